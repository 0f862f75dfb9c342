//! The state root: one directory per container holding its definition, its lock and, while it
//! runs, a private `run/` directory.
//!
//! ```text
//! ROOT/domains/NAME/domain.toml   definition (written atomically)
//!                   lock          flock'ed by every operation that changes the container
//!                   run/          0700; runtime.toml, status.json, console.log, shutdown
//! ```
//!
//! `runtime.toml` records bwrap's outer process, the namespace's PID 1 (bwrap's reaper) and
//! the container's init, each as PID + start time: a later `capvirt` process finds the tree
//! again, and a PID reused by an unrelated process is never taken for the container.
//! bwrap writes `{"exit-code": N}` to `status.json` when the tree ends; `shutdown` marks a stop
//! capvirt asked for. Together they tell "shut off" (init exited 0, or stopped on request)
//! from "crashed" (killed from outside, or init failed).

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
use serde::{Deserialize, Serialize};

use crate::{
    cgroup::Controller,
    procfs::Proc,
    spec::{check_name, Container},
};

/// How long an operation waits for another one holding the same container's lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(60);

/// A state root.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Paths of one container.
#[derive(Debug, Clone)]
pub struct DomainPaths {
    pub name: String,
    pub dir: PathBuf,
    pub definition: PathBuf,
    pub lock: PathBuf,
    pub run: PathBuf,
    pub runtime: PathBuf,
    pub status: PathBuf,
    pub console: PathBuf,
    pub shutdown: PathBuf,
    /// Present while suspended without a freezer (the tree was SIGSTOPped).
    pub stopped: PathBuf,
}

/// What a running container is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// bwrap's process outside the namespaces (it waits for the tree and writes the status).
    pub monitor: Proc,
    /// PID 1 of the container's PID namespace (bwrap's reaper): when it ends, so does the tree.
    pub ns_init: Proc,
    /// The container's init (`boot.init`), once it has been executed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<Proc>,
    /// The cgroup controllers that hold the tree and enforce its limits.
    pub controllers: Vec<Controller>,
    /// `bwrap --version` of the bubblewrap that started it.
    pub bwrap_version: String,
    /// The definition it was started from.
    pub container: Container,
}

/// Whether a container's tree exists.
#[derive(Debug, Clone)]
pub enum Liveness {
    /// Never started, or stopped and cleaned up.
    Stopped,
    Alive(Runtime),
    /// The tree is gone but its runtime directory is still there: `clean` when init exited 0
    /// or capvirt asked it to stop, otherwise it crashed or was killed from outside.
    Ended {
        clean: bool,
        runtime: Option<Runtime>,
    },
}

/// The exclusive lock of one container; released on drop.
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

    /// Paths of the container `name` (checked again here: it becomes a directory name).
    pub fn paths(&self, name: &str) -> Result<DomainPaths, PluginError> {
        check_name(name)?;
        let dir = self.domains_dir().join(name);
        let run = dir.join("run");
        Ok(DomainPaths {
            name: name.to_string(),
            definition: dir.join("domain.toml"),
            lock: dir.join("lock"),
            runtime: run.join("runtime.toml"),
            status: run.join("status.json"),
            console: run.join("console.log"),
            shutdown: run.join("shutdown"),
            stopped: run.join("stopped"),
            run,
            dir,
        })
    }

    /// Names of the defined containers, sorted.
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

    /// The stored definition, or a not-found error.
    pub fn require(&self, name: &str) -> Result<(DomainPaths, Container), PluginError> {
        let paths = self.paths(name)?;
        match read_toml(&paths.definition)? {
            Some(container) => Ok((paths, container)),
            None => Err(not_defined(name)),
        }
    }

    /// Takes the container's lock, waiting up to `wait`. With `create`, makes the domain
    /// directory first (define); otherwise the container must exist.
    pub fn lock(&self, name: &str, create: bool) -> Result<DomainLock, PluginError> {
        self.lock_within(name, create, LOCK_WAIT)?.ok_or_else(|| {
            PluginError::timeout(format!(
                "domain '{name}' is locked by another capvirt operation; gave up after {} s",
                LOCK_WAIT.as_secs()
            ))
        })
    }

    /// The lock if it can be had within `wait` (`None`: someone else holds it).
    pub fn lock_within(&self, name: &str, create: bool, wait: Duration) -> Result<Option<DomainLock>, PluginError> {
        let paths = self.paths(name)?;
        let deadline = Instant::now() + wait;
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
                        return Ok(Some(DomainLock { _file: file, paths }));
                    }
                    if !create {
                        return Err(not_defined(name));
                    }
                }
                Err(fs::TryLockError::WouldBlock) => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                Err(fs::TryLockError::Error(e)) => return Err(io_failure(&paths.lock, "lock", &e)),
            }
        }
    }

    /// Whether the container's tree runs, from its runtime record and `/proc`.
    pub fn liveness(&self, paths: &DomainPaths) -> Result<Liveness, PluginError> {
        let runtime: Option<Runtime> = read_toml(&paths.runtime)?;
        if let Some(runtime) = &runtime {
            // The namespace's PID 1 holds the tree: the kernel kills every process of the
            // namespace when it ends.
            if runtime.ns_init.alive() {
                return Ok(Liveness::Alive(runtime.clone()));
            }
        } else if !paths.run.exists() {
            return Ok(Liveness::Stopped);
        }
        let clean = paths.shutdown.exists() || exit_code(&paths.status) == Some(0);
        Ok(Liveness::Ended { clean, runtime })
    }
}

