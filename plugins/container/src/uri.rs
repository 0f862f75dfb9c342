//! Connection URIs: `container:///session` (per-user), `container:///system` (root only), with
//! the optional parameter `root=DIR` (another state root, percent-encoded).

use std::path::PathBuf;

use capvirt_plugin_api::PluginError;
use percent_encoding::percent_decode_str;

/// What a URI selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub uri: String,
    /// Absolute state root (canonical when it already exists).
    pub root: PathBuf,
}

/// Parses a `container://` URI.
pub fn parse(uri: &str) -> Result<Config, PluginError> {
    let rest = uri
        .strip_prefix("container://")
        .ok_or_else(|| PluginError::invalid_argument(format!("{uri:?} is not a container:// URI")))?;
    let (location, query) = match rest.split_once('?') {
        Some((location, query)) => (location, Some(query)),
        None => (rest, None),
    };
    let Some(path) = location.strip_prefix('/') else {
        return Err(PluginError::unsupported(format!(
            "{uri}: remote hosts are not supported; use container:///session or container:///system"
        )));
    };
    let mut root = None;
    for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| PluginError::invalid_argument(format!("{uri}: parameter `{key}` is not valid UTF-8")))?;
        match key {
            "root" if root.is_some() => {
                return Err(PluginError::invalid_argument(format!("{uri}: parameter `root` given twice")))
            }
            "root" => {
                if value.is_empty() || value.chars().any(char::is_control) {
                    return Err(PluginError::invalid_argument(format!(
                        "{uri}: `root` must be a non-empty path without control characters"
                    )));
                }
                root = Some(PathBuf::from(value.as_ref()));
            }
            other => {
                return Err(PluginError::invalid_argument(format!("{uri}: unknown parameter `{other}` (known: root)")))
            }
        }
    }
    let root = match (path, root) {
        ("session" | "system", Some(root)) => root,
        ("session", None) => capvirt_plugin_api::state::session_root("container")?,
        ("system", None) => {
            if !rustix::process::geteuid().is_root() {
                return Err(PluginError::invalid_argument(
                    "container:///system needs root privileges; use container:///session".to_string(),
                ));
            }
            PathBuf::from("/var/lib/capvirt/container")
        }
        (other, _) => {
            return Err(PluginError::invalid_argument(format!(
                "{uri}: unknown instance {other:?}; use container:///session or container:///system"
            )))
        }
    };
    Ok(Config { uri: uri.to_string(), root: capvirt_plugin_api::state::normalize_root(&root)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_session_system_and_root() {
        let config = parse("container:///session?root=/tmp/a%20b").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.root, PathBuf::from("/tmp/a b"));
        assert_eq!(config.uri, "container:///session?root=/tmp/a%20b");
        let system = parse("container:///system?root=/tmp/sys").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(system.root, PathBuf::from("/tmp/sys"));
    }

    #[test]
    fn session_root_follows_xdg_state_home() {
        // Only the shape is checked: the environment belongs to the whole test process.
        if let Ok(config) = parse("container:///session") {
            assert!(config.root.ends_with("capvirt/container"), "{}", config.root.display());
        }
    }

    #[test]
    fn refuses_unknown_parameters_instances_and_hosts() {
        for bad in [
            "container:///session?rot=/x",
            "container:///session?root=/a&root=/b",
            "container:///session?root=",
            "container:///session?root=%0a",
            "container://host/system",
            "container:///other",
            "qemu:///session",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }
}
