//! Who a domain's QEMU runs as, and the little it may reach by path.
//!
//! `qemu:///system` (as root) never runs QEMU as root: QEMU is started already as an
//! unprivileged account (root's `[qemu] user`, the `qemu_user` connect option, default
//! [`DEFAULT_USER`]) with std's `CommandExt::uid`/`gid` — setgid, setgroups(0), setuid in the
//! child before exec, so no QEMU code ever runs privileged and QEMU's seccomp filter can deny
//! every set*id call. `qemu:///session` (and any non-root caller) runs QEMU as the caller.
//!
//! Whatever the account, QEMU opens no image by path: the driver opens each disk (as root)
//! and hands QEMU the descriptor in an fd set (`-add-fd`, `/dev/fdset/N`; hot-plugged disks
//! through QMP `add-fd`), so images keep their owner and mode and QEMU reaches exactly the
//! images of its domain. Kernel and initrd, which QEMU reads only by name, are copied for the
//! account into its own directory and removed once QEMU has read them.
//!
//! The one directory QEMU writes is `ROOT/emulator/NAME` (its pidfile: QEMU creates it, locks
//! it and deletes it on a clean exit): owned by the account, reachable through `ROOT` and
//! `ROOT/emulator` (mode 0710, group of the account). The domain's own directory (definition,
//! live configuration, sockets, logs) stays root's: QEMU can neither read nor replace what
//! root reads back later.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use capvirt_plugin_api::{PluginError, Value};

use crate::{
    store::{io_failure, DomainPaths, Store},
    uri::Config,
};

/// The account `qemu:///system` QEMUs run as unless root's config names another.
pub const DEFAULT_USER: &str = "capvirt-qemu";

/// QEMU's own seccomp filter: obsolete system calls, set*id/setsid, fork/exec and resource
/// control (nice, affinity, scheduling) are denied. Possible because QEMU is not daemonized
/// (`-daemonize` forks and calls setsid after the filter is in place).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Where `qemu:///system`'s default state root lives (`/var/lib/capvirt/qemu`).
const SYSTEM_STATE_DIR: &str = "/var/lib/capvirt";

/// An unprivileged account QEMU runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Who a connection's QEMUs run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runner {
    /// The calling process's own identity (`qemu:///session`, or a caller that is not root).
    Caller,
    /// The unprivileged account of `qemu:///system`.
    Account(Account),
}

/// The `qemu_user` connect option ([`DEFAULT_USER`] when absent).
pub fn user_option(options: &Value) -> Result<String, PluginError> {
    let Some(value) = options.get("qemu_user") else { return Ok(DEFAULT_USER.to_string()) };
    let bad = || PluginError::invalid_argument("connect option qemu_user: must be an account name".to_string());
    let name = value.as_str().ok_or_else(bad)?;
    let plain = !name.is_empty()
        && name.len() <= 32
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'));
    if !plain {
        return Err(bad());
    }
    Ok(name.to_string())
}

impl Runner {
    /// The owner of the devices the driver creates for QEMU (tap devices); `None`: the
    /// calling process's own identity.
    pub fn tap_owner(&self) -> Option<crate::tap::Owner> {
        match self {
            Runner::Caller => None,
            Runner::Account(account) => Some(crate::tap::Owner { uid: account.uid, gid: account.gid }),
        }
    }
}

/// Who runs the QEMUs of a connection: the configured account for `qemu:///system` when this
/// process is root (refused, with the command that creates it, when the account is missing).
pub fn runner(config: &Config) -> Result<Runner, PluginError> {
    if !config.system || !rustix::process::geteuid().is_root() {
        return Ok(Runner::Caller);
    }
    account(&config.qemu_user).map(Runner::Account)
}

fn account(name: &str) -> Result<Account, PluginError> {
    match nix::unistd::User::from_name(name) {
        Ok(Some(user)) if user.uid.is_root() => Err(PluginError::invalid_state(format!(
            "qemu:///system runs QEMU as the unprivileged account '{name}', but it has uid 0; name an unprivileged \
             account in [qemu] user of the system config"
        ))),
        Ok(Some(user)) => Ok(Account { name: name.to_string(), uid: user.uid.as_raw(), gid: user.gid.as_raw() }),
        Ok(None) => Err(PluginError::invalid_state(format!(
            "qemu:///system runs QEMU as the unprivileged account '{name}', which does not exist; create it with \
             `useradd --system --no-create-home --shell /usr/sbin/nologin {name}` (or name another one in [qemu] \
             user of the system config)"
        ))),
        Err(e) => Err(PluginError::driver_failure(format!("cannot look up the QEMU account '{name}': {e}"))),
    }
}

/// Whether `runner` may open `/dev/kvm` read-write. An account is judged by the mode bits
/// for its uid and group (QEMU gets no supplementary groups).
pub fn kvm_usable(runner: &Runner) -> bool {
    const KVM: &str = "/dev/kvm";
    match runner {
        Runner::Caller => OpenOptions::new().read(true).write(true).open(KVM).is_ok(),
        Runner::Account(account) => fs::metadata(KVM).is_ok_and(|meta| allowed(&meta, account, 0o6)),
    }
}

