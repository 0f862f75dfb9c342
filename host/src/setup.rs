//! How a front end (the `capvirt` CLI, the `capvirtd` daemon) turns its options into a
//! [`HostConfig`]: the options it was given, then the environment (`CAPVIRT_PLUGIN_DIR`,
//! `CAPVIRT_ENABLE`, `CAPVIRT_AUDIT_LOG`, `CAPVIRT_CHECK_RESULTS`), then the config files
//! (the user's host config, root's system config and access policy). One place, so the CLI
//! and the daemon build the same host from the same settings.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use crate::{
    access::AccessPolicy,
    audit::AuditSetting,
    caller::Caller,
    config::{self, HostFileConfig, SystemConfig},
    error::ErrorCategory,
    host::{is_system_uri, HostConfig, RegistrySource},
    isolate::Isolation,
    plugin_cache, plugins,
    policy::Policy,
    registry::{source, Registry},
};

/// A setup step that failed: the category decides the exit code, the message says what and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SetupError {
    pub category: ErrorCategory,
    pub message: String,
}

impl SetupError {
    /// The caller's options are wrong (exit 2).
    pub fn usage(message: impl Into<String>) -> SetupError {
        SetupError { category: ErrorCategory::Usage, message: message.into() }
    }

    /// Anything else: unreadable or untrusted files, IO (exit 1).
    pub fn other(message: impl Into<String>) -> SetupError {
        SetupError { category: ErrorCategory::Other, message: message.into() }
    }
}

/// What a front end's options say about the host; everything else is derived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostOptions {
    /// `--plugin-dir`, in order (empty: `CAPVIRT_PLUGIN_DIR`, else next to the program, then
    /// the system directory).
    pub plugin_dirs: Vec<PathBuf>,
    /// `--registry DIR` (default: the embedded registry).
    pub registry_dir: Option<PathBuf>,
    /// `--enable`: experimental capabilities to enable, besides `CAPVIRT_ENABLE` and the
    /// host config's `enable`.
    pub enable: Vec<String>,
    /// `--audit-log`.
    pub audit_log: Option<PathBuf>,
    /// `--isolate`: drivers in child processes of this program, with this idle bound per call.
    pub isolate: Option<Duration>,
    /// Load no plugins (a remote connection's plugins are the daemon's).
    pub no_local_plugins: bool,
}

/// Root's files: the system config and the access policy.
#[derive(Debug, Clone)]
pub struct SystemFiles {
    pub config: SystemConfig,
    pub access: AccessPolicy,
}

impl SystemFiles {
    /// Reads them from [`config::system_dir`]; a file there that root does not control, or
    /// that does not parse, is an error: nothing is called under a policy that cannot be trusted.
    pub fn load() -> Result<SystemFiles, SetupError> {
        let dir = config::system_dir();
        let config = SystemConfig::load(&dir).map_err(|e| SetupError::other(e.to_string()))?;
        let access = AccessPolicy::load(&dir).map_err(|e| SetupError::other(e.to_string()))?;
        Ok(SystemFiles { config, access })
    }
}

/// The registry: embedded, or read from `dir`.
pub fn load_registry(dir: Option<&Path>) -> Result<Arc<Registry>, SetupError> {
    let registry = match dir {
        None => Registry::embedded(),
        Some(dir) => {
            let files = source::read_dir(dir)
                .map_err(|e| SetupError::usage(format!("cannot read registry {}: {e}", dir.display())))?;
            Registry::from_sources(&files)
        }
    };
    registry.map(Arc::new).map_err(|e| SetupError::other(e.to_string().replace('\n', "; ")))
}

