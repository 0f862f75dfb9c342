//! Connection URIs: `container:///session` (per-user), `container:///system` (root only), with
//! the optional parameter `root=DIR` (another state root, percent-encoded).

use std::path::PathBuf;

use capvirt_plugin_api::PluginError;

/// What a URI selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub uri: String,
    /// Absolute state root (canonical when it already exists).
    pub root: PathBuf,
}

/// Parses a `container://` URI.
pub fn parse(uri: &str) -> Result<Config, PluginError> {
    let privileged = rustix::process::geteuid().is_root();
    let local = capvirt_plugin_api::state::parse_local_uri(uri, "container", &[], privileged)?;
    Ok(Config { uri: uri.to_string(), root: local.root })
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
