//! Plugin discovery and the load-time checks of each plugin against the registry.
//!
//! One bad plugin never stops the others: every file ends up either loaded or refused with a
//! reason, and `capvirt plugins` shows both.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use capvirt_plugin_api::{Manifest, PluginModuleRef};

use crate::{
    loader,
    plugin_cache::{host_fingerprint, DirState, FileEntry, Identity, Inputs, PluginCache, Verdict},
    registry::{model::StringFormat, types::check_format, CapabilityIndex, Registry},
};

/// Plugin file names: `libcapvirt_driver_<name>.so`.
pub const PLUGIN_PREFIX: &str = "libcapvirt_driver_";
pub const PLUGIN_SUFFIX: &str = ".so";
/// Searched after the executable's directory when no directory is given explicitly.
pub const SYSTEM_PLUGIN_DIR: &str = "/usr/lib/capvirt/plugins";

/// SHA-256 pins of plugin files: canonical path → `sha256:<hex>` (`[pins]` in the host config).
pub type Pins = BTreeMap<PathBuf, String>;

/// The directories to search, in order: explicit ones (`--plugin-dir`, else
/// `CAPVIRT_PLUGIN_DIR`, colon-separated) replace the defaults, which are the directory of
/// the executable and then [`SYSTEM_PLUGIN_DIR`].
pub fn search_path(explicit: &[PathBuf], env_value: Option<&str>, exe_dir: Option<&Path>) -> Vec<PathBuf> {
    if !explicit.is_empty() {
        return explicit.to_vec();
    }
    if let Some(value) = env_value.filter(|v| !v.is_empty()) {
        return std::env::split_paths(value).collect();
    }
    exe_dir.into_iter().map(Path::to_path_buf).chain([PathBuf::from(SYSTEM_PLUGIN_DIR)]).collect()
}

/// A plugin's manifest, copied out of the ABI types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    pub name: String,
    pub vendor: String,
    pub version: String,
    pub registry_version: String,
    pub schemes: Vec<String>,
    pub description: String,
    /// `(capability id, capability version)` as declared.
    pub capabilities: Vec<(String, u32)>,
}

impl PluginInfo {
    fn from_manifest(m: &Manifest) -> Self {
        PluginInfo {
            name: m.name.to_string(),
            vendor: m.vendor.to_string(),
            version: m.version.to_string(),
            registry_version: m.registry_version.to_string(),
            schemes: m.schemes.iter().map(|s| s.to_string()).collect(),
            description: m.description.to_string(),
            capabilities: m.capabilities.iter().map(|c| (c.id.to_string(), c.version)).collect(),
        }
    }
}

/// A plugin that passed every check.
pub struct LoadedPlugin {
    pub path: PathBuf,
    pub info: PluginInfo,
    pub(crate) module: PluginModuleRef,
    /// Registry capabilities this plugin may be called for, by registry index.
    callable: Vec<bool>,
    /// Declared capabilities that are never callable, with the reason.
    pub ignored: Vec<(String, String)>,
    /// Built for a newer minor of this host's registry major: its results may carry optional
    /// fields added in that minor, which the host drops instead of refusing the result.
    pub(crate) newer_registry: bool,
}

impl LoadedPlugin {
    pub fn implements(&self, index: CapabilityIndex) -> bool {
        self.callable.get(index.0).copied().unwrap_or(false)
    }

    /// The declared version of a capability, if the plugin implements it.
    pub fn implemented_version(&self, id: &str) -> Option<u32> {
        self.info.capabilities.iter().find(|(c, _)| c == id).map(|(_, v)| *v)
    }

    /// Whether the plugin targets a newer minor of this host's registry (its results may carry
    /// fields this host does not know; they are dropped, see `Connection::call`).
    pub fn targets_newer_registry(&self) -> bool {
        self.newer_registry
    }
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin").field("path", &self.path).field("info", &self.info).finish_non_exhaustive()
    }
}

/// The SDK answers a `manifest()` that panicked with an empty name and the panic as the
/// description (`plugin-api/src/export.rs`): report the panic, not the empty name.
fn manifest_failure(info: &PluginInfo) -> Option<String> {
    if !info.name.is_empty() {
        return None;
    }
    info.description.strip_prefix("driver panicked: ").map(|panic| format!("manifest() panicked: {panic}"))
}

