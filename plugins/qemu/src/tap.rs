//! Host tap devices of `bridge` interfaces (`qemu:///system` only: creating a tap takes
//! CAP_NET_ADMIN).
//!
//! Each bridge interface gets a persistent tap created with iproute2's `ip`, enslaved to the
//! bridge and up; the driver opens it and hands QEMU the descriptor (`-netdev tap,fd=N`, QMP
//! `getfd` for hot-plug), so QEMU, unprivileged and filtered, never opens `/dev/net/tun`. Names are derived from
//! the domain's directory and the interface's QEMU device id, so they are the same at every
//! start, at most 15 characters (the kernel's limit) and share a per-domain prefix: stopping a
//! domain (whatever stopped it) removes every tap with its prefix, and a start first removes
//! stale ones a crash left behind, so taps never pile up across starts and destroys.

use std::{
    fmt,
    path::Path,
    process::{Command, Stdio},
};

use capvirt_plugin_api::PluginError;
use sha2::{Digest, Sha256};

use crate::spec::{Interface, Machine};

/// Where the kernel lists network interfaces.
const SYS_NET: &str = "/sys/class/net";
/// Every capvirt tap starts with it.
const TAP_PREFIX: &str = "cv";
/// Hex digits naming the domain, then the interface (2 + 8 + 5 = 15, IFNAMSIZ - 1).
const DOMAIN_DIGITS: usize = 8;
const NIC_DIGITS: usize = 5;

/// Why a tap could not be set up or removed.
#[derive(Debug)]
pub enum TapError {
    /// The bridge an interface names does not exist on this host.
    NoBridge(String),
    /// The named interface exists but is not a bridge.
    NotABridge(String),
    /// `ip` could not be run (iproute2 missing).
    NoIp(std::io::Error),
    /// `ip` refused a command (its arguments and message).
    Ip { command: String, message: String },
    /// The tap could not be opened for QEMU (`/dev/net/tun`, `TUNSETIFF`).
    Open { tap: String, message: String },
}

impl fmt::Display for TapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TapError::NoBridge(bridge) => write!(
                f,
                "bridge '{bridge}' does not exist on this host (create it first, e.g. `ip link add {bridge} type bridge`)"
            ),
            TapError::NotABridge(bridge) => write!(f, "'{bridge}' is a network interface of this host but not a bridge"),
            TapError::NoIp(e) => write!(f, "cannot run `ip` (iproute2) to manage tap devices: {e}"),
            TapError::Ip { command, message } => write!(f, "`{command}` failed: {message}"),
            TapError::Open { tap, message } => write!(f, "cannot open tap '{tap}' for QEMU: {message}"),
        }
    }
}

impl From<TapError> for PluginError {
    fn from(e: TapError) -> Self {
        match e {
            TapError::NoBridge(_) => PluginError::not_found(e.to_string()),
            TapError::NotABridge(_) => PluginError::invalid_argument(e.to_string()),
            TapError::NoIp(_) | TapError::Ip { .. } | TapError::Open { .. } => {
                PluginError::driver_failure(e.to_string())
            }
        }
    }
}

/// Who may open a tap besides root: QEMU running as an unprivileged user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

fn hex(bytes: &[u8], digits: usize) -> String {
    bytes
        .iter()
        .flat_map(|b| [b >> 4, b & 0xf])
        .take(digits)
        .map(|n| char::from_digit(n.into(), 16).unwrap_or('0'))
        .collect()
}

/// The prefix of every tap of the domain whose directory is `domain_dir`.
pub fn prefix(domain_dir: &Path) -> String {
    let digest = Sha256::digest(domain_dir.as_os_str().as_encoded_bytes());
    format!("{TAP_PREFIX}{}", hex(&digest, DOMAIN_DIGITS))
}

/// The tap of the interface with QEMU device id `device_id`.
pub fn name(domain_dir: &Path, device_id: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(domain_dir.as_os_str().as_encoded_bytes());
    hasher.update([0]);
    hasher.update(device_id.as_bytes());
    format!("{}{}", prefix(domain_dir), hex(&hasher.finalize(), NIC_DIGITS))
}

/// Whether `bridge` is an existing Linux bridge.
pub fn check_bridge(bridge: &str) -> Result<(), TapError> {
    let dir = Path::new(SYS_NET).join(bridge);
    if dir.join("bridge").is_dir() {
        Ok(())
    } else if dir.exists() {
        Err(TapError::NotABridge(bridge.to_string()))
    } else {
        Err(TapError::NoBridge(bridge.to_string()))
    }
}

fn ip(args: &[&str]) -> Result<(), TapError> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().map_err(TapError::NoIp)?;
    if out.status.success() {
        return Ok(());
    }
    let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(TapError::Ip { command: format!("ip {}", args.join(" ")), message })
}

