//! `capvirtd`: the capvirt daemon ([`capvirt_host::daemon`]) for service managers, and the
//! child process of its isolated drivers (`capvirtd driver-child PLUGIN`). Same daemon as
//! `capvirt daemon`, same options, same host settings ([`capvirt_host::setup`]); what it
//! does not link is the CLI (clap, indicatif) and the maintainer tools.
//!
//! Exit codes are the CLI's: 0 stopped by SIGTERM/SIGINT, 1 a failure, 2 a usage error.

use std::{ffi::OsString, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use capvirt_host::{
    daemon::{self, DaemonOptions},
    isolate::Isolation,
    setup::{self, HostOptions, SetupError, SystemFiles},
    ErrorCategory, Host, DEFAULT_URI,
};

const USAGE: &str = "\
usage: capvirtd [OPTIONS]
       capvirtd driver-child PLUGIN [--pin SHA256]

Serves this host's driver plugins to remote clients (DRIVER+unix://, +ssh://, +tls:// URIs):
every call goes through this daemon's registry, policy, validation and audit log.

Options:
  --listen unix:PATH|tcp:ADDR:PORT  where to listen, repeatable; tcp: always with mutual TLS
                                    [default: unix:/run/capvirt/capvirt-sock for root,
                                    else unix:$XDG_RUNTIME_DIR/capvirt/capvirt-sock]
  --tls-cert FILE    the daemon's certificate [default: /etc/capvirt/pki/servercert.pem]
  --tls-key FILE     its private key [default: /etc/capvirt/pki/serverkey.pem]
  --tls-ca FILE      the CA signing client certificates [default: /etc/capvirt/pki/cacert.pem]
  --max-message-size BYTES   largest request or reply
  --socket-group GROUP       the socket's group [default: capvirt.toml [daemon] socket_group]
  --socket-mode OCTAL        the socket's mode [default: capvirt.toml [daemon] socket_mode, else 0600]
  --plugin-dir DIR   where plugins are, repeatable [default: $CAPVIRT_PLUGIN_DIR, else next to
                     this program, then /usr/lib/capvirt/plugins]
  --registry DIR     a registry source tree instead of the embedded registry
  --enable ID        enable an experimental capability, repeatable
  --audit-log FILE   where calls are audited (system connections: always root's [audit] path)
  --isolate          run each driver in a child process
  --isolate-timeout SECS   per-call bound for isolated drivers
  -h, --help         this text
  -V, --version      the version
";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let outcome =
        if args.first().is_some_and(|a| a == "driver-child") { driver_child(&args[1..]) } else { serve(args) };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capvirtd: error: {}", e.message);
            ExitCode::from(e.category.exit_code())
        }
    }
}

/// What the command line asked for.
enum Request {
    Serve { daemon: Box<DaemonOptions>, host: Box<HostOptions> },
    Help,
    Version,
}

fn serve(args: Vec<OsString>) -> Result<(), SetupError> {
    let (daemon, host_options) = match parse(args)? {
        Request::Help => {
            print!("{USAGE}");
            return Ok(());
        }
        Request::Version => {
            println!("capvirtd {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        Request::Serve { daemon, host } => (daemon, host),
    };
    init_logging();
    let system = SystemFiles::load()?;
    let registry = setup::load_registry(host_options.registry_dir.as_deref())?;
    let host = || Ok(Host::with_registry(host_options.host_config(&system, DEFAULT_URI)?, Arc::clone(&registry)));
    daemon::run(&daemon, &system, host)
}

fn parse(args: Vec<OsString>) -> Result<Request, SetupError> {
    use lexopt::prelude::*;
    let usage = |e: lexopt::Error| SetupError::usage(format!("{e} (see capvirtd --help)"));
    let mut parser = lexopt::Parser::from_args(args);
    let (mut daemon, mut host) = (DaemonOptions::default(), HostOptions::default());
    let mut isolate_timeout = None;
    while let Some(arg) = parser.next().map_err(usage)? {
        // Owned, so the option's value can be read from the parser next.
        let name = match arg {
            Long(name) => name.to_string(),
            Short('h') => "help".to_string(),
            Short('V') => "version".to_string(),
            _ => return Err(usage(arg.unexpected())),
        };
        let mut text = || -> Result<String, SetupError> { parser.value().map_err(usage)?.string().map_err(usage) };
        match name.as_str() {
            "listen" => daemon.listen.push(text()?),
            "tls-cert" => daemon.tls_cert = Some(PathBuf::from(text()?)),
            "tls-key" => daemon.tls_key = Some(PathBuf::from(text()?)),
            "tls-ca" => daemon.tls_ca = Some(PathBuf::from(text()?)),
            "max-message-size" => {
                let value = text()?;
                let bytes = value.parse().map_err(|_| {
                    SetupError::usage(format!("--max-message-size {value:?}: expected a number of bytes"))
                })?;
                daemon.max_message_bytes = Some(bytes);
            }
            "socket-group" => daemon.socket_group = Some(text()?),
            "socket-mode" => daemon.socket_mode = Some(text()?),
            "plugin-dir" => host.plugin_dirs.push(PathBuf::from(text()?)),
            "registry" => host.registry_dir = Some(PathBuf::from(text()?)),
            "enable" => host.enable.push(text()?),
            "audit-log" => host.audit_log = Some(PathBuf::from(text()?)),
            "isolate" => host.isolate = Some(Isolation::DEFAULT_IDLE_TIMEOUT),
            "isolate-timeout" => {
                let value = text()?;
                let secs: u64 = value.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                    SetupError::usage(format!("--isolate-timeout {value:?}: expected a whole number of seconds"))
                })?;
                isolate_timeout = Some(Duration::from_secs(secs));
            }
            "help" => return Ok(Request::Help),
            "version" => return Ok(Request::Version),
            _ => return Err(SetupError::usage(format!("unknown option --{name} (see capvirtd --help)"))),
        }
    }
    if std::env::var_os("CAPVIRT_ISOLATE").is_some_and(|v| v == "1") {
        host.isolate.get_or_insert(Isolation::DEFAULT_IDLE_TIMEOUT);
    }
    if let Some(timeout) = isolate_timeout {
        match &mut host.isolate {
            Some(bound) => *bound = timeout,
            None => return Err(SetupError::usage("--isolate-timeout is for isolated drivers: give --isolate too")),
        }
    }
    Ok(Request::Serve { daemon: Box::new(daemon), host: Box::new(host) })
}

