//! The state root: one directory per domain holding its definition, its lock and, while QEMU
//! runs, a private `run/` directory (pidfile, QMP sockets, live configuration).
//!
//! ```text
//! ROOT/domains/NAME/domain.toml   definition (written atomically)
//!                   lock          flock'ed by every operation that changes the domain
//!                   console.log   the serial console's output since the last start (console.rs)
//!                   snapshots.toml  the domain's snapshot records (snapshot.rs; written atomically)
//!                   run/          0700; qemu.log, live.toml, qmpN.sock, qmpN.lock, console.sock
//! ROOT/emulator/NAME/qemu.pid     the only directory QEMU writes (its pidfile; see privilege.rs)
//! ```
//!
//! Whether QEMU runs is read from its pidfile: QEMU keeps a POSIX write lock on it for its
//! whole life and deletes it on a clean exit. A pidfile that nobody locks is therefore the
//! mark of a QEMU that died without cleaning up (crashed, SIGKILLed). This is immune to PID
//! reuse and to zombies.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

pub use capvirt_plugin_api::state::{io_failure, make_private_dir, not_defined, read_toml, same_file, write_toml};

use capvirt_plugin_api::PluginError;

use crate::spec::{check_name, Machine};

/// The domain's snapshot records, beside the definition (`snapshot.rs`).
pub const SNAPSHOTS_FILE: &str = "snapshots.toml";

/// The directory of the domains' QEMU-owned directories (`privilege.rs`).
pub const EMULATOR_DIR: &str = "emulator";

/// How long an operation waits for another one holding the same domain's lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(60);

/// A state root.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Paths of one domain.
#[derive(Debug, Clone)]
pub struct DomainPaths {
    pub name: String,
    pub dir: PathBuf,
    pub definition: PathBuf,
    pub lock: PathBuf,
    pub run: PathBuf,
    /// The directory QEMU itself writes (`ROOT/emulator/NAME`): its pidfile, nothing of root's.
    pub emulator: PathBuf,
    pub pidfile: PathBuf,
    pub log: PathBuf,
    pub live: PathBuf,
    /// The serial console's output since the last start (kept after the domain stops).
    pub console: PathBuf,
}

impl DomainPaths {
    pub fn monitor_socket(&self, channel: usize) -> PathBuf {
        self.run.join(format!("qmp{channel}.sock"))
    }
    pub fn monitor_lock(&self, channel: usize) -> PathBuf {
        self.run.join(format!("qmp{channel}.lock"))
    }
    /// The serial console's socket (QEMU serves one client at a time).
    pub fn console_socket(&self) -> PathBuf {
        self.run.join("console.sock")
    }
}

/// Whether a domain's QEMU process exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// No pidfile: never started, or QEMU exited cleanly.
    Stopped,
    /// A QEMU process holds the pidfile lock.
    Alive(i32),
    /// A pidfile without its QEMU: it died without cleaning up.
    Crashed,
}

/// The exclusive lock of one domain; released on drop.
#[derive(Debug)]
pub struct DomainLock {
    _file: File,
    pub paths: DomainPaths,
}

