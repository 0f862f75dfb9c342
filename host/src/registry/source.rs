//! Where registry files come from: the copy embedded at build time, or a directory on disk
//! (`--registry DIR`, used by maintainers). This is the registry's only IO.

use std::{fs, io, path::Path};

use super::SourceFile;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_registry.rs"));
}

/// The embedded registry as parsed by the build script ([`super::ParsedRegistry`] as
/// MessagePack): decoding it is many times faster than parsing the TOML at every start.
pub static EMBEDDED_PARSED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/embedded_registry.msgpack"));

/// The reviewed registry files compiled into this binary.
pub fn embedded_files() -> Vec<SourceFile> {
    embedded::EMBEDDED_FILES
        .iter()
        .map(|(path, text)| SourceFile { path: (*path).to_string(), text: (*text).to_string() })
        .collect()
}

/// Reads `registry.toml`, `types.toml` (if present) and `capabilities/*.toml` below `root`.
pub fn read_dir(root: &Path) -> io::Result<Vec<SourceFile>> {
    let mut files = Vec::new();
    for name in ["registry.toml", "types.toml"] {
        let path = root.join(name);
        match fs::read_to_string(&path) {
            Ok(text) => files.push(SourceFile { path: name.to_string(), text }),
            Err(e) if e.kind() == io::ErrorKind::NotFound && name == "types.toml" => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }
    let capabilities = root.join("capabilities");
    let entries = match fs::read_dir(&capabilities) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", capabilities.display()))),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".toml") {
            names.push(name);
        }
    }
    names.sort();
    for name in names {
        let path = capabilities.join(&name);
        let text =
            fs::read_to_string(&path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        files.push(SourceFile { path: format!("capabilities/{name}"), text });
    }
    Ok(files)
}
