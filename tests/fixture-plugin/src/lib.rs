//! A test-only plugin whose manifest and behaviour are chosen by `CAPVIRT_FIXTURE_MODE` when
//! it is loaded:
//!
//! - `panic` (default): serves `fixture://`; `domain.info` panics (but for domain `segv` the
//!   process dies of SIGSEGV, for `abort` it aborts, for `hang` the call never returns — the
//!   isolation tests), `domain.list` works, `host.info` returns a result of the wrong shape;
//! - `rejected`: declares the rejected `domain.monitor-command` (must be refused);
//! - `unknown`: declares a capability the registry does not know (must be ignored);
//! - `major`: built against registry 2.0.0 (must be refused);
//! - `connect-panic`: panics while connecting;
//! - `manifest-panic`: panics while describing itself (must be refused with the panic message);
//! - `liar`: a small in-memory hypervisor that lies where `capvirt plugin verify` must catch it:
//!   declares `domain.reboot` without implementing it, misspells `domain.suspnd`, returns a
//!   malformed `host.info`, and answers `driver-failure` instead of `invalid-state` when asked to
//!   resume a running domain; everything else follows the contracts;
//! - `abort`: like `liar`, but aborts the process inside `invoke` of `domain.list`;
//! - `later-kind`: `domain.info` fails with error code 4242, one a later plugin-api might add
//!   (the host must carry it as a driver failure naming the code, in process and isolated);
//! - `newer`: built for registry 1.9.0, declares `domain.hibernate` (unknown here) and
//!   contract version 2 of `domain.info`;
//! - `newer-fields`: built for registry 1.2.0; its `domain.info` result (for any domain) carries
//!   fields this host's registry does not declare, at the top and inside an interface, as a
//!   plugin for a newer minor may (the host drops them); for domain `bad` `vcpus` is also a
//!   string (malformed for any minor);
//! - `extra-fields`: the same results, built for registry 1.1.0 (the host refuses them).

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard},
};

use capvirt_plugin_api::{
    prelude::*,
    types::{domain_summary, DomainInfo, DomainSpec, DomainState, InterfaceInfo, InterfaceKind},
};

pub struct Fixture;

fn mode() -> String {
    std::env::var("CAPVIRT_FIXTURE_MODE").unwrap_or_else(|_| "panic".into())
}

impl Plugin for Fixture {
    fn manifest() -> Manifest {
        let base = |registry: &str| {
            Manifest::new("fixture", "capvirt tests", "0.1.0", registry)
                .scheme("fixture")
                .description("Misbehaving plugin for tests.")
        };
        match mode().as_str() {
            "manifest-panic" => panic!("fixture cannot describe itself"),
            "rejected" => base("1.0.0").capabilities(["domain.list", "domain.monitor-command"]),
            "unknown" => base("1.0.0").capabilities(["domain.list", "domain.teleport"]),
            "major" => base("2.0.0").capabilities(["domain.list"]),
            "liar" | "abort" => base("1.0.0").capabilities(LIAR_CAPABILITIES.iter().copied()),
            // Built for a newer registry minor: a capability this host does not know yet, and
            // a newer contract version of one it does.
            "newer" => base("1.9.0").capabilities(["domain.list", "domain.hibernate"]).capability("domain.info", 2),
            "newer-fields" => base("1.2.0").capabilities(["domain.list", "domain.info"]),
            "extra-fields" => base("1.1.0").capabilities(["domain.list", "domain.info"]),
            _ => base("1.0.0").capabilities(["domain.list", "domain.info", "host.info"]),
        }
    }

    fn connect(_uri: &str, _options: &Value) -> Result<Self, PluginError> {
        if mode() == "connect-panic" {
            panic!("fixture refuses to connect");
        }
        Ok(Fixture)
    }

    fn invoke(&self, capability: &str, args: &Args<'_>, _ctx: &Context<'_>) -> Result<Value, PluginError> {
        match mode().as_str() {
            "liar" => return liar(capability, args),
            "abort" if capability == "domain.list" => std::process::abort(),
            "abort" => return liar(capability, args),
            "later-kind" if capability == "domain.info" => {
                return Err(PluginError::new(ErrorKind::from_code(4242), "the domain is hibernating"))
            }
            "newer-fields" | "extra-fields" if capability == "domain.info" => {
                return Ok(info_with_newer_fields(args.str("domain")?));
            }
            _ => {}
        }
        match capability {
            "domain.list" => Ok(Value::list(Vec::<Value>::new())),
            "domain.info" => crash(args.str("domain")?),
            // Declared type is HostInfo; a bare string is malformed.
            "host.info" => Ok(Value::from("not a record")),
            other => Err(PluginError::unsupported(other.to_string())),
        }
    }
}

const LIAR_CAPABILITIES: &[&str] = &[
    "host.info",
    "domain.list",
    "domain.info",
    "domain.define",
    "domain.undefine",
    "domain.start",
    "domain.destroy",
    "domain.suspend",
    "domain.suspnd",
    "domain.resume",
    "domain.reboot",
];

/// The liar's domains (one table per process: the verifier runs each plugin in its own).
static DOMAINS: Mutex<Table> = Mutex::new(BTreeMap::new());

