//! `capvirt call CAPABILITY [--arg key=value]…`: reaches any callable capability with typed,
//! validated arguments, with no per-capability CLI code.

use clap::{Arg, ArgAction, ArgMatches, Command};

use capvirt_plugin_api::Value;

use crate::{args, commands::capability, context::Context, CliError};
use capvirt_host::registry::Registry;

pub fn cli() -> Command {
    Command::new("call")
        .about("Call any capability by id with typed arguments")
        .long_about(
            "Call any capability by id. Arguments are parsed by their declared type: scalars plainly \
             (42, true, vm1), records and lists as TOML inline values ({ kind = \"usb-tablet\", id = \"t0\" }) \
             or @FILE for a TOML file. Unknown, missing and mistyped arguments are refused.",
        )
        .arg(Arg::new("capability").value_name("CAPABILITY").required(true).help("Capability id, e.g. domain.info"))
        .arg(
            Arg::new("arg")
                .long("arg")
                .short('a')
                .value_name("KEY=VALUE")
                .action(ArgAction::Append)
                .help("An argument (repeatable)"),
        )
        .arg(Arg::new("out-file").long("out-file").value_name("FILE").help("Write the result's bytes to FILE"))
}

pub fn exec(m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    let id = m.get_one::<String>("capability").cloned().unwrap_or_default();
    let registry = std::sync::Arc::clone(&ctx.registry);
    let record = arg_record(&registry, &id, m)?;
    let out_file = m.get_one::<String>("out-file").map(std::path::PathBuf::from);
    match registry.lookup(&id) {
        Some(cap) => capability::perform(ctx, cap, record, out_file),
        None => {
            // Let the dispatch path produce the refusal (and its exit code).
            let conn = ctx.connect()?;
            conn.call(&id, record)?;
            Ok(())
        }
    }
}

/// The argument record of `--arg KEY=VALUE`s for capability `id` (also `capvirt bench call`).
pub fn arg_record(registry: &Registry, id: &str, m: &ArgMatches) -> Result<Value, CliError> {
    let mut record = Value::record_empty();
    for pair in m.get_many::<String>("arg").into_iter().flatten() {
        let (key, text) =
            pair.split_once('=').ok_or_else(|| CliError::usage(format!("--arg {pair:?}: expected KEY=VALUE")))?;
        if record.get(key).is_some() {
            return Err(CliError::usage(format!("argument `{key}` given twice")));
        }
        // Unknown capabilities and keys are passed on as strings: the dispatch path refuses
        // them with the proper policy or validation error.
        let value = match registry.lookup(id).and_then(|cap| cap.param(key)) {
            Some(param) => args::parse_value(&registry.types, &param.ty, key, text)?,
            None => Value::string(text),
        };
        record.set(key.to_string(), value);
    }
    Ok(record)
}
