//! The maintainer workflow on a registry *source tree* (`proposals/`): scaffolding new
//! proposals, linting, recording reviews, promoting stages, semver-checked diffs and the
//! generated API reference.
//!
//! Everything here works on [`SourceFile`]s (path relative to the registry root + text) and
//! returns new texts or reports; only [`source`] touches the file system or git, so the
//! CLI decides where results go.

pub mod diff;
pub mod docs;
pub mod lint;
pub mod promote;
pub mod review;
pub mod scaffold;
pub mod source;
pub mod span;

pub use capvirt_host::error::one_line;
use capvirt_host::registry::{model::CapabilityFile, RegistryFile, SourceFile};

/// The path of a capability's proposal, relative to the registry root.
pub fn capability_path(id: &str) -> String {
    format!("capabilities/{id}.toml")
}

/// The source file at `path`, if present.
pub fn find_file<'a>(files: &'a [SourceFile], path: &str) -> Option<&'a SourceFile> {
    files.iter().find(|f| f.path == path)
}

/// Replaces (or adds) the file at `path`.
pub fn put_file(files: &mut Vec<SourceFile>, path: &str, text: String) {
    match files.iter_mut().find(|f| f.path == path) {
        Some(file) => file.text = text,
        None => files.push(SourceFile { path: path.to_string(), text }),
    }
}

/// Parses `registry.toml` out of a source set.
pub fn registry_file(files: &[SourceFile]) -> Result<RegistryFile, String> {
    let file = find_file(files, "registry.toml").ok_or("the registry has no registry.toml")?;
    toml::from_str(&file.text).map_err(|e| format!("registry.toml: {}", one_line(&e.to_string())))
}

/// Parses one capability proposal out of a source set.
pub fn capability_file(files: &[SourceFile], id: &str) -> Result<(String, CapabilityFile), String> {
    let path = capability_path(id);
    let file = find_file(files, &path).ok_or_else(|| format!("no proposal `{id}` (expected {path})"))?;
    let doc = toml::from_str(&file.text).map_err(|e| format!("{path}: {}", one_line(&e.to_string())))?;
    Ok((path, doc))
}
