//! Commands derived from the registry's `[cli]` hints (`list`, `dominfo`, `suspend`…), and the
//! shared code that performs a call and renders its result.

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
};

use capvirt_plugin_api::Value;
use clap::{Arg, ArgAction, ArgMatches, Command};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{args, context::Context, output, CliError, OutputFormat};
use capvirt_host::{
    driver::{CallObserver, NoObserver},
    registry::{Capability, FieldDef, Registry, Stage, Ty},
};

/// One subcommand per capability with a `[cli]` hint (rejected/removed ones excluded).
pub fn commands(registry: &Registry) -> Vec<Command> {
    commands_named(registry, None)
}

/// [`commands`], only the one named `only` when given (a start builds just what it runs).
pub fn commands_named(registry: &Registry, only: Option<&str>) -> Vec<Command> {
    registry
        .capabilities()
        .iter()
        .filter(|cap| !cap.stage().is_forbidden())
        .filter_map(|cap| cap.doc.cli.as_ref().map(|hint| (cap, hint)))
        .filter(|(_, hint)| only.is_none_or(|name| hint.command == name))
        .map(|(cap, hint)| {
            let mut about = if hint.about.is_empty() { cap.doc.title.clone() } else { hint.about.clone() };
            match cap.stage() {
                Stage::Stable => {}
                stage => about.push_str(&format!(" [{stage}]")),
            }
            let mut cmd = Command::new(hint.command.clone()).about(about).long_about(format!(
                "{}\n\n{}\n\nCapability: {} (version {})",
                cap.doc.title,
                cap.doc.summary,
                cap.id(),
                cap.doc.version
            ));
            for name in &hint.positional {
                if let Some(param) = cap.param(name) {
                    let is_file = hint.file_args.contains(name);
                    cmd = cmd.arg(
                        Arg::new(param.name.clone())
                            .value_name(if is_file { "FILE".to_string() } else { param.name.to_uppercase() })
                            .required(param.required)
                            .help(if is_file {
                                format!("TOML file holding the {}: {}", param.ty_text, param.doc)
                            } else {
                                param.doc.clone()
                            }),
                    );
                }
            }
            if let Some(file) = &hint.output_file {
                cmd = cmd.arg(
                    Arg::new(file.clone())
                        .value_name(file.to_uppercase())
                        .required(true)
                        .help("File to write (`-`: standard output)"),
                );
            }
            for param in cap.params.iter().filter(|p| !hint.positional.contains(&p.name)) {
                cmd = cmd.arg(option_arg(param));
            }
            cmd
        })
        .collect()
}

/// A non-positional parameter: a boolean defaulting to false is a flag, anything else
/// takes a value.
fn option_arg(param: &FieldDef) -> Arg {
    let long = param.name.replace('_', "-");
    let arg = Arg::new(param.name.clone()).long(long).help(param.doc.clone());
    let is_false_flag = matches!(param.ty, Ty::Bool) && matches!(param.default, None | Some(Value::Bool(false)));
    if is_false_flag && !param.required {
        arg.action(ArgAction::SetTrue)
    } else {
        arg.value_name(param.name.to_uppercase()).required(param.required)
    }
}

/// Runs the derived command `name`.
pub fn exec(name: &str, m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    let registry = std::sync::Arc::clone(&ctx.registry);
    let cap = registry.by_command(name).ok_or_else(|| CliError::usage(format!("unknown command `{name}`")))?;
    let hint = cap.doc.cli.clone().ok_or_else(|| CliError::usage(format!("`{}` has no CLI command", cap.id())))?;
    let mut record = Value::record_empty();
    for param in &cap.params {
        let is_flag = matches!(m.try_get_one::<bool>(&param.name), Ok(Some(_)));
        if is_flag {
            if m.get_flag(&param.name) {
                record.set(param.name.clone(), true);
            }
            continue;
        }
        let Some(text) = m.try_get_one::<String>(&param.name).ok().flatten() else {
            continue;
        };
        let value = if hint.file_args.contains(&param.name) {
            args::read_toml_file(&param.name, Path::new(text))?
        } else {
            args::parse_value(&registry.types, &param.ty, &param.name, text)?
        };
        record.set(param.name.clone(), value);
    }
    let output_file =
        hint.output_file.as_ref().and_then(|f| m.try_get_one::<String>(f).ok().flatten()).map(PathBuf::from);
    perform(ctx, cap, record, output_file)
}

