//! `capvirt plugins`: loaded and refused plugins, with the reason for each refusal.

use clap::{ArgMatches, Command};

use crate::cli::{context::Context, output, CliError, OutputFormat};

pub fn cli() -> Command {
    Command::new("plugins").about("List loaded and refused driver plugins")
}

pub fn exec(_m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    let format = ctx.output();
    let host = ctx.host()?;
    let set = host.plugins();
    match format {
        OutputFormat::Json => {
            let loaded: Vec<serde_json::Value> = set
                .loaded
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "status": "loaded",
                        "name": p.info.name,
                        "vendor": p.info.vendor,
                        "version": p.info.version,
                        "registry_version": p.info.registry_version,
                        "schemes": p.info.schemes,
                        "path": p.path.display().to_string(),
                        "capabilities": p.info.capabilities.iter().map(|(id, v)| serde_json::json!({"id": id, "version": v})).collect::<Vec<_>>(),
                        "ignored": p.ignored.iter().map(|(id, why)| serde_json::json!({"id": id, "reason": why})).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let refused: Vec<serde_json::Value> = set
                .refused
                .iter()
                .map(|r| serde_json::json!({"status": "refused", "name": r.name, "path": r.path.display().to_string(), "reason": r.reason}))
                .collect();
            output::print(&output::json_value(&serde_json::Value::Array(loaded.into_iter().chain(refused).collect())));
        }
        OutputFormat::Table => {
            let header: Vec<String> = ["Plugin", "Version", "Schemes", "Status", "Path"].map(String::from).to_vec();
            let mut cells: Vec<Vec<String>> = set
                .loaded
                .iter()
                .map(|p| {
                    vec![
                        p.info.name.clone(),
                        p.info.version.clone(),
                        p.info.schemes.join(","),
                        format!("loaded ({} capabilities)", p.info.capabilities.len() - p.ignored.len()),
                        p.path.display().to_string(),
                    ]
                })
                .collect();
            cells.extend(set.refused.iter().map(|r| {
                vec![
                    r.name.clone().unwrap_or_else(|| "-".into()),
                    "-".into(),
                    "-".into(),
                    format!("refused: {}", r.reason),
                    r.path.display().to_string(),
                ]
            }));
            let mut text = output::table(&header, &cells);
            if set.loaded.is_empty() && set.refused.is_empty() {
                text.push_str("No plugins found (searched --plugin-dir, $CAPVIRT_PLUGIN_DIR or the executable's directory and /usr/lib/capvirt/plugins).\n");
            }
            output::print(&text);
        }
    }
    Ok(())
}