/// Creates the persistent tap `tap` (owned by `owner` when given, so that an unprivileged QEMU
/// can open it), enslaves it to `bridge` and brings it up. A tap of that name left by an
/// earlier run is replaced. On failure nothing is left behind.
/// Opens the persistent tap `tap` (made by [`create`]) as QEMU's end of it: QEMU gets the
/// descriptor (`-netdev tap,fd=N`, or `getfd` for hot-plug) and never opens `/dev/net/tun`,
/// which is often root-only and which an unprivileged QEMU under its seccomp filter should not
/// reach anyway (libvirt does the same).
pub fn open(tap: &str) -> Result<std::os::fd::OwnedFd, TapError> {
    use std::os::fd::AsFd;
    let failed = |message: String| TapError::Open { tap: tap.to_string(), message };
    // Attach only: no address, MTU or link-state change (those are `ip`'s business).
    let device = tun_rs::DeviceBuilder::new()
        .name(tap)
        .layer(tun_rs::Layer::L2)
        .build_sync()
        .map_err(|e| failed(e.to_string()))?;
    // A descriptor of our own; the device's is closed when it drops.
    device.as_fd().try_clone_to_owned().map_err(|e| failed(e.to_string()))
}

pub fn create(tap: &str, bridge: &str, owner: Option<Owner>) -> Result<(), TapError> {
    check_bridge(bridge)?;
    if Path::new(SYS_NET).join(tap).exists() {
        delete(tap)?;
    }
    let (uid, gid) = owner.map(|o| (o.uid.to_string(), o.gid.to_string())).unzip();
    let mut add = vec!["tuntap", "add", "dev", tap, "mode", "tap"];
    if let (Some(uid), Some(gid)) = (&uid, &gid) {
        add.extend(["user", uid.as_str(), "group", gid.as_str()]);
    }
    ip(&add)?;
    if let Err(e) = ip(&["link", "set", "dev", tap, "master", bridge, "up"]) {
        let _ = delete(tap);
        return Err(e);
    }
    Ok(())
}

/// Removes the tap `tap` (already gone: nothing to do).
pub fn delete(tap: &str) -> Result<(), TapError> {
    match ip(&["link", "delete", "dev", tap]) {
        Err(_) if !Path::new(SYS_NET).join(tap).exists() => Ok(()),
        other => other,
    }
}

/// The taps of the domain whose directory is `domain_dir` that exist now.
pub fn existing(domain_dir: &Path) -> Vec<String> {
    let prefix = prefix(domain_dir);
    let Ok(entries) = std::fs::read_dir(SYS_NET) else { return Vec::new() };
    let mut taps: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        // `tun_flags`: a tun/tap device, never a bridge or a NIC that happens to match.
        .filter(|n| n.starts_with(&prefix) && Path::new(SYS_NET).join(n).join("tun_flags").exists())
        .collect();
    taps.sort();
    taps
}

/// Removes every tap of the domain (its QEMU stopped, or a new one is about to start).
pub fn sweep(domain_dir: &Path) -> Result<(), TapError> {
    let mut first_error = None;
    for tap in existing(domain_dir) {
        if let Err(e) = delete(&tap) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Creates the taps of every bridge interface of `machine`, after removing stale ones of the
/// domain. On failure the taps created so far are removed.
pub fn setup(domain_dir: &Path, machine: &Machine, owner: Option<Owner>) -> Result<(), PluginError> {
    let bridged: Vec<(usize, &Interface, &str)> = machine
        .interfaces
        .iter()
        .enumerate()
        .filter_map(|(i, nic)| nic.bridge.as_deref().map(|b| (i, nic, b)))
        .collect();
    if bridged.is_empty() && existing(domain_dir).is_empty() {
        return Ok(());
    }
    sweep(domain_dir)?;
    for (index, nic, bridge) in bridged {
        let id = nic.device_id(index);
        if let Err(e) = create(&name(domain_dir, &id), bridge, owner) {
            let _ = sweep(domain_dir);
            let error = PluginError::from(e);
            return Err(PluginError::new(error.kind, format!("interface {id}: {}", error.message)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_stable_and_share_the_domain_prefix() {
        let dir = Path::new("/var/lib/capvirt/qemu/domains/web");
        let a = name(dir, "net0");
        assert_eq!(a.len(), 15, "{a}");
        assert_eq!(a, name(dir, "net0"));
        assert_ne!(a, name(dir, "net1"));
        assert!(a.starts_with(&prefix(dir)) && name(dir, "net1").starts_with(&prefix(dir)));
        assert!(!name(Path::new("/tmp/other/domains/web"), "net0").starts_with(&prefix(dir)));
        assert!(a.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    }

    #[test]
    fn a_missing_bridge_is_named() {
        let error = check_bridge("cvnosuchbr0").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("bridge 'cvnosuchbr0' does not exist"), "{error}");
        // `lo` exists but is no bridge.
        assert!(matches!(check_bridge("lo"), Err(TapError::NotABridge(_))));
    }
}