/// Calls `cap` with `args` on the selected connection and prints the result.
pub fn perform(ctx: &mut Context, cap: &Capability, args: Value, output_file: Option<PathBuf>) -> Result<(), CliError> {
    let format = ctx.output();
    let conn = ctx.connect()?;
    let message_args = args.clone();
    let wants_progress = cap.doc.cli.as_ref().is_some_and(|h| h.progress)
        && format == OutputFormat::Table
        && std::io::stderr().is_terminal();
    let result = if wants_progress {
        let bar = ProgressObserver::new();
        let result = conn.call_observed(cap.id(), args, &bar);
        bar.finish();
        result?
    } else {
        conn.call_observed(cap.id(), args, &NoObserver)?
    };
    let registry = conn.registry();
    let mut shown = result;
    // FILE `-`: the data itself goes to standard output (JSON output keeps it in the document).
    if output_file.as_deref() == Some(Path::new("-")) {
        if format == OutputFormat::Table {
            let bytes = take_bytes(&mut shown)
                .ok_or_else(|| CliError::other(format!("`{}` returned no data to write", cap.id())))?;
            output::print_bytes(&bytes);
        } else {
            output::print(&output::json(&shown));
        }
        return Ok(());
    }
    if let Some(path) = &output_file {
        let bytes = take_bytes(&mut shown)
            .ok_or_else(|| CliError::other(format!("`{}` returned no data to write", cap.id())))?;
        capvirt_plugin_api::fs::write_atomic(path, &bytes)
            .map_err(|e| CliError::other(format!("cannot write {}: {e}", path.display())))?;
        shown.set("file", path.display().to_string());
    }
    match format {
        OutputFormat::Json => {
            if !shown.is_unit() {
                output::print(&output::json(&shown));
            }
        }
        OutputFormat::Table => {
            let hint_message = cap.doc.cli.as_ref().and_then(|h| h.message.clone());
            let structured = registry.types.record_fields(&cap.result).is_some() || matches!(cap.result, Ty::List(_));
            match hint_message {
                Some(template) if !structured || output_file.is_some() => {
                    let mut vars = message_args;
                    if let Some(path) = &output_file {
                        vars.set("file", path.display().to_string());
                    }
                    if !shown.is_unit() && output_file.is_none() {
                        vars.set("result", shown.clone());
                    }
                    output::print(&format!("{}\n", substitute(&template, &vars)));
                }
                _ => output::print(&output::human(&registry.types, &cap.result, &shown)),
            }
        }
    }
    Ok(())
}

/// Removes and returns the first bytes field of a record result (or the bytes result itself).
fn take_bytes(value: &mut Value) -> Option<Vec<u8>> {
    match value {
        Value::Bytes(b) => {
            let data = b.to_vec();
            *value = Value::record_empty();
            Some(data)
        }
        Value::Record(fields) => {
            let index = fields.iter().position(|f| matches!(f.value, Value::Bytes(_)))?;
            let field = fields.remove(index);
            field.value.as_bytes().map(<[u8]>::to_vec)
        }
        _ => None,
    }
}

/// Replaces `{name}` and `{name.field}` with argument values.
fn substitute(template: &str, vars: &Value) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let key = &rest[start + 1..start + len];
        let mut value = Some(vars);
        for part in key.split('.') {
            value = value.and_then(|v| v.get(part));
        }
        match value {
            Some(v) => out.push_str(&v.to_string()),
            None => out.push_str(&rest[start..=start + len]),
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    out
}

/// Shows driver progress as a progress bar on stderr.
struct ProgressObserver {
    bar: ProgressBar,
}

impl ProgressObserver {
    fn new() -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        ProgressObserver { bar }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl CallObserver for ProgressObserver {
    fn progress(&self, done: u64, total: u64) {
        if total > 0 {
            self.bar.set_length(total);
        }
        self.bar.set_position(done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitute_fills_known_and_keeps_unknown() {
        let vars = Value::record([("domain", Value::from("vm1")), ("spec", Value::record([("name", "x")]))]);
        assert_eq!(substitute("Domain '{domain}' / {spec.name} / {nope}", &vars), "Domain 'vm1' / x / {nope}");
    }
}
