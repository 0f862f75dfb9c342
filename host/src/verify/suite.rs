//! The conformance suite, run inside the verifier's child process (see [`super`]).
//!
//! Everything goes through [`Connection::call`] with result checking on, so the plugin is
//! judged exactly as the host serves it. Each contract case gets its own scratch domain
//! (`verify-N`), brought to the case's situation with `domain.define`, `domain.start` and
//! `domain.suspend`, observed with `domain.info`, and removed afterwards.

use std::{path::Path, sync::Arc};

use capvirt_plugin_api::{ErrorKind, Value};

use super::{did_you_mean, CapabilityStatus, Event};
use crate::{
    error::CallError,
    host::{Connection, Host, HostConfig},
    plugins::PluginInfo,
    policy::Policy,
    registry::{
        contract::{error_code_word, Case, DomainCondition, Expect, Given, ResultCheck},
        model::StringFormat,
        Capability, Registry, Stage, Ty, TypeBody, TypeTable,
    },
};

/// What the child was asked to do.
pub struct SuiteOptions<'a> {
    /// The private directory holding the plugin's copy.
    pub plugin_dir: &'a Path,
    pub uri: Option<String>,
    /// The scratch domains' spec (its `name` is replaced per domain).
    pub spec: Option<Value>,
    /// Where scratch files (a state root for `qemu:///session`, sample paths) may go.
    pub scratch: &'a Path,
    /// The host settings to verify under (the CLI's); the plugin directory, the policy (every
    /// experimental capability enabled) and result checking (on) are the verifier's.
    pub base: HostConfig,
}

/// Runs the whole suite, reporting every step to `emit`.
pub fn run(registry: Arc<Registry>, options: &SuiteOptions<'_>, emit: &mut dyn FnMut(Event)) {
    // Every experimental capability is enabled: the verifier checks all the plugin declares.
    let enabled = registry
        .capabilities()
        .iter()
        .filter(|c| c.stage() == Stage::Experimental)
        .map(|c| c.id().to_string())
        .collect();
    let config = HostConfig {
        plugin_dirs: vec![options.plugin_dir.to_path_buf()],
        policy: Policy { enabled, access: options.base.policy.access.clone() },
        check_results: true,
        ..options.base.clone()
    };
    let host = Host::with_registry(config, Arc::clone(&registry));
    if let Some(refused) = host.plugins().refused.first() {
        if let Some(info) = &refused.manifest {
            emit(plugin_event(info));
            classify(&registry, info, emit);
        }
        emit(Event::Refused { reason: refused.reason.clone() });
        emit(Event::Done);
        return;
    }
    let Some(plugin) = host.plugins().loaded.first().cloned() else {
        emit(Event::Refused { reason: "no plugin was loaded from the file".into() });
        emit(Event::Done);
        return;
    };
    let info = &plugin.info;
    emit(plugin_event(info));
    classify(&registry, info, emit);

    let uri = options
        .uri
        .clone()
        .unwrap_or_else(|| default_uri(info.schemes.first().map_or("", String::as_str), options.scratch));
    emit(Event::Uri { uri: uri.clone() });
    emit(Event::Start { capability: "(plugin)".into(), clause: "connect".into() });
    let conn = match host.connect(&uri, false) {
        Ok(conn) => conn,
        Err(error) => {
            emit(check("(plugin)", "connect", Err(format!("cannot connect to {uri}: {error}"))));
            emit(Event::Done);
            return;
        }
    };
    let scheme = info.schemes.first().cloned().unwrap_or_default();
    let spec = options.spec.clone().unwrap_or_else(|| default_spec(&scheme));
    let mut session = Session {
        conn: &conn,
        registry: &registry,
        spec,
        next: 0,
        created: Default::default(),
        scratch: options.scratch,
        emit,
    };
    for capability in registry.capabilities() {
        if !plugin.implements(capability.index) {
            continue;
        }
        let mut ran = false;
        for case in &capability.contract.cases {
            ran |= session.case(capability, case);
        }
        if !ran {
            session.smoke(capability);
        }
        if !capability.contract.monotonic.is_empty() {
            session.monotonic(capability);
        }
    }
    emit(Event::Done);
}

fn plugin_event(info: &PluginInfo) -> Event {
    Event::Plugin {
        name: info.name.clone(),
        vendor: info.vendor.clone(),
        version: info.version.clone(),
        registry_version: info.registry_version.clone(),
        schemes: info.schemes.clone(),
    }
}