fn domains() -> Result<MutexGuard<'static, Table>, PluginError> {
    DOMAINS.lock().map_err(|_| PluginError::internal("fixture state poisoned"))
}

type Table = BTreeMap<String, (DomainSpec, DomainState)>;

fn entry<'t>(table: &'t mut Table, name: &str) -> Result<&'t mut (DomainSpec, DomainState), PluginError> {
    table.get_mut(name).ok_or_else(|| PluginError::not_found(format!("no domain '{name}'")))
}

fn liar(capability: &str, args: &Args<'_>) -> Result<Value, PluginError> {
    let mut table = domains()?;
    let transition = |state: &mut DomainState, from: DomainState, to: DomainState| {
        if *state != from {
            return Err(PluginError::invalid_state(format!("domain is {}", state.as_str())));
        }
        *state = to;
        Ok(Value::Unit)
    };
    match capability {
        // Lie: a bare string where a HostInfo record is declared.
        "host.info" => Ok(Value::from("not a record")),
        "domain.list" => {
            let all = args.bool_or("all", false)?;
            Ok(Value::list(
                table
                    .values()
                    .filter(|(_, state)| all || *state != DomainState::ShutOff)
                    .map(|(spec, state)| domain_summary(spec.name.clone(), *state)),
            ))
        }
        "domain.info" => {
            let (spec, state) = entry(&mut table, args.str("domain")?)?;
            let mut info = DomainInfo::new(spec.name.clone(), *state);
            info.vcpus = spec.vcpus;
            info.memory_kib = spec.memory_mib.saturating_mul(1024);
            info.max_memory_kib = info.memory_kib;
            Ok(info.into_value())
        }
        "domain.define" => {
            let spec = DomainSpec::from_value(args.get("spec")?)?;
            for device in &spec.devices {
                device.disk_backing()?;
            }
            match table.get_mut(&spec.name) {
                Some((_, state)) if *state != DomainState::ShutOff => {
                    Err(PluginError::invalid_state("domain is active"))
                }
                Some(entry) => {
                    entry.0 = spec;
                    Ok(Value::Unit)
                }
                None => {
                    table.insert(spec.name.clone(), (spec, DomainState::ShutOff));
                    Ok(Value::Unit)
                }
            }
        }
        "domain.undefine" => {
            let name = args.str("domain")?;
            let (_, state) = entry(&mut table, name)?;
            if *state != DomainState::ShutOff {
                return Err(PluginError::invalid_state("domain is active"));
            }
            table.remove(name);
            Ok(Value::Unit)
        }
        "domain.start" => {
            transition(&mut entry(&mut table, args.str("domain")?)?.1, DomainState::ShutOff, DomainState::Running)
        }
        "domain.destroy" => {
            let (_, state) = entry(&mut table, args.str("domain")?)?;
            if *state == DomainState::ShutOff {
                return Err(PluginError::invalid_state("domain is not running"));
            }
            *state = DomainState::ShutOff;
            Ok(Value::Unit)
        }
        "domain.suspend" => {
            transition(&mut entry(&mut table, args.str("domain")?)?.1, DomainState::Running, DomainState::Paused)
        }
        "domain.resume" => {
            let (_, state) = entry(&mut table, args.str("domain")?)?;
            match *state {
                // Lie: the contract says invalid-state.
                DomainState::Running => Err(PluginError::driver_failure("resume failed")),
                _ => transition(state, DomainState::Paused, DomainState::Running),
            }
        }
        // Lie: declared in the manifest, never implemented.
        other => Err(PluginError::unsupported(format!("fixture does not implement `{other}`"))),
    }
}

capvirt_plugin_api::export_plugin!(Fixture);

/// A valid `DomainInfo` plus fields a later registry minor might add: `balloon_kib` at the top
/// and `mtu` in its interface.
fn info_with_newer_fields(domain: &str) -> Value {
    let mut info = DomainInfo::new(domain, DomainState::Running);
    info.vcpus = 2;
    info.interfaces = vec![InterfaceInfo::new("net0", InterfaceKind::User, "52:54:00:12:34:56")];
    let mut value = info.into_value();
    value.set("balloon_kib", Value::UInt(4096));
    if domain == "bad" {
        // Wrong for any registry minor.
        value.set("vcpus", "two");
    }
    if let Some(Value::List(interfaces)) = value.get("interfaces").cloned() {
        let mut interfaces: Vec<Value> = interfaces.into_iter().collect();
        for interface in &mut interfaces {
            interface.set("mtu", Value::UInt(1500));
        }
        value.set("interfaces", Value::list(interfaces));
    }
    value
}

/// Dies or hangs as the domain's name says (see the crate docs); otherwise panics.
fn crash(domain: &str) -> Result<Value, PluginError> {
    match domain {
        "segv" => {
            // Rust's runtime catches the first SIGSEGV (its stack-overflow check), finds no
            // guard-page fault, restores the default action and returns; the second kills.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
            Err(PluginError::internal("SIGSEGV did not end the process"))
        }
        "abort" => std::process::abort(),
        "hang" => loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        },
        _ => panic!("fixture panics in domain.info"),
    }
}
