//! `capvirt audit verify [FILE]`: checks an audit log's hash chain and names the first record
//! that breaks it.
//!
//! Exit codes: 0 the chain is intact · 1 broken (edited, inserted, reordered or deleted
//! record, cut tail) or unreadable · 5 the file does not exist · 2 usage.

use std::path::PathBuf;

use clap::{Arg, ArgMatches, Command};

use capvirt_host::{
    audit::{verify_file, VerifyError},
    error::ErrorCategory,
    setup::audit_log_path,
};

use crate::{context::Context, output, CliError, OutputFormat};

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
            let (uri, audit_log) = (ctx.globals.uri(), ctx.globals.audit_log.clone());
            let system = ctx.system()?;
            audit_log_path(audit_log.as_deref(), &system.config, &uri)?.ok_or_else(|| {
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
