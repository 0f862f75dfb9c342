//! Connection URIs: `qemu:///session` (per-user), `qemu:///system` (root only), with optional
//! parameters `root=DIR` (another state root, percent-encoded), `accel=auto|kvm|tcg` and
//! `emulator=PATH` (the QEMU binary; default: `qemu-system-x86_64` on `PATH`).

use std::path::{Path, PathBuf};

use capvirt_plugin_api::PluginError;

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
    /// Where images may be (the host's `image_allow` connect option; set by `connect`).
    pub images: crate::spec::ImagePolicy,
    /// `qemu:///system` (root; bridge interfaces), not `qemu:///session`.
    pub system: bool,
}

/// Parses a `qemu://` URI.
pub fn parse(uri: &str) -> Result<Config, PluginError> {
    let privileged = rustix::process::geteuid().is_root();
    let local = capvirt_plugin_api::state::parse_local_uri(uri, "qemu", &["accel", "emulator"], privileged)?;
    let mut accel = Accel::Auto;
    let mut emulator = Emulator::default();
    for (key, value) in &local.params {
        match key.as_str() {
            "accel" => {
                accel = Accel::parse(value).ok_or_else(|| {
                    PluginError::invalid_argument(format!("{uri}: `accel` must be auto, kvm or tcg, not {value:?}"))
                })?;
            }
            _ => {
                if value.is_empty() || value.chars().any(char::is_control) {
                    return Err(PluginError::invalid_argument(format!(
                        "{uri}: `emulator` must be a non-empty path without control characters"
                    )));
                }
                emulator = Emulator::at(Path::new(value), local.instance == "system")?;
            }
        }
    }
    let system = local.instance == "system";
    Ok(Config { uri: uri.to_string(), root: local.root, accel, emulator, images: Default::default(), system })
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
        assert_eq!(config.emulator.program(), Path::new("/bin/sh"));
        let default = parse("qemu:///session?root=/tmp/a").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(default.emulator.program(), Path::new("qemu-system-x86_64"));
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
