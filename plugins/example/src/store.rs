//! The toy hypervisor's state: every domain of a state root in one TOML file, `domains.toml`.
//!
//! capvirt opens a fresh connection in every CLI process, so nothing may live only in memory:
//! each call reads the file, and each change rewrites it atomically under an exclusive lock
//! (`lock` beside it), so concurrent `capvirt` processes never lose each other's changes and a
//! crash never leaves a partial file.
//!
//! capvirt-plugin-api releases after 1.0.0 offer these pieces ready-made (`fs::write_atomic`,
//! and the `state` feature's `parse_local_uri`, `read_toml`, `write_toml`); this example keeps
//! to the 1.0.0 API so that CI can also build it against that release.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use capvirt_plugin_api::PluginError;
use serde::{Deserialize, Serialize};

/// A domain's lifecycle state, in the registry's words (`DomainState`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    #[serde(rename = "shut off")]
    ShutOff,
    #[serde(rename = "running")]
    Running,
    #[serde(rename = "paused")]
    Paused,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::ShutOff => "shut off",
            State::Running => "running",
            State::Paused => "paused",
        }
    }

    pub fn is_active(self) -> bool {
        self != State::ShutOff
    }
}

/// A device present from boot (the registry's `DeviceSpec`, as far as the toy keeps it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub kind: String,
    pub id: String,
}

/// One defined domain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Domain {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub state: State,
    #[serde(default)]
    pub devices: Vec<Device>,
    /// CPU time consumed up to the last pause (0 when shut off).
    #[serde(default)]
    pub cpu_time_ns: u64,
    /// When the domain last began running (ns since the Unix epoch); `None` unless running.
    #[serde(default)]
    pub running_since_ns: Option<u64>,
}

impl Domain {
    /// CPU time consumed since the domain started: the toy's guests keep every vCPU busy.
    pub fn cpu_time_now(&self) -> u64 {
        let running = self.running_since_ns.map_or(0, |since| now_ns().saturating_sub(since));
        self.cpu_time_ns.saturating_add(running.saturating_mul(self.vcpus))
    }
}

/// Everything under one state root.
#[derive(Serialize, Deserialize, Default, Debug)]
pub struct Table {
    #[serde(default)]
    pub domains: BTreeMap<String, Domain>,
}

/// A state root: a directory holding `domains.toml` and its `lock`.
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The store at `root`; with `create`, the directory is made (mode 0700) if missing.
    pub fn open(root: PathBuf, create: bool) -> Result<Store, PluginError> {
        if create {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&root)
                .map_err(|e| io_failure(&root, "create directory", &e))?;
        }
        Ok(Store { root })
    }

    fn table_path(&self) -> PathBuf {
        self.root.join("domains.toml")
    }

    /// The current table (empty when nothing was ever defined). Lock-free: writers replace
    /// the file by renaming, so a reader sees a whole old or a whole new table.
    pub fn read(&self) -> Result<Table, PluginError> {
        let path = self.table_path();
        match fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| {
                let first_line = e.to_string().lines().next().unwrap_or_default().to_string();
                PluginError::driver_failure(format!("{} is corrupt: {first_line}", path.display()))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Table::default()),
            Err(e) => Err(io_failure(&path, "read", &e)),
        }
    }

    /// Runs `change` on the table under the root's exclusive lock and stores the result if
    /// `change` succeeds; a failed change leaves the file untouched.
    pub fn update<T>(&self, change: impl FnOnce(&mut Table) -> Result<T, PluginError>) -> Result<T, PluginError> {
        let lock_path = self.root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_failure(&lock_path, "open", &e))?;
        lock.lock().map_err(|e| io_failure(&lock_path, "lock", &e))?;
        let mut table = self.read()?;
        let result = change(&mut table)?;
        let path = self.table_path();
        let text = toml::to_string(&table)
            .map_err(|e| PluginError::internal(format!("cannot encode {}: {e}", path.display())))?;
        write_atomic(&path, text.as_bytes()).map_err(|e| io_failure(&path, "write", &e))?;
        // The lock is released when `lock` is dropped, after the rename.
        Ok(result)
    }
}

/// Writes `bytes` to `path` atomically and durably: a temporary file in the same directory,
/// fsync, rename over `path`, fsync of the directory. The temporary is removed on failure.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // Unique per writer: writers hold the root's lock, and the pid tells processes apart.
    let tmp = dir.join(format!(".domains.toml.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

pub fn io_failure(path: &Path, what: &str, e: &io::Error) -> PluginError {
    PluginError::driver_failure(format!("cannot {what} {}: {e}", path.display()))
}

pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("capvirt-example-{name}-{}", std::process::id()))
    }

    #[test]
    fn changes_persist_and_a_failed_change_leaves_the_table_alone() {
        let root = scratch("persist");
        let store = Store::open(root.clone(), true).unwrap_or_else(|e| panic!("{e}"));
        let domain = Domain {
            vcpus: 2,
            memory_mib: 64,
            state: State::ShutOff,
            devices: vec![],
            cpu_time_ns: 0,
            running_since_ns: None,
        };
        store
            .update(|t| {
                t.domains.insert("a".into(), domain.clone());
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let refused: Result<(), _> = store.update(|t| {
            t.domains.clear();
            Err(PluginError::invalid_state("no"))
        });
        assert!(refused.is_err());
        let reopened = Store::open(root.clone(), false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reopened.read().map(|t| t.domains.get("a").cloned()).ok(), Some(Some(domain)));
        fs::write(root.join("domains.toml"), "domains = 3").unwrap_or_else(|e| panic!("{e}"));
        let corrupt = reopened.read().err().map(|e| e.message.to_string()).unwrap_or_default();
        assert!(corrupt.contains("domains.toml is corrupt"), "{corrupt}");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_missing_root_reads_as_empty() {
        let store = Store::open(scratch("missing"), false).unwrap_or_else(|e| panic!("{e}"));
        assert!(store.read().is_ok_and(|t| t.domains.is_empty()));
    }
}
