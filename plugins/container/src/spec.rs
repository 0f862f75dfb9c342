//! The container definition as this driver stores and runs it, and the validation that turns
//! the registry's hypervisor-agnostic `DomainSpec` into it.
//!
//! The registry already checked types and formats; this re-checks whatever becomes a path or
//! a bwrap argument, and refuses what a container cannot have (disks, USB devices, a display,
//! a kernel to boot) with one line saying what to use instead.

use std::path::{Component, Path, PathBuf};

use capvirt_plugin_api::{types::DomainSpec, PluginError};
use serde::{Deserialize, Serialize};

/// Bound on init's argument list (the kernel's own limit is far higher; this keeps the
/// stored definition and the bwrap command line small).
const MAX_INIT_ARGS: usize = 4096;
/// Paths bwrap mounts itself in every container: a share there would be hidden or hide them.
const RESERVED_TARGETS: [&str; 2] = ["/proc", "/dev"];

/// A host directory shared into the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Share {
    /// Canonical host directory.
    pub source: PathBuf,
    /// Normalized absolute path inside the container.
    pub target: String,
    pub readonly: bool,
}

/// A validated container definition (what `domain.toml` holds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Container {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u64,
    /// The first process: an absolute program path and its arguments.
    pub init: Vec<String>,
    /// Empty: the default view (host system directories read-only, a private `/tmp`).
    #[serde(default)]
    pub filesystems: Vec<Share>,
}

/// Checks a domain name before it becomes a directory or cgroup name (the registry checked it
/// too; nothing that touches the file system relies on that). The rule all drivers share.
pub fn check_name(name: &str) -> Result<(), PluginError> {
    capvirt_plugin_api::types::check_domain_name(name)
}

fn refuse(message: impl Into<String>) -> PluginError {
    PluginError::invalid_argument(message)
}

/// Validates a whole domain spec into the stored definition. Reads the file system (shared
/// directories must exist) but writes nothing.
pub fn validate(spec: &DomainSpec, host_memory_mib: u64) -> Result<Container, PluginError> {
    check_name(&spec.name)?;
    if spec.memory_mib < 16 {
        return Err(refuse(format!("memory_mib {} is below 16 MiB", spec.memory_mib)));
    }
    // 0: the host's memory is unknown (no /proc/meminfo).
    if host_memory_mib > 0 && spec.memory_mib > host_memory_mib {
        return Err(refuse(format!(
            "memory_mib {} exceeds this host's {host_memory_mib} MiB of memory",
            spec.memory_mib
        )));
    }
    if !(1..=255).contains(&spec.vcpus) {
        return Err(refuse(format!("vcpus {} is outside 1..=255", spec.vcpus)));
    }
    if !spec.disks.is_empty() {
        return Err(refuse(
            "containers have no disks: share a host directory with [[filesystems]] (source, target) instead of [[disks]]",
        ));
    }
    if !spec.devices.is_empty() {
        return Err(refuse("containers have no USB devices: remove [[devices]]"));
    }
    if spec.graphics.is_some() {
        return Err(refuse("containers have no display adapter: remove [graphics]"));
    }
    if !spec.interfaces.is_empty() {
        return Err(PluginError::unsupported(
            "the container driver does not give containers network interfaces yet (they have loopback only): remove [[interfaces]]"
                .to_string(),
        ));
    }
    let boot = spec.boot.as_ref();
    if boot.is_some_and(|b| b.kernel.is_some() || b.initrd.is_some() || b.cmdline.is_some()) {
        return Err(refuse(
            "boot.kernel, boot.initrd and boot.cmdline boot a virtual machine's kernel; a container runs boot.init on the host's kernel",
        ));
    }
    let init = boot.map(|b| b.init.clone()).unwrap_or_default();
    check_init(&init)?;
    let mut filesystems: Vec<Share> = Vec::with_capacity(spec.filesystems.len());
    for fs in &spec.filesystems {
        let share = share(&fs.source, &fs.target, fs.readonly)?;
        if filesystems.iter().any(|s| s.target == share.target) {
            return Err(refuse(format!("filesystem target {} is used twice", share.target)));
        }
        filesystems.push(share);
    }
    Ok(Container { name: spec.name.clone(), memory_mib: spec.memory_mib, vcpus: spec.vcpus, init, filesystems })
}