/// A file that was not loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedPlugin {
    pub path: PathBuf,
    /// The plugin's name when its manifest could be read.
    pub name: Option<String>,
    pub reason: String,
    /// Refused only because the file no longer matches its SHA-256 pin.
    pub pin_mismatch: bool,
    /// The manifest, when it could be read (refused at admission).
    pub manifest: Option<PluginInfo>,
}

/// A plugin file (it exports the plugin root module) in a plugin directory that is not named
/// like a plugin, so never loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredFile {
    pub path: PathBuf,
    /// Why it was not loaded, with the name it would need.
    pub hint: String,
}

/// The hint for a shared library named `file_name` that is not named like a plugin.
pub fn misnamed_hint(file_name: &str) -> String {
    let stem = file_name.strip_suffix(PLUGIN_SUFFIX).unwrap_or(file_name);
    let stem = stem.strip_prefix("lib").unwrap_or(stem);
    let name = stem.strip_prefix("capvirt_driver_").unwrap_or(stem);
    let name = if name.is_empty() { "NAME" } else { name };
    format!("not named {PLUGIN_PREFIX}*{PLUGIN_SUFFIX}, so not loaded: rename it to {PLUGIN_PREFIX}{name}{PLUGIN_SUFFIX} to load it")
}

/// A plugin admitted earlier, as admission sees it: its name, schemes and path.
type Claim<'c> = (&'c str, &'c [String], &'c Path);

/// What admission decided: callable flags by registry index, and ignored capabilities.
type Admission = (Vec<bool>, Vec<(String, String)>);

/// The outcome of loading every plugin on the search path.
#[derive(Debug, Default)]
pub struct PluginSet {
    pub loaded: Vec<Arc<LoadedPlugin>>,
    pub refused: Vec<RefusedPlugin>,
    /// Plugin files in plugin directories that are not named like plugins.
    pub ignored: Vec<IgnoredFile>,
    /// Non-fatal findings (ignored capabilities, unreadable directories).
    pub warnings: Vec<String>,
    /// Pins checked when loading files.
    pins: Pins,
}

/// The plugin files on a search path, in discovery order (a file name seen in an earlier
/// directory shadows later ones), and the state of each directory.
struct SearchPath {
    dirs: Vec<DirState>,
    files: Vec<PathBuf>,
    /// Shared libraries not named like plugins (a hint may be due).
    misnamed: Vec<PathBuf>,
    warnings: Vec<String>,
}

impl SearchPath {
    fn scan(dirs: &[PathBuf]) -> SearchPath {
        let mut scan = SearchPath { dirs: Vec::new(), files: Vec::new(), misnamed: Vec::new(), warnings: Vec::new() };
        let mut seen_names = HashSet::new();
        for dir in dirs {
            scan.dirs.push(DirState::of(dir, fs::metadata(dir).ok().as_ref()));
            let entries = match fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    scan.warnings.push(format!("cannot read plugin directory {}: {e}", dir.display()));
                    continue;
                }
            };
            // Sorted by name; a path per plugin file only (most directories hold other files).
            let mut files = Vec::new();
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name();
                let bytes = name.as_encoded_bytes();
                if !bytes.ends_with(PLUGIN_SUFFIX.as_bytes()) || name.to_str().is_none() {
                    continue;
                }
                if bytes.starts_with(PLUGIN_PREFIX.as_bytes()) {
                    files.push(name);
                } else {
                    scan.misnamed.push(dir.join(name));
                }
            }
            files.sort_unstable_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
            for name in files {
                let path = dir.join(&name);
                if seen_names.insert(name) {
                    scan.files.push(path);
                }
            }
        }
        scan
    }
}

/// The pin of `path`, if any. Pins are keyed by canonical path; resolving it costs a few
/// syscalls, so only with pins.
fn pin_of(pins: &Pins, path: &Path) -> Option<String> {
    if pins.is_empty() {
        return None;
    }
    fs::canonicalize(path).ok().and_then(|canonical| pins.get(&canonical).cloned())
}

/// Where the plugins of a search path are found and how the manifest cache is used.
#[derive(Debug, Clone)]
pub(crate) struct Discovery {
    pub dirs: Vec<PathBuf>,
    pub pins: Pins,
    /// The manifest cache's directory; `None`: no cache.
    pub cache_dir: Option<PathBuf>,
}

