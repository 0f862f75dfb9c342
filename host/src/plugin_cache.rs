//! The plugin manifest cache: which plugin file serves which URI scheme, so that a command
//! that connects loads the one plugin it needs instead of every installed one.
//!
//! The cache is never trusted for security. It only answers "which file serves scheme X"; that
//! file is then loaded with every check (`StrictModes`, the ELF image, its pin, abi_stable's
//! layout check) and admitted on its real manifest. A cache that does not match the plugin
//! directories exactly (a file added, removed or changed, a directory's owner or mode, the
//! pins, the host binary or its registry), or that cannot be read or parsed, is ignored: the
//! host loads every plugin as without a cache and writes a fresh one.
//!
//! Files are identified by device, inode, size, and modification and status-change times in
//! nanoseconds. The status-change time (ctime) is set by the kernel on every write, chmod,
//! chown or rename onto the name and cannot be set back by `touch` or `cp -p`, so a file with
//! an unchanged identity has unchanged bytes; a pinned file's entry also records the pin it
//! was checked against.

use std::{
    fs::{self, Metadata},
    hash::{Hash, Hasher},
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::registry::Registry;

/// Bumped when the file layout changes: an older file is then simply ignored.
const FORMAT: u32 = 2;

/// Where the cache lives: `$XDG_CACHE_HOME/capvirt`, else `~/.cache/capvirt` for users and
/// `/var/cache/capvirt` for root (as libvirt keeps its caches under `/var/cache/libvirt`).
pub fn default_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(xdg) = var("XDG_CACHE_HOME") {
        return Some(xdg.join("capvirt"));
    }
    if rustix::process::getuid().is_root() {
        return Some(PathBuf::from("/var/cache/capvirt"));
    }
    var("HOME").map(|home| home.join(".cache/capvirt"))
}

/// A file's identity: equal identities mean equal bytes (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(crate) struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    pub(crate) fn of(meta: &Metadata) -> Self {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A search directory as the plugin checks saw it: absent, or its identity, owner and mode
/// (a directory that becomes group-writable refuses every plugin in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DirState {
    path: PathBuf,
    state: Option<(u64, u64, u32, u32, u32)>,
}

impl DirState {
    pub(crate) fn of(path: &Path, meta: Option<&Metadata>) -> Self {
        DirState { path: path.to_path_buf(), state: meta.map(|m| (m.dev(), m.ino(), m.uid(), m.gid(), m.mode())) }
    }
}

/// What loading one file decided, as far as it follows from the file itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Verdict {
    /// Refused before admission for a reason that follows from the file's bytes (and its pin).
    Refused,
    /// Decided by more than its bytes (ownership, a failing `dlopen`): the cache cannot tell
    /// whether it would load now, so it cannot answer for schemes discovered after it.
    Unsettled,
    /// Its manifest was read. `admissible`: it passes admission when no other plugin claims
    /// its name or schemes (duplicates depend on the other files, so they are decided anew).
    Plugin { name: String, schemes: Vec<String>, admissible: bool },
}

/// One plugin file on the search path, in discovery order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileEntry {
    pub path: PathBuf,
    pub identity: Identity,
    /// The pin in force when it was checked.
    pub pin: Option<String>,
    pub verdict: Verdict,
}

/// The whole cache file: a digest of the inputs discovery saw (so that checking them is
/// hashing a fresh scan and comparing two numbers, with nothing to parse or format), and what
/// each file turned out to be, in discovery order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    format: u32,
    inputs: u64,
    verdicts: Vec<Verdict>,
}

/// The inputs of discovery as they are now, cheaply: one `stat` per directory and file.
pub(crate) struct Inputs {
    pub dirs: Vec<DirState>,
    /// Plugin files in discovery order, with identity and pin; `None` when one could not be
    /// inspected (then the cache cannot answer).
    pub files: Option<Vec<(PathBuf, Identity, Option<String>)>>,
}

