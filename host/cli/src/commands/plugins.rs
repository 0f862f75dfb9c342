//! `capvirt plugins`: loaded and refused plugins, with the reason for each refusal, and shared
//! libraries in plugin directories that are not named like plugins. Exits 1 when any plugin
//! was refused, so scripts and package post-install checks notice. `--pin` records the SHA-256
//! of every loaded plugin in the host config, after which a changed file is refused.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use clap::{Arg, ArgAction, ArgMatches, Command};

use capvirt_host::config::HostFileConfig;

use crate::{context::Context, output, CliError, OutputFormat};

pub fn cli() -> Command {
    Command::new("plugins").about("List loaded and refused driver plugins").arg(
        Arg::new("pin").long("pin").action(ArgAction::SetTrue).help(
            "Record the SHA-256 of every loaded plugin (and of pinned files that changed) in the host config; \
             a pinned file that changes is then refused",
        ),
    )
}

/// `--plugin-dir` values: an existing directory (a typo must not silently load nothing).
pub fn existing_plugin_dir(value: &str) -> Result<String, String> {
    let path = Path::new(value);
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(value.to_string()),
        Ok(_) => Err(format!("plugin directory {value} is not a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!("plugin directory {value} does not exist")),
        Err(e) => Err(format!("plugin directory {value}: {e}")),
    }
}

pub fn exec(m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    let format = ctx.output();
    let host = ctx.host()?;
    let set = host.plugins();
    let pinned = if m.get_flag("pin") { Some(pin(set)?) } else { None };
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
            let ignored = set.ignored.iter().map(
                |i| serde_json::json!({"status": "ignored", "name": null, "path": i.path.display().to_string(), "reason": i.hint}),
            );
            output::print(&output::json_value(&serde_json::Value::Array(
                loaded.into_iter().chain(refused).chain(ignored).collect(),
            )));
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
                        loaded_status(p),
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
            cells.extend(set.ignored.iter().map(|i| {
                vec!["-".into(), "-".into(), "-".into(), format!("ignored: {}", i.hint), i.path.display().to_string()]
            }));
            let mut text = output::table(&header, &cells);
            if set.loaded.is_empty() && set.refused.is_empty() && set.ignored.is_empty() {
                text.push_str("No plugins found (searched --plugin-dir, $CAPVIRT_PLUGIN_DIR or the executable's directory and /usr/lib/capvirt/plugins).\n");
            }
            if let Some((count, config)) = &pinned {
                text.push_str(&format!("Pinned the SHA-256 of {count} plugin file(s) in {}.\n", config.display()));
            }
            output::print(&text);
        }
    }
    match set.refused.len() {
        0 => Ok(()),
        1 => Err(CliError::other("1 plugin was refused (reason above)")),
        n => Err(CliError::other(format!("{n} plugins were refused (reasons above)"))),
    }
}

/// `loaded (N capabilities)`, and the declared capabilities this host cannot call (unknown to
/// its registry, or a newer contract version), so a plugin built for a newer registry says
/// what it brings that this host does not use.
fn loaded_status(plugin: &capvirt_host::plugins::LoadedPlugin) -> String {
    let callable = plugin.info.capabilities.len() - plugin.ignored.len();
    if plugin.ignored.is_empty() {
        return format!("loaded ({callable} capabilities)");
    }
    let ids: Vec<&str> = plugin.ignored.iter().map(|(id, _)| id.as_str()).collect();
    format!("loaded ({callable} capabilities; not callable here: {})", ids.join(", "))
}

/// Writes the pins of `set` into the host config; returns how many and where.
fn pin(set: &capvirt_host::plugins::PluginSet) -> Result<(usize, std::path::PathBuf), CliError> {
    let location = capvirt_host::config::locate_from_env()
        .ok_or_else(|| CliError::usage("no host config location to write pins to (set CAPVIRT_CONFIG or HOME)"))?;
    let pins = set.pins_to_record().map_err(CliError::other)?;
    HostFileConfig::rewrite(&location, |text| with_pins(text, &pins)).map_err(|e| CliError::other(e.to_string()))?;
    Ok((pins.len(), location.path))
}

/// `text` (a config file) with `pins` set in its `[pins]` table, keeping everything else in
/// the file (comments included) and replacing older pins of the same files.
fn with_pins(text: &str, pins: &BTreeMap<PathBuf, String>) -> Result<String, String> {
    let mut doc: toml_edit::DocumentMut =
        text.parse().map_err(|e: toml_edit::TomlError| capvirt_host::error::one_line(&e.to_string()))?;
    let table = doc
        .entry("pins")
        .or_insert_with(toml_edit::table)
        .as_table_mut()
        .ok_or_else(|| "`pins` is not a table".to_string())?;
    for (file, digest) in pins {
        let key = file.to_str().ok_or_else(|| format!("cannot pin {}: the path is not UTF-8", file.display()))?;
        table.insert(key, toml_edit::value(digest.as_str()));
    }
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn pins_are_written_keeping_the_rest_of_the_file() {
        let path = Path::new("c.toml");
        let digest = format!("sha256:{}", "ab".repeat(32));
        let pins = BTreeMap::from([(PathBuf::from("/p/libcapvirt_driver_x.so"), digest.clone())]);
        let original = "# my host\nenable = [\"a.b\"] # experimental\n";
        let text = with_pins(original, &pins).unwrap_or_else(|e| panic!("{e}"));
        assert!(text.starts_with(original), "{text}");
        let parsed = HostFileConfig::parse(path, &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((parsed.enable, parsed.pins), (vec!["a.b".to_string()], pins.clone()));
        // Re-pinning replaces the old digest.
        let newer =
            BTreeMap::from([(PathBuf::from("/p/libcapvirt_driver_x.so"), format!("sha256:{}", "cd".repeat(32)))]);
        let again = HostFileConfig::parse(path, &with_pins(&text, &newer).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(again.map(|c| c.pins).ok(), Some(newer));
    }
}
