//! Global options and the lazily built host and connection a command works with.

use std::{ffi::OsString, path::PathBuf, sync::Arc};

use clap::ArgMatches;

use capvirt_host::{
    audit::AuditSetting,
    host::{Connection, Host, DEFAULT_URI},
    registry::Registry,
    setup::{self, HostOptions, SystemFiles},
};

use super::{opt_string, output::OutputFormat, CliError};

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
    Ok(setup::load_registry(dir)?)
}

/// What a command has to work with; the host and connection are built on first use.
pub struct Context {
    pub globals: GlobalOptions,
    pub registry: Arc<Registry>,
    host: Option<Host>,
    system: Option<SystemFiles>,
    /// Set when the first thing built is a remote connection: the daemon's plugins serve it,
    /// so the client loads none (a remote `list` starts as fast as a local one).
    no_local_plugins: bool,
}

impl Context {
    pub fn new(globals: GlobalOptions, registry: Arc<Registry>) -> Self {
        Context { globals, registry, host: None, system: None, no_local_plugins: false }
    }

    /// Root's system config and access policy ([`SystemFiles::load`]), read once.
    pub fn system(&mut self) -> Result<&SystemFiles, CliError> {
        if self.system.is_none() {
            self.system = Some(SystemFiles::load()?);
        }
        self.system.as_ref().ok_or_else(|| CliError::other("system config unavailable"))
    }

    /// The front end's side of the host's settings; [`setup`] derives the rest.
    pub fn host_options(&self) -> HostOptions {
        HostOptions {
            plugin_dirs: self.globals.plugin_dirs.clone(),
            registry_dir: self.globals.registry_dir.clone(),
            enable: self.globals.enable.clone(),
            audit_log: self.globals.audit_log.clone(),
            isolate: self.globals.isolate,
            no_local_plugins: self.no_local_plugins,
        }
    }

    /// How this command audits (see [`setup::audit_log_path`]).
    pub fn audit_setting(&mut self) -> Result<AuditSetting, CliError> {
        let (uri, options) = (self.globals.uri(), self.host_options());
        let system = self.system()?;
        Ok(options.audit_setting(&system.config, &uri)?)
    }

    pub fn output(&self) -> OutputFormat {
        self.globals.output
    }

    /// The host with every plugin on the search path loaded.
    pub fn host(&mut self) -> Result<&Host, CliError> {
        if self.host.is_none() {
            let (uri, options) = (self.globals.uri(), self.host_options());
            let config = options.host_config(self.system()?, &uri)?;
            self.host = Some(Host::with_registry(config, Arc::clone(&self.registry)));
        }
        self.host.as_ref().ok_or_else(|| CliError::other("host unavailable"))
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
