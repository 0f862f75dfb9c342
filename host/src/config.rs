//! The host configuration file: settings an administrator makes once per user instead of on
//! every command line: the experimental capabilities enabled on this host, optional SHA-256
//! pins of plugin files (written by `capvirt plugins --pin`; a pinned file that changed is
//! refused), and whether mutating calls may proceed when the audit log cannot be written:
//!
//! ```toml
//! # ~/.config/capvirt/config.toml
//! enable = ["domain.snapshot-create"]
//!
//! [pins]
//! "/usr/lib/capvirt/plugins/libcapvirt_driver_qemu.so" = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//!
//! [audit]
//! fail_open = true   # default false: refuse mutating calls that cannot be audited
//! ```
//!
//! Found at `$CAPVIRT_CONFIG` when set (the file must then exist), else
//! `$XDG_CONFIG_HOME/capvirt/config.toml` (`~/.config/…`), which may be absent.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// `config.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFileConfig {
    /// Experimental capabilities callable on this host, as with `--enable ID`.
    #[serde(default)]
    pub enable: Vec<String>,
    /// SHA-256 pins of plugin files: canonical path → `sha256:<64 lowercase hex digits>`.
    #[serde(default)]
    pub pins: BTreeMap<PathBuf, String>,
    #[serde(default)]
    pub audit: AuditFileConfig,
}

/// `[audit]` in `config.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFileConfig {
    /// Let mutating calls proceed (with a warning) when the audit log cannot be written.
    #[serde(default)]
    pub fail_open: bool,
}

/// Why a pin value is not `sha256:<64 lowercase hex digits>`, if it is not.
fn pin_problem(value: &str) -> Option<String> {
    let well_formed = value
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    (!well_formed).then(|| format!("pin {value:?} is not sha256:<64 lowercase hex digits>"))
}

/// A config file that exists but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read host config {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("invalid host config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Where the config file is, and whether it must exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigLocation {
    pub path: PathBuf,
    /// Named explicitly (`CAPVIRT_CONFIG`): a missing file is an error.
    pub explicit: bool,
}

/// The config location from the environment values given (`CAPVIRT_CONFIG`,
/// `XDG_CONFIG_HOME`, `HOME`); `None` when no location can be derived.
pub fn locate(explicit: Option<&str>, xdg_config_home: Option<&str>, home: Option<&str>) -> Option<ConfigLocation> {
    let non_empty = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(path) = non_empty(explicit) {
        return Some(ConfigLocation { path, explicit: true });
    }
    let base = non_empty(xdg_config_home).or_else(|| non_empty(home).map(|h| h.join(".config")))?;
    Some(ConfigLocation { path: base.join("capvirt").join("config.toml"), explicit: false })
}

/// The location from the process environment.
pub fn locate_from_env() -> Option<ConfigLocation> {
    let var = |name: &str| std::env::var(name).ok();
    locate(var("CAPVIRT_CONFIG").as_deref(), var("XDG_CONFIG_HOME").as_deref(), var("HOME").as_deref())
}

impl HostFileConfig {
    /// Parses a config file's text.
    pub fn parse(path: &Path, text: &str) -> Result<HostFileConfig, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { path: path.to_path_buf(), message };
        let config: HostFileConfig =
            toml::from_str(text).map_err(|e| invalid(crate::maint::one_line(&e.to_string())))?;
        for (file, value) in &config.pins {
            let problem = pin_problem(value);
            if let Some(problem) = problem {
                return Err(invalid(format!("[pins] {}: {problem}", file.display())));
            }
        }
        Ok(config)
    }

    /// Records `pins` in the config at `location` (created if absent), keeping everything
    /// else in the file (comments included) and replacing older pins of the same files.
    /// Written atomically: readers see the old file or the new one.
    pub fn write_pins(location: &ConfigLocation, pins: &BTreeMap<PathBuf, String>) -> Result<(), ConfigError> {
        let path = &location.path;
        let read_error = |source: io::Error| ConfigError::Read { path: path.clone(), source };
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(read_error(e)),
        };
        let text = with_pins(&text, pins).map_err(|message| ConfigError::Invalid { path: path.clone(), message })?;
        HostFileConfig::parse(path, &text)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(read_error)?;
        }
        capvirt_plugin_api::fs::write_atomic(path, text.as_bytes()).map_err(read_error)
    }

    /// Reads the config at `location`; an absent default file is an empty config.
    pub fn load(location: Option<&ConfigLocation>) -> Result<HostFileConfig, ConfigError> {
        let Some(location) = location else { return Ok(HostFileConfig::default()) };
        match fs::read_to_string(&location.path) {
            Ok(text) => HostFileConfig::parse(&location.path, &text),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !location.explicit => Ok(HostFileConfig::default()),
            Err(source) => Err(ConfigError::Read { path: location.path.clone(), source }),
        }
    }
}