/// Reports how the registry treats each declared capability. An id the registry does not know
/// is a failure (`unknown`, with a did-you-mean), unless the plugin targets a newer registry,
/// which may have it (`not callable`).
fn classify(registry: &Registry, info: &PluginInfo, emit: &mut dyn FnMut(Event)) {
    let newer_registry = semver::Version::parse(&info.registry_version).is_ok_and(|v| &v > registry.version());
    for (id, version) in &info.capabilities {
        let (status, detail) = match registry.lookup(id) {
            None => {
                let hint = did_you_mean(id, registry.capabilities().iter().map(Capability::id))
                    .map(|k| format!("; did you mean `{k}`?"))
                    .unwrap_or_default();
                if newer_registry {
                    let detail = format!(
                        "not in registry {}; the plugin targets newer registry {}{hint}",
                        registry.version(),
                        info.registry_version
                    );
                    (CapabilityStatus::NotCallable, detail)
                } else {
                    (CapabilityStatus::Unknown, format!("not in registry {}{hint}", registry.version()))
                }
            }
            Some(cap) if cap.stage().is_forbidden() => {
                (CapabilityStatus::Rejected, format!("the registry marks it {}", cap.stage()))
            }
            Some(cap) if *version > cap.doc.version || *version == 0 => (
                CapabilityStatus::NewerContract,
                format!("declares contract version {version}, the registry has {}", cap.doc.version),
            ),
            Some(cap) if !cap.stage().is_callable() => {
                (CapabilityStatus::NotCallable, format!("the registry has it as a {}", cap.stage()))
            }
            Some(cap) => (
                CapabilityStatus::Accepted,
                format!("{} since {}", cap.stage(), cap.doc.since.as_ref().map_or("-".into(), ToString::to_string)),
            ),
        };
        emit(Event::Capability { id: id.clone(), version: *version, status, detail });
    }
}

/// The URI a plugin is verified on when none is given: a private one per scheme — an
/// in-memory test host, else the `session` instance on a private state root, the convention
/// of drivers that keep state (`capvirt_plugin_api::state`); other drivers take `--uri`.
pub fn default_uri(scheme: &str, scratch: &Path) -> String {
    match scheme {
        "test" => format!("test:///capvirt-verify-{}", std::process::id()),
        other => format!("{other}:///session?root={}", percent_encode(&scratch.join(other).display().to_string())),
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// The scratch domains' spec when none is given: small, diskless, for any scheme.
pub fn default_spec(scheme: &str) -> Value {
    let memory: u64 = if scheme == "qemu" { 64 } else { 128 };
    Value::record([("name", Value::from("verify")), ("memory_mib", Value::UInt(memory)), ("vcpus", Value::UInt(1))])
}

fn check(capability: &str, clause: &str, outcome: Result<String, String>) -> Event {
    let (passed, detail) = match outcome {
        Ok(detail) => (true, detail),
        Err(detail) => (false, detail),
    };
    Event::Check { capability: capability.into(), clause: clause.into(), passed, skipped: false, detail }
}

fn skipped(capability: &str, clause: &str, why: String) -> Event {
    Event::Check { capability: capability.into(), clause: clause.into(), passed: true, skipped: true, detail: why }
}

/// The outcome word of a call (`ok`, an error kind, or how the host refused it).
fn outcome_word(result: &Result<Value, CallError>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(CallError::Driver { error, .. }) => kind_word(error.kind).into(),
        Err(CallError::InvalidArguments { .. }) => "invalid-argument".into(),
        Err(CallError::MalformedResult { .. }) => "malformed-result".into(),
        Err(CallError::NotImplemented { .. }) => "not-implemented".into(),
        // The host refused it; `describe` adds the reason.
        Err(_) => "denied".into(),
    }
}

fn kind_word(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::NotFound => "not-found",
        ErrorKind::InvalidArgument => "invalid-argument",
        ErrorKind::InvalidState => "invalid-state",
        ErrorKind::Unsupported => "unsupported",
        ErrorKind::DriverFailure => "driver-failure",
        ErrorKind::Timeout => "timeout",
        ErrorKind::Internal => "internal",
        // A code from a later plugin-api: never what a contract expects (`describe` adds the code).
        _ => "unknown-kind",
    }
}

fn describe(result: &Result<Value, CallError>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(error) => format!("{} ({error})", outcome_word(result)),
    }
}

