//! Configuration files.
//!
//! **The user's config** (`config.toml`): settings made once per user instead of on every
//! command line: the experimental capabilities enabled, and optional SHA-256 pins of plugin
//! files (written by `capvirt plugins --pin`; a pinned file that changed is refused):
//!
//! ```toml
//! # ~/.config/capvirt/config.toml
//! enable = ["domain.snapshot-create"]
//!
//! [pins]
//! "/usr/lib/capvirt/plugins/libcapvirt_driver_qemu.so" = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! ```
//!
//! Found at `$CAPVIRT_CONFIG` when set (the file must then exist), else
//! `$XDG_CONFIG_HOME/capvirt/config.toml` (`~/.config/…`), which may be absent.
//!
//! **The system config** (`capvirt.toml` in the system config directory, [`system_dir`]):
//! what only root decides. Like `access.toml` next to it ([`crate::access`]) it is used only
//! when it and every directory above it are owned by root and not writable by group or others:
//!
//! ```toml
//! # /etc/capvirt/capvirt.toml
//! [audit]
//! path = "/var/log/capvirt/audit.jsonl"  # the log of root and of every *:///system connection
//! fail_open = false                       # true: mutating calls proceed when it cannot be written
//!
//! [images]
//! # Where disk images, kernels and save files may be; absent: anywhere but the deny list
//! # (/etc, /proc, /sys, /boot, /dev and device nodes), which only an entry inside it lifts.
//! allow = ["/var/lib/capvirt/images", "/srv/vm"]
//!
//! [qemu]
//! # The unprivileged account qemu:///system QEMUs run as (absent: capvirt-qemu).
//! user = "capvirt-qemu"
//! [daemon]
//! # Who may connect to `capvirt daemon`'s Unix socket besides root (libvirt's unix_sock_group
//! # and unix_sock_rw_perms); `--socket-group`/`--socket-mode` override. Default: root only, 0600.
//! socket_group = "capvirt"                # a group name or a numeric gid
//! socket_mode = "0660"                    # octal, at most 0777
//! ```

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// `config.toml`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFileConfig {
    /// Experimental capabilities callable on this host, as with `--enable ID`.
    #[serde(default)]
    pub enable: Vec<String>,
    /// SHA-256 pins of plugin files: canonical path → `sha256:<64 lowercase hex digits>`.
    #[serde(default)]
    pub pins: BTreeMap<PathBuf, String>,
    /// Only to say where `[audit]` went: a user cannot loosen auditing.
    #[serde(default)]
    audit: Option<toml::Value>,
}

/// The system config directory: `$CAPVIRT_SYSCONFDIR` when set (tests, staging; the same
/// ownership checks apply), else `/etc/capvirt`.
pub fn system_dir() -> PathBuf {
    std::env::var_os("CAPVIRT_SYSCONFDIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(SYSTEM_DIR), PathBuf::from)
}

/// The default system config directory.
pub const SYSTEM_DIR: &str = "/etc/capvirt";
/// The system config's file name in [`system_dir`].
pub const SYSTEM_FILE: &str = "capvirt.toml";
/// Where root's and `*:///system` connections' audit records go unless `capvirt.toml` says.
pub const SYSTEM_AUDIT_LOG: &str = "/var/log/capvirt/audit.jsonl";

/// `capvirt.toml`: what only root decides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemConfig {
    #[serde(default)]
    pub audit: SystemAudit,
    #[serde(default)]
    pub images: SystemImages,
    #[serde(default)]
    pub qemu: SystemQemu,
    #[serde(default)]
    pub daemon: SystemDaemon,
    /// The file it came from (`None`: absent, defaults).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[audit]` in `capvirt.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemAudit {
    /// The log of root and of `*:///system` connections ([`SYSTEM_AUDIT_LOG`] when absent).
    pub path: Option<PathBuf>,
    /// Let mutating calls proceed (with a warning) when the audit log cannot be written.
    #[serde(default)]
    pub fail_open: bool,
}

/// `[images]` in `capvirt.toml`, passed to drivers as the `image_allow` connect option.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemImages {
    /// Absolute directories (or files) images may be in; empty: anywhere but the deny list.
    #[serde(default)]
    pub allow: Vec<PathBuf>,
}

/// `[qemu]` in `capvirt.toml`, passed to drivers as the `qemu_user` connect option.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemQemu {
    /// The account `qemu:///system` QEMUs run as (the driver's `capvirt-qemu` when absent).
    pub user: Option<String>,
}

