//! The host: a registry, the loaded plugins, the policy, and the connections opened through
//! them. [`Connection::call`] is the one dispatch path:
//! registry → policy → validation → driver → audit.

use std::{path::PathBuf, sync::Arc, time::Instant};

use capvirt_plugin_api::{PluginError, Value};

use crate::{
    audit::{self, AuditRecord},
    driver::{CallObserver, DriverHandle, NoObserver},
    error::{CallError, HostError},
    plugins::{LoadedPlugin, PluginSet},
    policy::{self, Policy},
    registry::{source, Registry},
    validate,
};

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
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            registry: RegistrySource::default(),
            plugin_dirs: Vec::new(),
            policy: Policy::default(),
            pins: Default::default(),
            check_results: true,
        }
    }
}

/// A configured host.
pub struct Host {
    registry: Arc<Registry>,
    plugins: PluginSet,
    policy: Arc<Policy>,
    check_results: bool,
}

impl Host {
    /// Loads the registry and every plugin on the search path.
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
        let plugins = PluginSet::discover_pinned(&registry, &config.plugin_dirs, &config.pins);
        for warning in &plugins.warnings {
            tracing::warn!(target: "capvirt::plugins", "{warning}");
        }
        Host { registry, plugins, policy: Arc::new(config.policy), check_results: config.check_results }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn plugins(&self) -> &PluginSet {
        &self.plugins
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Opens a connection to `uri` through the plugin serving its scheme.
    pub fn connect(&self, uri: &str, readonly: bool) -> Result<Connection, HostError> {
        let scheme = uri_scheme(uri)?;
        let plugin = self.plugins.for_scheme(scheme).ok_or_else(|| {
            let refused: Vec<String> = self
                .plugins
                .refused
                .iter()
                .map(|r| {
                    format!("{}: {}", r.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(), r.reason)
                })
                .collect();
            let hint = if self.plugins.loaded.is_empty() && refused.is_empty() {
                "no plugins found; see `capvirt plugins`".to_string()
            } else if refused.is_empty() {
                let schemes: Vec<&str> =
                    self.plugins.loaded.iter().flat_map(|p| p.info.schemes.iter().map(String::as_str)).collect();
                format!("served schemes: {}", schemes.join(", "))
            } else {
                format!("refused plugins: {}", refused.join("; "))
            };
            HostError::NoDriver { uri: uri.to_string(), scheme: scheme.to_string(), hint }
        })?;
        let options = Value::record([("readonly", Value::Bool(readonly))]);
        let driver = (plugin.module.connect())(uri.into(), &options)
            .into_result()
            .map_err(|error| HostError::Connect { uri: uri.to_string(), error })?;
        Ok(Connection {
            uri: uri.to_string(),
            readonly,
            plugin: Arc::clone(plugin),
            driver: DriverHandle::new(driver),
            registry: Arc::clone(&self.registry),
            policy: Arc::clone(&self.policy),
            check_results: self.check_results,
        })
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

/// An open connection. Calls may come from several threads.
pub struct Connection {
    uri: String,
    readonly: bool,
    plugin: Arc<LoadedPlugin>,
    driver: DriverHandle,
    registry: Arc<Registry>,
    policy: Arc<Policy>,
    check_results: bool,
}

impl Connection {
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

    /// Calls capability `id` with an argument record (`Value::Unit` for none).
    pub fn call(&self, id: &str, args: Value) -> Result<Value, CallError> {
        self.call_observed(id, args, &NoObserver)
    }

    /// [`Connection::call`], reporting progress and events to `observer`.
    pub fn call_observed(&self, id: &str, args: Value, observer: &dyn CallObserver) -> Result<Value, CallError> {
        // Registry: an id it does not declare is refused before anything else.
        let Some(declared) = self.registry.lookup(id) else {
            return Err(CallError::Unknown { id: id.to_string(), registry_version: self.registry.version().clone() });
        };
        // Only audited (mutating) calls need the clock; reading it costs ~20 ns.
        let started = declared.mutates().then(Instant::now);
        // Policy.
        let grant = match policy::authorize_capability(declared, &self.policy, &self.uri, self.readonly) {
            Ok(grant) => grant,
            Err(error) => {
                if declared.mutates() {
                    self.audit(id, &args, Err(&error), started);
                }
                return Err(error);
            }
        };
        let capability = grant.capability();
        if grant.deprecated {
            let replacement = capability.doc.replaced_by.as_deref().map(|r| format!("; use `{r}`")).unwrap_or_default();
            tracing::warn!(target: "capvirt::policy", "capability `{id}` is deprecated{replacement}");
        }
        // Validation.
        let args = match validate::validate(&self.registry, &grant, args) {
            Ok(args) => args,
            Err(error) => {
                // `args` was consumed; record the refusal without them.
                if capability.mutates() {
                    self.audit(id, &Value::Unit, Err(&error), started);
                }
                return Err(error);
            }
        };
        // Driver support, then the driver.
        let outcome = if !self.plugin.implements(capability.index) {
            Err(CallError::NotImplemented { id: id.to_string(), driver: self.plugin.info.name.clone() })
        } else {
            self.driver
                .invoke(&grant, &args, observer)
                .map_err(|error: PluginError| CallError::Driver { id: id.to_string(), error })
                .and_then(|mut result| {
                    if self.check_results {
                        self.registry.validate_result(capability, &mut result).map_err(|error| {
                            CallError::MalformedResult {
                                id: id.to_string(),
                                driver: self.plugin.info.name.clone(),
                                error,
                            }
                        })?;
                    }
                    Ok(result)
                })
        };
        // Audit.
        if capability.mutates() {
            self.audit(id, args.value(), outcome.as_ref().map(|_| ()), started);
        }
        outcome
    }

    fn audit(&self, id: &str, args: &Value, outcome: Result<(), &CallError>, started: Option<Instant>) {
        audit::record(&AuditRecord {
            capability: id,
            uri: &self.uri,
            driver: &self.plugin.info.name,
            args,
            outcome: match outcome {
                Ok(()) => "ok",
                Err(e) => e.audit_outcome(),
            },
            error: outcome.err().map(ToString::to_string),
            elapsed: started.map(|s| s.elapsed()).unwrap_or_default(),
        });
    }
}