impl Store {
    pub fn new(root: PathBuf) -> Store {
        Store { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn domains_dir(&self) -> PathBuf {
        self.root.join("domains")
    }

    /// Paths of the domain `name` (checked again here: it becomes a directory name).
    pub fn paths(&self, name: &str) -> Result<DomainPaths, PluginError> {
        check_name(name)?;
        let dir = self.domains_dir().join(name);
        let run = dir.join("run");
        let emulator = self.root.join(EMULATOR_DIR).join(name);
        Ok(DomainPaths {
            name: name.to_string(),
            definition: dir.join("domain.toml"),
            lock: dir.join("lock"),
            pidfile: emulator.join("qemu.pid"),
            emulator,
            log: run.join("qemu.log"),
            live: run.join("live.toml"),
            console: dir.join("console.log"),
            run,
            dir,
        })
    }

    /// Names of the defined domains, sorted.
    pub fn names(&self) -> Result<Vec<String>, PluginError> {
        let entries = match fs::read_dir(self.domains_dir()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_failure(&self.domains_dir(), "list", &e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| check_name(name).is_ok())
            .filter(|name| self.domains_dir().join(name).join("domain.toml").is_file())
            .collect();
        names.sort();
        Ok(names)
    }

    /// The stored definition, `None` when the domain is not defined.
    pub fn definition(&self, paths: &DomainPaths) -> Result<Option<Machine>, PluginError> {
        read_toml(&paths.definition)
    }

    /// The stored definition, or a not-found error.
    pub fn require(&self, name: &str) -> Result<(DomainPaths, Machine), PluginError> {
        let paths = self.paths(name)?;
        match self.definition(&paths)? {
            Some(machine) => Ok((paths, machine)),
            None => Err(not_defined(name)),
        }
    }

    /// Takes the domain's lock, waiting up to [`LOCK_WAIT`]. With `create`, makes the domain
    /// directory first (define, restore, incoming migration); otherwise the domain must exist.
    pub fn lock(&self, name: &str, create: bool) -> Result<DomainLock, PluginError> {
        let paths = self.paths(name)?;
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            if create {
                make_private_dir(&self.root)?;
                make_private_dir(&self.domains_dir())?;
                make_private_dir(&paths.dir)?;
            }
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .mode(0o600)
                .open(&paths.lock)
            {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_defined(name)),
                Err(e) => return Err(io_failure(&paths.lock, "open", &e)),
            };
            match file.try_lock() {
                Ok(()) => {
                    // Undefine deletes the lock file while holding it: a waiter that then gets
                    // the lock on the unlinked file must start over.
                    if same_file(&file, &paths.lock) {
                        return Ok(DomainLock { _file: file, paths });
                    }
                    if !create {
                        return Err(not_defined(name));
                    }
                }
                Err(fs::TryLockError::WouldBlock) => {
                    if Instant::now() >= deadline {
                        return Err(PluginError::timeout(format!(
                            "domain '{name}' is locked by another capvirt operation; gave up after {} s",
                            LOCK_WAIT.as_secs()
                        )));
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(fs::TryLockError::Error(e)) => return Err(io_failure(&paths.lock, "lock", &e)),
            }
        }
    }

    /// Whether the domain's QEMU runs.
    pub fn liveness(&self, paths: &DomainPaths) -> Result<Liveness, PluginError> {
        // QEMUs started by drivers before the emulator directory kept it in `run/`.
        let legacy = paths.run.join("qemu.pid");
        let (file, pidfile) = match open_pidfile(&paths.pidfile) {
            Ok(file) => (file, &paths.pidfile),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match open_pidfile(&legacy) {
                Ok(file) => (file, &legacy),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Liveness::Stopped),
                Err(e) => return Err(io_failure(&legacy, "open", &e)),
            },
            Err(e) => return Err(io_failure(&paths.pidfile, "open", &e)),
        };
        match lock_holder(&file) {
            Ok(Some(pid)) => Ok(Liveness::Alive(pid)),
            Ok(None) => Ok(Liveness::Crashed),
            Err(e) => Err(io_failure(pidfile, "inspect the lock of", &e)),
        }
    }
}

/// Opens a pidfile in a directory QEMU owns: never through a symlink QEMU planted, never
/// blocking on a FIFO (the lock query then fails instead).
fn open_pidfile(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)
}

/// The PID holding a POSIX write lock on `file` (QEMU's pidfile lock), if any.
fn lock_holder(file: &File) -> io::Result<Option<i32>> {
    let mut query = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETLK(&mut query)).map_err(io::Error::from)?;
    if query.l_type == libc::F_UNLCK as libc::c_short {
        Ok(None)
    } else {
        Ok(Some(query.l_pid))
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PluginError> {
    capvirt_plugin_api::fs::write_atomic(path, bytes).map_err(|e| io_failure(path, "write", &e))
}

/// Removes a domain's runtime directories (after its QEMU is gone).
pub fn remove_runtime(paths: &DomainPaths) -> Result<(), PluginError> {
    // The taps of bridge interfaces belong to the QEMU that stopped (best effort: a tap left
    // behind is removed at the domain's next start or undefine).
    let _ = crate::tap::sweep(&paths.dir);
    for dir in [&paths.emulator, &paths.run] {
        match fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_failure(dir, "remove", &e)),
        }
    }
    Ok(())
}