/// Where the host appends audit records for a connection to `uri`:
///
/// - a `*:///system` connection: always the system config's log (`[audit] path`, default
///   `/var/log/capvirt/audit.jsonl`); `--audit-log` naming another file is refused (exit 2) and
///   `CAPVIRT_AUDIT_LOG` ignored (logged at info level): the caller does not choose where a
///   system connection's records go;
/// - otherwise `--audit-log`, else `CAPVIRT_AUDIT_LOG`, else for root the system config's log,
///   for other users `$XDG_STATE_HOME/capvirt/audit.jsonl` (`~/.local/state/…`); `None` when
///   none can be derived (mutating calls are then refused).
pub fn audit_log_path(
    audit_log: Option<&Path>,
    system: &SystemConfig,
    uri: &str,
) -> Result<Option<PathBuf>, SetupError> {
    let env = std::env::var_os("CAPVIRT_AUDIT_LOG").filter(|p| !p.is_empty()).map(PathBuf::from);
    if is_system_uri(uri) {
        let configured = system.audit_path();
        if let Some(path) = audit_log.filter(|p| *p != configured) {
            return Err(SetupError::usage(format!(
                "--audit-log {} is refused for {uri}: a system connection is audited to {}, set by root in {}/{} ([audit] path)",
                path.display(),
                configured.display(),
                config::system_dir().display(),
                config::SYSTEM_FILE
            )));
        }
        // Ambient (an exported variable), unlike the explicit option: noted, not an error,
        // and not a warning on every call of a shell that exports it.
        if env.as_ref().is_some_and(|p| *p != configured) {
            tracing::info!(target: "capvirt::audit", "CAPVIRT_AUDIT_LOG is ignored for {uri}: a system connection is audited to {}", configured.display());
        }
        return Ok(Some(configured));
    }
    if let Some(path) = audit_log.map(Path::to_path_buf).or(env) {
        return Ok(Some(path));
    }
    if Caller::current().is_root() {
        return Ok(Some(system.audit_path()));
    }
    let state_home = std::env::var_os("XDG_STATE_HOME").filter(|p| !p.is_empty()).map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").filter(|p| !p.is_empty()).map(|h| PathBuf::from(h).join(".local").join("state"))
    });
    Ok(state_home.map(|dir| dir.join("capvirt").join("audit.jsonl")))
}

impl HostOptions {
    /// How calls on `uri` are audited: the log [`audit_log_path`] picks, failing open only
    /// when the system config says so.
    pub fn audit_setting(&self, system: &SystemConfig, uri: &str) -> Result<AuditSetting, SetupError> {
        let path = audit_log_path(self.audit_log.as_deref(), system, uri)?;
        Ok(AuditSetting::Log { path, fail_open: system.audit.fail_open })
    }

    /// The host configuration these options, the environment and the config files describe,
    /// for a host first asked to serve `uri` (which decides the audit log).
    pub fn host_config(&self, system: &SystemFiles, uri: &str) -> Result<HostConfig, SetupError> {
        let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(PathBuf::from));
        let env_dirs = std::env::var("CAPVIRT_PLUGIN_DIR").ok();
        let plugin_dirs = if self.no_local_plugins {
            Vec::new()
        } else {
            plugins::search_path(&self.plugin_dirs, env_dirs.as_deref(), exe_dir.as_deref())
        };
        let mut enabled: BTreeSet<String> = self.enable.iter().cloned().collect();
        if let Ok(list) = std::env::var("CAPVIRT_ENABLE") {
            enabled.extend(list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from));
        }
        let file_config =
            HostFileConfig::load(config::locate_from_env().as_ref()).map_err(|e| SetupError::usage(e.to_string()))?;
        enabled.extend(file_config.enable);
        Ok(HostConfig {
            registry: match &self.registry_dir {
                Some(dir) => RegistrySource::Dir(dir.clone()),
                None => RegistrySource::Embedded,
            },
            plugin_dirs,
            policy: Policy { enabled, access: system.access.clone() },
            // On unless turned off (`CAPVIRT_CHECK_RESULTS=0`).
            check_results: std::env::var_os("CAPVIRT_CHECK_RESULTS").is_none_or(|v| v != "0"),
            pins: file_config.pins,
            audit: self.audit_setting(&system.config, uri)?,
            image_allow: system.config.images.allow.clone(),
            qemu_user: system.config.qemu.user.clone(),
            isolation: self.isolation()?,
            plugin_cache: plugin_cache::default_dir(),
        })
    }

    /// Isolated drivers run as children of this very program (`PROGRAM driver-child PLUGIN`).
    fn isolation(&self) -> Result<Option<Isolation>, SetupError> {
        let Some(idle_timeout) = self.isolate else { return Ok(None) };
        let program = std::env::current_exe()
            .map_err(|e| SetupError::other(format!("--isolate: cannot find this program to run drivers: {e}")))?;
        Ok(Some(Isolation { program, idle_timeout }))
    }
}
