//! `capvirt audit verify [FILE]`: checks an audit log's hash chain and names the first record
//! that breaks it.
//!
//! Exit codes: 0 the chain is intact · 1 broken (edited, inserted, reordered or deleted
//! record, cut tail) or unreadable · 5 the file does not exist · 2 usage.

use std::path::PathBuf;

use clap::{Arg, ArgMatches, Command};

use crate::{
    audit::{verify_file, VerifyError},
    cli::{context::Context, output, CliError, GlobalOptions, OutputFormat},
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
        None => log_path(&ctx.globals).ok_or_else(|| {
            CliError::usage("no audit log location (give FILE, --audit-log, CAPVIRT_AUDIT_LOG, XDG_STATE_HOME or HOME)")
        })?,
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

/// Where the host appends audit records: `--audit-log`, else `CAPVIRT_AUDIT_LOG`, else
/// `$XDG_STATE_HOME/capvirt/audit.jsonl` (`~/.local/state/…`); `None` when none can be derived.
pub(crate) fn log_path(globals: &GlobalOptions) -> Option<PathBuf> {
    if let Some(path) = &globals.audit_log {
        return Some(path.clone());
    }
    if let Some(path) = std::env::var_os("CAPVIRT_AUDIT_LOG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let state_home = std::env::var_os("XDG_STATE_HOME").filter(|p| !p.is_empty()).map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").filter(|p| !p.is_empty()).map(|h| PathBuf::from(h).join(".local").join("state"))
    })?;
    Some(state_home.join("capvirt").join("audit.jsonl"))
}
