//! The host: a registry, the loaded plugins, the policy, and the connections opened through
//! them. [`Connection::call`] is the one dispatch path:
//! registry → policy → validation → driver → audit.

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Instant,
};

use capvirt_plugin_api::{PluginError, Value};

use crate::{
    audit::{
        redact::{self, Redacted},
        AuditLog, AuditSetting, Entry, Event,
    },
    caller::Caller,
    driver::{CallObserver, DriverHandle, NoObserver},
    error::{CallError, HostError},
    plugins::{Discovery, LoadedPlugin, PluginSet},
    policy::{self, Grant, Policy},
    registry::{source, Capability, CapabilityIndex, Registry, ValidationError},
    validate::{self, ValidArgs},
};

pub use crate::connection::Connection;

/// The URI used when none is given and `CAPVIRT_DEFAULT_URI` is unset.
pub const DEFAULT_URI: &str = "test:///default";

/// Which registry a host enforces.
#[derive(Debug, Clone, Default)]
pub enum RegistrySource {
    /// The reviewed registry compiled into this binary.
    #[default]
    Embedded,
    /// A directory laid out like `proposals/` (maintainers testing a change).
    Dir(PathBuf),
}

/// How to set a host up.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub registry: RegistrySource,
    /// Directories searched for plugins, in order (see [`crate::plugins::search_path`]).
    pub plugin_dirs: Vec<PathBuf>,
    pub policy: Policy,
    /// Check every driver result against its declared type (on by default: a driver bug
    /// becomes a `malformed result` error naming the field instead of reaching users).
    pub check_results: bool,
    /// SHA-256 pins of plugin files; a pinned file that changed is refused.
    pub pins: crate::plugins::Pins,
    /// Where audit records go; off by default for library users, always a log in the CLI.
    pub audit: AuditSetting,
    /// Where drivers may open images (the system config's `[images] allow`; empty: anywhere
    /// but their deny list). Passed to every driver as the `image_allow` connect option.
    pub image_allow: Vec<PathBuf>,
    /// The account `qemu:///system` QEMUs run as (the system config's `[qemu] user`; `None`:
    /// the driver's default). Passed to every driver as the `qemu_user` connect option.
    pub qemu_user: Option<String>,
    /// Run each connection's driver in a child process (`None`: in this process).
    pub isolation: Option<crate::isolate::Isolation>,
    /// The directory of the plugin manifest cache (`crate::plugin_cache`), which lets
    /// [`Host::connect`] load only the plugin serving the URI; `None` (the default for library
    /// users): every plugin is loaded on first use.
    pub plugin_cache: Option<PathBuf>,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            registry: RegistrySource::default(),
            plugin_dirs: Vec::new(),
            policy: Policy::default(),
            pins: Default::default(),
            audit: AuditSetting::default(),
            check_results: true,
            image_allow: Vec::new(),
            qemu_user: None,
            isolation: None,
            plugin_cache: None,
        }
    }
}

/// A configured host.
pub struct Host {
    registry: Arc<Registry>,
    discovery: Discovery,
    /// Every plugin on the search path, loaded on first need (a connection served from the
    /// manifest cache loads only its own).
    plugins: OnceLock<PluginSet>,
    policy: Arc<Policy>,
    check_results: bool,
    audit: Option<Arc<AuditLog>>,
    image_allow: Vec<PathBuf>,
    qemu_user: Option<String>,
    isolation: Option<crate::isolate::Isolation>,
}

impl Host {
    /// Loads the registry; plugins are loaded when first needed.
    pub fn new(config: HostConfig) -> Result<Host, HostError> {
        let registry = match &config.registry {
            RegistrySource::Embedded => Registry::embedded()?,
            RegistrySource::Dir(dir) => Registry::from_sources(&source::read_dir(dir)?)?,
        };
        Ok(Host::with_registry(config, Arc::new(registry)))
    }

