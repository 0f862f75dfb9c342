//! Global options and the lazily built host and connection a command works with.

use std::{ffi::OsString, path::PathBuf, sync::Arc};

use clap::ArgMatches;

use super::{opt_string, output::OutputFormat, CliError};
use capvirt_host::{
    access::AccessPolicy,
    audit::AuditSetting,
    config::SystemConfig,
    host::{Connection, Host, HostConfig, RegistrySource, DEFAULT_URI},
    plugins,
    policy::Policy,
    registry::{source, Registry},
};

/// Options every command accepts.
#[derive(Debug, Clone, Default)]
pub struct GlobalOptions {
    pub uri: Option<String>,
    pub readonly: bool,
    pub plugin_dirs: Vec<PathBuf>,
    pub output: OutputFormat,
    pub registry_dir: Option<PathBuf>,
    pub enable: Vec<String>,
    pub audit_log: Option<PathBuf>,
    /// Drivers in child processes, with this idle bound per call.
    pub isolate: Option<std::time::Duration>,
}

impl GlobalOptions {
    pub fn from_matches(m: &ArgMatches, registry_dir: Option<PathBuf>) -> Self {
        GlobalOptions {
            uri: opt_string(m, "connect"),
            readonly: m.get_flag("readonly"),
            plugin_dirs: m.get_many::<String>("plugin-dir").map(|v| v.map(PathBuf::from).collect()).unwrap_or_default(),
            output: match opt_string(m, "output").as_deref() {
                Some("json") => OutputFormat::Json,
                _ => OutputFormat::Table,
            },
            registry_dir,
            enable: m.get_many::<String>("enable").map(|v| v.cloned().collect()).unwrap_or_default(),
            audit_log: opt_string(m, "audit-log").map(PathBuf::from),
            isolate: (m.get_flag("isolate") || std::env::var_os("CAPVIRT_ISOLATE").is_some_and(|v| v == "1")).then(
                || {
                    m.get_one::<u64>("isolate-timeout")
                        .map(|secs| std::time::Duration::from_secs(*secs))
                        .unwrap_or(capvirt_host::isolate::Isolation::DEFAULT_IDLE_TIMEOUT)
                },
            ),
        }
    }

    /// The connection URI: `-c`, else `CAPVIRT_DEFAULT_URI`, else `test:///default`.
    pub fn uri(&self) -> String {
        self.uri
            .clone()
            .or_else(|| std::env::var("CAPVIRT_DEFAULT_URI").ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| DEFAULT_URI.to_string())
    }
}

/// Finds `--registry DIR` / `--registry=DIR` before clap parses (the registry shapes the CLI).
pub fn prescan_registry_dir(argv: &[OsString]) -> Option<PathBuf> {
    let mut iter = argv.iter().skip(1);
    while let Some(arg) = iter.next() {
        let arg = arg.to_string_lossy();
        if arg == "--" {
            break;
        }
        if arg == "--registry" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(dir) = arg.strip_prefix("--registry=") {
            return Some(PathBuf::from(dir));
        }
    }
    None
}

pub fn load_registry(dir: Option<&std::path::Path>) -> Result<Arc<Registry>, CliError> {
    let registry = match dir {
        None => Registry::embedded(),
        Some(dir) => {
            let files = source::read_dir(dir)
                .map_err(|e| CliError::usage(format!("cannot read registry {}: {e}", dir.display())))?;
            Registry::from_sources(&files)
        }
    };
    registry.map(Arc::new).map_err(|e| CliError::other(e.to_string().replace('\n', "; ")))
}

/// What a command has to work with; the host and connection are built on first use.
pub struct Context {
    pub globals: GlobalOptions,
    pub registry: Arc<Registry>,
    host: Option<Host>,
    system: Option<(SystemConfig, AccessPolicy)>,
    /// Set when the first thing built is a remote connection: the daemon's plugins serve it,
    /// so the client loads none (a remote `list` starts as fast as a local one).
    no_local_plugins: bool,
}

impl Context {
    pub fn new(globals: GlobalOptions, registry: Arc<Registry>) -> Self {
        Context { globals, registry, host: None, system: None, no_local_plugins: false }
    }