struct Session<'a, 'e> {
    conn: &'a Connection,
    registry: &'a Registry,
    spec: Value,
    next: usize,
    /// Names this run defined (only these are ever destroyed or undefined).
    created: std::collections::HashSet<String>,
    scratch: &'a Path,
    emit: &'e mut dyn FnMut(Event),
}

impl Session<'_, '_> {
    /// `capvirt-verify-PID-N`: never the name of a domain the verifier did not create (on a
    /// shared `--uri`, a domain of that name already defined fails the case, untouched).
    fn fresh_name(&mut self) -> String {
        self.next += 1;
        format!("capvirt-verify-{}-{}", std::process::id(), self.next)
    }

    fn spec_named(&self, name: &str) -> Value {
        let mut spec = self.spec.clone();
        spec.set("name", Value::string(name));
        spec
    }

    /// A spec no driver may accept although it passes the registry's types.
    fn invalid_spec(&self, name: &str) -> Value {
        let mut spec = self.spec_named(name);
        let bad = Value::record([("kind", Value::from("usb-disk")), ("id", Value::from("verifybad0"))]);
        let mut devices: Vec<Value> =
            spec.get("devices").and_then(Value::as_list).map(<[Value]>::to_vec).unwrap_or_default();
        devices.push(bad);
        spec.set("devices", Value::list(devices));
        spec
    }

    fn start(&mut self, capability: &str, clause: &str) {
        (self.emit)(Event::Start { capability: capability.into(), clause: clause.into() });
    }

    fn call(&self, id: &str, args: Value) -> Result<Value, CallError> {
        self.conn.call(id, args)
    }

    /// Brings a fresh domain `name` into `condition`.
    fn prepare(&mut self, name: &str, condition: DomainCondition) -> Result<(), String> {
        // Names are per process already; a situation that defines the domain also makes sure
        // it is not someone else's (`undefined` ones do not observe: `domain.info` may be what
        // is under test).
        if condition != DomainCondition::Undefined && self.can("domain.info") {
            match self.observe(name)?.as_str() {
                "undefined" => {}
                state => return Err(format!("scratch domain name {name} is already in use ({state}); left alone")),
            }
        }
        self.created.insert(name.to_string());
        if condition == DomainCondition::Undefined {
            return Ok(());
        }
        let mut steps = vec![("domain.define", Value::record([("spec", self.spec_named(name))]))];
        if matches!(condition, DomainCondition::Running | DomainCondition::Paused) {
            steps.push(("domain.start", Value::record([("domain", Value::string(name))])));
        }
        if condition == DomainCondition::Paused {
            steps.push(("domain.suspend", Value::record([("domain", Value::string(name))])));
        }
        for (id, args) in steps {
            self.call(id, args).map_err(|e| format!("setup for `{condition}`: {id} failed: {}", describe(&Err(e))))?;
        }
        Ok(())
    }

    /// The domain's state as `domain.info` reports it (`undefined` when not found).
    fn observe(&self, name: &str) -> Result<String, String> {
        match self.call("domain.info", Value::record([("domain", Value::string(name))])) {
            Ok(info) => Ok(info.get("state").and_then(Value::as_str).unwrap_or("?").to_string()),
            Err(CallError::Driver { error, .. }) if error.kind == ErrorKind::NotFound => Ok("undefined".into()),
            Err(e) => Err(format!("domain.info to observe the state failed: {}", describe(&Err(e)))),
        }
    }

    /// Removes domain `name`, whatever its state.
    fn cleanup(&mut self, name: &str) {
        let domain = || Value::record([("domain", Value::string(name))]);
        if !self.created.remove(name) || !self.can("domain.info") {
            return;
        }
        if matches!(self.observe(name).as_deref(), Ok("undefined")) {
            return;
        }
        let _ = self.call("domain.destroy", domain());
        let _ = self.call("domain.undefine", domain());
        if let Ok(state) = self.observe(name) {
            if state != "undefined" {
                (self.emit)(check(
                    "(cleanup)",
                    &format!("scratch domain {name}"),
                    Err(format!("still defined ({state}) after domain.destroy and domain.undefine")),
                ));
            }
        }
    }