/// `capvirtd driver-child PLUGIN [--pin SHA256]`: one isolated driver, serving the socket
/// its host passed as standard input (see [`capvirt_host::isolate`]).
fn driver_child(args: &[OsString]) -> Result<(), SetupError> {
    use lexopt::prelude::*;
    let usage = |e: lexopt::Error| SetupError::usage(format!("driver-child: {e}"));
    let mut parser = lexopt::Parser::from_args(args.iter().cloned());
    let (mut plugin, mut pin) = (None, None);
    while let Some(arg) = parser.next().map_err(usage)? {
        match arg {
            Long("pin") => pin = Some(parser.value().map_err(usage)?.string().map_err(usage)?),
            Value(path) if plugin.is_none() => plugin = Some(PathBuf::from(path)),
            _ => return Err(usage(arg.unexpected())),
        }
    }
    let plugin = plugin.ok_or_else(|| SetupError::usage("driver-child: expected the plugin file"))?;
    capvirt_host::isolate::child::run(&plugin, pin.as_deref())
        .map_err(|e| SetupError { category: ErrorCategory::Other, message: e.to_string() })
}

/// Warnings from the host (tracing) to stderr, one line each; journald adds the time.
fn init_logging() {
    let subscriber = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .without_time()
        .with_target(false)
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(args: &[&str]) -> Result<Request, SetupError> {
        parse(args.iter().map(OsString::from).collect())
    }

    #[test]
    fn options_fill_the_daemon_and_host_settings() {
        let request = parsed(&[
            "--listen",
            "unix:/tmp/s",
            "--listen=tcp:127.0.0.1:0",
            "--tls-ca",
            "/p/ca.pem",
            "--plugin-dir",
            "/a",
            "--plugin-dir",
            "/b",
            "--enable",
            "domain.events",
            "--isolate",
            "--isolate-timeout",
            "7",
            "--max-message-size",
            "4096",
        ]);
        let Ok(Request::Serve { daemon, host }) = request else { panic!("not a serve request") };
        assert_eq!(daemon.listen, ["unix:/tmp/s", "tcp:127.0.0.1:0"]);
        assert_eq!(daemon.tls_ca, Some(PathBuf::from("/p/ca.pem")));
        assert_eq!(daemon.max_message_bytes, Some(4096));
        assert_eq!(host.plugin_dirs, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(host.enable, ["domain.events"]);
        assert_eq!(host.isolate, Some(Duration::from_secs(7)));
    }

    #[test]
    fn bad_options_are_usage_errors_naming_the_option() {
        for (args, names) in [
            (&["--listne", "unix:/x"][..], "--listne"),
            (&["--listen"][..], "--listen"),
            (&["--max-message-size", "lots"][..], "--max-message-size"),
            (&["--isolate-timeout", "5"][..], "--isolate-timeout"),
            (&["stray"][..], "stray"),
        ] {
            match parsed(args) {
                Err(e) => {
                    assert_eq!(e.category, ErrorCategory::Usage, "{args:?}");
                    assert!(e.message.contains(names), "{args:?}: {}", e.message);
                }
                Ok(_) => panic!("{args:?} accepted"),
            }
        }
    }

    #[test]
    fn help_and_version_are_requests() {
        assert!(matches!(parsed(&["--help"]), Ok(Request::Help)));
        assert!(matches!(parsed(&["-V"]), Ok(Request::Version)));
    }
}
