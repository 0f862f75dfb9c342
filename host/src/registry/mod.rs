//! The capability registry: the single source of truth for what may be called, with which
//! arguments, and how the CLI, validation, docs and support matrix present it.
//!
//! **Architecture Invariant:** this module (model, types, compilation) does no IO. Files are
//! read by [`source`]; the embedded copy comes from the build script.

pub mod contract;
pub mod model;
pub mod source;
pub mod types;

use std::{collections::HashMap, fmt};

use rustc_hash::FxHashMap;

use capvirt_plugin_api::Value;

pub use model::{CapabilityFile, CliHint, RegistryFile, Stage, TypesFile};
pub use types::{Bounds, FieldDef, Ty, TypeBody, TypeDef, TypeId, TypeTable, ValidationError, ValuePath};

/// Index of a capability in its [`Registry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CapabilityIndex(pub usize);

/// A compiled capability: the proposal as written plus its resolved parameter and result types.
#[derive(Debug, Clone)]
pub struct Capability {
    pub index: CapabilityIndex,
    /// The proposal file as written.
    pub doc: CapabilityFile,
    /// Where it came from, relative to the registry root (`capabilities/domain.suspend.toml`).
    pub source: String,
    pub params: Vec<FieldDef>,
    pub result: Ty,
    /// The cases of `[contract]` that compiled (a contract's problems are lint findings,
    /// never a reason to refuse the registry).
    pub contract: contract::Contract,
}

impl Capability {
    pub fn id(&self) -> &str {
        &self.doc.id
    }
    pub fn stage(&self) -> Stage {
        self.doc.stage
    }
    pub fn mutates(&self) -> bool {
        self.doc.mutates
    }
    pub fn param(&self, name: &str) -> Option<&FieldDef> {
        self.params.iter().find(|p| p.name == name)
    }
}

/// One source file of a registry: its path relative to the registry root and its text.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: String,
    pub text: String,
}

/// A registry that failed to build; every problem found is listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryError {
    pub problems: Vec<Problem>,
}

/// One problem in one registry file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub message: String,
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid registry ({} problem{})",
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {}: {}", p.file, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for RegistryError {}

/// Registry files parsed into their model but not compiled yet: the first half of
/// [`Registry::from_sources`], exposed so that tools may parse the files their own way (the
/// maintainer lint does, for speed) and still compile them exactly as the host does.
#[derive(Debug, Clone, Default)]
pub struct ParsedSources {
    pub info: Option<RegistryFile>,
    /// Whether `registry.toml` was among the files, parsed or not.
    pub registry_file_seen: bool,
    pub types: TypesFile,
    /// `(path relative to the registry root, proposal)`.
    pub capabilities: Vec<(String, CapabilityFile)>,
    /// Files that could not be parsed, or are not registry files.
    pub problems: Vec<Problem>,
}

impl ParsedSources {
    /// Parses every file, recording problems instead of stopping at the first.
    pub fn parse(files: &[SourceFile]) -> ParsedSources {
        let mut problems = Vec::new();
        let mut push = |file: &str, message: String| problems.push(Problem { file: file.to_string(), message });

        let mut info = None;
        let mut registry_file_seen = false;
        let mut types_file = TypesFile::default();
        let mut capability_files = Vec::new();
        for file in files {
            match file.path.as_str() {
                "registry.toml" => {
                    registry_file_seen = true;
                    match toml::from_str::<RegistryFile>(&file.text) {
                        Ok(parsed) => info = Some(parsed),
                        Err(e) => push(&file.path, one_line(&e)),
                    }
                }
                "types.toml" => match toml::from_str::<TypesFile>(&file.text) {
                    Ok(parsed) => types_file = parsed,
                    Err(e) => push(&file.path, one_line(&e)),
                },
                path if path.starts_with("capabilities/") && path.ends_with(".toml") => {
                    match toml::from_str::<CapabilityFile>(&file.text) {
                        Ok(parsed) => capability_files.push((file.path.clone(), parsed)),
                        Err(e) => push(&file.path, one_line(&e)),
                    }
                }
                other => push(
                    other,
                    "not a registry file (expected registry.toml, types.toml or capabilities/*.toml)".into(),
                ),
            }
        }
        ParsedSources { info, registry_file_seen, types: types_file, capabilities: capability_files, problems }
    }
}