/// Why `name` is not a plausible account name (the rules of `useradd`, loosely), if it is not.
fn account_name_problem(name: &str) -> Option<String> {
    let body = name.strip_suffix('$').unwrap_or(name);
    let mut chars = body.chars();
    let well_formed = name.len() <= 32
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    (!well_formed).then(|| {
        format!(
            "[qemu] user {:?} is not an account name (a letter or _, then letters, digits, _ - .; at most 32)",
            crate::audit::redact::cut(name, 64)
        )
    })
}

/// `[daemon]` in `capvirt.toml`: the daemon socket's group and mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemDaemon {
    /// The group the socket is given: a name or a numeric gid.
    pub socket_group: Option<String>,
    /// The socket's permission bits, octal text as in libvirt (`"0660"`); checked by
    /// [`parse_socket_mode`] when the file is read.
    pub socket_mode: Option<String>,
}

impl SystemDaemon {
    /// The socket mode, if the file sets one.
    pub fn socket_mode(&self) -> Result<Option<u32>, String> {
        self.socket_mode.as_deref().map(parse_socket_mode).transpose()
    }
}

/// The daemon socket's mode from octal text (`0660`, `660`, `0o660`): permission bits only
/// (no setuid, setgid or sticky bit, which mean nothing on a socket), and the owner must keep
/// read and write (a daemon whose owner cannot connect is a mistake, not a policy).
pub fn parse_socket_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    let mode = u32::from_str_radix(digits, 8)
        .ok()
        .filter(|_| !digits.is_empty() && digits.len() <= 4)
        .ok_or_else(|| format!("socket mode {text:?} is not an octal mode such as 0660"))?;
    if mode > 0o777 {
        return Err(format!(
            "socket mode {text:?} has bits beyond 0777 (setuid, setgid or sticky mean nothing on a socket)"
        ));
    }
    if mode & 0o600 != 0o600 {
        return Err(format!("socket mode {text:?} takes read and write from the owner; it must include 0600"));
    }
    Ok(mode)
}

impl SystemConfig {
    /// The log root's calls and `*:///system` connections are audited to.
    pub fn audit_path(&self) -> PathBuf {
        self.audit.path.clone().unwrap_or_else(|| PathBuf::from(SYSTEM_AUDIT_LOG))
    }