    /// Arguments for `capability`: domain names and specs generated, `with` added, other
    /// required parameters sampled from their types.
    fn arguments(&self, capability: &Capability, name: &str, given: Given, with: &[(String, Value)]) -> Value {
        let types = &self.registry.types;
        let mut args = Value::record_empty();
        for param in &capability.params {
            if let Some((_, value)) = with.iter().find(|(n, _)| n == &param.name) {
                args.set(param.name.clone(), value.clone());
                continue;
            }
            match types.type_name(&param.ty).as_str() {
                "DomainName" => args.set(param.name.clone(), Value::string(name)),
                "DomainSpec" if given == Given::InvalidSpec => args.set(param.name.clone(), self.invalid_spec(name)),
                "DomainSpec" => args.set(param.name.clone(), self.spec_named(name)),
                _ if param.required => args.set(param.name.clone(), sample(types, &param.ty, self.scratch)),
                _ => {}
            }
        }
        args
    }

    /// Whether the plugin implements `id`.
    fn can(&self, id: &str) -> bool {
        self.registry.lookup(id).is_some_and(|c| self.conn.plugin().is_some_and(|p| p.implements(c.index)))
    }

    /// What the plugin lacks to set up `condition` and observe the state afterwards.
    fn missing_for(&self, condition: DomainCondition, observe: bool) -> Vec<&'static str> {
        let mut needed = Vec::new();
        if condition != DomainCondition::Undefined {
            needed.push("domain.define");
        }
        if matches!(condition, DomainCondition::Running | DomainCondition::Paused) {
            needed.push("domain.start");
        }
        if condition == DomainCondition::Paused {
            needed.push("domain.suspend");
        }
        if observe {
            needed.push("domain.info");
        }
        needed.into_iter().filter(|id| !self.can(id)).collect()
    }

    /// One contract case on a fresh scratch domain; `false` when skipped.
    fn case(&mut self, capability: &Capability, case: &Case) -> bool {
        let id = capability.id();
        let clause = case.clause();
        let observes = case.then.is_some() || case.result.is_some() || matches!(case.expect, Expect::Error(_));
        let missing = self.missing_for(case.given.before(), observes);
        if !missing.is_empty() {
            (self.emit)(skipped(id, &clause, format!("skipped: the plugin does not implement {}", missing.join(", "))));
            return false;
        }
        let name = self.fresh_name();
        let target = if case.given == Given::UnknownDomain { format!("{name}-missing") } else { name.clone() };
        self.start(id, &clause);
        let outcome = self.run_case(capability, case, &name, &target);
        (self.emit)(check(id, &clause, outcome));
        self.cleanup(&name);
        true
    }

    fn run_case(&mut self, capability: &Capability, case: &Case, name: &str, target: &str) -> Result<String, String> {
        self.prepare(name, case.given.before())?;
        let args = self.arguments(capability, target, case.given, &case.with);
        let result = self.call(capability.id(), args);
        let got = outcome_word(&result);
        let expected = case.expect.to_string();
        if got != expected {
            return Err(format!("expected {expected}, got {}", describe(&result)));
        }
        if let (Some(check), Ok(value)) = (case.result, &result) {
            let state = self.observe(target).unwrap_or_default();
            result_shows(check, value, target, &state)?;
        }
        let then = match (case.then, case.expect) {
            (Some(then), _) => Some(then),
            (None, Expect::Error(_)) => Some(case.given.before()),
            (None, Expect::Ok) => None,
        };
        if let Some(then) = then {
            let state = self.observe(target)?;
            if state != then.as_str() {
                return Err(format!("{} as expected, but the domain is then `{state}`, not `{then}`", got));
            }
        }
        Ok(match then {
            Some(then) => format!("{got}, then {then}"),
            None => got,
        })
    }

    /// Calls a capability without a contract once, on a running scratch domain, with sampled
    /// arguments: it must answer with a result or an error it declares, not `unsupported`
    /// (unless declared), a malformed result or an internal error.
    fn smoke(&mut self, capability: &Capability) {
        let id = capability.id();
        let clause = "called once (no runnable contract case)";
        let name = self.fresh_name();
        // Without the lifecycle capabilities, the call names a domain that does not exist.
        let given = if self.missing_for(DomainCondition::Running, false).is_empty() {
            Given::Domain(DomainCondition::Running)
        } else {
            Given::UnknownDomain
        };
        self.start(id, clause);
        let outcome = (|| {
            self.prepare(&name, given.before())?;
            let args = self.arguments(capability, &name, given, &[]);
            let result = self.call(id, args);
            let word = outcome_word(&result);
            let declared: Vec<&str> = capability.doc.errors.iter().map(|c| error_code_word(*c)).collect();
            if word == "ok" || declared.contains(&word.as_str()) {
                Ok(word)
            } else {
                Err(format!(
                    "answered {} (declared errors: {})",
                    describe(&result),
                    if declared.is_empty() { "none".into() } else { declared.join(", ") }
                ))
            }
        })();
        (self.emit)(check(id, clause, outcome));
        self.cleanup(&name);
    }

    /// Two calls in a row on a running domain: the `monotonic` fields never decrease.
    fn monotonic(&mut self, capability: &Capability) {
        let id = capability.id();
        let clause = format!("monotonic ({})", capability.contract.monotonic.join(", "));
        let missing = self.missing_for(DomainCondition::Running, false);
        if !missing.is_empty() {
            (self.emit)(skipped(id, &clause, format!("skipped: the plugin does not implement {}", missing.join(", "))));
            return;
        }
        let name = self.fresh_name();
        self.start(id, &clause);
        let outcome = (|| {
            self.prepare(&name, DomainCondition::Running)?;
            let args = self.arguments(capability, &name, Given::Domain(DomainCondition::Running), &[]);
            let first = self.call(id, args.clone()).map_err(|e| format!("first call: {}", describe(&Err(e))))?;
            let second = self.call(id, args).map_err(|e| format!("second call: {}", describe(&Err(e))))?;
            for field in &capability.contract.monotonic {
                let read = |v: &Value| v.get(field).and_then(Value::as_u64);
                match (read(&first), read(&second)) {
                    (Some(a), Some(b)) if b < a => return Err(format!("`{field}` decreased from {a} to {b}")),
                    (Some(_), Some(_)) => {}
                    _ => return Err(format!("`{field}` missing from the result")),
                }
            }
            Ok("never decreased over two calls".to_string())
        })();
        (self.emit)(check(id, &clause, outcome));
        self.cleanup(&name);
    }
}