/// Registry files parsed into their model, as the build script embeds them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ParsedRegistry {
    pub registry: RegistryFile,
    pub types: TypesFile,
    /// `(path relative to the registry root, proposal)`.
    pub capabilities: Vec<(String, CapabilityFile)>,
}

/// The compiled registry.
#[derive(Debug, Clone)]
pub struct Registry {
    pub info: RegistryFile,
    pub types: TypeTable,
    capabilities: Vec<Capability>,
    /// Looked up on every call.
    by_id: IdTable,
}

/// Capability id → index, looked up on every call: open addressing over a power-of-two table
/// at most half full, keyed by the id's FxHash (fast and not DoS-resistant, fine for the
/// registry's own ids), each hit confirmed by an inline comparison of the short id.
#[derive(Debug, Clone, Default)]
struct IdTable {
    /// `(hash, index + 1)`; index 0 marks an empty slot.
    slots: Vec<(u64, usize)>,
}

impl IdTable {
    fn new(capabilities: &[Capability]) -> IdTable {
        let size = (capabilities.len() * 2).next_power_of_two().max(8);
        let mut slots = vec![(0, 0); size];
        for capability in capabilities {
            let hash = id_hash(capability.id());
            let mut at = hash as usize & (size - 1);
            while slots[at].1 != 0 {
                at = (at + 1) & (size - 1);
            }
            slots[at] = (hash, capability.index.0 + 1);
        }
        IdTable { slots }
    }

    #[inline]
    fn find<'a>(&self, capabilities: &'a [Capability], id: &str) -> Option<&'a Capability> {
        let hash = id_hash(id);
        let mask = self.slots.len().wrapping_sub(1);
        let mut at = hash as usize & mask;
        loop {
            let (slot_hash, index) = *self.slots.get(at)?;
            if index == 0 {
                return None;
            }
            if slot_hash == hash {
                let capability = capabilities.get(index - 1)?;
                if types::same_text(capability.id(), id) {
                    return Some(capability);
                }
            }
            at = (at + 1) & mask;
        }
    }
}

#[inline]
fn id_hash(id: &str) -> u64 {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one(id)
}

impl Registry {
    /// Makes every capability that `reviewed` marks as changing state (or does not know)
    /// mutating here too; with no reviewed registry at hand, every capability. An unreviewed
    /// registry (`--registry DIR`) may add or reshape capabilities for maintainers, but never
    /// loosens read-only connections, access control or auditing, which all follow `mutates`.
    pub fn keep_reviewed_mutates(&mut self, reviewed: Option<&Registry>) {
        for capability in &mut self.capabilities {
            let reviewed_mutates = reviewed.and_then(|r| r.lookup(capability.id())).is_none_or(Capability::mutates);
            capability.doc.mutates |= reviewed_mutates;
        }
    }

    /// The reviewed registry compiled into this host. The build script already parsed the
    /// TOML (a file that does not parse fails the build); this only decodes and compiles it.
    pub fn embedded() -> Result<Registry, RegistryError> {
        let parsed: ParsedRegistry = rmp_serde::from_slice(source::EMBEDDED_PARSED).map_err(|e| RegistryError {
            problems: vec![Problem { file: "(embedded)".into(), message: format!("corrupt embedded registry: {e}") }],
        })?;
        Registry::from_parsed(ParsedSources {
            info: Some(parsed.registry),
            registry_file_seen: true,
            types: parsed.types,
            capabilities: parsed.capabilities,
            problems: Vec::new(),
        })
    }

    /// Builds a registry from `registry.toml`, `types.toml` and `capabilities/*.toml` sources.
    pub fn from_sources(files: &[SourceFile]) -> Result<Registry, RegistryError> {
        Registry::from_parsed(ParsedSources::parse(files))
    }

