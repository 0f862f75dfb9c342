//! `capvirt audit verify [FILE]`: checks an audit log's hash chain and names the first record
//! that breaks it.
//!
//! Exit codes: 0 the chain is intact · 1 broken (edited, inserted, reordered or deleted
//! record, cut tail) or unreadable · 5 the file does not exist · 2 usage.

use std::path::PathBuf;

use clap::{Arg, ArgMatches, Command};

use crate::{context::Context, output, CliError, GlobalOptions, OutputFormat};
use capvirt_host::{
    audit::{verify_file, VerifyError},
    config::SystemConfig,
    error::ErrorCategory,
};

pub fn cli() -> Command {
    Command::new("audit").about("Check the audit log").subcommand_required(true).subcommand(
        Command::new("verify")
            .about("Verify the audit log's hash chain; names the first edited, inserted, reordered or deleted record")
            .arg(
                Arg::new("file")
                    .value_name("FILE")
                    .help("The log to check [default: the log mutating calls are audited to]"),
            ),
    )
}

pub fn exec(m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    let Some(("verify", sub)) = m.subcommand() else {
        return Err(CliError::usage("expected `capvirt audit verify [FILE]`"));
    };
    let path = match sub.get_one::<String>("file") {
        Some(file) => PathBuf::from(file),
        None => {
            let uri = ctx.globals.uri();
            let globals = ctx.globals.clone();
            let (system, _) = ctx.system()?;
            log_path(&globals, system, &uri)?.ok_or_else(|| {
                CliError::usage(
                    "no audit log location (give FILE, --audit-log, CAPVIRT_AUDIT_LOG, XDG_STATE_HOME or HOME)",
                )
            })?
        }
    };
    match verify_file(&path) {
        Ok(report) => {
            let shown = path.display();
            output::print(&match ctx.output() {
                OutputFormat::Json => output::json_value(
                    &serde_json::json!({"path": shown.to_string(), "intact": true, "records": report.records}),
                ),
                OutputFormat::Table => format!("{shown}: {} records, hash chain intact\n", report.records),
            });
            Ok(())
        }
        Err(VerifyError::Read { path, source }) if source.kind() == std::io::ErrorKind::NotFound => {
            Err(CliError::new(ErrorCategory::NotFound, format!("audit log {} does not exist", path.display())))
        }
        Err(e) => Err(CliError::other(e.to_string())),
    }
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
pub(crate) fn log_path(globals: &GlobalOptions, system: &SystemConfig, uri: &str) -> Result<Option<PathBuf>, CliError> {
    let env = std::env::var_os("CAPVIRT_AUDIT_LOG").filter(|p| !p.is_empty()).map(PathBuf::from);
    if capvirt_host::host::is_system_uri(uri) {
        let configured = system.audit_path();
        if let Some(path) = globals.audit_log.as_ref().filter(|p| **p != configured) {
            return Err(CliError::usage(format!(
                "--audit-log {} is refused for {uri}: a system connection is audited to {}, set by root in {}/{} ([audit] path)",
                path.display(),
                configured.display(),
                capvirt_host::config::system_dir().display(),
                capvirt_host::config::SYSTEM_FILE
            )));
        }
        // Ambient (an exported variable), unlike the explicit option: noted, not an error,
        // and not a warning on every call of a shell that exports it.
        if env.as_ref().is_some_and(|p| *p != configured) {
            tracing::info!(target: "capvirt::audit", "CAPVIRT_AUDIT_LOG is ignored for {uri}: a system connection is audited to {}", configured.display());
        }
        return Ok(Some(configured));
    }
    if let Some(path) = globals.audit_log.clone().or(env) {
        return Ok(Some(path));
    }
    if capvirt_host::caller::Caller::current().is_root() {
        return Ok(Some(system.audit_path()));
    }
    let state_home = std::env::var_os("XDG_STATE_HOME").filter(|p| !p.is_empty()).map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").filter(|p| !p.is_empty()).map(|h| PathBuf::from(h).join(".local").join("state"))
    });
    Ok(state_home.map(|dir| dir.join("capvirt").join("audit.jsonl")))
}