    /// A host enforcing an already built registry (`config.registry` only says whether it is
    /// the reviewed one: an unreviewed one keeps the reviewed `mutates` flags).
    pub fn with_registry(config: HostConfig, registry: Arc<Registry>) -> Host {
        let registry = match &config.registry {
            RegistrySource::Embedded => registry,
            RegistrySource::Dir(_) => {
                let mut hardened = Registry::clone(&registry);
                hardened.keep_reviewed_mutates(Registry::embedded().ok().as_ref());
                Arc::new(hardened)
            }
        };
        let discovery = Discovery { dirs: config.plugin_dirs, pins: config.pins, cache_dir: config.plugin_cache };
        let audit = match config.audit {
            AuditSetting::Off => None,
            AuditSetting::Log { path, fail_open } => Some(Arc::new(AuditLog::new(path, fail_open))),
        };
        Host {
            registry,
            discovery,
            plugins: OnceLock::new(),
            policy: Arc::new(config.policy),
            check_results: config.check_results,
            audit,
            image_allow: config.image_allow,
            qemu_user: config.qemu_user,
            isolation: config.isolation,
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Every plugin on the search path, loaded or refused (loads them on first use).
    pub fn plugins(&self) -> &PluginSet {
        self.plugins.get_or_init(|| {
            let plugins = self.discovery.discover_all(&self.registry);
            for warning in &plugins.warnings {
                tracing::warn!(target: "capvirt::plugins", "{warning}");
            }
            plugins
        })
    }

    /// The plugin serving `scheme`: from the manifest cache when it can answer (only that
    /// plugin is loaded), else from every plugin on the search path.
    fn plugin_for(&self, uri: &str, scheme: &str) -> Result<Arc<LoadedPlugin>, HostError> {
        if self.plugins.get().is_none() {
            if let Some((plugin, warnings)) = self.discovery.cached_plugin(&self.registry, scheme) {
                for warning in &warnings {
                    tracing::warn!(target: "capvirt::plugins", "{warning}");
                }
                return Ok(Arc::new(plugin));
            }
        }
        let plugins = self.plugins();
        plugins.for_scheme(scheme).cloned().ok_or_else(|| {
            let refused: Vec<String> = plugins
                .refused
                .iter()
                .map(|r| {
                    format!("{}: {}", r.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(), r.reason)
                })
                .collect();
            let hint = if plugins.loaded.is_empty() && refused.is_empty() {
                "no plugins found; see `capvirt plugins`".to_string()
            } else if refused.is_empty() {
                let schemes: Vec<&str> =
                    plugins.loaded.iter().flat_map(|p| p.info.schemes.iter().map(String::as_str)).collect();
                format!("served schemes: {}", schemes.join(", "))
            } else {
                format!("refused plugins: {}", refused.join("; "))
            };
            HostError::NoDriver { uri: uri.to_string(), scheme: scheme.to_string(), hint }
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The audit log, when this host audits.
    pub fn audit_log(&self) -> Option<&AuditLog> {
        self.audit.as_deref()
    }

    /// Opens a connection to `uri` through the plugin serving its scheme, for this process's
    /// caller ([`Caller::current`]).
    pub fn connect(&self, uri: &str, readonly: bool) -> Result<Connection, HostError> {
        self.connect_as(uri, readonly, Caller::current().clone())
    }

    /// Opens a connection whose calls are made on behalf of `caller` (a daemon passes its
    /// peer's credentials): the access policy decides on, and audit records carry, its ids.
    pub fn connect_as(&self, uri: &str, readonly: bool, caller: Caller) -> Result<Connection, HostError> {
        // `DRIVER+unix://…`: the daemon runs the dispatch path; no local plugin is involved.
        if let Some(target) = crate::remote::RemoteTarget::parse(uri)? {
            let registry = Arc::clone(&self.registry);
            return Ok(Connection::Remote(Box::new(crate::remote::RemoteConnection::connect(
                uri, target, readonly, registry,
            )?)));
        }
        let scheme = uri_scheme(uri)?;
        let plugin = self.plugin_for(uri, scheme)?;
        let connect_error = |error| HostError::Connect { uri: uri.to_string(), error };
        let mut options = vec![("readonly", Value::Bool(readonly)), ("image_allow", self.image_allow_option())];
        if let Some(user) = &self.qemu_user {
            options.push(("qemu_user", Value::string(user)));
        }
        let options = Value::record(options);
        let driver = match &self.isolation {
            None => {
                let driver = (plugin.module.connect())(uri.into(), &options).into_result().map_err(connect_error)?;
                DriverHandle::new(driver)
            }
            Some(isolation) => {
                let pin = self.discovery.pins.get(&plugin.path).map(String::as_str);
                let driver = crate::isolate::IsolatedDriver::start(
                    &plugin.info.name,
                    &plugin.path,
                    pin,
                    uri,
                    options,
                    isolation,
                )
                .map_err(connect_error)?;
                DriverHandle::isolated(driver)
            }
        };
        Ok(Connection::Local(LocalConnection {
            uri: uri.to_string(),
            audit_uri: redact::cut(uri, redact::MAX_TEXT).into_owned(),
            readonly,
            plugin,
            driver,
            registry: Arc::clone(&self.registry),
            policy: Arc::clone(&self.policy),
            check_results: self.check_results,
            audit: self.audit.clone(),
            caller: Arc::new(caller),
            migrate: self.registry.lookup(crate::migration::MIGRATE).map(|c| c.index),
        }))
    }

    fn image_allow_option(&self) -> Value {
        Value::List(self.image_allow.iter().map(|p| Value::string(&p.to_string_lossy())).collect::<Vec<_>>().into())
    }
}

/// The scheme of a connection URI (`test` for `test:///default`).
pub fn uri_scheme(uri: &str) -> Result<&str, HostError> {
    crate::registry::types::check_format(crate::registry::model::StringFormat::Uri, uri)
        .map_err(|why| HostError::BadUri { uri: uri.to_string(), why })?;
    uri.split_once("://")
        .map(|(scheme, _)| scheme)
        .ok_or_else(|| HostError::BadUri { uri: uri.to_string(), why: "missing scheme".into() })
}

/// Whether `uri` names a host's system instance (`qemu:///system`, `container:///system`):
/// its audit log and policy come from root's config, never from the caller.
pub fn is_system_uri(uri: &str) -> bool {
    uri.split_once("://").is_some_and(|(_, rest)| {
        let path = rest.split(['?', '#']).next().unwrap_or_default();
        path == "/system" || path == "/system/"
    })
}

/// An open connection to an in-process driver. Calls may come from several threads.
pub struct LocalConnection {
    uri: String,
    /// The URI as audit records carry it (bounded).
    audit_uri: String,
    readonly: bool,
    plugin: Arc<LoadedPlugin>,
    driver: DriverHandle,
    registry: Arc<Registry>,
    policy: Arc<Policy>,
    check_results: bool,
    audit: Option<Arc<AuditLog>>,
    /// On whose behalf calls are made unless [`Connection::call_as`] names another caller.
    caller: Arc<Caller>,
    /// `domain.migrate`, whose remote destinations the host reaches itself (`crate::migration`).
    migrate: Option<CapabilityIndex>,
}

impl LocalConnection {
    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    pub fn plugin(&self) -> &LoadedPlugin {
        &self.plugin
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn registry_arc(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The caller this connection's calls are made for.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// Calls capability `id` with an argument record (`Value::Unit` for none).
    pub fn call(&self, id: &str, args: Value) -> Result<Value, CallError> {
        self.dispatch(&self.caller, id, args, &NoObserver)
    }

    /// [`Connection::call`], reporting progress and events to `observer`.
    pub fn call_observed(&self, id: &str, args: Value, observer: &dyn CallObserver) -> Result<Value, CallError> {
        self.dispatch(&self.caller, id, args, observer)
    }

    /// [`Connection::call`] on behalf of `caller` (a daemon serving several peers over one
    /// connection): the access policy decides on, and audit records carry, its ids.
    pub fn call_as(&self, caller: &Caller, id: &str, args: Value) -> Result<Value, CallError> {
        self.dispatch(caller, id, args, &NoObserver)
    }

    /// [`Connection::call_as`], reporting progress and events to `observer`.
    pub fn call_observed_as(
        &self,
        caller: &Caller,
        id: &str,
        args: Value,
        observer: &dyn CallObserver,
    ) -> Result<Value, CallError> {
        self.dispatch(caller, id, args, observer)
    }

    /// The one dispatch path: registry → policy (stage, read-only, access by `caller`) →
    /// validation → driver → audit.
    pub(crate) fn dispatch(
        &self,
        caller: &Caller,
        id: &str,
        args: Value,
        observer: &dyn CallObserver,
    ) -> Result<Value, CallError> {
        // Registry: an id it does not declare is refused before anything else (and audited:
        // probing for capabilities is an attempt too).
        let Some(declared) = self.registry.lookup(id) else {
            let error = CallError::Unknown { id: id.to_string(), registry_version: self.registry.version().clone() };
            if self.audit.is_some() {
                self.refused(caller, id, &redact::args(&args), &error, None);
            }
            return Err(error);
        };
        // Mutating calls take the audited path; the others stay as cheap as without a log.
        if let Some(log) = self.audit.as_deref() {
            // `mutates` is the reviewed registry's whatever `--registry` says (see `with_registry`).
            if declared.mutates() {
                return self.call_audited(log, caller, declared, id, args, observer);
            }
        }
        // Policy. Denials are audited whether or not the capability mutates.
        let grant = match self.authorize(caller, declared, id) {
            Ok(grant) => grant,
            Err(error) => {
                if self.audit.is_some() {
                    self.refused(caller, id, &redact::args(&args), &error, None);
                }
                return Err(error);
            }
        };
        // Validation.
        let args = validate::validate(&self.registry, &grant, args)?;
        // Driver support, then the driver.
        if !self.plugin.implements(grant.capability().index) {
            return Err(self.not_implemented(id));
        }
        self.act(caller, &grant, &args, observer)
    }

    /// The dispatch path of a mutating call on an audited connection: every refusal is
    /// recorded with the arguments as sent, and the intent is on disk before the driver acts.
    #[inline(never)]
    fn call_audited(
        &self,
        log: &AuditLog,
        caller: &Caller,
        declared: &Capability,
        id: &str,
        args: Value,
        observer: &dyn CallObserver,
    ) -> Result<Value, CallError> {
        let started = Some(Instant::now());
        // Taken now: validation consumes the arguments.
        let recorded = redact::args(&args);
        let grant = match self.authorize(caller, declared, id) {
            Ok(grant) => grant,
            Err(error) => {
                self.refused(caller, id, &recorded, &error, started);
                return Err(error);
            }
        };
        let args = match validate::validate(&self.registry, &grant, args) {
            Ok(args) => args,
            Err(error) => {
                self.refused(caller, id, &recorded, &error, started);
                return Err(error);
            }
        };
        if !self.plugin.implements(grant.capability().index) {
            let error = self.not_implemented(id);
            self.refused(caller, id, &recorded, &error, started);
            return Err(error);
        }
        // The intent, synced, before the driver acts: fail closed.
        let intent = match log.append(&self.entry(caller, Event::Intent, id, Some(&recorded.json), None, None, started))
        {
            Ok(seq) => Some(seq),
            Err(error) if log.fail_open() => {
                tracing::warn!(target: "capvirt::audit", "{error}; calling `{id}` unaudited (audit fail_open is set)");
                None
            }
            Err(error) => return Err(CallError::AuditUnavailable { id: id.to_string(), error }),
        };
        let outcome = self.act(caller, &grant, &args, observer);
        // The outcome. The call has happened: a failure to record it is only reported.
        if let Some(intent) = intent {
            let error = outcome.as_ref().err().map(|e| redact::message(&e.to_string(), &recorded.secrets));
            let word = match &outcome {
                Ok(_) => "ok",
                Err(e) => e.audit_outcome(),
            };
            let entry = self.entry(caller, Event::Outcome { intent }, id, None, Some(word), error.as_deref(), started);
            if let Err(error) = log.append(&entry) {
                tracing::warn!(target: "capvirt::audit", "{error}; the outcome of `{id}` (intent seq {intent}) is not recorded");
            }
        }
        outcome
    }

    /// The policy step, with the deprecation warning.
    // Inlined into both dispatch paths: as a call it cost the unaudited path ~15 instructions.
    #[inline(always)]
    fn authorize<'r>(&'r self, caller: &Caller, declared: &'r Capability, id: &str) -> Result<Grant<'r>, CallError> {
        let grant = policy::authorize_capability(declared, &self.policy, caller, &self.uri, self.readonly)?;
        if grant.deprecated {
            let replacement =
                grant.capability().doc.replaced_by.as_deref().map(|r| format!("; use `{r}`")).unwrap_or_default();
            tracing::warn!(target: "capvirt::policy", "capability `{id}` is deprecated{replacement}");
        }
        Ok(grant)
    }

    #[cold]
    fn not_implemented(&self, id: &str) -> CallError {
        CallError::NotImplemented { id: id.to_string(), driver: self.plugin.info.name.clone() }
    }

    /// The granted call: the driver's, except a migration to another host, which the host runs
    /// as phases (each through this dispatch path, here and in the destination's daemon).
    #[inline(always)]
    fn act(
        &self,
        caller: &Caller,
        grant: &Grant<'_>,
        args: &ValidArgs,
        observer: &dyn CallObserver,
    ) -> Result<Value, CallError> {
        if self.migrate == Some(grant.capability().index) {
            if let Some(destination) = crate::migration::remote_destination(args.value())? {
                return crate::migration::between_hosts(self, caller, destination, observer);
            }
        }
        self.drive(grant, args, observer)
    }

    /// The driver call, and the result check when enabled.
    #[inline(always)]
    fn drive(&self, grant: &Grant<'_>, args: &ValidArgs, observer: &dyn CallObserver) -> Result<Value, CallError> {
        let id = grant.capability().id();
        let mut result = self
            .driver
            .invoke(grant, args, observer)
            .map_err(|error: PluginError| CallError::Driver { id: id.to_string(), error })?;
        if self.check_results {
            if let Err(error) = self.registry.validate_result(grant.capability(), &mut result) {
                return self.refuse_or_trim_result(grant.capability(), result, error);
            }
        }
        Ok(result)
    }

    /// A result that failed its check: malformed, unless the plugin targets a newer registry
    /// minor and only fields added since make it so (they are dropped; see
    /// [`LoadedPlugin::targets_newer_registry`]). Decided here, off the hot path: ordinary
    /// results never get this far.
    #[cold]
    #[inline(never)]
    fn refuse_or_trim_result(
        &self,
        capability: &Capability,
        mut result: Value,
        error: ValidationError,
    ) -> Result<Value, CallError> {
        let malformed = |error| CallError::MalformedResult {
            id: capability.id().to_string(),
            driver: self.plugin.info.name.clone(),
            error,
        };
        if !self.plugin.targets_newer_registry() {
            return Err(malformed(error));
        }
        self.registry.types.drop_unknown_fields(&capability.result, &mut result);
        self.registry.validate_result(capability, &mut result).map_err(malformed)?;
        Ok(result)
    }

    /// Records a refusal; the call is refused anyway, so a failure to record it only warns.
    #[cold]
    fn refused(&self, caller: &Caller, id: &str, recorded: &Redacted, error: &CallError, started: Option<Instant>) {
        let Some(log) = self.audit.as_deref() else { return };
        let message = redact::message(&error.to_string(), &recorded.secrets);
        let id = redact::cut(id, redact::MAX_TEXT);
        let entry = self.entry(
            caller,
            Event::Refused,
            &id,
            Some(&recorded.json),
            Some(error.audit_outcome()),
            Some(&message),
            started,
        );
        if let Err(e) = log.append(&entry) {
            tracing::warn!(target: "capvirt::audit", "{e}; the refusal of `{id}` is not recorded");
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn entry<'a>(
        &'a self,
        caller: &'a Caller,
        event: Event,
        id: &'a str,
        args: Option<&'a serde_json::Value>,
        outcome: Option<&'static str>,
        error: Option<&'a str>,
        started: Option<Instant>,
    ) -> Entry<'a> {
        Entry {
            caller,
            event,
            capability: id,
            uri: &self.audit_uri,
            driver: &self.plugin.info.name,
            args,
            outcome,
            error,
            elapsed: match event {
                Event::Intent => None,
                _ => started.map(|s| s.elapsed()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_system_uri;

    #[test]
    fn system_uris_are_the_local_system_instances() {
        for system in ["qemu:///system", "container:///system?root=/x", "qemu:///system/", "xen:///system#f"] {
            assert!(is_system_uri(system), "{system}");
        }
        for other in ["qemu:///session", "test:///default", "qemu://host/system", "qemu:///systems", "system"] {
            assert!(!is_system_uri(other), "{other}");
        }
    }
}
