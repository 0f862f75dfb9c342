//! Connection URIs: `qemu:///session` (per-user), `qemu:///system` (root only), with optional
//! parameters `root=DIR` (another state root, percent-encoded), `accel=auto|kvm|tcg` and
//! `emulator=PATH` (the QEMU binary; default: `qemu-system-x86_64` on `PATH`).

use std::path::PathBuf;

use capvirt_plugin_api::PluginError;
use percent_encoding::percent_decode_str;

use crate::emulator::Emulator;

/// Which accelerator domains started through this connection use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM when `/dev/kvm` can be opened read-write, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    fn parse(s: &str) -> Option<Accel> {
        match s {
            "auto" => Some(Accel::Auto),
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

/// What a URI selects.
#[derive(Debug, Clone)]
pub struct Config {
    pub uri: String,
    /// Absolute state root (canonical when it already exists).
    pub root: PathBuf,
    pub accel: Accel,
    pub emulator: Emulator,
}

/// Parses a `qemu://` URI.
pub fn parse(uri: &str) -> Result<Config, PluginError> {
    let rest = uri
        .strip_prefix("qemu://")
        .ok_or_else(|| PluginError::invalid_argument(format!("{uri:?} is not a qemu:// URI")))?;
    let (location, query) = match rest.split_once('?') {
        Some((location, query)) => (location, Some(query)),
        None => (rest, None),
    };
    let Some(path) = location.strip_prefix('/') else {
        return Err(PluginError::unsupported(format!(
            "{uri}: remote hosts are not supported; use qemu:///session or qemu:///system"
        )));
    };
    let mut root = None;
    let mut accel = None;
    let mut emulator = None;
    for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| PluginError::invalid_argument(format!("{uri}: parameter `{key}` is not valid UTF-8")))?;
        match key {
            "root" if root.is_some() => return Err(duplicate(uri, key)),
            "root" => {
                if value.is_empty() || value.chars().any(char::is_control) {
                    return Err(PluginError::invalid_argument(format!(
                        "{uri}: `root` must be a non-empty path without control characters"
                    )));
                }
                root = Some(PathBuf::from(value.as_ref()));
            }
            "accel" if accel.is_some() => return Err(duplicate(uri, key)),
            "accel" => {
                accel = Some(Accel::parse(&value).ok_or_else(|| {
                    PluginError::invalid_argument(format!("{uri}: `accel` must be auto, kvm or tcg, not {value:?}"))
                })?);
            }
            "emulator" if emulator.is_some() => return Err(duplicate(uri, key)),
            "emulator" => {
                if value.is_empty() || value.chars().any(char::is_control) {
                    return Err(PluginError::invalid_argument(format!(
                        "{uri}: `emulator` must be a non-empty path without control characters"
                    )));
                }
                emulator = Some(PathBuf::from(value.as_ref()));
            }
            other => {
                return Err(PluginError::invalid_argument(format!(
                    "{uri}: unknown parameter `{other}` (known: root, accel, emulator)"
                )))
            }
        }
    }
    let root = match (path, root) {
        ("session" | "system", Some(root)) => root,
        ("session", None) => capvirt_plugin_api::state::session_root("qemu")?,
        ("system", None) => {
            if !rustix::process::geteuid().is_root() {
                return Err(PluginError::invalid_argument(
                    "qemu:///system needs root privileges; use qemu:///session".to_string(),
                ));
            }
            PathBuf::from("/var/lib/capvirt/qemu")
        }
        (other, _) => {
            return Err(PluginError::invalid_argument(format!(
                "{uri}: unknown instance {other:?}; use qemu:///session or qemu:///system"
            )))
        }
    };
    let emulator = match emulator {
        Some(emulator_path) => Emulator::at(&emulator_path, path == "system")?,
        None => Emulator::default(),
    };
    Ok(Config {
        uri: uri.to_string(),
        root: capvirt_plugin_api::state::normalize_root(&root)?,
        accel: accel.unwrap_or(Accel::Auto),
        emulator,
    })
}

fn duplicate(uri: &str, key: &str) -> PluginError {
    PluginError::invalid_argument(format!("{uri}: parameter `{key}` given twice"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_root_and_accel() {
        let config = parse("qemu:///session?root=/tmp/a%20b&accel=tcg").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.root, PathBuf::from("/tmp/a b"));
        assert_eq!(config.accel, Accel::Tcg);
    }

    #[test]
    fn takes_an_absolute_emulator_path() {
        let config = parse("qemu:///session?root=/tmp/a&emulator=/bin/sh").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.emulator.program(), std::path::Path::new("/bin/sh"));
        let default = parse("qemu:///session?root=/tmp/a").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(default.emulator.program(), std::path::Path::new("qemu-system-x86_64"));
        for bad in [
            "qemu:///session?root=/tmp/a&emulator=",
            "qemu:///session?root=/tmp/a&emulator=sh",
            "qemu:///session?root=/tmp/a&emulator=/bin/sh&emulator=/bin/sh",
            "qemu:///session?root=/tmp/a&emulator=/nonexistent/qemu",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn refuses_unknown_parameters_and_hosts() {
        for bad in [
            "qemu:///session?rot=/x",
            "qemu:///session?accel=xen",
            "qemu:///session?root=/a&root=/b",
            "qemu://host/system",
            "qemu:///other",
            "qemu:///session?root=",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }
}