/// Removes a whole domain directory (undefine), the lock file last.
pub fn remove_domain(paths: &DomainPaths) -> Result<(), PluginError> {
    remove_runtime(paths)?;
    // `outgoing`: the last save or migration's mark for `domain.events` watchers.
    for path in
        [&paths.console, &paths.dir.join(SNAPSHOTS_FILE), &paths.dir.join("outgoing"), &paths.definition, &paths.lock]
    {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_failure(path, "remove", &e)),
        }
    }
    // An atomic write interrupted by a crash (`kill -9` during define) leaves its temporary
    // file (`.domain.toml.tmp-PID-N`, see capvirt_plugin_api::fs); it goes with the domain.
    if let Ok(entries) = fs::read_dir(&paths.dir) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_name().to_string_lossy().starts_with(".domain.toml.tmp-") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    // Other stray files keep the directory; that is harmless.
    let _ = fs::remove_dir(&paths.dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(name: &str, memory_mib: u64) -> Machine {
        Machine::bare(name, memory_mib)
    }

    fn ok<T>(result: Result<T, PluginError>) -> T {
        result.unwrap_or_else(|e| panic!("{}", e.message))
    }

    fn io<T>(result: io::Result<T>) -> T {
        result.unwrap_or_else(|e| panic!("{e}"))
    }

    fn scratch() -> (tempfile::TempDir, Store) {
        let root = io(tempfile::tempdir());
        let store = Store::new(root.path().join("state"));
        (root, store)
    }

    fn define(store: &Store, name: &str) -> DomainPaths {
        let lock = ok(store.lock(name, true));
        ok(write_toml(&lock.paths.definition, &machine(name, 64)));
        lock.paths.clone()
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = io(fs::read_dir(dir))
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn names_that_are_not_plain_identifiers_never_become_paths() {
        let (_root, store) = scratch();
        for bad in ["", ".", "..", "../etc", "a/b", "/abs", ".hidden", "a..b", "with space", "nul\0", &"x".repeat(65)] {
            assert!(store.paths(bad).is_err(), "{bad:?} was accepted");
            assert!(store.lock(bad, true).is_err(), "{bad:?} was locked");
        }
        let paths = ok(store.paths("vm-1.test_2"));
        assert_eq!(paths.dir, store.root().join("domains/vm-1.test_2"));
        assert!(paths.monitor_socket(3).starts_with(&paths.run));
        assert!(!store.root().exists(), "checking names created nothing");
    }

    #[test]
    fn names_lists_defined_domains_only_sorted() {
        let (_root, store) = scratch();
        assert_eq!(ok(store.names()), Vec::<String>::new(), "no state root yet");
        define(&store, "web");
        define(&store, "db");
        // A directory without a definition (define interrupted before the write), a stray
        // file and a directory whose name no domain may have are not domains.
        ok(store.lock("half", true));
        let domains = store.root().join("domains");
        io(fs::write(domains.join("notes.txt"), "x"));
        io(fs::create_dir(domains.join("bad name")));
        io(fs::write(domains.join("bad name/domain.toml"), "name = \"bad name\""));
        assert_eq!(ok(store.names()), ["db", "web"]);
    }

    #[test]
    fn definitions_are_replaced_whole_and_leave_no_temporary_files() {
        let (_root, store) = scratch();
        let paths = define(&store, "vm");
        assert_eq!(ok(store.definition(&paths)), Some(machine("vm", 64)));
        ok(write_toml(&paths.definition, &machine("vm", 128)));
        assert_eq!(ok(store.require("vm")).1, machine("vm", 128));
        assert_eq!(entries(&paths.dir), ["domain.toml", "lock"]);
        // A crash's half-written temporary file is never read as the definition.
        io(fs::write(paths.dir.join(".domain.toml.tmp-4242-0"), "name = \"vm\"\nmemory_mi"));
        assert_eq!(ok(store.definition(&paths)), Some(machine("vm", 128)));
        // A write that cannot happen leaves nothing behind.
        let gone = ok(store.paths("gone"));
        assert!(write_toml(&gone.definition, &machine("gone", 64)).is_err());
        assert!(!gone.dir.exists());
    }

    #[test]
    fn a_corrupt_definition_is_an_error_not_a_panic() {
        let (_root, store) = scratch();
        let paths = define(&store, "vm");
        io(fs::write(&paths.definition, "name = 3\n\u{0}\u{ff}"));
        assert!(store.definition(&paths).is_err());
        assert!(store.require("vm").is_err());
        assert!(matches!(store.require("other"), Err(e) if e.kind == capvirt_plugin_api::ErrorKind::NotFound));
    }

    #[test]
    fn undefine_removes_leftover_temporary_files_with_the_domain() {
        let (_root, store) = scratch();
        let paths = define(&store, "vm");
        io(fs::create_dir_all(&paths.run));
        io(fs::write(paths.run.join("qemu.log"), "log"));
        io(fs::write(&paths.console, "console"));
        io(fs::write(paths.dir.join(".domain.toml.tmp-4242-0"), "partial"));
        io(fs::write(paths.dir.join(".domain.toml.tmp-4243-7"), ""));
        let lock = ok(store.lock("vm", false));
        ok(remove_domain(&lock.paths));
        drop(lock);
        assert!(!paths.dir.exists(), "left {:?}", entries(&paths.dir));
        assert_eq!(ok(store.names()), Vec::<String>::new());
        // Undefining what is gone already is not an error.
        ok(remove_domain(&paths));
    }

    #[test]
    fn locks_need_a_defined_domain_unless_creating() {
        let (_root, store) = scratch();
        assert!(matches!(store.lock("vm", false), Err(e) if e.kind == capvirt_plugin_api::ErrorKind::NotFound));
        let lock = ok(store.lock("vm", true));
        assert!(lock.paths.lock.is_file());
        // The lock is exclusive across open file descriptions (other capvirt processes).
        let other = io(File::open(&lock.paths.lock));
        assert!(matches!(other.try_lock(), Err(fs::TryLockError::WouldBlock)));
        drop(lock);
        assert!(other.try_lock().is_ok());
    }

    #[test]
    fn liveness_reads_the_pidfile() {
        let (_root, store) = scratch();
        let paths = define(&store, "vm");
        assert_eq!(ok(store.liveness(&paths)), Liveness::Stopped);
        io(fs::create_dir_all(&paths.run));
        io(fs::create_dir_all(&paths.emulator));
        // A pidfile nobody locks: its QEMU died without cleaning up.
        io(fs::write(&paths.pidfile, "4242\n"));
        assert_eq!(ok(store.liveness(&paths)), Liveness::Crashed);
        ok(remove_runtime(&paths));
        assert_eq!(ok(store.liveness(&paths)), Liveness::Stopped);
        ok(remove_runtime(&paths));
        // A QEMU of an older driver kept its pidfile in run/.
        io(fs::create_dir_all(&paths.run));
        io(fs::write(paths.run.join("qemu.pid"), "4242\n"));
        assert_eq!(ok(store.liveness(&paths)), Liveness::Crashed);
        ok(remove_runtime(&paths));
        // QEMU owns its directory: a symlink planted as the pidfile is not followed, and a
        // FIFO never blocks the query.
        io(fs::create_dir_all(&paths.emulator));
        io(std::os::unix::fs::symlink("/etc/passwd", &paths.pidfile));
        assert!(store.liveness(&paths).is_err());
        io(fs::remove_file(&paths.pidfile));
        io(nix::unistd::mkfifo(&paths.pidfile, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(io::Error::from));
        let _ = store.liveness(&paths);
        ok(remove_runtime(&paths));
        assert!(!paths.emulator.exists() && !paths.run.exists());
    }
}