    /// Compiles already parsed registry files (see [`ParsedSources`]); every problem found,
    /// including those recorded while parsing, is reported.
    pub fn from_parsed(parsed: ParsedSources) -> Result<Registry, RegistryError> {
        let ParsedSources {
            info,
            registry_file_seen,
            types: types_file,
            capabilities: mut capability_files,
            mut problems,
        } = parsed;
        let mut push = |file: &str, message: String| problems.push(Problem { file: file.to_string(), message });
        let info = match info {
            Some(info) => info,
            None => {
                if !registry_file_seen {
                    push("registry.toml", "missing".into());
                }
                return Err(RegistryError { problems });
            }
        };

        let types = compile_types(&types_file, &mut push);

        capability_files.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        let mut capabilities = Vec::with_capacity(capability_files.len());
        let mut by_id = FxHashMap::default();
        for (path, doc) in capability_files {
            let expected_name = format!("capabilities/{}.toml", doc.id);
            if path != expected_name {
                push(&path, format!("capability `{}` must live in {expected_name}", doc.id));
            }
            if by_id.contains_key(&doc.id) {
                push(&path, format!("duplicate capability id `{}`", doc.id));
                continue;
            }
            let mut params = Vec::with_capacity(doc.params.len());
            for (i, decl) in doc.params.iter().enumerate() {
                if doc.params[..i].iter().any(|p| p.name == decl.name) {
                    push(&path, format!("parameter `{}` declared twice", decl.name));
                }
                match compile_field(&types, decl) {
                    Ok(field) => params.push(field),
                    Err(message) => push(&path, format!("parameter `{}`: {message}", decl.name)),
                }
            }
            normalize_defaults(&mut params, &types, &mut |m| push(&path, m));
            for param in &mut params {
                param.quick = types.quick_for(&param.ty, param.bounds);
            }
            let result = match types.parse_expr(&doc.result.ty) {
                Ok(ty) => ty,
                Err(message) => {
                    push(&path, format!("result: {message}"));
                    Ty::Unit
                }
            };
            check_capability(&doc, &params, &result, &types, &mut |m| push(&path, m));
            if doc.stage != Stage::Draft && doc.stage != Stage::Rejected && doc.since.is_none() {
                push(&path, format!("stage `{}` requires `since`", doc.stage));
            }
            if let Some(since) = &doc.since {
                if since > &info.version {
                    push(&path, format!("`since = {since}` is newer than the registry version {}", info.version));
                }
            }
            let index = CapabilityIndex(capabilities.len());
            by_id.insert(doc.id.clone(), index);
            let (contract, _) = contract::compile(&doc, &types, &params, &result);
            capabilities.push(Capability { index, doc, source: path, params, result, contract });
        }

        // CLI command names must be unique, or the derived CLI would be ambiguous.
        let mut commands: HashMap<&str, &str> = HashMap::new();
        for cap in &capabilities {
            if let Some(cli) = &cap.doc.cli {
                if let Some(other) = commands.insert(cli.command.as_str(), cap.id()) {
                    problems.push(Problem {
                        file: cap.source.clone(),
                        message: format!("CLI command `{}` already used by `{other}`", cli.command),
                    });
                }
            }
        }

        if problems.is_empty() {
            let by_id = IdTable::new(&capabilities);
            Ok(Registry { info, types, capabilities, by_id })
        } else {
            Err(RegistryError { problems })
        }
    }

    pub fn version(&self) -> &semver::Version {
        &self.info.version
    }

    /// Looks a capability up by id.
    pub fn lookup(&self, id: &str) -> Option<&Capability> {
        self.by_id.find(&self.capabilities, id)
    }

    pub fn capability(&self, index: CapabilityIndex) -> &Capability {
        &self.capabilities[index.0]
    }

    /// Every capability, sorted by id.
    pub fn capabilities(&self) -> &[Capability] {
        &self.capabilities
    }

    /// The capability exposed as CLI command `command`.
    pub fn by_command(&self, command: &str) -> Option<&Capability> {
        self.capabilities.iter().find(|c| c.doc.cli.as_ref().is_some_and(|cli| cli.command == command))
    }