    /// The root-owned system config and access policy ([`capvirt_host::config::system_dir`]); a file
    /// there that root does not control, or that does not parse, fails the command (exit 1):
    /// nothing is called under a policy that cannot be trusted.
    pub fn system(&mut self) -> Result<&(SystemConfig, AccessPolicy), CliError> {
        if self.system.is_none() {
            let dir = capvirt_host::config::system_dir();
            let config = SystemConfig::load(&dir).map_err(|e| CliError::other(e.to_string()))?;
            let access = AccessPolicy::load(&dir).map_err(|e| CliError::other(e.to_string()))?;
            self.system = Some((config, access));
        }
        self.system.as_ref().ok_or_else(|| CliError::other("system config unavailable"))
    }

    /// How this command audits: the log [`super::commands::audit::log_path`] picks, failing
    /// open only when the system config says so.
    pub fn audit_setting(&mut self) -> Result<AuditSetting, CliError> {
        let uri = self.globals.uri();
        let globals = self.globals.clone();
        let (system, _) = self.system()?;
        let path = super::commands::audit::log_path(&globals, system, &uri)?;
        Ok(AuditSetting::Log { path, fail_open: system.audit.fail_open })
    }

    pub fn output(&self) -> OutputFormat {
        self.globals.output
    }

    /// The host with every plugin on the search path loaded.
    pub fn host(&mut self) -> Result<&Host, CliError> {
        if self.host.is_none() {
            let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(PathBuf::from));
            let env_dirs = std::env::var("CAPVIRT_PLUGIN_DIR").ok();
            let plugin_dirs = if self.no_local_plugins {
                Vec::new()
            } else {
                plugins::search_path(&self.globals.plugin_dirs, env_dirs.as_deref(), exe_dir.as_deref())
            };
            let mut enabled: std::collections::BTreeSet<String> = self.globals.enable.iter().cloned().collect();
            if let Ok(list) = std::env::var("CAPVIRT_ENABLE") {
                enabled.extend(list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from));
            }
            let file_config =
                capvirt_host::config::HostFileConfig::load(capvirt_host::config::locate_from_env().as_ref());
            let file_config = file_config.map_err(|e| CliError::usage(e.to_string()))?;
            enabled.extend(file_config.enable);
            let audit = self.audit_setting()?;
            let (system, access) = self.system()?;
            let (access, image_allow, qemu_user) =
                (access.clone(), system.images.allow.clone(), system.qemu.user.clone());
            let config = HostConfig {
                registry: match &self.globals.registry_dir {
                    Some(dir) => RegistrySource::Dir(dir.clone()),
                    None => RegistrySource::Embedded,
                },
                plugin_dirs,
                policy: Policy { enabled, access },
                // On unless turned off (`CAPVIRT_CHECK_RESULTS=0`).
                check_results: std::env::var_os("CAPVIRT_CHECK_RESULTS").is_none_or(|v| v != "0"),
                pins: file_config.pins,
                audit,
                image_allow,
                qemu_user,
                isolation: self.isolation()?,
                plugin_cache: capvirt_host::plugin_cache::default_dir(),
            };
            self.host = Some(Host::with_registry(config, Arc::clone(&self.registry)));
        }
        self.host.as_ref().ok_or_else(|| CliError::other("host unavailable"))
    }

    /// Isolated drivers run as children of this very binary.
    fn isolation(&self) -> Result<Option<capvirt_host::isolate::Isolation>, CliError> {
        let Some(idle_timeout) = self.globals.isolate else { return Ok(None) };
        let program = std::env::current_exe()
            .map_err(|e| CliError::other(format!("--isolate: cannot find this program to run drivers: {e}")))?;
        Ok(Some(capvirt_host::isolate::Isolation { program, idle_timeout }))
    }

    /// The host, owned: a long-running command (`daemon`) shares it across threads.
    pub fn take_host(&mut self) -> Result<Host, CliError> {
        self.host()?;
        self.host.take().ok_or_else(|| CliError::other("host unavailable"))
    }

    /// A connection to the selected URI.
    pub fn connect(&mut self) -> Result<Connection, CliError> {
        let uri = self.globals.uri();
        let readonly = self.globals.readonly;
        if self.host.is_none() && matches!(capvirt_host::remote::RemoteTarget::parse(&uri), Ok(Some(_))) {
            self.no_local_plugins = true;
        }
        Ok(self.host()?.connect(&uri, readonly)?)
    }
}