impl Discovery {
    fn cache(&self) -> Option<PluginCache> {
        self.cache_dir.as_deref().map(|dir| PluginCache::new(dir, &self.dirs))
    }

    /// Loads every plugin (and refreshes the manifest cache).
    pub(crate) fn discover_all(&self, registry: &Registry) -> PluginSet {
        let (set, dirs, files) = PluginSet::discover_recording(registry, &self.dirs, &self.pins);
        if let Some(cache) = self.cache() {
            cache.store(&host_fingerprint(registry), &dirs, files);
        }
        set
    }

    /// The plugin serving `scheme`, loaded alone, when the manifest cache matches the search
    /// path and names it; `None` means "ask [`Discovery::discover_all`]". The file gets every
    /// check of a full discovery and is admitted on its real manifest.
    pub(crate) fn cached_plugin(&self, registry: &Registry, scheme: &str) -> Option<(LoadedPlugin, Vec<String>)> {
        let cache = self.cache()?;
        let scan = SearchPath::scan(&self.dirs);
        let files = scan
            .files
            .into_iter()
            .map(|path| {
                let identity = Identity::of(&fs::metadata(&path).ok()?);
                let pin = pin_of(&self.pins, &path);
                Some((path, identity, pin))
            })
            .collect();
        let answer = cache.answer(&host_fingerprint(registry), &Inputs { dirs: scan.dirs, files }, scheme)?;
        let pin = pin_of(&self.pins, &answer.path);
        let claims =
            answer.earlier.iter().map(|(name, schemes, path)| (name.as_str(), schemes.as_slice(), path.as_path()));
        match PluginSet::load_one(registry, &answer.path, pin.as_deref(), claims) {
            Loaded::Plugin(plugin) if plugin.info.name == answer.name && plugin.info.schemes == answer.schemes => {
                let warnings = plugin.ignored_warnings();
                Some((plugin, warnings))
            }
            // The file says otherwise now (its manifest depends on more than its bytes, or it
            // is refused): the cache is stale.
            _ => None,
        }
    }
}

/// What loading one file came to.
enum Loaded {
    Plugin(LoadedPlugin),
    Refused { refusal: RefusedPlugin, verdict: Verdict },
}

impl LoadedPlugin {
    fn ignored_warnings(&self) -> Vec<String> {
        self.ignored
            .iter()
            .map(|(id, why)| format!("plugin `{}`: capability `{id}` ignored: {why}", self.info.name))
            .collect()
    }
}

impl PluginSet {
    /// Loads every `libcapvirt_driver_*.so` in `dirs`, in order. A file name seen in an earlier
    /// directory shadows later ones.
    pub fn discover(registry: &Registry, dirs: &[PathBuf]) -> PluginSet {
        PluginSet::discover_pinned(registry, dirs, &Pins::new())
    }

    /// [`PluginSet::discover`], refusing every pinned file whose SHA-256 differs from its pin.
    pub fn discover_pinned(registry: &Registry, dirs: &[PathBuf], pins: &Pins) -> PluginSet {
        PluginSet::discover_recording(registry, dirs, pins).0
    }

    /// [`PluginSet::discover_pinned`], the directories as scanned and what each file turned
    /// out to be (for the cache).
    fn discover_recording(
        registry: &Registry,
        dirs: &[PathBuf],
        pins: &Pins,
    ) -> (PluginSet, Vec<DirState>, Vec<FileEntry>) {
        let scan = SearchPath::scan(dirs);
        let mut set = PluginSet { pins: pins.clone(), warnings: scan.warnings, ..PluginSet::default() };
        for path in scan.misnamed {
            // A plugin in all but its name (other libraries are none of our business).
            if loader::exports_root_module(&path) != Some(false) {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                set.ignored.push(IgnoredFile { hint: misnamed_hint(&name), path });
            }
        }
        let mut entries = Vec::new();
        for path in scan.files {
            // Taken before loading: a file replaced meanwhile gets a new identity next time.
            let identity = fs::metadata(&path).ok().map(|m| Identity::of(&m));
            let pin = pin_of(pins, &path);
            let verdict = set.load_pinned(registry, &path, pin.as_deref());
            // A file that cannot be inspected cannot be recognised next time either.
            let (identity, verdict) = identity.map_or((Identity::default(), Verdict::Unsettled), |id| (id, verdict));
            entries.push(FileEntry { path, identity, pin, verdict });
        }
        (set, scan.dirs, entries)
    }

