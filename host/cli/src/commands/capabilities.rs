//! `capvirt capabilities`: what the connected driver supports, per registry.

use clap::{ArgMatches, Command};

use crate::{context::Context, output, CliError, OutputFormat};

pub fn cli() -> Command {
    Command::new("capabilities").about("Show which registry capabilities the connected driver implements")
}

pub fn exec(_m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    let format = ctx.output();
    let conn = ctx.connect()?;
    // In process: the loaded plugin; remote: the daemon's description of its plugin.
    let driver = conn.driver_support()?;
    let registry = conn.registry();
    let rows: Vec<(String, String, Option<u32>, String)> = registry
        .capabilities()
        .iter()
        .map(|cap| {
            let command = cap.doc.cli.as_ref().map(|h| h.command.clone()).unwrap_or_default();
            let version = driver.callable.iter().find(|(id, _)| id == cap.id()).map(|(_, v)| *v);
            (cap.id().to_string(), cap.stage().to_string(), version, command)
        })
        .collect();
    match format {
        OutputFormat::Json => {
            let list: Vec<serde_json::Value> = rows
                .iter()
                .map(|(id, stage, version, command)| {
                    serde_json::json!({
                        "id": id, "stage": stage, "implemented": version.is_some(),
                        "version": version, "command": if command.is_empty() { None } else { Some(command) },
                    })
                })
                .collect();
            let doc = serde_json::json!({
                "uri": conn.uri(),
                "driver": driver.name,
                "driver_version": driver.version,
                "registry_version": registry.version().to_string(),
                "capabilities": list,
                "ignored": driver.ignored.iter().map(|(id, why)| serde_json::json!({"id": id, "reason": why})).collect::<Vec<_>>(),
            });
            output::print(&output::json_value(&doc));
        }
        OutputFormat::Table => {
            let header: Vec<String> = ["Capability", "Stage", "Driver", "Command"].map(String::from).to_vec();
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|(id, stage, version, command)| {
                    let support = version.map_or_else(|| "no".to_string(), |v| format!("yes (v{v})"));
                    vec![id.clone(), stage.clone(), support, command.clone()]
                })
                .collect();
            let mut text = format!(
                "Driver {} {} on {} (registry {})\n\n",
                driver.name,
                driver.version,
                conn.uri(),
                registry.version()
            );
            text.push_str(&output::table(&header, &cells));
            for (id, why) in &driver.ignored {
                text.push_str(&format!("ignored: {id}: {why}\n"));
            }
            output::print(&text);
        }
    }
    Ok(())
}
