//! `capvirt capabilities`: what the connected driver supports, per registry.

use clap::{ArgMatches, Command};

use crate::{context::Context, output, CliError, OutputFormat};

pub fn cli() -> Command {
    Command::new("capabilities").about("Show which registry capabilities the connected driver implements")
}

pub fn exec(_m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    let format = ctx.output();
    let conn = ctx.connect()?;
    let plugin = conn.plugin().ok_or_else(|| {
        CliError::new(
            capvirt_host::ErrorCategory::Unsupported,
            format!("`capabilities` lists a local driver's support; {} is served by a daemon", conn.uri()),
        )
    })?;
    let registry = conn.registry();
    let rows: Vec<(String, String, bool, Option<u32>, String)> = registry
        .capabilities()
        .iter()
        .map(|cap| {
            let command = cap.doc.cli.as_ref().map(|h| h.command.clone()).unwrap_or_default();
            (
                cap.id().to_string(),
                cap.stage().to_string(),
                plugin.implements(cap.index),
                plugin.implemented_version(cap.id()),
                command,
            )
        })
        .collect();
    match format {
        OutputFormat::Json => {
            let list: Vec<serde_json::Value> = rows
                .iter()
                .map(|(id, stage, implemented, version, command)| {
                    serde_json::json!({
                        "id": id, "stage": stage, "implemented": implemented,
                        "version": version, "command": if command.is_empty() { None } else { Some(command) },
                    })
                })
                .collect();
            let doc = serde_json::json!({
                "uri": conn.uri(),
                "driver": plugin.info.name,
                "driver_version": plugin.info.version,
                "registry_version": registry.version().to_string(),
                "capabilities": list,
                "ignored": plugin.ignored.iter().map(|(id, why)| serde_json::json!({"id": id, "reason": why})).collect::<Vec<_>>(),
            });
            output::print(&output::json_value(&doc));
        }
        OutputFormat::Table => {
            let header: Vec<String> = ["Capability", "Stage", "Driver", "Command"].map(String::from).to_vec();
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|(id, stage, implemented, version, command)| {
                    let support = match (implemented, version) {
                        (true, Some(v)) => format!("yes (v{v})"),
                        (true, None) | (false, _) => "no".to_string(),
                    };
                    vec![id.clone(), stage.clone(), support, command.clone()]
                })
                .collect();
            let mut text = format!(
                "Driver {} {} on {} (registry {})\n\n",
                plugin.info.name,
                plugin.info.version,
                conn.uri(),
                registry.version()
            );
            text.push_str(&output::table(&header, &cells));
            for (id, why) in &plugin.ignored {
                text.push_str(&format!("ignored: {id}: {why}\n"));
            }
            output::print(&text);
        }
    }
    Ok(())
}