/// Whether the mode bits of `meta` grant `account` every permission in `bits` (0o4 read,
/// 0o2 write, 0o1 search), as the kernel decides without ACLs: owner, else group, else others.
fn allowed(meta: &fs::Metadata, account: &Account, bits: u32) -> bool {
    let shift = if meta.uid() == account.uid {
        6
    } else if meta.gid() == account.gid {
        3
    } else {
        0
    };
    (meta.mode() >> shift) & bits == bits
}

/// The directory of the domain's QEMU (`ROOT/emulator/NAME`), made afresh for a start: owned
/// by the account, every directory above it searchable by it. Returns its path.
pub fn prepare(store: &Store, paths: &DomainPaths, runner: &Runner) -> Result<PathBuf, PluginError> {
    let dir = paths.emulator.clone();
    let parent = store.root().join(crate::store::EMULATOR_DIR);
    crate::store::make_private_dir(&parent)?;
    match fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_failure(&dir, "remove", &e)),
    }
    fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| io_failure(&dir, "create directory", &e))?;
    let Runner::Account(account) = runner else { return Ok(dir) };
    std::os::unix::fs::chown(&dir, Some(account.uid), Some(account.gid))
        .map_err(|e| io_failure(&dir, "hand over", &e))?;
    // Root's directories on the way: search only, for the account's group only.
    for own in [store.root(), parent.as_path()] {
        share_search(own, account)?;
    }
    check_reachable(store.root(), account)?;
    Ok(dir)
}

/// Gives the account's group search (not read) permission on a directory of root's.
fn share_search(dir: &Path, account: &Account) -> Result<(), PluginError> {
    let meta = fs::metadata(dir).map_err(|e| io_failure(dir, "inspect", &e))?;
    if meta.gid() != account.gid && meta.uid() != account.uid {
        std::os::unix::fs::chown(dir, None, Some(account.gid)).map_err(|e| io_failure(dir, "share", &e))?;
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o010 == 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o010)).map_err(|e| io_failure(dir, "share", &e))?;
    }
    Ok(())
}

/// Refuses a state root the account cannot reach (QEMU resolves its pidfile's path from `/`).
/// capvirt's own `/var/lib/capvirt` is opened for search; any other blocking directory is
/// named with the fix. A directory with an ACL is left to the kernel to judge.
fn check_reachable(root: &Path, account: &Account) -> Result<(), PluginError> {
    let default_parent = Path::new(SYSTEM_STATE_DIR);
    for dir in root.ancestors().skip(1) {
        let meta = fs::metadata(dir).map_err(|e| io_failure(dir, "inspect", &e))?;
        if allowed(&meta, account, 0o1) || has_acl(dir) {
            continue;
        }
        if dir == default_parent && meta.uid() == 0 {
            let mode = meta.mode() & 0o7777;
            fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o011))
                .map_err(|e| io_failure(dir, "open for search", &e))?;
            continue;
        }
        return Err(PluginError::invalid_state(format!(
            "QEMU runs as '{}', which cannot reach the state root {}: directory {} (mode {:04o}, uid {}) is not \
             searchable by it; allow it (chmod o+x {}) or use a state root below a searchable directory",
            account.name,
            root.display(),
            dir.display(),
            meta.mode() & 0o7777,
            meta.uid(),
            dir.display()
        )));
    }
    Ok(())
}

fn has_acl(dir: &Path) -> bool {
    let mut empty: [u8; 0] = [];
    rustix::fs::getxattr(dir, "system.posix_acl_access", &mut empty[..]).is_ok()
}

/// What QEMU reads by name at start: the kernel and initrd, as given to a QEMU running as the
/// caller, or copied for an account into its directory (the originals may be root's alone).
#[derive(Debug, Default)]
pub struct BootFiles {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Copies to remove once QEMU has read them.
    staged: Vec<PathBuf>,
}

impl BootFiles {
    /// The domain's kernel and initrd for `runner` to read.
    pub fn stage(machine: &crate::spec::Machine, dir: &Path, runner: &Runner) -> Result<BootFiles, PluginError> {
        let mut files = BootFiles::default();
        let Some(boot) = &machine.boot else { return Ok(files) };
        let Runner::Account(account) = runner else {
            files.kernel = Some(boot.kernel.clone());
            files.initrd = boot.initrd.clone();
            return Ok(files);
        };
        let kernel = dir.join("kernel");
        copy_for(&boot.kernel, &kernel, account)?;
        files.staged.push(kernel.clone());
        files.kernel = Some(kernel);
        if let Some(initrd) = &boot.initrd {
            let copy = dir.join("initrd");
            copy_for(initrd, &copy, account)?;
            files.staged.push(copy.clone());
            files.initrd = Some(copy);
        }
        Ok(files)
    }