/// The digest of discovery's inputs: the host, each directory's state, each file's path,
/// identity and pin. SipHash with fixed keys: stable for one host binary, which is one of the
/// inputs. (A collision could only make the cache name a wrong file, which is then checked
/// and admitted on its real manifest like any other.)
fn inputs_digest<'a>(
    host: &str,
    dirs: &[DirState],
    files: impl Iterator<Item = (&'a Path, &'a Identity, Option<&'a str>)>,
) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    host.hash(&mut hasher);
    for dir in dirs {
        dir.path.hash(&mut hasher);
        dir.state.hash(&mut hasher);
    }
    for (path, identity, pin) in files {
        path.hash(&mut hasher);
        identity.hash(&mut hasher);
        pin.hash(&mut hasher);
    }
    hasher.finish()
}

/// The file served by the cache for a scheme: load it, and admit it against `earlier`.
pub(crate) struct Answer {
    pub path: PathBuf,
    pub name: String,
    pub schemes: Vec<String>,
    /// The `(name, schemes, path)` of the plugins discovery admits before this one.
    pub earlier: Vec<(String, Vec<String>, PathBuf)>,
}

/// The cache of one plugin search path.
pub(crate) struct PluginCache {
    path: PathBuf,
}

impl PluginCache {
    /// The cache file for `search_path` in directory `dir` (one file per search path, so hosts
    /// with different `--plugin-dir`s do not overwrite each other's).
    pub(crate) fn new(dir: &Path, search_path: &[PathBuf]) -> Self {
        let mut hasher = Sha256::new();
        for dir in search_path {
            hasher.update(dir.as_os_str().as_encoded_bytes());
            hasher.update([0]);
        }
        let digest = hasher.finalize();
        let name: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        PluginCache { path: dir.join(format!("plugins-{name}.json")) }
    }

    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The stored snapshot, if there is a readable one of this format.
    fn read(&self) -> Option<Snapshot> {
        let bytes = fs::read(&self.path).ok()?;
        serde_json::from_slice::<Snapshot>(&bytes).ok().filter(|s| s.format == FORMAT)
    }

    /// The file serving `scheme` according to the stored snapshot, when it matches `inputs`
    /// and `host` exactly; `None` when the cache cannot answer.
    pub(crate) fn answer(&self, host: &str, inputs: &Inputs, scheme: &str) -> Option<Answer> {
        let files = inputs.files.as_ref()?;
        let snapshot = self.read()?;
        let now = inputs_digest(host, &inputs.dirs, files.iter().map(|(p, id, pin)| (p.as_path(), id, pin.as_deref())));
        if snapshot.inputs != now || snapshot.verdicts.len() != files.len() {
            return None;
        }
        let mut earlier: Vec<(String, Vec<String>, PathBuf)> = Vec::new();
        for (verdict, (path, _, _)) in snapshot.verdicts.into_iter().zip(files) {
            let (name, schemes) = match verdict {
                Verdict::Plugin { name, schemes, admissible: true } => (name, schemes),
                Verdict::Plugin { admissible: false, .. } | Verdict::Refused => continue,
                Verdict::Unsettled => return None,
            };
            let duplicate = earlier.iter().any(|(n, s, _)| *n == name || s.iter().any(|taken| schemes.contains(taken)));
            if duplicate {
                continue;
            }
            if schemes.iter().any(|s| s == scheme) {
                return Some(Answer { path: path.clone(), name, schemes, earlier });
            }
            earlier.push((name, schemes, path.clone()));
        }
        None
    }

    /// Stores what a full discovery saw, unless the stored copy already says it. Failures are
    /// only logged: the cache is an optimisation.
    pub(crate) fn store(&self, host: &str, dirs: &[DirState], files: Vec<FileEntry>) {
        let inputs = inputs_digest(host, dirs, files.iter().map(|f| (f.path.as_path(), &f.identity, f.pin.as_deref())));
        let snapshot = Snapshot { format: FORMAT, inputs, verdicts: files.into_iter().map(|f| f.verdict).collect() };
        if self.read().as_ref() == Some(&snapshot) {
            return;
        }
        let written = serde_json::to_vec(&snapshot).map_err(std::io::Error::other).and_then(|bytes| {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            capvirt_plugin_api::fs::write_atomic_mode(&self.path, &bytes, 0o600)
        });
        if let Err(e) = written {
            tracing::debug!(target: "capvirt::plugins", "cannot write the plugin cache {}: {e}", self.path.display());
        }
    }
}