    /// Loads one file (also used for plugins named directly).
    pub fn load_file(&mut self, registry: &Registry, path: &Path) {
        let pin = pin_of(&self.pins, path);
        self.load_pinned(registry, path, pin.as_deref());
    }

    /// Loads one file against the plugins loaded so far; returns the verdict for the cache.
    fn load_pinned(&mut self, registry: &Registry, path: &Path, pin: Option<&str>) -> Verdict {
        let claims = self.loaded.iter().map(|p| (p.info.name.as_str(), p.info.schemes.as_slice(), p.path.as_path()));
        match PluginSet::load_one(registry, path, pin, claims) {
            Loaded::Plugin(plugin) => {
                self.warnings.extend(plugin.ignored_warnings());
                let verdict = Verdict::Plugin {
                    name: plugin.info.name.clone(),
                    schemes: plugin.info.schemes.clone(),
                    admissible: true,
                };
                self.loaded.push(Arc::new(plugin));
                verdict
            }
            Loaded::Refused { refusal, verdict } => {
                self.refused.push(refusal);
                verdict
            }
        }
    }

    /// Loads the plugin at `path` and admits it unless a plugin in `claims` (name, schemes)
    /// already has its name or one of its schemes.
    fn load_one<'c>(
        registry: &Registry,
        path: &Path,
        pin: Option<&str>,
        claims: impl Iterator<Item = Claim<'c>> + Clone,
    ) -> Loaded {
        let refused = |reason, pin_mismatch, manifest: Option<PluginInfo>, verdict| Loaded::Refused {
            refusal: RefusedPlugin {
                path: path.to_path_buf(),
                name: manifest.as_ref().map(|m| m.name.clone()),
                reason,
                pin_mismatch,
                manifest,
            },
            verdict,
        };
        let raw = match loader::load(path, pin) {
            Ok(raw) => raw,
            Err(refusal) => {
                let verdict =
                    if refusal.from_content || refusal.pin_mismatch { Verdict::Refused } else { Verdict::Unsettled };
                return refused(refusal.reason, refusal.pin_mismatch, None, verdict);
            }
        };
        let info = PluginInfo::from_manifest(&raw.manifest);
        if let Some(reason) = manifest_failure(&info) {
            return refused(reason, false, None, Verdict::Refused);
        }
        match PluginSet::admit(registry, &info, claims) {
            Ok((callable, ignored)) => {
                // `admit` has parsed the version and checked the major.
                let newer_registry = semver::Version::parse(&info.registry_version)
                    .is_ok_and(|built_for| built_for > *registry.version());
                Loaded::Plugin(LoadedPlugin {
                    path: path.to_path_buf(),
                    info,
                    module: raw.module,
                    callable,
                    ignored,
                    newer_registry,
                })
            }
            Err(reason) => {
                let admissible = PluginSet::admit(registry, &info, std::iter::empty()).is_ok();
                let verdict = Verdict::Plugin { name: info.name.clone(), schemes: info.schemes.clone(), admissible };
                refused(reason, false, Some(info), verdict)
            }
        }
    }

    /// Checks a manifest against the registry and the plugins admitted before it (`claims`:
    /// their names and schemes).
    fn admit<'c>(
        registry: &Registry,
        info: &PluginInfo,
        claims: impl Iterator<Item = Claim<'c>> + Clone,
    ) -> Result<Admission, String> {
        if let Err(why) = check_format(StringFormat::Name, &info.name) {
            return Err(format!("invalid plugin name: {why}"));
        }
        if semver::Version::parse(&info.version).is_err() {
            return Err(format!("plugin version {:?} is not a semver version", info.version));
        }
        let built_for = semver::Version::parse(&info.registry_version)
            .map_err(|_| format!("registry version {:?} is not a semver version", info.registry_version))?;
        let host_version = registry.version();
        if built_for.major != host_version.major {
            let remedy = if built_for.major > host_version.major {
                "upgrade capvirt to a host with that registry major"
            } else {
                "rebuild the plugin for this host's registry"
            };
            return Err(format!(
                "built against registry {built_for}, this host's registry is {host_version}: another major version \
                 is incompatible ({remedy})"
            ));
        }
        if info.schemes.is_empty() {
            return Err("serves no URI scheme".into());
        }
        for scheme in &info.schemes {
            if check_format(StringFormat::Uri, &format!("{scheme}://")).is_err() {
                return Err(format!("invalid URI scheme {scheme:?}"));
            }
        }
        if let Some((_, _, other)) = claims.clone().find(|(name, _, _)| *name == info.name) {
            return Err(format!("a plugin named `{}` is already loaded from {}", info.name, other.display()));
        }
        for scheme in &info.schemes {
            if let Some((other, _, _)) = claims.clone().find(|(_, schemes, _)| schemes.contains(scheme)) {
                return Err(format!("scheme `{scheme}` is already served by plugin `{other}`"));
            }
        }
        // A plugin built for a newer registry minor may declare capabilities this host has
        // not heard of yet: it loads, and those are not callable here.
        let newer = if built_for > *host_version {
            format!(" (the plugin targets newer registry {built_for})")
        } else {
            String::new()
        };
        let mut callable = vec![false; registry.capabilities().len()];
        let mut ignored = Vec::new();
        for (id, version) in &info.capabilities {
            let Some(cap) = registry.lookup(id) else {
                ignored
                    .push((id.clone(), format!("not callable: unknown to this host's registry {host_version}{newer}")));
                continue;
            };
            if cap.stage().is_forbidden() {
                return Err(format!("implements `{id}`, which the registry marks {}", cap.stage()));
            }
            if *version > cap.doc.version || *version == 0 {
                ignored.push((
                    id.clone(),
                    format!(
                        "not callable: implements contract version {version}, this host's registry declares version {}{newer}",
                        cap.doc.version
                    ),
                ));
                continue;
            }
            callable[cap.index.0] = true;
        }
        Ok((callable, ignored))
    }

    /// The files `capvirt plugins --pin` records, with their SHA-256 (canonical path →
    /// `sha256:<hex>`): every loaded plugin, and every file refused only for a changed pin.
    pub fn pins_to_record(&self) -> Result<Pins, String> {
        let loaded = self.loaded.iter().map(|p| p.path.as_path());
        let repinned = self.refused.iter().filter(|r| r.pin_mismatch).map(|r| r.path.as_path());
        loaded
            .chain(repinned)
            .map(|path| {
                let fail = |e: std::io::Error| format!("cannot pin {}: {e}", path.display());
                let canonical = fs::canonicalize(path).map_err(fail)?;
                let digest = fs::File::open(&canonical).and_then(|f| loader::sha256_of(&f)).map_err(fail)?;
                Ok((canonical, digest))
            })
            .collect()
    }

    /// The plugin serving `scheme`.
    pub fn for_scheme(&self, scheme: &str) -> Option<&Arc<LoadedPlugin>> {
        self.loaded.iter().find(|p| p.info.schemes.iter().any(|s| s == scheme))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_directories_replace_the_defaults() {
        let exe = Path::new("/opt/capvirt/bin");
        assert_eq!(search_path(&[PathBuf::from("/a")], Some("/b:/c"), Some(exe)), vec![PathBuf::from("/a")]);
        assert_eq!(search_path(&[], Some("/b:/c"), Some(exe)), vec![PathBuf::from("/b"), PathBuf::from("/c")]);
        assert_eq!(search_path(&[], Some(""), Some(exe)), vec![exe.to_path_buf(), PathBuf::from(SYSTEM_PLUGIN_DIR)]);
        assert_eq!(search_path(&[], None, None), vec![PathBuf::from(SYSTEM_PLUGIN_DIR)]);
    }

    #[test]
    fn misnamed_libraries_get_the_name_they_need() {
        let hint = |f: &str| misnamed_hint(f).rsplit(' ').nth(3).map(String::from);
        assert_eq!(hint("libfoo.so").as_deref(), Some("libcapvirt_driver_foo.so"));
        assert_eq!(hint("capvirt_driver_foo.so").as_deref(), Some("libcapvirt_driver_foo.so"));
        assert_eq!(hint("mydriver.so").as_deref(), Some("libcapvirt_driver_mydriver.so"));
        assert_eq!(hint("lib.so").as_deref(), Some("libcapvirt_driver_NAME.so"));
    }
}