    /// Removes the copies (QEMU keeps what it read in memory, also for a reset).
    pub fn remove_copies(&self) {
        for copy in &self.staged {
            let _ = fs::remove_file(copy);
        }
    }
}

/// Copies `from` (opened by root, a regular file) to a new file `to` owned by the account.
fn copy_for(from: &Path, to: &Path, account: &Account) -> Result<(), PluginError> {
    let mut source = open_regular(from, false)?;
    // A new file only: nothing planted at `to` is followed or reused.
    let mut copy = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .map_err(|e| io_failure(to, "create", &e))?;
    io::copy(&mut source, &mut copy).map_err(|e| io_failure(to, "copy into", &e))?;
    std::os::unix::fs::fchown(&copy, Some(account.uid), Some(account.gid)).map_err(|e| io_failure(to, "hand over", &e))
}

/// Opens a file the spec names for QEMU (an image or a boot file): never a FIFO, socket or
/// character device (the open does not block on one); block devices only as images, which the
/// image policy has allowed by then.
pub fn open_image(path: &Path, readonly: bool) -> Result<File, PluginError> {
    let file = open_regular_or_block(path, !readonly)?;
    Ok(file)
}

fn open_regular(path: &Path, write: bool) -> Result<File, PluginError> {
    let file = open_nonblocking(path, write)?;
    let meta = file.metadata().map_err(|e| io_failure(path, "inspect", &e))?;
    if !meta.is_file() {
        return Err(PluginError::invalid_argument(format!("{} is not a regular file", path.display())));
    }
    Ok(file)
}

fn open_regular_or_block(path: &Path, write: bool) -> Result<File, PluginError> {
    use std::os::unix::fs::FileTypeExt;
    let file = open_nonblocking(path, write)?;
    let kind = file.metadata().map_err(|e| io_failure(path, "inspect", &e))?.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(PluginError::invalid_argument(format!(
            "{} is neither a regular file nor a block device",
            path.display()
        )));
    }
    Ok(file)
}

fn open_nonblocking(path: &Path, write: bool) -> Result<File, PluginError> {
    OpenOptions::new().read(true).write(write).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path).map_err(|e| {
        match e.kind() {
            io::ErrorKind::NotFound => PluginError::not_found(format!("image {} no longer exists", path.display())),
            _ => io_failure(path, "open", &e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn someone() -> Account {
        Account { name: "q".into(), uid: 4242, gid: 4343 }
    }

    #[test]
    fn mode_bits_are_judged_as_the_kernel_does() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("f");
        fs::write(&path, "x").unwrap_or_else(|e| panic!("{e}"));
        let meta = |mode: u32| {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap_or_else(|e| panic!("{e}"));
            fs::metadata(&path).unwrap_or_else(|e| panic!("{e}"))
        };
        // Neither owner nor group: the others' bits decide.
        assert!(!allowed(&meta(0o770), &someone(), 0o4));
        assert!(allowed(&meta(0o704), &someone(), 0o4));
        assert!(!allowed(&meta(0o704), &someone(), 0o6));
        assert!(allowed(&meta(0o001), &someone(), 0o1));
        let owner = fs::metadata(&path).map(|m| m.uid()).unwrap_or_default();
        let me = Account { uid: owner, ..someone() };
        // The owner's bits alone decide for the owner, even when others may.
        assert!(!allowed(&meta(0o077), &me, 0o4));
        assert!(allowed(&meta(0o600), &me, 0o6));
    }

    #[test]
    fn the_user_option_is_an_account_name() {
        assert_eq!(user_option(&Value::record_empty()).ok().as_deref(), Some(DEFAULT_USER));
        let named = Value::record([("qemu_user", Value::from("vmrun"))]);
        assert_eq!(user_option(&named).ok().as_deref(), Some("vmrun"));
        for bad in ["", "a b", "a/b", "a,b"] {
            assert!(user_option(&Value::record([("qemu_user", Value::from(bad))])).is_err(), "{bad:?}");
        }
        assert!(user_option(&Value::record([("qemu_user", Value::from(true))])).is_err());
    }

    #[test]
    fn a_missing_account_is_refused_with_the_command_that_creates_it() {
        let err = account("capvirt-no-such-account").err().map(|e| e.message.to_string()).unwrap_or_default();
        assert!(err.contains("does not exist") && err.contains("useradd --system"), "{err}");
        let root = account("root").err().map(|e| e.message.to_string()).unwrap_or_default();
        assert!(root.contains("uid 0"), "{root}");
    }

    #[test]
    fn images_never_open_fifos_or_character_devices() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap_or_else(|e| panic!("{e}"));
        assert!(open_image(&fifo, true).is_err());
        assert!(open_image(Path::new("/dev/null"), true).is_err());
        assert!(open_regular(dir.path(), false).is_err());
        let file = dir.path().join("disk");
        fs::write(&file, "x").unwrap_or_else(|e| panic!("{e}"));
        assert!(open_image(&file, false).is_ok());
        assert!(open_image(&dir.path().join("gone"), true).is_err_and(|e| e.message.contains("no longer exists")));
    }
}