    /// Validates a capability's argument record in place (see [`TypeTable::validate_record`]).
    #[inline]
    pub fn validate_args(&self, capability: &Capability, args: &mut Value) -> Result<(), ValidationError> {
        if self.types.record_passes_quick(&capability.params, args) {
            return Ok(());
        }
        self.types.validate_record("argument record", &capability.params, args, &ValuePath::root(""))
    }

    /// Validates a driver's result against the declared result type.
    #[inline]
    pub fn validate_result(&self, capability: &Capability, result: &mut Value) -> Result<(), ValidationError> {
        let path = ValuePath::root("result");
        // Records (most results) straight to their fields' checks.
        match self.types.record_of(&capability.result) {
            Some((_, fields)) if self.types.record_passes_quick(fields, result) => Ok(()),
            Some((name, fields)) => self.types.validate_record(name, fields, result, &path),
            None => self.types.validate(&capability.result, Bounds::default(), result, &path),
        }
    }
}

fn one_line(err: &toml::de::Error) -> String {
    err.to_string().lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().join(" ")
}

fn compile_types(file: &TypesFile, push: &mut impl FnMut(&str, String)) -> TypeTable {
    use model::TypeKind;
    // First pass: register every name so that types may refer to each other in any order.
    let mut table = TypeTable {
        defs: file
            .types
            .iter()
            .map(|(name, decl)| TypeDef {
                name: name.clone(),
                doc: decl.doc.clone(),
                body: TypeBody::Enum { values: Vec::new() },
            })
            .collect(),
    };
    let primitive_names = ["unit", "bool", "int", "uint", "float", "string", "bytes"];
    let mut bodies = Vec::with_capacity(file.types.len());
    for (name, decl) in &file.types {
        if primitive_names.contains(&name.as_str()) || name.starts_with("list") {
            push("types.toml", format!("type name `{name}` is reserved"));
        }
        let base = match decl.kind {
            TypeKind::String => Some(Ty::Str),
            TypeKind::Uint => Some(Ty::UInt),
            TypeKind::Int => Some(Ty::Int),
            TypeKind::Bool => Some(Ty::Bool),
            TypeKind::Float => Some(Ty::Float),
            TypeKind::Bytes => Some(Ty::Bytes),
            TypeKind::Enum | TypeKind::Record => None,
        };
        if decl.format.is_some() && decl.kind != TypeKind::String {
            push("types.toml", format!("type `{name}`: `format` applies to strings only"));
        }
        let body = match (decl.kind, base) {
            (TypeKind::Enum, _) => {
                if decl.values.is_empty() {
                    push("types.toml", format!("enum `{name}` has no values"));
                }
                TypeBody::Enum { values: decl.values.clone() }
            }
            (TypeKind::Record, _) => {
                let mut fields = Vec::with_capacity(decl.fields.len());
                for (i, field) in decl.fields.iter().enumerate() {
                    if decl.fields[..i].iter().any(|f| f.name == field.name) {
                        push("types.toml", format!("record `{name}`: field `{}` declared twice", field.name));
                    }
                    match compile_field(&table, field) {
                        Ok(f) => fields.push(f),
                        Err(message) => {
                            push("types.toml", format!("record `{name}`, field `{}`: {message}", field.name))
                        }
                    }
                }
                TypeBody::Record { fields }
            }
            (_, Some(base)) => TypeBody::Scalar {
                base,
                format: decl.format,
                max_len: decl.max_len,
                bounds: Bounds { min: decl.min, max: decl.max },
            },
            (_, None) => unreachable_body(),
        };
        bodies.push(body);
    }
    for (def, body) in table.defs.iter_mut().zip(bodies) {
        def.body = body;
    }
    // Defaults can only be checked once every body is known; they are kept normalized (see
    // `normalize_defaults`).
    let mut normalized = Vec::new();
    for (index, def) in table.defs.iter().enumerate() {
        if let TypeBody::Record { fields } = &def.body {
            for (field_index, field) in fields.iter().enumerate() {
                if let Some(default) = &field.default {
                    let mut value = default.clone();
                    let path = format!("{}.{}", def.name, field.name);
                    match table.validate(&field.ty, field.bounds, &mut value, &ValuePath::root(&path)) {
                        Ok(()) => normalized.push((index, field_index, value)),
                        Err(e) => push("types.toml", format!("default of {e}")),
                    }
                }
            }
        }
    }
    for (index, field_index, value) in normalized {
        if let TypeBody::Record { fields } = &mut table.defs[index].body {
            fields[field_index].default = Some(value);
        }
    }
    table.plan_fields();
    if let Some(cycle) = find_record_cycle(&table) {
        push("types.toml", format!("record `{cycle}` contains itself (a value of it could never end)"));
    }
    table
}

