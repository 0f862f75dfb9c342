//! Embeds the reviewed registry (`../proposals`) into the host.
//!
//! Every `.toml` file is included with `include_str!`, so the binary carries the exact reviewed
//! text. A file that is not even valid TOML fails the build here; the semantic checks run when
//! the host parses the registry, and a unit test makes a broken registry fail `cargo test`.

use std::{env, fs, path::Path};

fn main() {
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let proposals = Path::new(&manifest_dir).join("..").join("proposals");
    println!("cargo:rerun-if-changed={}", proposals.display());
    let capabilities_dir = proposals.join("capabilities");
    println!("cargo:rerun-if-changed={}", capabilities_dir.display());

    let mut files: Vec<(String, std::path::PathBuf)> = Vec::new();
    for name in ["registry.toml", "types.toml"] {
        files.push((name.to_string(), proposals.join(name)));
    }
    let mut capability_files: Vec<_> = fs::read_dir(&capabilities_dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", capabilities_dir.display()))
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    capability_files.sort();
    for path in capability_files {
        let name = path.file_name().and_then(|n| n.to_str()).expect("UTF-8 file name").to_string();
        files.push((format!("capabilities/{name}"), path));
    }

    let mut out = String::from("/// `(path relative to proposals/, contents)` of every registry file.\n");
    out.push_str("pub static EMBEDDED_FILES: &[(&str, &str)] = &[\n");
    for (name, path) in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if let Err(err) = text.parse::<toml::Table>() {
            panic!("proposals/{name} is not valid TOML: {err}");
        }
        let absolute = fs::canonicalize(path).expect("existing file");
        out.push_str(&format!("    ({name:?}, include_str!({:?})),\n", absolute.display().to_string()));
    }
    out.push_str("];\n");
    let out_path = Path::new(&env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("embedded_registry.rs");
    fs::write(out_path, out).expect("write embedded_registry.rs");
}
