//! What each fuzz target does with one input. Shared by the cargo-fuzz binaries
//! (`fuzz_targets/*.rs`) and by the regression replay in the main workspace
//! (`tests/it/fuzz_regressions.rs` includes this file), so that a kept crashing input is
//! replayed through exactly the code that crashed.
//!
//! Every function returns normally on any input; a panic (an assertion here included) is a
//! bug. Errors are the expected outcome for most inputs.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
};

use arbitrary::{Arbitrary, Unstructured};
use capvirt_cli::args;
use capvirt_host::{
    policy::{self, Policy},
    registry::{Registry, SourceFile, TypeBody},
    validate, Value,
};
use capvirt_plugin_api::{
    types::{DeviceSpec, DomainSpec},
    Field,
};

/// What a target does with one input.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (the names of `fuzz_targets/*.rs` and of the corpus directories).
pub const TARGETS: &[(&str, Target)] = &[
    ("registry", registry),
    ("domain_spec", domain_spec),
    ("device_spec", device_spec),
    ("validate_args", validate_args),
    ("qmp_reply", qmp_reply),
];

/// Registry sources: files separated by 0xff (never in UTF-8 text); each file's first line is
/// its path relative to the registry root, the rest its text.
pub fn registry(data: &[u8]) {
    let files: Vec<SourceFile> = data
        .split(|&b| b == 0xff)
        .map(|chunk| {
            let text = String::from_utf8_lossy(chunk);
            let (path, text) = text.split_once('\n').unwrap_or((&text, ""));
            SourceFile { path: path.to_string(), text: text.to_string() }
        })
        .collect();
    if let Ok(registry) = Registry::from_sources(&files) {
        // A registry that compiles answers every lookup it lists.
        for capability in registry.capabilities() {
            let found = registry.lookup(capability.id()).map(|c| c.index);
            assert_eq!(found, Some(capability.index), "lookup of {}", capability.id());
        }
    }
}

/// A `define FILE` spec file: read as the CLI reads it, validated against the embedded
/// registry's `domain.define`, converted to the typed spec and validated by the QEMU driver.
pub fn domain_spec(data: &[u8]) {
    let Some(spec) = spec_argument(data, "domain.define", "spec") else { return };
    match DomainSpec::from_value(&spec) {
        Ok(spec) => {
            let _ = capvirt_driver_qemu::fuzzing::define(&spec);
        }
        Err(e) => panic!("registry-valid domain spec refused by DomainSpec::from_value: {}", e.message),
    }
}

/// An `attach-device DOMAIN FILE` device file, as [`domain_spec`] for `domain.attach-device`.
pub fn device_spec(data: &[u8]) {
    let Some(device) = spec_argument(data, "domain.attach-device", "device") else { return };
    match DeviceSpec::from_value(&device) {
        Ok(device) => {
            let _ = capvirt_driver_qemu::fuzzing::attach(&device);
        }
        Err(e) => panic!("registry-valid device refused by DeviceSpec::from_value: {}", e.message),
    }
}

/// Reads `data` as the TOML file of `capability`'s `param` and returns the validated value.
fn spec_argument(data: &[u8], capability: &str, param: &'static str) -> Option<Value> {
    images();
    let file = scratch_file();
    std::fs::write(&file, data).ok()?;
    let read = args::read_toml_file(param, &file);
    let _ = std::fs::remove_file(&file);
    let value = read.ok()?;
    let registry = embedded();
    let capability = registry.lookup(capability)?;
    let mut record = Value::record([(param, value)]);
    registry.validate_args(capability, &mut record).ok()?;
    record.get(param).cloned()
}

/// Arguments built from the input by `arbitrary` for a capability it picks, validated as the
/// dispatch path does.
pub fn validate_args(data: &[u8]) {
    let mut input = Unstructured::new(data);
    let Ok(pick) = input.arbitrary::<u8>() else { return };
    let Ok(args) = FuzzValue::arbitrary_take_rest(input) else { return };
    let registry = embedded();
    let capabilities = registry.capabilities();
    let Some(capability) = capabilities.get(usize::from(pick) % capabilities.len().max(1)) else { return };
    let args = args.into_value(registry);
    let policy = Policy { enabled: capabilities.iter().map(|c| c.id().to_string()).collect(), ..Default::default() };
    // As root: the access policy lets root call everything, so every capability reaches validation.
    let root = capvirt_host::Caller::with_groups(0, 0, vec![0]);
    let normalized = match policy::authorize_capability(capability, &policy, &root, "test:///default", false) {
        Ok(grant) => match validate::validate(registry, &grant, args) {
            Ok(valid) => valid.value().clone(),
            Err(_) => return,
        },
        // Drafts and removed capabilities are never granted; their arguments still validate.
        Err(_) => {
            let mut args = if args.is_unit() { Value::record_empty() } else { args };
            if registry.validate_args(capability, &mut args).is_err() {
                return;
            }
            args
        }
    };
    // Validation normalizes (defaults, integer signedness); its output is valid as it stands.
    let mut again = normalized.clone();
    if let Err(e) = registry.validate_args(capability, &mut again) {
        panic!("{}: normalized arguments no longer validate: {e}", capability.id());
    }
    assert_eq!(again, normalized, "{}: validating normalized arguments changed them", capability.id());
    // Drivers read validated arguments into the typed mirrors: those must accept them.
    match capability.id() {
        "domain.define" => {
            if let Some(spec) = normalized.get("spec") {
                if let Err(e) = DomainSpec::from_value(spec) {
                    panic!("registry-valid domain spec refused by DomainSpec::from_value: {}", e.message);
                }
            }
        }
        "domain.attach-device" | "domain.detach-device" => {
            if let Some(device) = normalized.get("device") {
                if let Err(e) = DeviceSpec::from_value(device) {
                    panic!("registry-valid device refused by DeviceSpec::from_value: {}", e.message);
                }
            }
        }
        _ => {}
    }
}

