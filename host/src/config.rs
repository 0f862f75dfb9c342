//! The host configuration file: settings an administrator makes once per user instead of on
//! every command line: the experimental capabilities enabled on this host, and whether
//! mutating calls may proceed when the audit log cannot be written:
//!
//! ```toml
//! # ~/.config/capvirt/config.toml
//! enable = ["domain.snapshot-create"]
//!
//! [audit]
//! fail_open = true   # default false: refuse mutating calls that cannot be audited
//! ```
//!
//! Found at `$CAPVIRT_CONFIG` when set (the file must then exist), else
//! `$XDG_CONFIG_HOME/capvirt/config.toml` (`~/.config/…`), which may be absent.

use std::{
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
        toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: crate::maint::one_line(&e.to_string()),
        })
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
    fn missing_default_file_is_empty_but_missing_explicit_file_is_an_error() {
        let missing = PathBuf::from("/nonexistent/capvirt/config.toml");
        let default = ConfigLocation { path: missing.clone(), explicit: false };
        assert_eq!(HostFileConfig::load(Some(&default)).map_err(|e| e.to_string()), Ok(HostFileConfig::default()));
        let explicit = ConfigLocation { path: missing, explicit: true };
        assert!(HostFileConfig::load(Some(&explicit)).is_err());
    }
}