    /// Reads `DIR/capvirt.toml` (defaults when absent), refusing a file root does not control.
    pub fn load(dir: &Path) -> Result<SystemConfig, ConfigError> {
        let path = dir.join(SYSTEM_FILE);
        let text = match read_root_owned(&path, 1 << 20) {
            Ok(None) => return Ok(SystemConfig::default()),
            Ok(Some(text)) => text,
            Err(RootOwnedError::Io(source)) => return Err(ConfigError::Read { path, source }),
            Err(RootOwnedError::Unsafe(why)) => return Err(ConfigError::Invalid { path, message: why }),
        };
        SystemConfig::parse(&path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<SystemConfig, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { path: path.to_path_buf(), message };
        let mut config: SystemConfig =
            toml::from_str(text).map_err(|e| invalid(crate::error::one_line(&e.to_string())))?;
        let relative = config.audit.path.iter().chain(&config.images.allow).find(|p| !p.is_absolute());
        if let Some(relative) = relative {
            return Err(invalid(format!("{} is not an absolute path", relative.display())));
        }
        if let Some(problem) = config.qemu.user.as_deref().and_then(account_name_problem) {
            return Err(invalid(problem));
        }
        config.daemon.socket_mode().map_err(|why| invalid(format!("[daemon] {why}")))?;
        if config.daemon.socket_group.as_deref() == Some("") {
            return Err(invalid("[daemon] socket_group is empty".into()));
        }
        config.source = Some(path.to_path_buf());
        Ok(config)
    }
}

/// Why [`read_root_owned`] did not return a file's text.
#[derive(Debug)]
pub enum RootOwnedError {
    Io(io::Error),
    /// Someone other than root could have written it.
    Unsafe(String),
}

/// Reads a file only root can have written: it and every directory above it (after resolving
/// symlinks) owned by root and not writable by group or others — a world-writable directory
/// with the sticky bit (`/tmp`) passes, since no one else can replace root's entries in it.
/// `Ok(None)` when it does not exist; at most `cap` bytes.
pub fn read_root_owned(path: &Path, cap: u64) -> Result<Option<String>, RootOwnedError> {
    use std::{
        io::Read,
        os::unix::fs::{MetadataExt, OpenOptionsExt},
    };
    let file = match fs::OpenOptions::new()
        .read(true)
        // A FIFO would block the open; it is refused below like any non-regular file.
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RootOwnedError::Io(e)),
    };
    let meta = file.metadata().map_err(RootOwnedError::Io)?;
    if !meta.is_file() {
        return Err(RootOwnedError::Unsafe("it is not a regular file".into()));
    }
    owned_by_root_only(&meta, "it", false)?;
    let canonical = fs::canonicalize(path).map_err(RootOwnedError::Io)?;
    for dir in canonical.ancestors().skip(1) {
        let meta = fs::metadata(dir).map_err(RootOwnedError::Io)?;
        owned_by_root_only(&meta, &format!("directory {}", dir.display()), true)?;
    }
    let mut bytes = Vec::new();
    file.take(cap + 1).read_to_end(&mut bytes).map_err(RootOwnedError::Io)?;
    if bytes.len() as u64 > cap {
        return Err(RootOwnedError::Unsafe(format!("it is larger than {} KiB", cap >> 10)));
    }
    let text = String::from_utf8(bytes).map_err(|_| RootOwnedError::Unsafe("it is not UTF-8 text".into()))?;
    return Ok(Some(text));

    fn owned_by_root_only(meta: &fs::Metadata, what: &str, sticky_ok: bool) -> Result<(), RootOwnedError> {
        let mode = meta.mode();
        if meta.uid() != 0 {
            return Err(RootOwnedError::Unsafe(format!(
                "{what} is owned by uid {}, not root; it must be owned by root and writable only by root",
                meta.uid()
            )));
        }
        if mode & 0o022 != 0 && !(sticky_ok && mode & 0o1000 != 0) {
            let by = match (mode & 0o020 != 0, mode & 0o002 != 0) {
                (true, true) => "group and others",
                (true, false) => "group",
                _ => "others",
            };
            return Err(RootOwnedError::Unsafe(format!(
                "{what} is writable by {by} (mode {:04o}); it must be writable only by root",
                mode & 0o7777
            )));
        }
        Ok(())
    }
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
            toml::from_str(text).map_err(|e| invalid(crate::error::one_line(&e.to_string())))?;
        if config.audit.is_some() {
            return Err(invalid(format!(
                "[audit] is set only by root, in {SYSTEM_DIR}/{SYSTEM_FILE} (a user cannot loosen auditing)"
            )));
        }
        for (file, value) in &config.pins {
            let problem = pin_problem(value);
            if let Some(problem) = problem {
                return Err(invalid(format!("[pins] {}: {problem}", file.display())));
            }
        }
        Ok(config)
    }

    /// Rewrites the config at `location` (created if absent) with `edit` applied to its
    /// text: the result must parse, or nothing is written. Written atomically: readers see
    /// the old file or the new one. (`capvirt plugins --pin` edits `[pins]` keeping the
    /// rest of the file, comments included; the format-preserving editor lives in the CLI.)
    pub fn rewrite(
        location: &ConfigLocation,
        edit: impl FnOnce(&str) -> Result<String, String>,
    ) -> Result<(), ConfigError> {
        let path = &location.path;
        let read_error = |source: io::Error| ConfigError::Read { path: path.clone(), source };
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(read_error(e)),
        };
        let text = edit(&text).map_err(|message| ConfigError::Invalid { path: path.clone(), message })?;
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
        let audit = HostFileConfig::parse(path, "[audit]\nfail_open = true\n").map(|_| ()).map_err(|e| e.to_string());
        assert!(audit.is_err_and(|e| e.contains("only by root") && e.contains("/etc/capvirt/capvirt.toml")));
        let unknown = HostFileConfig::parse(path, "enabled = []\n").map(|_| ()).map_err(|e| e.to_string());
        assert!(unknown.is_err_and(|e| e.contains("c.toml") && e.contains("enabled")));
        assert!(HostFileConfig::parse(path, "enable = \"a.b\"\n").is_err());
    }

    #[test]
    fn pins_must_be_sha256_digests() {
        let path = Path::new("c.toml");
        for bad in ["md5:00", "sha256:AB", "sha256:abc", "ab"] {
            let text = format!("[pins]\n\"/p/x.so\" = \"{bad}\"\n");
            let err = HostFileConfig::parse(path, &text).map(|_| ()).map_err(|e| e.to_string());
            assert!(err.is_err_and(|e| e.contains("/p/x.so") && e.contains("sha256:<64")), "{bad}");
        }
    }

    #[test]
    fn system_config_parses_and_wants_absolute_paths() {
        let path = Path::new("/etc/capvirt/capvirt.toml");
        let text = "[audit]\npath = \"/var/log/x.jsonl\"\nfail_open = true\n[images]\nallow = [\"/srv/vm\"]\n";
        let config = SystemConfig::parse(path, text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.audit_path(), PathBuf::from("/var/log/x.jsonl"));
        assert!(config.audit.fail_open);
        assert_eq!(config.images.allow, [PathBuf::from("/srv/vm")]);
        assert_eq!(SystemConfig::default().audit_path(), PathBuf::from(SYSTEM_AUDIT_LOG));
        assert!(SystemConfig::parse(path, "[images]\nallow = [\"vm\"]\n").is_err());
        assert!(SystemConfig::parse(path, "[audit]\nfailopen = true\n").is_err());
    }

    #[test]
    fn the_qemu_account_is_a_plain_account_name() {
        let path = Path::new("/etc/capvirt/capvirt.toml");
        let config = SystemConfig::parse(path, "[qemu]\nuser = \"vmrunner\"\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.qemu.user.as_deref(), Some("vmrunner"));
        assert_eq!(SystemConfig::default().qemu.user, None);
        for bad in ["", "1abc", "a b", "a/b", "a,b", "a\\u0000", &"x".repeat(33)] {
            let text = format!("[qemu]\nuser = \"{bad}\"\n");
            let err = SystemConfig::parse(path, &text).map(|_| ()).map_err(|e| e.to_string());
            assert!(err.is_err_and(|e| e.contains("is not an account name")), "{bad:?} accepted");
        }
        assert!(SystemConfig::parse(path, "[qemu]\ngroup = \"kvm\"\n").is_err());
    }

    #[test]
    fn the_daemon_section_takes_octal_socket_modes_that_keep_the_owner() {
        let path = Path::new("/etc/capvirt/capvirt.toml");
        let config = SystemConfig::parse(path, "[daemon]\nsocket_group = \"kvm\"\nsocket_mode = \"0660\"\n");
        let daemon = config.map(|c| c.daemon).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(daemon.socket_group.as_deref(), Some("kvm"));
        assert_eq!(daemon.socket_mode(), Ok(Some(0o660)));
        assert_eq!(SystemDaemon::default().socket_mode(), Ok(None));
        for (good, mode) in [("0600", 0o600), ("666", 0o666), ("0o770", 0o770)] {
            assert_eq!(parse_socket_mode(good), Ok(mode), "{good}");
        }
        for (bad, why) in [
            ("rw", "not an octal"),
            ("", "not an octal"),
            ("4660", "beyond 0777"),
            ("0066", "0600"),
            ("0o", "octal"),
            ("99", "octal"),
        ] {
            assert!(parse_socket_mode(bad).is_err_and(|e| e.contains(why)), "{bad}: {:?}", parse_socket_mode(bad));
        }
        let bad =
            SystemConfig::parse(path, "[daemon]\nsocket_mode = \"0060\"\n").map(|_| ()).map_err(|e| e.to_string());
        assert!(bad.is_err_and(|e| e.contains("capvirt.toml") && e.contains("[daemon]") && e.contains("0600")));
        assert!(SystemConfig::parse(path, "[daemon]\nsocket_mode = 432\n").is_err());
        assert!(SystemConfig::parse(path, "[daemon]\nsocket_group = \"\"\n").is_err());
        assert!(SystemConfig::parse(path, "[daemon]\nsocket_perms = \"0660\"\n").is_err());
    }

    #[test]
    fn only_files_root_controls_are_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("capvirt-root-owned-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        let file = dir.join("f.toml");
        fs::write(&file, "x = 1\n").unwrap_or_else(|e| panic!("{e}"));
        let read = |p: &Path| match read_root_owned(p, 100) {
            Ok(text) => Ok(text),
            Err(RootOwnedError::Unsafe(why)) => Err(why),
            Err(RootOwnedError::Io(e)) => Err(e.to_string()),
        };
        assert_eq!(read(&dir.join("absent")), Ok(None));
        if rustix::process::geteuid().is_root() {
            fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(read(&file), Ok(Some("x = 1\n".into())));
            fs::set_permissions(&file, fs::Permissions::from_mode(0o664)).unwrap_or_else(|e| panic!("{e}"));
            assert!(read(&file).is_err_and(|why| why.contains("writable by group")));
            fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap_or_else(|e| panic!("{e}"));
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap_or_else(|e| panic!("{e}"));
            assert!(read(&file).is_err_and(|why| why.contains("directory") && why.contains("others")));
        } else {
            assert!(read(&file).is_err_and(|why| why.contains("not root")));
        }
        let _ = fs::remove_dir_all(&dir);
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