/// A QMP server's byte stream, chunked at 0xff (see `capvirt_driver_qemu::fuzzing::qmp_exchange`).
pub fn qmp_reply(data: &[u8]) {
    capvirt_driver_qemu::fuzzing::qmp_exchange(data);
}

/// A mirror of [`Value`] that `arbitrary` can build; record field names are mostly names the
/// registry declares, so that inputs get past "unknown field".
#[derive(Debug, Arbitrary)]
enum FuzzValue {
    Unit,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(FuzzText),
    Bytes(Vec<u8>),
    List(Vec<FuzzValue>),
    Record(Vec<(FuzzText, FuzzValue)>),
}

#[derive(Debug, Arbitrary)]
enum FuzzText {
    /// The n-th word the registry knows (parameter, field and enum names).
    Known(u16),
    Other(String),
}

impl FuzzText {
    fn into_string(self, words: &[String]) -> String {
        match self {
            FuzzText::Known(n) if !words.is_empty() => words[usize::from(n) % words.len()].clone(),
            FuzzText::Known(_) => String::new(),
            FuzzText::Other(s) => s,
        }
    }
}

impl FuzzValue {
    fn into_value(self, registry: &Registry) -> Value {
        self.convert(&registry_words(registry))
    }

    fn convert(self, words: &[String]) -> Value {
        match self {
            FuzzValue::Unit => Value::Unit,
            FuzzValue::Bool(b) => Value::Bool(b),
            FuzzValue::Int(n) => Value::Int(n),
            FuzzValue::UInt(n) => Value::UInt(n),
            FuzzValue::Float(f) => Value::Float(f),
            FuzzValue::Str(s) => Value::from(s.into_string(words)),
            FuzzValue::Bytes(b) => Value::from(b),
            FuzzValue::List(items) => Value::List(items.into_iter().map(|v| v.convert(words)).collect()),
            FuzzValue::Record(fields) => Value::Record(
                fields
                    .into_iter()
                    .map(|(name, value)| Field::new(name.into_string(words), value.convert(words)))
                    .collect(),
            ),
        }
    }
}

/// Every name the registry declares: parameters, record fields, enum words.
fn registry_words(registry: &Registry) -> Vec<String> {
    static WORDS: OnceLock<Vec<String>> = OnceLock::new();
    WORDS
        .get_or_init(|| {
            let mut words: Vec<String> = Vec::new();
            for capability in registry.capabilities() {
                words.extend(capability.params.iter().map(|p| p.name.clone()));
            }
            for def in registry.types.iter() {
                words.push(def.name.clone());
                match &def.body {
                    TypeBody::Record { fields } => words.extend(fields.iter().map(|f| f.name.clone())),
                    TypeBody::Enum { values } => words.extend(values.iter().cloned()),
                    TypeBody::Scalar { .. } => {}
                }
            }
            words.sort();
            words.dedup();
            words
        })
        .clone()
}

fn embedded() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| match Registry::embedded() {
        Ok(registry) => registry,
        Err(e) => panic!("the embedded registry does not build: {e}"),
    })
}

/// A file of this process for the input (the CLI reads spec files by path).
fn scratch_file() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "capvirt-fuzz-{}-{}.toml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Directory of the images the seed specs name (`/tmp/capvirt-fuzz-images/…`): a raw image, a
/// qcow2 image, a qcow2 image with a backing file, a kernel.
pub const IMAGES: &str = "/tmp/capvirt-fuzz-images";

fn images() {
    static MADE: OnceLock<()> = OnceLock::new();
    MADE.get_or_init(|| {
        let dir = Path::new(IMAGES);
        let _ = std::fs::create_dir_all(dir);
        let qcow2 = |backing_offset: u64| {
            let mut header = vec![0u8; 104];
            header[..4].copy_from_slice(b"QFI\xfb");
            header[4..8].copy_from_slice(&3u32.to_be_bytes());
            header[8..16].copy_from_slice(&backing_offset.to_be_bytes());
            header
        };
        let files: [(&str, Vec<u8>); 5] = [
            ("disk.raw", vec![0; 4096]),
            ("other.raw", vec![0; 4096]),
            ("disk.qcow2", qcow2(0)),
            ("backed.qcow2", qcow2(512)),
            ("vmlinuz", b"not really a kernel".to_vec()),
        ];
        for (name, bytes) in files {
            let path = dir.join(name);
            if std::fs::read(&path).ok().as_deref() != Some(&bytes[..]) {
                let _ = std::fs::write(&path, &bytes);
            }
        }
    });
}