/// The exit code bwrap reported for the container's init, if it did.
pub fn exit_code(status: &Path) -> Option<i64> {
    let text = fs::read_to_string(status).ok()?;
    // bwrap writes one JSON document per event, separated by newlines.
    serde_json::Deserializer::from_str(&text)
        .into_iter::<serde_json::Value>()
        .filter_map(Result::ok)
        .find_map(|doc| doc.get("exit-code").and_then(serde_json::Value::as_i64))
}

/// Writes a runtime record atomically but without fsync: it describes processes, which a
/// host crash ends anyway, so durability buys nothing and two fsyncs would double the time a
/// start takes on a busy disk. Readers still see the old or the new file, never a part.
pub fn write_runtime<T: Serialize>(path: &Path, value: &T) -> Result<(), PluginError> {
    let text =
        toml::to_string(value).map_err(|e| PluginError::internal(format!("cannot encode {}: {e}", path.display())))?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let written = fs::write(&tmp, text.as_bytes()).and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_failure(path, "write", &e));
    }
    Ok(())
}

/// Removes a container's runtime directory (after its tree is gone).
pub fn remove_runtime(paths: &DomainPaths) -> Result<(), PluginError> {
    match fs::remove_dir_all(&paths.run) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_failure(&paths.run, "remove", &e)),
    }
}

/// Removes a whole domain directory (undefine), the lock file last.
pub fn remove_domain(paths: &DomainPaths) -> Result<(), PluginError> {
    remove_runtime(paths)?;
    for path in [&paths.definition, &paths.lock] {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_failure(path, "remove", &e)),
        }
    }
    // Stray files (an interrupted atomic write) keep the directory; that is harmless.
    let _ = fs::remove_dir(&paths.dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_exit_code_bwrap_appends_to_its_status() {
        let dir = std::env::temp_dir().join(format!("capvirt-container-status-{}", std::process::id()));
        make_private_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        let status = dir.join("status.json");
        fs::write(&status, "{ \"child-pid\": 12, \"pid-namespace\": 4026532180 }\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(exit_code(&status), None, "still running");
        fs::write(&status, "{ \"child-pid\": 12 }\n{ \"exit-code\": 137 }\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(exit_code(&status), Some(137));
        assert_eq!(exit_code(&dir.join("missing.json")), None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_domain_without_runtime_files_is_stopped() {
        let root = std::env::temp_dir().join(format!("capvirt-container-store-{}", std::process::id()));
        let store = Store::new(root.clone());
        let paths = store.paths("c1").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(store.liveness(&paths), Ok(Liveness::Stopped)));
        assert!(store.paths("../c1").is_err());
        assert_eq!(store.names().ok(), Some(Vec::new()));
        let _ = fs::remove_dir_all(&root);
    }
}