/// `text` (a config file) with `pins` set in its `[pins]` table.
fn with_pins(text: &str, pins: &BTreeMap<PathBuf, String>) -> Result<String, String> {
    let mut doc: toml_edit::DocumentMut =
        text.parse().map_err(|e: toml_edit::TomlError| crate::maint::one_line(&e.to_string()))?;
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
    use super::*;

    #[test]
    fn location_precedence() {
        let explicit = locate(Some("/etc/c.toml"), Some("/x"), Some("/home/u"));
        assert_eq!(explicit, Some(ConfigLocation { path: "/etc/c.toml".into(), explicit: true }));
        let xdg = locate(Some(""), Some("/x"), Some("/home/u")).map(|l| l.path);
        assert_eq!(xdg, Some(PathBuf::from("/x/capvirt/config.toml")));
        let home = locate(None, None, Some("/home/u")).map(|l| l.path);
        assert_eq!(home, Some(PathBuf::from("/home/u/.config/capvirt/config.toml")));
        assert_eq!(locate(None, None, None), None);
    }

    #[test]
    fn parsing_refuses_unknown_keys_and_wrong_types() {
        let path = Path::new("c.toml");
        let ok = HostFileConfig::parse(path, "enable = [\"a.b\"]\n").map_err(|e| e.to_string());
        assert_eq!(ok, Ok(HostFileConfig { enable: vec!["a.b".into()], ..Default::default() }));
        let audit = HostFileConfig::parse(path, "[audit]\nfail_open = true\n").map(|c| c.audit.fail_open);
        assert!(matches!(audit, Ok(true)));
        assert!(HostFileConfig::parse(path, "[audit]\nfail_opne = true\n").is_err());
        let unknown = HostFileConfig::parse(path, "enabled = []\n").map(|_| ()).map_err(|e| e.to_string());
        assert!(unknown.is_err_and(|e| e.contains("c.toml") && e.contains("enabled")));
        assert!(HostFileConfig::parse(path, "enable = \"a.b\"\n").is_err());
    }

    #[test]
    fn pins_are_sha256_digests_and_are_written_keeping_the_rest_of_the_file() {
        let path = Path::new("c.toml");
        let digest = format!("sha256:{}", "ab".repeat(32));
        let pins = BTreeMap::from([(PathBuf::from("/p/libcapvirt_driver_x.so"), digest.clone())]);
        let original = "# my host\nenable = [\"a.b\"] # experimental\n";
        let text = with_pins(original, &pins).unwrap_or_else(|e| panic!("{e}"));
        assert!(text.starts_with(original), "{text}");
        let parsed = HostFileConfig::parse(path, &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed, HostFileConfig { enable: vec!["a.b".into()], pins: pins.clone(), ..Default::default() });
        // Re-pinning replaces the old digest.
        let newer =
            BTreeMap::from([(PathBuf::from("/p/libcapvirt_driver_x.so"), format!("sha256:{}", "cd".repeat(32)))]);
        let again = HostFileConfig::parse(path, &with_pins(&text, &newer).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(again.map(|c| c.pins).ok(), Some(newer));
        for bad in ["md5:00", "sha256:AB", "sha256:abc", "ab"] {
            let text = format!("[pins]\n\"/p/x.so\" = \"{bad}\"\n");
            let err = HostFileConfig::parse(path, &text).map(|_| ()).map_err(|e| e.to_string());
            assert!(err.is_err_and(|e| e.contains("/p/x.so") && e.contains("sha256:<64")), "{bad}");
        }
    }

    #[test]
    fn missing_default_file_is_empty_but_missing_explicit_file_is_an_error() {
        let missing = PathBuf::from("/nonexistent/capvirt/config.toml");
        let default = ConfigLocation { path: missing.clone(), explicit: false };
        assert_eq!(HostFileConfig::load(Some(&default)).map_err(|e| e.to_string()), Ok(HostFileConfig::default()));
        let explicit = ConfigLocation { path: missing, explicit: true };
        assert!(HostFileConfig::load(Some(&explicit)).is_err());
    }
}
