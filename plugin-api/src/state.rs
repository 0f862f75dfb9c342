//! What drivers that keep their domains under a state root share (feature `state`): where a
//! `session` instance keeps its state, one spelling per root, TOML records written atomically,
//! and the errors that go with them — written once for every driver.

use std::{
    fs::{self, File},
    io,
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
};

use serde::{de::DeserializeOwned, Serialize};

use crate::PluginError;

/// `$XDG_STATE_HOME/capvirt/DRIVER`, else `~/.local/state/capvirt/DRIVER`: where the
/// `DRIVER:///session` instance keeps its state.
pub fn session_root(driver: &str) -> Result<PathBuf, PluginError> {
    let state_home = std::env::var_os("XDG_STATE_HOME").map(PathBuf::from).filter(|p| p.is_absolute());
    let base = match state_home {
        Some(dir) => dir,
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .map(|home| home.join(".local/state"))
            .ok_or_else(|| {
                PluginError::invalid_argument(format!(
                    "{driver}:///session needs $XDG_STATE_HOME or $HOME to locate its state; pass ?root=DIR"
                ))
            })?,
    };
    Ok(base.join("capvirt").join(driver))
}

/// One spelling per state root, so that paths and names derived from it (pidfiles, cgroups)
/// compare equal across connections: canonical when the directory exists, else made absolute.
pub fn normalize_root(root: &Path) -> Result<PathBuf, PluginError> {
    match fs::canonicalize(root) {
        Ok(path) => Ok(path),
        Err(_) => std::path::absolute(root).map_err(|e| {
            PluginError::invalid_argument(format!("state root {}: cannot make it absolute: {e}", root.display()))
        }),
    }
}

/// The error for a domain the state root does not define.
pub fn not_defined(name: &str) -> PluginError {
    PluginError::not_found(format!("domain '{name}' is not defined"))
}

/// A failed file operation on `path`, as a driver failure naming it.
pub fn io_failure(path: &Path, what: &str, e: &io::Error) -> PluginError {
    PluginError::driver_failure(format!("cannot {what} {}: {e}", path.display()))
}

/// Creates a directory readable only by its owner (it holds sockets and definitions).
pub fn make_private_dir(path: &Path) -> Result<(), PluginError> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(|e| io_failure(path, "create directory", &e))
}

/// Reads a TOML file; `None` when it does not exist.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, PluginError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_failure(path, "read", &e)),
    };
    toml::from_str(&text).map(Some).map_err(|e| {
        PluginError::driver_failure(format!(
            "{} is corrupt: {}",
            path.display(),
            e.to_string().lines().next().unwrap_or_default()
        ))
    })
}

/// `value` as TOML text, for a record about to be written.
pub fn to_toml<T: Serialize>(path: &Path, value: &T) -> Result<String, PluginError> {
    toml::to_string(value).map_err(|e| PluginError::internal(format!("cannot encode {}: {e}", path.display())))
}

/// Writes `value` as TOML atomically and durably (see [`crate::fs::write_atomic`]): readers
/// and crashes see the old or the new file, never a partial one.
pub fn write_toml<T: Serialize>(path: &Path, value: &T) -> Result<(), PluginError> {
    crate::fs::write_atomic(path, to_toml(path, value)?.as_bytes()).map_err(|e| io_failure(path, "write", &e))
}

/// Total memory of the host in KiB, from `/proc/meminfo` (0 when unknown): the bound on a
/// domain's memory and `host.info`'s figure.
pub fn host_memory_kib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Whether the open `file` is still the one at `path` (not replaced or removed meanwhile).
pub fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_corrupt_one_is_named() {
        let dir = std::env::temp_dir().join(format!("capvirt-state-{}", std::process::id()));
        make_private_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("record.toml");
        assert_eq!(read_toml::<std::collections::BTreeMap<String, u64>>(&path).ok(), Some(None));
        let record: std::collections::BTreeMap<String, u64> = [("vcpus".to_string(), 2)].into();
        write_toml(&path, &record).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_toml(&path).ok(), Some(Some(record)));
        fs::write(&path, "vcpus = ").unwrap_or_else(|e| panic!("{e}"));
        let corrupt = read_toml::<std::collections::BTreeMap<String, u64>>(&path).err().map(|e| e.message.to_string());
        assert!(corrupt.unwrap_or_default().contains("is corrupt"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn session_roots_are_per_driver() {
        if std::env::var_os("XDG_STATE_HOME").is_some() || std::env::var_os("HOME").is_some() {
            let root = session_root("qemu").unwrap_or_else(|e| panic!("{e}"));
            assert!(root.ends_with("capvirt/qemu"), "{}", root.display());
        }
        assert!(normalize_root(Path::new("relative/dir")).is_ok_and(|p| p.is_absolute()));
    }
}