/// init is handed to bwrap as an argument list: no shell parses it. The program must be an
/// absolute path (inside the container) so it can never be read as one of bwrap's options.
fn check_init(init: &[String]) -> Result<(), PluginError> {
    let Some(program) = init.first() else {
        return Err(refuse(
            "a container needs boot.init, the program (absolute path) and arguments of its first process",
        ));
    };
    if !program.starts_with('/') || program.chars().any(char::is_control) {
        return Err(refuse(format!(
            "boot.init program {program:?} must be an absolute path inside the container without control characters"
        )));
    }
    if init.len() > MAX_INIT_ARGS {
        return Err(refuse(format!("boot.init has {} arguments; at most {MAX_INIT_ARGS}", init.len())));
    }
    // Arguments may hold newlines (a script for `sh -c`), never NUL: it cannot cross exec.
    if let Some(arg) = init.iter().find(|a| a.contains('\0')) {
        return Err(refuse(format!("boot.init argument {arg:?} contains a NUL byte")));
    }
    Ok(())
}

/// A shared directory: an existing host directory, mounted at a plain absolute path.
fn share(source: &str, target: &str, readonly: bool) -> Result<Share, PluginError> {
    if !source.starts_with('/') || source.chars().any(char::is_control) {
        return Err(refuse(format!(
            "filesystem source {source:?} must be an absolute host path without control characters"
        )));
    }
    let resolved = std::fs::canonicalize(source).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => refuse(format!("filesystem source {source} does not exist")),
        _ => refuse(format!("filesystem source {source}: {e}")),
    })?;
    if !resolved.is_dir() {
        return Err(refuse(format!("filesystem source {source} is not a directory")));
    }
    Ok(Share { source: resolved, target: check_target(target)?, readonly })
}

/// A target is absolute, without `.`/`..` components or control characters, and not where
/// bwrap mounts `/proc` and `/dev`. Returns it normalized (no repeated or trailing `/`).
pub fn check_target(target: &str) -> Result<String, PluginError> {
    if !target.starts_with('/') || target.chars().any(char::is_control) {
        return Err(refuse(format!(
            "filesystem target {target:?} must be an absolute path inside the container without control characters"
        )));
    }
    let mut normalized = String::new();
    for component in Path::new(target).components() {
        match component {
            Component::RootDir => {}
            Component::Normal(part) => {
                normalized.push('/');
                normalized.push_str(&part.to_string_lossy());
            }
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(refuse(format!("filesystem target {target:?} must not contain `.` or `..`")))
            }
        }
    }
    // `Path::components` drops a lone `.`; the text check catches it.
    if target.split('/').any(|part| part == "." || part == "..") {
        return Err(refuse(format!("filesystem target {target:?} must not contain `.` or `..`")));
    }
    if normalized.is_empty() {
        normalized.push('/');
    }
    if RESERVED_TARGETS.iter().any(|r| normalized == *r || normalized.starts_with(&format!("{r}/"))) {
        return Err(refuse(format!(
            "filesystem target {normalized} is reserved: every container gets its own /proc and /dev"
        )));
    }
    Ok(normalized)
}

#[cfg(test)]
mod tests {
    use capvirt_plugin_api::types::{
        BootSpec, DiskBus, DiskFormat, DiskSpec, FilesystemSpec, GraphicsAdapter, GraphicsSpec, InterfaceKind,
        InterfaceSpec,
    };

    use super::*;

    fn spec(init: &[&str]) -> DomainSpec {
        let mut spec = DomainSpec::new("c1", 64, 1);
        spec.boot = Some(BootSpec::init(init.iter().copied()));
        spec
    }