/// Checks what a result shows about domain `name`, whose state is now `state`.
fn result_shows(check: ResultCheck, value: &Value, name: &str, state: &str) -> Result<(), String> {
    let describes = |v: &Value| v.get("name").and_then(Value::as_str) == Some(name);
    let state_of = |v: &Value| v.get("state").and_then(Value::as_str).unwrap_or("?").to_string();
    match check {
        ResultCheck::DescribesDomain => {
            if !describes(value) {
                return Err(format!("the result does not describe `{name}`"));
            }
            if state_of(value) != state {
                return Err(format!("the result says `{}`, domain.info then says `{state}`", state_of(value)));
            }
        }
        ResultCheck::ListsDomain => {
            let entry = value.as_list().and_then(|items| items.iter().find(|v| describes(v)));
            match entry {
                None => return Err(format!("the list does not include `{name}`")),
                Some(entry) if state_of(entry) != state => {
                    return Err(format!("the list says `{name}` is `{}`, domain.info says `{state}`", state_of(entry)))
                }
                Some(_) => {}
            }
        }
        ResultCheck::OmitsDomain => {
            if value.as_list().is_some_and(|items| items.iter().any(describes)) {
                return Err(format!("the list includes `{name}`"));
            }
        }
    }
    Ok(())
}

/// A value of type `ty` that passes the registry's checks, for parameters no contract fills.
fn sample(types: &TypeTable, ty: &Ty, scratch: &Path) -> Value {
    match ty {
        Ty::Unit => Value::Unit,
        Ty::Bool => Value::Bool(false),
        Ty::Int => Value::Int(0),
        Ty::UInt => Value::UInt(1),
        Ty::Float => Value::Float(0.0),
        Ty::Str => Value::from("verify"),
        Ty::Bytes => Value::from(Vec::<u8>::new()),
        Ty::List(_) => Value::list(Vec::<Value>::new()),
        Ty::Named(id) => match &types.get(*id).body {
            TypeBody::Scalar { base, format, bounds, .. } => match format {
                Some(StringFormat::Name) => Value::from("verifysample0"),
                Some(StringFormat::Path) => Value::string(&scratch.join("verify-sample").display().to_string()),
                Some(StringFormat::Uri) => Value::from("test:///capvirt-verify-elsewhere"),
                None => match base {
                    Ty::UInt => Value::UInt(bounds.min.map_or(1, |m| m.max(0).unsigned_abs()).max(1)),
                    Ty::Int => Value::Int(bounds.min.unwrap_or(0)),
                    other => sample(types, other, scratch),
                },
            },
            TypeBody::Enum { values } => values.first().map_or(Value::Unit, |v| Value::string(v)),
            TypeBody::Record { fields } => Value::record(
                fields.iter().filter(|f| f.required).map(|f| (f.name.clone(), sample(types, &f.ty, scratch))),
            ),
        },
    }
}
