//! Embeds the reviewed registry (`../proposals`) into the host.
//!
//! Every file is parsed here with the registry's own model (`src/registry/model.rs`), so a file
//! that does not match the schema fails the build, and the parsed form is embedded as
//! MessagePack (self-describing, so optional fields and TOML values survive; decoded without
//! scanning text: less than half of JSON's cost) so the host does not parse TOML at every
//! start. The raw text is embedded too, for tools that work on the files as written.
//! Cross-reference checks run when the host compiles the registry; a unit test makes a
//! registry that fails them fail `cargo test`.

use std::{env, fs, path::Path};

#[allow(dead_code)]
#[path = "src/registry/model.rs"]
mod model;

fn main() {
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let proposals = Path::new(&manifest_dir).join("..").join("proposals");
    println!("cargo:rerun-if-changed={}", proposals.display());
    let capabilities_dir = proposals.join("capabilities");
    println!("cargo:rerun-if-changed={}", capabilities_dir.display());
    println!("cargo:rerun-if-changed=src/registry/model.rs");

    let mut capability_files: Vec<_> = fs::read_dir(&capabilities_dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", capabilities_dir.display()))
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    capability_files.sort();

    let read = |name: &str, path: &Path| -> String {
        println!("cargo:rerun-if-changed={}", path.display());
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read proposals/{name}: {e}"))
    };
    fn parse<T: serde::de::DeserializeOwned>(name: &str, text: &str) -> T {
        toml::from_str(text).unwrap_or_else(|e| panic!("proposals/{name} does not match the registry schema:\n{e}"))
    }

    let mut raw = Vec::new();
    let registry_text = read("registry.toml", &proposals.join("registry.toml"));
    let registry: model::RegistryFile = parse("registry.toml", &registry_text);
    raw.push(("registry.toml".to_string(), proposals.join("registry.toml")));
    let types_text = read("types.toml", &proposals.join("types.toml"));
    let types: model::TypesFile = parse("types.toml", &types_text);
    raw.push(("types.toml".to_string(), proposals.join("types.toml")));
    let mut capabilities = Vec::new();
    for path in capability_files {
        let name = format!("capabilities/{}", path.file_name().and_then(|n| n.to_str()).expect("UTF-8 file name"));
        let text = read(&name, &path);
        let capability: model::CapabilityFile = parse(&name, &text);
        capabilities.push((name.clone(), capability));
        raw.push((name, path));
    }

    let out_dir = env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    // Field names are kept (`to_vec_named`): fields the model skips when empty or absent make
    // positional encodings ambiguous. Same layout as `registry::ParsedRegistry`.
    #[derive(serde::Serialize)]
    struct Parsed<'a> {
        registry: &'a model::RegistryFile,
        types: &'a model::TypesFile,
        capabilities: &'a [(String, model::CapabilityFile)],
    }
    let parsed = Parsed { registry: &registry, types: &types, capabilities: &capabilities };
    let encoded = rmp_serde::to_vec_named(&parsed).expect("encode the registry as MessagePack");
    fs::write(Path::new(&out_dir).join("embedded_registry.msgpack"), encoded).expect("write embedded_registry.msgpack");

    let mut out = String::from("/// `(path relative to proposals/, contents)` of every registry file.\n");
    out.push_str("pub static EMBEDDED_FILES: &[(&str, &str)] = &[\n");
    for (name, path) in &raw {
        let absolute = fs::canonicalize(path).expect("existing file");
        out.push_str(&format!("    ({name:?}, include_str!({:?})),\n", absolute.display().to_string()));
    }
    out.push_str("];\n");
    fs::write(Path::new(&out_dir).join("embedded_registry.rs"), out).expect("write embedded_registry.rs");
}