// Scalar kinds always have a base; kept as a function so the match above stays total.
fn unreachable_body() -> TypeBody {
    TypeBody::Enum { values: Vec::new() }
}

/// A record that requires a field of its own type (directly or not) has no finite value.
fn find_record_cycle(table: &TypeTable) -> Option<String> {
    fn visit(table: &TypeTable, id: TypeId, stack: &mut Vec<TypeId>) -> bool {
        if stack.contains(&id) {
            return true;
        }
        let TypeBody::Record { fields } = &table.get(id).body else {
            return false;
        };
        stack.push(id);
        let found = fields
            .iter()
            .filter(|f| f.required)
            .any(|f| matches!(f.ty, Ty::Named(inner) if visit(table, inner, stack)));
        stack.pop();
        found
    }
    (0..table.defs.len()).map(TypeId).find(|id| visit(table, *id, &mut Vec::new())).map(|id| table.get(id).name.clone())
}

fn compile_field(table: &TypeTable, decl: &model::FieldDecl) -> Result<FieldDef, String> {
    let ty = table.parse_expr(&decl.ty)?;
    let default = match &decl.default {
        None => None,
        Some(_) if decl.required => return Err("a required field cannot have a default".into()),
        Some(value) => Some(Value::from_toml(value)),
    };
    Ok(FieldDef {
        name: decl.name.clone(),
        ty,
        ty_text: decl.ty.clone(),
        required: decl.required,
        default,
        bounds: Bounds { min: decl.min, max: decl.max },
        label: decl.label.clone(),
        doc: decl.doc.clone(),
        // Set once every type body is known (`TypeTable::plan_fields`, `plan_params`).
        quick: Default::default(),
    })
}

/// Checks each default against its type and keeps it normalized as validation normalizes
/// arguments (a TOML integer is signed: an unsigned parameter's default becomes `UInt`), so
/// that a filled-in default is exactly what a caller could have passed.
fn normalize_defaults(fields: &mut [FieldDef], types: &TypeTable, push: &mut impl FnMut(String)) {
    for field in fields {
        if let Some(default) = &mut field.default {
            if let Err(e) = types.validate(&field.ty, field.bounds, default, &ValuePath::root(&field.name)) {
                push(format!("default of {e}"));
            }
        }
    }
}

