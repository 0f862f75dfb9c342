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

/// A parsed `SCHEME:///session|system[?root=DIR&KEY=VALUE…]` URI of a state-keeping driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalUri {
    /// The state root: `root=DIR`, else the instance's default, normalized.
    pub root: PathBuf,
    /// `session` or `system`.
    pub instance: String,
    /// The other parameters, percent-decoded, each given once, in URI order.
    pub params: Vec<(String, String)>,
}

/// Parses a local URI of `scheme`: remote hosts are unsupported, parameters must be in
/// `known` (besides `root`) and appear once, `root` is a non-empty path without control
/// characters, `system` needs root privileges (`privileged`) and defaults to
/// `/var/lib/capvirt/SCHEME`, `session` to [`session_root`].
pub fn parse_local_uri(uri: &str, scheme: &str, known: &[&str], privileged: bool) -> Result<LocalUri, PluginError> {
    let invalid = |why: String| PluginError::invalid_argument(format!("{uri}: {why}"));
    let rest = uri
        .strip_prefix(scheme)
        .and_then(|r| r.strip_prefix("://"))
        .ok_or_else(|| PluginError::invalid_argument(format!("{uri:?} is not a {scheme}:// URI")))?;
    let (location, query) = rest.split_once('?').map_or((rest, None), |(l, q)| (l, Some(q)));
    let Some(instance) = location.strip_prefix('/') else {
        return Err(PluginError::unsupported(format!(
            "{uri}: remote hosts are not supported; use {scheme}:///session or {scheme}:///system"
        )));
    };
    let mut root = None;
    let mut params: Vec<(String, String)> = Vec::new();
    for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| invalid(format!("parameter `{key}` is not valid UTF-8")))?
            .into_owned();
        if (key == "root" && root.is_some()) || params.iter().any(|(k, _)| k == key) {
            return Err(invalid(format!("parameter `{key}` given twice")));
        }
        if key == "root" {
            if value.is_empty() || value.chars().any(char::is_control) {
                return Err(invalid("`root` must be a non-empty path without control characters".into()));
            }
            root = Some(PathBuf::from(value));
        } else if known.contains(&key) {
            params.push((key.to_string(), value));
        } else {
            let known = std::iter::once("root").chain(known.iter().copied()).collect::<Vec<_>>().join(", ");
            return Err(invalid(format!("unknown parameter `{key}` (known: {known})")));
        }
    }
    let root = match (instance, root) {
        ("session" | "system", Some(root)) => root,
        ("session", None) => session_root(scheme)?,
        ("system", None) if privileged => PathBuf::from("/var/lib/capvirt").join(scheme),
        ("system", None) => {
            return Err(PluginError::invalid_argument(format!(
                "{scheme}:///system needs root privileges; use {scheme}:///session"
            )))
        }
        (other, _) => {
            return Err(invalid(format!("unknown instance {other:?}; use {scheme}:///session or {scheme}:///system")))
        }
    };
    Ok(LocalUri { root: normalize_root(&root)?, instance: instance.to_string(), params })
}

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
    fn local_uris_give_root_and_known_parameters_once() {
        let uri = parse_local_uri("x:///session?root=/tmp/a%20b&k=v%2C1", "x", &["k"], false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(uri.root, PathBuf::from("/tmp/a b"));
        assert_eq!((uri.instance.as_str(), uri.params), ("session", vec![("k".into(), "v,1".into())]));
        assert_eq!(
            parse_local_uri("x:///system", "x", &[], true).map(|u| u.root).ok(),
            Some(PathBuf::from("/var/lib/capvirt/x"))
        );
        for bad in [
            "y:///session",
            "x://host/system",
            "x:///other",
            "x:///system",
            "x:///session?root=",
            "x:///session?root=/a&root=/b",
            "x:///session?k=1&k=2",
            "x:///session?unknown=1",
            "x:///session?k=%FF",
        ] {
            assert!(parse_local_uri(bad, "x", &["k"], false).is_err(), "{bad} accepted");
        }
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