/// What a cache entry is only valid for: the invoking user (ownership checks depend on it),
/// this host binary (its identity covers the embedded registry and the plugin ABI it checks
/// against) and the registry it enforces (a
/// `--registry` directory or a library caller's own), by version and capability stages.
pub(crate) fn host_fingerprint(registry: &Registry) -> String {
    let exe = std::env::current_exe().ok().and_then(|exe| fs::metadata(exe).ok()).map(|m| Identity::of(&m));
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    registry.version().hash(&mut hasher);
    for capability in registry.capabilities() {
        capability.id().hash(&mut hasher);
        capability.stage().to_string().hash(&mut hasher);
        capability.doc.version.hash(&mut hasher);
    }
    format!(
        "capvirt {} uid {} plugin-api {} exe {:?} registry {:016x}",
        env!("CARGO_PKG_VERSION"),
        rustix::process::getuid().as_raw(),
        capvirt_plugin_api::ABI_VERSION,
        exe,
        hasher.finish()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, verdict: Verdict) -> FileEntry {
        let identity = Identity { dev: 1, ino: path.len() as u64, size: 10, mtime: (1, 2), ctime: (3, 4) };
        FileEntry { path: PathBuf::from(path), identity, pin: None, verdict }
    }

    fn plugin(name: &str, schemes: &[&str], admissible: bool) -> Verdict {
        Verdict::Plugin { name: name.into(), schemes: schemes.iter().map(|s| s.to_string()).collect(), admissible }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("capvirt-cache-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn answers_follow_discovery_order_and_duplicates() {
        let dir = scratch("order");
        let cache = PluginCache::new(&dir, &[PathBuf::from("/p")]);
        let files = vec![
            entry("/p/a", Verdict::Refused),
            entry("/p/bb", plugin("b", &["x"], true)),
            entry("/p/ccc", plugin("c", &["x", "y"], true)), // scheme x taken: refused as a duplicate
            entry("/p/dddd", plugin("d", &["y"], false)),    // refused on its own
            entry("/p/eeeee", plugin("e", &["y", "z"], true)),
            entry("/p/ffffff", Verdict::Unsettled),
            entry("/p/ggggggg", plugin("g", &["w"], true)),
        ];
        let dirs = vec![DirState::of(Path::new("/p"), None)];
        cache.store("h", &dirs, files.clone());
        let meta = fs::metadata(cache.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(meta.mode() & 0o777, 0o600);
        let inputs = Inputs {
            dirs: dirs.clone(),
            files: Some(files.iter().map(|f| (f.path.clone(), f.identity, f.pin.clone())).collect()),
        };
        let served = |scheme| cache.answer("h", &inputs, scheme).map(|a| (a.name, a.earlier.len()));
        assert_eq!(served("x"), Some(("b".into(), 0)));
        assert_eq!(served("y"), Some(("e".into(), 1)));
        // Past a file whose verdict depends on more than its bytes, the cache cannot tell.
        assert_eq!(served("w"), None);
        assert_eq!(served("v"), None);
        // Another host binary, another directory state, a changed file, a pin: no answer.
        assert!(cache.answer("other", &inputs, "x").is_none());
        let moved = Inputs { dirs: vec![DirState::of(Path::new("/q"), None)], files: inputs.files.clone() };
        assert!(cache.answer("h", &moved, "x").is_none());
        let mut changed = inputs.files.clone().unwrap_or_default();
        changed[0].1.ctime.1 += 1;
        assert!(cache.answer("h", &Inputs { dirs: dirs.clone(), files: Some(changed) }, "x").is_none());
        let mut pinned = inputs.files.clone().unwrap_or_default();
        pinned[1].2 = Some("sha256:00".into());
        assert!(cache.answer("h", &Inputs { dirs: dirs.clone(), files: Some(pinned) }, "x").is_none());
        // A corrupt file is no cache.
        fs::write(cache.path(), b"{\"format\": 1, \"host\": ").unwrap_or_else(|e| panic!("{e}"));
        assert!(cache.answer("h", &inputs, "x").is_none());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_file_per_search_path() {
        let a = PluginCache::new(Path::new("/c"), &[PathBuf::from("/a")]);
        let b = PluginCache::new(Path::new("/c"), &[PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_ne!(a.path, b.path);
        assert!(a.path.starts_with("/c"));
    }
}