    fn refused(spec: &DomainSpec) -> String {
        match validate(spec, 0) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => {
                assert_eq!(e.kind, capvirt_plugin_api::ErrorKind::InvalidArgument, "{e}");
                e.message.to_string()
            }
        }
    }

    #[test]
    fn accepts_an_init_and_shares() {
        let mut s = spec(&["/bin/sh", "-c", "echo hi\nsleep 1"]);
        s.filesystems.push(FilesystemSpec::new("/usr", "/usr//"));
        let c = validate(&s, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.init.len(), 3);
        assert_eq!(c.filesystems[0].target, "/usr");
        assert!(c.filesystems[0].readonly);
        let text = toml::to_string(&c).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(toml::from_str::<Container>(&text).ok(), Some(c));
    }

    #[test]
    fn refuses_what_a_container_cannot_have() {
        let mut disks = spec(&["/bin/true"]);
        disks.disks.push(DiskSpec::new("/img.qcow2", DiskFormat::Qcow2, DiskBus::Virtio));
        assert!(refused(&disks).contains("no disks"));
        let mut graphics = spec(&["/bin/true"]);
        graphics.graphics = Some(GraphicsSpec::new(GraphicsAdapter::Vga));
        assert!(refused(&graphics).contains("display"));
        let mut network = spec(&["/bin/true"]);
        network.interfaces.push(InterfaceSpec::new(InterfaceKind::User));
        let unsupported = validate(&network, 0).err().map(|e| (e.kind, e.message.to_string()));
        assert!(
            unsupported.as_ref().is_some_and(|(kind, message)| *kind == capvirt_plugin_api::ErrorKind::Unsupported
                && message.contains("loopback only")),
            "{unsupported:?}"
        );
        let mut kernel = spec(&["/bin/true"]);
        if let Some(boot) = kernel.boot.as_mut() {
            boot.kernel = Some("/boot/vmlinuz".into());
        }
        assert!(refused(&kernel).contains("boot.kernel"));
        assert!(refused(&DomainSpec::new("c1", 64, 1)).contains("needs boot.init"));
        assert!(refused(&spec(&[])).contains("needs boot.init"));
        assert!(refused(&spec(&["sh"])).contains("absolute path"));
        assert!(refused(&spec(&["--bind"])).contains("absolute path"));
        assert!(refused(&spec(&["/bin/sh", "a\0b"])).contains("NUL"));
    }

    #[test]
    fn refuses_bad_shares() {
        for (source, target, needle) in [
            ("/usr", "usr", "absolute path inside"),
            ("usr", "/usr", "absolute host path"),
            ("/nonexistent-capvirt", "/x", "does not exist"),
            ("/etc/hostname", "/x", "not a directory"),
            ("/usr", "/a/../b", "`..`"),
            ("/usr", "/a/./b", "`..`"),
            ("/usr", "/proc", "reserved"),
            ("/usr", "/dev/shm", "reserved"),
            ("/usr", "/a\nb", "control"),
        ] {
            let mut s = spec(&["/bin/true"]);
            s.filesystems.push(FilesystemSpec::new(source, target));
            let message = refused(&s);
            assert!(message.contains(needle), "{source} → {target}: {message}");
        }
        let mut twice = spec(&["/bin/true"]);
        twice.filesystems.push(FilesystemSpec::new("/usr", "/x"));
        twice.filesystems.push(FilesystemSpec::new("/etc", "/x/"));
        assert!(refused(&twice).contains("used twice"));
    }

    #[test]
    fn names_never_become_paths() {
        for bad in ["../x", "a/b", ".x", "a..b", "", "a b", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_name("web-1.prod_a").is_ok());
    }

    #[test]
    fn bounds_memory_and_vcpus() {
        let mut s = spec(&["/bin/true"]);
        s.memory_mib = 1 << 20;
        assert!(validate(&s, 1024).is_err());
        s.memory_mib = 64;
        s.vcpus = 0;
        assert!(validate(&s, 1024).is_err());
    }
}