fn check_capability(
    doc: &CapabilityFile,
    params: &[FieldDef],
    result: &Ty,
    types: &TypeTable,
    push: &mut impl FnMut(String),
) {
    let Some(cli) = &doc.cli else { return };
    let mut optional_seen = false;
    for name in &cli.positional {
        match params.iter().find(|p| &p.name == name) {
            None => push(format!("cli.positional names unknown parameter `{name}`")),
            Some(p) if p.required && optional_seen => {
                push(format!("cli.positional: required `{name}` cannot follow an optional parameter"))
            }
            Some(p) => optional_seen |= !p.required,
        }
    }
    for name in &cli.file_args {
        if !cli.positional.contains(name) {
            push(format!("cli.file_args names `{name}`, which is not positional"));
        }
    }
    if cli.output_file.is_some() {
        let has_bytes = types
            .record_fields(result)
            .is_some_and(|fields| fields.iter().any(|f| matches!(types.base(&f.ty), Ty::Bytes)))
            || matches!(types.base(result), Ty::Bytes);
        if !has_bytes {
            push("cli.output_file needs a result with bytes to write".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_registry_is_valid() {
        let registry = Registry::embedded().unwrap_or_else(|e| panic!("{e}"));
        assert!(registry.lookup("domain.suspend").is_some());
        assert_eq!(registry.lookup("domain.monitor-command").map(Capability::stage), Some(Stage::Rejected));
    }

    /// The compact embedded form decodes to exactly what the TOML files parse to: optional
    /// fields, TOML default values and contract `with` tables included.
    #[test]
    fn embedded_encoding_matches_the_toml_files() {
        let embedded: ParsedRegistry = rmp_serde::from_slice(source::EMBEDDED_PARSED).unwrap_or_else(|e| panic!("{e}"));
        let from_toml = ParsedSources::parse(&source::embedded_files());
        assert!(from_toml.problems.is_empty(), "{:?}", from_toml.problems);
        assert_eq!(Some(embedded.registry), from_toml.info);
        assert_eq!(embedded.types, from_toml.types);
        assert_eq!(embedded.capabilities, from_toml.capabilities);
        let defaults = embedded.capabilities.iter().flat_map(|(_, c)| &c.params).filter(|p| p.default.is_some());
        assert!(defaults.count() > 0, "the check covers TOML default values");
        let with_tables = embedded.capabilities.iter().filter_map(|(_, c)| c.contract.as_ref()).flat_map(|c| &c.cases);
        assert!(with_tables.filter(|case| case.with.is_some()).count() > 0, "the check covers contract `with` tables");
    }

    fn sources(capability: &str) -> Vec<SourceFile> {
        let embedded = source::embedded_files();
        let mut files: Vec<SourceFile> =
            embedded.into_iter().filter(|f| !f.path.starts_with("capabilities/")).collect();
        files.push(SourceFile { path: "capabilities/x.y.toml".into(), text: capability.into() });
        files
    }

    #[test]
    fn unknown_type_and_bad_positional_are_reported() {
        let text = r#"
id = "x.y"
version = 1
title = "t"
stage = "draft"
mutates = false
summary = "s"
motivation = "m"
[[params]]
name = "a"
type = "NoSuchType"
[cli]
command = "xy"
positional = ["b"]
"#;
        let err = Registry::from_sources(&sources(text)).expect_err("must fail");
        let all = err.to_string();
        assert!(all.contains("unknown type `NoSuchType`"), "{all}");
        assert!(all.contains("unknown parameter `b`"), "{all}");
    }

    #[test]
    fn validation_normalizes_and_refuses() {
        let registry = Registry::embedded().unwrap_or_else(|e| panic!("{e}"));
        let define = registry.lookup("domain.define").unwrap_or_else(|| panic!("define"));
        let mut args = Value::record([(
            "spec",
            Value::record([
                ("name", Value::from("vm1")),
                ("memory_mib", Value::Int(512)),
                ("vcpus", Value::Int(1)),
                (
                    "disks",
                    Value::list([Value::record([
                        ("path", Value::from("/tmp/a.img")),
                        ("format", Value::from("raw")),
                        ("bus", Value::from("virtio")),
                    ])]),
                ),
            ]),
        )]);
        registry.validate_args(define, &mut args).unwrap_or_else(|e| panic!("{e}"));
        let spec = args.get("spec").unwrap_or_else(|| panic!("spec"));
        assert_eq!(spec.get("memory_mib"), Some(&Value::UInt(512)));
        let disk = &spec.get("disks").and_then(Value::as_list).unwrap_or_default()[0];
        assert_eq!(disk.get("readonly"), Some(&Value::Bool(false)), "default filled in");

        let mut bad = Value::record([(
            "spec",
            Value::record([("name", Value::from("../x")), ("memory_mib", Value::Int(512)), ("vcpus", Value::Int(1))]),
        )]);
        let err = registry.validate_args(define, &mut bad).expect_err("bad name");
        assert_eq!(err.path, "spec.name");

        let mut huge = Value::record([(
            "spec",
            Value::record([("name", Value::from("x")), ("memory_mib", Value::Int(1 << 40)), ("vcpus", Value::Int(1))]),
        )]);
        let err = registry.validate_args(define, &mut huge).expect_err("absurd memory");
        assert_eq!(err.path, "spec.memory_mib");
    }
}

/// The SDK's typed mirrors (`capvirt_plugin_api::types`) must describe exactly the registry's
/// shapes: every value they build validates, and their enums list the registry's words.
#[cfg(test)]
mod sdk_mirror_tests {
    use capvirt_plugin_api::types::*;
    use capvirt_plugin_api::Value;

    use super::*;

    fn registry() -> Registry {
        Registry::embedded().unwrap_or_else(|e| panic!("{e}"))
    }

    fn check(registry: &Registry, type_name: &str, mut value: Value) {
        let ty = registry.types.parse_expr(type_name).unwrap_or_else(|e| panic!("{e}"));
        registry
            .types
            .validate(&ty, Bounds::default(), &mut value, &ValuePath::root(type_name))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn enum_values(registry: &Registry, name: &str) -> Vec<String> {
        let id = registry.types.lookup(name).unwrap_or_else(|| panic!("no type {name}"));
        match &registry.types.get(id).body {
            TypeBody::Enum { values } => values.clone(),
            other => panic!("{name} is not an enum: {other:?}"),
        }
    }

    #[test]
    fn built_values_validate() {
        let registry = registry();
        let mut spec = DomainSpec::new("vm1", 512, 2);
        let mut disk = DiskSpec::new("/img/a.qcow2", DiskFormat::Qcow2, DiskBus::Virtio);
        disk.target = Some("vda".into());
        spec.disks.push(disk);
        let mut stick = DeviceSpec::new(DeviceKind::UsbDisk, "stick");
        stick.path = Some("/img/stick.raw".into());
        stick.format = Some(DiskFormat::Raw);
        spec.devices.push(stick);
        spec.graphics = Some(GraphicsSpec::new(GraphicsAdapter::Virtio));
        check(&registry, "DomainSpec", spec.to_value());
        spec.boot = Some(BootSpec::init(["/bin/sleep", "60"]));
        spec.filesystems.push(FilesystemSpec::new("/srv/data", "/data"));
        check(&registry, "DomainSpec", spec.to_value());
        let mut nic = InterfaceSpec::new(InterfaceKind::User);
        nic.mac = Some(random_mac("vm1"));
        nic.forwards.push(PortForward::new(PortProtocol::Udp, 5353, 53));
        spec.interfaces.push(nic);
        spec.interfaces.push(InterfaceSpec::new(InterfaceKind::Bridge));
        check(&registry, "DomainSpec", spec.to_value());
        check(
            &registry,
            "DeviceSpec",
            NicDevice::new("hot0", Some(InterfaceSpec::new(InterfaceKind::User))).to_value(),
        );
        let mut info = DomainInfo::new("vm1", DomainState::Paused);
        info.vcpus = 2;
        check(&registry, "DomainInfo", info.clone().into_value());
        info.interfaces.push(InterfaceInfo::new("net0", InterfaceKind::User, random_mac("vm1")));
        info.hypervisor_version = Some("7.2.22".into());
        check(&registry, "DomainInfo", info.into_value());
        check(&registry, "BlockStats", BlockStats::new(1, 2, 3, 4, 5).into_value());
        check(&registry, "HostInfo", HostInfo::new("test:///default", "test", "1.0").into_value());
        check(&registry, "DomainSummary", domain_summary("vm1", DomainState::ShutOff));
        check(&registry, "Image", png_image(1, 1, vec![0x89]));
        check(&registry, "ConsoleOutput", console_output(7, b"READY\n".to_vec()));
    }

    #[test]
    fn enums_match_the_registry() {
        let registry = registry();
        let words = |all: Vec<&'static str>| all.into_iter().map(String::from).collect::<Vec<_>>();
        assert_eq!(enum_values(&registry, "DomainState"), words(DomainState::ALL.map(DomainState::as_str).to_vec()));
        assert_eq!(enum_values(&registry, "DiskFormat"), words(DiskFormat::ALL.map(DiskFormat::as_str).to_vec()));
        assert_eq!(enum_values(&registry, "DiskBus"), words(DiskBus::ALL.map(DiskBus::as_str).to_vec()));
        // `nic` is read through `AnyDevice`: `DeviceKind` stays the exhaustive 1.0 enum.
        let device_kinds = DeviceKind::ALL.map(DeviceKind::as_str).into_iter().chain([NicDevice::KIND]).collect();
        assert_eq!(enum_values(&registry, "DeviceKind"), words(device_kinds));
        assert_eq!(
            enum_values(&registry, "GraphicsAdapter"),
            words(GraphicsAdapter::ALL.map(GraphicsAdapter::as_str).to_vec())
        );
        assert_eq!(
            enum_values(&registry, "InterfaceKind"),
            words(InterfaceKind::ALL.map(InterfaceKind::as_str).to_vec())
        );
        assert_eq!(
            enum_values(&registry, "InterfaceModel"),
            words(InterfaceModel::ALL.map(InterfaceModel::as_str).to_vec())
        );
        assert_eq!(enum_values(&registry, "PortProtocol"), words(PortProtocol::ALL.map(PortProtocol::as_str).to_vec()));
    }

    #[test]
    fn record_mirrors_cover_every_registry_field() {
        let registry = registry();
        let fields = |name: &str| -> Vec<String> {
            let id = registry.types.lookup(name).unwrap_or_else(|| panic!("no type {name}"));
            match &registry.types.get(id).body {
                TypeBody::Record { fields } => fields.iter().map(|f| f.name.clone()).collect(),
                other => panic!("{name} is not a record: {other:?}"),
            }
        };
        let built =
            |v: Value| -> Vec<String> { v.fields().unwrap_or_default().iter().map(|f| f.name.to_string()).collect() };
        let mut spec = DomainSpec::new("x", 64, 1);
        spec.graphics = Some(GraphicsSpec::new(GraphicsAdapter::Vga));
        let mut boot = BootSpec::init(["/bin/sh"]);
        boot.kernel = Some("/boot/vmlinuz".into());
        boot.initrd = Some("/boot/initrd.img".into());
        boot.cmdline = Some("console=ttyS0".into());
        assert_eq!(built(boot.clone().to_value()), fields("BootSpec"));
        spec.boot = Some(boot);
        spec.interfaces.push(InterfaceSpec::new(InterfaceKind::User));
        assert_eq!(built(spec.to_value()), fields("DomainSpec"));
        assert_eq!(built(FilesystemSpec::new("/srv", "/data").to_value()), fields("FilesystemSpec"));
        let mut info = DomainInfo::new("x", DomainState::Running);
        info.hypervisor_version = Some("1.0".into());
        let mut nic = InterfaceInfo::new("net0", InterfaceKind::Bridge, "52:54:00:00:00:01");
        nic.bridge = Some("br0".into());
        nic.host_device = Some("cv0123456789abc".into());
        assert_eq!(built(nic.to_value()), fields("InterfaceInfo"));
        info.interfaces.push(nic);
        assert_eq!(built(info.into_value()), fields("DomainInfo"));
        assert_eq!(built(BlockStats::default().into_value()), fields("BlockStats"));
        assert_eq!(built(HostInfo::new("u", "h", "v").into_value()), fields("HostInfo"));
        assert_eq!(built(png_image(1, 1, Vec::new())), fields("Image"));
        assert_eq!(built(console_output(0, Vec::new())), fields("ConsoleOutput"));
        let mut nic = InterfaceSpec::new(InterfaceKind::Bridge);
        nic.mac = Some("52:54:00:00:00:01".into());
        nic.bridge = Some("br0".into());
        assert_eq!(built(nic.to_value()), fields("InterfaceSpec"));
        assert_eq!(built(PortForward::new(PortProtocol::Tcp, 1, 2).to_value()), fields("PortForward"));
    }
}
