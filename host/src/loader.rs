//! Opening plugin files. The only module that touches dynamic loading.
//!
//! Loading a shared object runs its initializers, so only files that look like ELF shared
//! objects are handed to the dynamic loader; everything else is refused with a reason first.
//! abi_stable then checks the plugin's ABI (version and the layout of every type reachable
//! from the root module) before any plugin function is called. Libraries are never unloaded:
//! references into them (manifest strings, vtables) stay valid for the process lifetime.

use std::{fs::File, io::Read, path::Path};

use abi_stable::library::{lib_header_from_path, LibraryError, RootModule};
use capvirt_plugin_api::{Manifest, PluginModuleRef};

/// A plugin whose ABI checked out, with its self-reported manifest (not yet checked against
/// the registry).
pub(crate) struct RawPlugin {
    pub module: PluginModuleRef,
    pub manifest: Manifest,
}

/// Loads the plugin at `path`, or says why it is not a usable plugin.
pub(crate) fn load(path: &Path) -> Result<RawPlugin, String> {
    check_elf_shared_object(path)?;
    let header = lib_header_from_path(path).map_err(describe_library_error)?;
    let module = header.init_root_module::<PluginModuleRef>().map_err(describe_library_error)?;
    // The SDK wraps the manifest function in catch_unwind, so this call cannot unwind into us.
    let manifest = (module.manifest())();
    Ok(RawPlugin { module, manifest })
}

fn check_elf_shared_object(path: &Path) -> Result<(), String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut header = [0u8; 18];
    let read = file.read(&mut header).map_err(|e| format!("cannot read: {e}"))?;
    if read == 0 {
        return Err("empty file, not a shared library".into());
    }
    if read < header.len() || &header[..4] != b"\x7fELF" {
        return Err("not a shared library (no ELF header)".into());
    }
    // e_type at offset 16, little-endian on the platforms we build for: 3 = ET_DYN.
    if u16::from_le_bytes([header[16], header[17]]) != 3 {
        return Err("ELF file is not a shared object".into());
    }
    Ok(())
}

fn describe_library_error(error: LibraryError) -> String {
    match error {
        LibraryError::GetSymbolError { .. } => {
            format!("not a capvirt plugin: it does not export {} root module", PluginModuleRef::NAME)
        }
        LibraryError::AbiInstability(details) => {
            let first = details.to_string().lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
            format!(
                "incompatible plugin ABI (built against a different capvirt-plugin-api major or abi_stable): {first}"
            )
        }
        LibraryError::IncompatibleVersionNumber { expected_version, actual_version, .. } => {
            format!("plugin ABI version {actual_version} is incompatible with this host's {expected_version}")
        }
        other => one_line(&other.to_string()),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
