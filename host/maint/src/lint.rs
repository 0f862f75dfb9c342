//! `capvirt proposal check`: the registry's lint.
//!
//! Structural problems (TOML syntax, schema, unknown types…) are always errors. The rules that
//! guard *acceptance* depend on the proposal's stage: they are warnings while a proposal is a
//! draft (so authors hear about them early), errors once it is callable (experimental, stable,
//! deprecated), and do not apply to `rejected`/`removed` proposals, which stay in the registry
//! as records. `capvirt proposal promote` lints the proposal *at its target stage*, so a rule
//! that only warned on a draft refuses the promotion.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
};

use serde::Serialize;

use super::{
    one_line,
    span::{KeyPath, Locator, Position},
};
use capvirt_host::registry::{
    contract,
    model::{CapabilityFile, Decision, FieldDecl, Stage, TypeDecl, TypeKind, VoteKind},
    ParsedSources, Problem, Registry, RegistryFile, SourceFile, TypesFile,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// The lint rules; each finding names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// Not valid TOML.
    Syntax,
    /// Valid TOML, but not the registry's file format (unknown or missing keys, wrong types).
    Schema,
    /// The files do not compile into a registry (unknown types, bad `since`, CLI clashes…).
    Registry,
    /// `namespace.verb[-noun]` ids, snake_case parameter names.
    Naming,
    /// No hypervisor or protocol names outside the vendor namespace, which never reaches stable.
    HypervisorAgnostic,
    /// Free-form command strings and opaque maps would let callers bypass the contract.
    Passthrough,
    /// Every section of a proposal filled in (no scaffold placeholders, documented parameters).
    Completeness,
    /// Stable capabilities are implemented by the test driver and a real one, with notes.
    StableMappings,
    /// Deprecated capabilities name a callable replacement.
    DeprecatedReplacement,
    /// Votes by maintainers only, and callable stages backed by the quorum.
    Review,
    /// `[contract]`: known situations, outcomes and states; expected errors declared in
    /// `errors`; arguments the verifier can generate or is given.
    Contract,
}

impl Rule {
    pub const ALL: [Rule; 11] = [
        Rule::Syntax,
        Rule::Schema,
        Rule::Registry,
        Rule::Naming,
        Rule::HypervisorAgnostic,
        Rule::Passthrough,
        Rule::Completeness,
        Rule::StableMappings,
        Rule::DeprecatedReplacement,
        Rule::Review,
        Rule::Contract,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Syntax => "syntax",
            Rule::Schema => "schema",
            Rule::Registry => "registry",
            Rule::Naming => "naming",
            Rule::HypervisorAgnostic => "hypervisor-agnostic",
            Rule::Passthrough => "passthrough",
            Rule::Completeness => "completeness",
            Rule::StableMappings => "stable-mappings",
            Rule::DeprecatedReplacement => "deprecated-replacement",
            Rule::Review => "review",
            Rule::Contract => "contract",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One finding, at a position in a registry file (path relative to the registry root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub severity: Severity,
    pub rule: Rule,
    pub message: String,
}

impl Finding {
    /// `file:line:col: severity[rule]: message`, with `file` under `root` (e.g. `proposals/`).
    pub fn render(&self, root: &str) -> String {
        let root = root.trim_end_matches('/');
        let file = if root.is_empty() || root == "." { self.file.clone() } else { format!("{root}/{}", self.file) };
        format!("{file}:{}:{}: {}[{}]: {}", self.line, self.column, self.severity, self.rule, self.message)
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(""))
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Files checked.
    pub files: usize,
    /// Sorted by file, position, rule.
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn errors(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Error).count()
    }

    pub fn warnings(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Warning).count()
    }

    pub fn has_errors(&self) -> bool {
        self.errors() > 0
    }

    /// Only the findings in `paths` (relative to the registry root).
    pub fn restricted_to(mut self, paths: &[String]) -> Report {
        self.findings.retain(|f| paths.contains(&f.file));
        self.files = paths.len();
        self
    }

    /// `N errors, M warnings in K files`.
    pub fn summary(&self) -> String {
        let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        format!(
            "{}, {} in {}",
            plural(self.errors(), "error"),
            plural(self.warnings(), "warning"),
            plural(self.files, "file")
        )
    }
}

/// Checks a whole registry source tree.
pub fn check(files: &[SourceFile]) -> Report {
    let mut out = Out::default();
    // Fast path: every file parses and the registry compiles, so only the model-level rules
    // remain and no span is needed unless a rule finds something.
    let parsed = parse_fast(files);
    if parsed.problems.is_empty() {
        let types = parsed.types.clone();
        if let Ok(registry) = Registry::from_parsed(parsed) {
            let caps: Vec<(&str, &CapabilityFile)> =
                registry.capabilities().iter().map(|c| (c.source.as_str(), &c.doc)).collect();
            lint_model(Some(&registry.info), &types, &caps, &mut out);
            lint_contracts(&registry, &mut out);
            return out.finish(files);
        }
    }
    check_broken(files, &mut out);
    out.finish(files)
}

/// [`ParsedSources::parse`] with the faster parser, proposals parsed on all cores; any
/// problem sends the check to the slow path, which reports with the host's own parser.
fn parse_fast(files: &[SourceFile]) -> ParsedSources {
    let mut parsed = ParsedSources::default();
    let mut proposals = Vec::with_capacity(files.len());
    for file in files {
        let ok = match file.path.as_str() {
            "registry.toml" => {
                parsed.registry_file_seen = true;
                toml::from_str(&file.text).map(|info| parsed.info = Some(info)).is_ok()
            }
            "types.toml" => toml::from_str(&file.text).map(|types| parsed.types = types).is_ok(),
            path if path.starts_with("capabilities/") && path.ends_with(".toml") => {
                proposals.push(file);
                true
            }
            _ => false,
        };
        if !ok {
            parsed.problems.push(Problem { file: file.path.clone(), message: "unparsed".into() });
        }
    }
    let parse_all = |chunk: &[&SourceFile]| -> Option<Vec<(String, CapabilityFile)>> {
        chunk.iter().map(|file| toml::from_str(&file.text).ok().map(|doc| (file.path.clone(), doc))).collect()
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let chunk_size = proposals.len().div_ceil(threads).max(64);
    let chunks: Vec<Option<Vec<(String, CapabilityFile)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = proposals.chunks(chunk_size).map(|chunk| scope.spawn(move || parse_all(chunk))).collect();
        handles.into_iter().map(|h| h.join().ok().flatten()).collect()
    });
    for chunk in chunks {
        match chunk {
            Some(docs) => parsed.capabilities.extend(docs),
            None => parsed.problems.push(Problem { file: String::new(), message: "unparsed".into() }),
        }
    }
    parsed
}

/// The slow path for a registry that does not compile: each file is parsed on its own for
/// syntax and schema errors with positions, the compiler's problems are placed as well as
/// their wording allows, and the model rules run on whatever parsed.
fn check_broken(files: &[SourceFile], out: &mut Out) {
    let mut failed: HashSet<&str> = HashSet::new();
    let mut info = None;
    let mut types = TypesFile::default();
    let mut docs = Vec::new();
    for file in files {
        let parsed = match file.path.as_str() {
            "registry.toml" => parse::<RegistryFile>(file, out).map(|r| info = Some(r)),
            "types.toml" => parse::<TypesFile>(file, out).map(|t| types = t),
            path if path.starts_with("capabilities/") && path.ends_with(".toml") => {
                parse::<CapabilityFile>(file, out).map(|doc| docs.push((file.path.as_str(), doc)))
            }
            _ => Some(()),
        };
        if parsed.is_none() {
            failed.insert(file.path.as_str());
        }
    }
    if let Err(error) = Registry::from_sources(files) {
        // Problems of files that did not even parse are already reported with positions.
        for problem in error.problems.iter().filter(|p| !failed.contains(p.file.as_str())) {
            let at = problem_location(&problem.file, &problem.message, &docs);
            out.push(&problem.file, at, Severity::Error, Rule::Registry, problem.message.clone());
        }
    }
    let caps: Vec<(&str, &CapabilityFile)> = docs.iter().map(|(path, doc)| (*path, doc)).collect();
    lint_model(info.as_ref(), &types, &caps, out);
}

/// The `contract` rule, on a registry that compiles (contracts refer to compiled types).
/// Errors on callable stages, warnings on drafts, nothing on rejected/removed records.
fn lint_contracts(registry: &Registry, out: &mut Out) {
    let missing = contract::missing_state_words(&registry.types);
    for capability in registry.capabilities() {
        let Some(severity) = guard_severity(capability.stage()) else { continue };
        if capability.doc.contract.is_none() {
            continue;
        }
        let (_, problems) = contract::compile(&capability.doc, &registry.types, &capability.params, &capability.result);
        for problem in problems {
            let at = match problem.case {
                Some(i) => KeyPath::root().key("contract").key("cases").index(i).key(problem.key),
                None => KeyPath::root().key("contract").key(problem.key),
            };
            out.push(&capability.source, at, severity, Rule::Contract, problem.message);
        }
        if !missing.is_empty() {
            out.push(
                &capability.source,
                KeyPath::from(["contract"]),
                severity,
                Rule::Contract,
                format!("the registry's `DomainState` lacks {}, which contracts use", missing.join(", ")),
            );
        }
    }
}

/// A finding before its position is known.
struct Pending {
    file: String,
    at: At,
    severity: Severity,
    rule: Rule,
    message: String,
}

enum At {
    Path(KeyPath),
    Offset(usize),
}

impl From<KeyPath> for At {
    fn from(path: KeyPath) -> Self {
        At::Path(path)
    }
}

#[derive(Default)]
struct Out {
    pending: Vec<Pending>,
}

impl Out {
    fn push(&mut self, file: &str, at: impl Into<At>, severity: Severity, rule: Rule, message: impl Into<String>) {
        self.pending.push(Pending { file: file.to_string(), at: at.into(), severity, rule, message: message.into() });
    }

    /// Resolves positions, parsing for spans only the files that have findings.
    fn finish(self, files: &[SourceFile]) -> Report {
        let mut by_file: BTreeMap<&str, Vec<Pending>> = BTreeMap::new();
        let mut orphans = Vec::new();
        for pending in self.pending {
            match files.iter().find(|f| f.path == pending.file) {
                Some(file) => by_file.entry(file.path.as_str()).or_default().push(pending),
                None => orphans.push(pending),
            }
        }
        let mut findings = Vec::new();
        for (path, pendings) in by_file {
            let text = files.iter().find(|f| f.path == path).map_or("", |f| f.text.as_str());
            let locator = pendings.iter().any(|p| matches!(p.at, At::Path(_))).then(|| Locator::new(text));
            for p in pendings {
                let position = match (&p.at, &locator) {
                    (At::Path(key), Some(locator)) => locator.locate(key),
                    (At::Offset(offset), _) => Position::at(text, *offset),
                    (At::Path(_), None) => Position::START,
                };
                findings.push(finding(p, position));
            }
        }
        // Findings about files that do not exist (a missing registry.toml) point at 1:1.
        findings.extend(orphans.into_iter().map(|p| finding(p, Position::START)));
        findings.sort_by(|a, b| {
            (&a.file, a.line, a.column, a.rule, &a.message).cmp(&(&b.file, b.line, b.column, b.rule, &b.message))
        });
        findings.dedup();
        Report { files: files.len(), findings }
    }
}

fn finding(p: Pending, position: Position) -> Finding {
    Finding {
        file: p.file,
        line: position.line,
        column: position.column,
        severity: p.severity,
        rule: p.rule,
        message: p.message,
    }
}

/// Parses one file for the slow path, reporting syntax and schema errors with their spans.
fn parse<T: serde::de::DeserializeOwned>(file: &SourceFile, out: &mut Out) -> Option<T> {
    if let Err(e) = toml_edit::ImDocument::parse(file.text.as_str()) {
        let offset = e.span().map_or(0, |s| s.start);
        out.push(&file.path, At::Offset(offset), Severity::Error, Rule::Syntax, one_line(e.message()));
        return None;
    }
    match toml::from_str::<T>(&file.text) {
        Ok(parsed) => Some(parsed),
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            out.push(&file.path, At::Offset(offset), Severity::Error, Rule::Schema, one_line(e.message()));
            None
        }
    }
}

/// Best-effort position for a problem reported by the registry compiler, which names the
/// offending part in words (`parameter `x`: …`, `result: …`).
fn problem_location(file: &str, message: &str, docs: &[(&str, CapabilityFile)]) -> KeyPath {
    let quoted = |prefix: &str| {
        message.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('`')).and_then(|rest| rest.split('`').next())
    };
    if file == "types.toml" {
        for prefix in ["record ", "type ", "enum ", "type name ", "default of "] {
            if let Some(name) = quoted(prefix) {
                let name = name.split('.').next().unwrap_or(name);
                return KeyPath::from(["types", name]);
            }
        }
        return KeyPath::root();
    }
    let doc = docs.iter().find(|(path, _)| *path == file).map(|(_, doc)| doc);
    if let Some(name) = quoted("parameter ") {
        let index = doc.and_then(|d| d.params.iter().rposition(|p| p.name == name));
        return match index {
            Some(i) => KeyPath::root().key("params").index(i).key("type"),
            None => KeyPath::from(["params"]),
        };
    }
    let starts = |p: &str| message.starts_with(p);
    if starts("result") {
        KeyPath::from(["result", "type"])
    } else if starts("stage") {
        KeyPath::from(["stage"])
    } else if starts("`since") {
        KeyPath::from(["since"])
    } else if starts("capability `") || starts("duplicate capability id") {
        KeyPath::from(["id"])
    } else if starts("CLI command") {
        KeyPath::from(["cli", "command"])
    } else if starts("cli") {
        KeyPath::from(["cli"])
    } else {
        KeyPath::root()
    }
}

/// Hypervisor and product names: a token *starting* with one is refused (`qemuargs`, `kvmclock`).
const HYPERVISOR_NAMES: &[&str] = &[
    "qemu",
    "kvm",
    "xen",
    "libxl",
    "esx",
    "vsphere",
    "vcenter",
    "vmware",
    "vbox",
    "virtualbox",
    "bhyve",
    "lxc",
    "openvz",
    "firecracker",
    "powervm",
];
/// Hypervisor access channels, and names that are prefixes of ordinary words
/// (`hyperv`/`hypervisor`): refused as whole tokens.
const PROTOCOL_NAMES: &[&str] = &["qmp", "hmp", "monitor", "vmx", "hyperv"];
/// Names of parameters that carry commands to be interpreted by someone else.
const COMMAND_WORDS: &[&str] = &[
    "command",
    "commands",
    "cmd",
    "cmdline",
    "script",
    "shell",
    "exec",
    "expr",
    "expression",
    "code",
    "args",
    "argv",
    "arguments",
    "raw",
    "passthrough",
];
/// Names of parameters that carry untyped key/value data.
const MAP_WORDS: &[&str] = &[
    "options",
    "opts",
    "extra",
    "extras",
    "properties",
    "props",
    "params",
    "parameters",
    "settings",
    "config",
    "attributes",
    "attrs",
    "json",
    "blob",
    "payload",
];

/// The namespace whose capabilities may name a hypervisor, and never become stable.
pub const VENDOR_NAMESPACE: &str = "vendor";

fn tokens(name: &str) -> impl Iterator<Item = String> + '_ {
    name.split(['.', '-', '_']).filter(|t| !t.is_empty()).map(str::to_ascii_lowercase)
}

/// The hypervisor or protocol name `name` contains, if any.
pub fn hypervisor_word(name: &str) -> Option<&'static str> {
    tokens(name).find_map(|token| {
        PROTOCOL_NAMES
            .iter()
            .find(|w| token == **w)
            .or_else(|| HYPERVISOR_NAMES.iter().find(|w| token.starts_with(**w)))
            .copied()
    })
}

pub fn is_vendor_scoped(id: &str) -> bool {
    id.strip_prefix(VENDOR_NAMESPACE).is_some_and(|rest| rest.starts_with('.'))
}

/// Checks the id convention: `namespace.verb[-noun]` (lowercase, kebab-case name), or
/// `vendor.<vendor>.verb[-noun]`. Returns what is wrong.
pub fn check_id(id: &str) -> Result<(), String> {
    let segments: Vec<&str> = id.split('.').collect();
    let expected = if is_vendor_scoped(id) { 3 } else { 2 };
    let shape = if expected == 3 { "`vendor.<vendor>.verb[-noun]`" } else { "`namespace.verb[-noun]`" };
    if segments.len() != expected {
        return Err(format!("id `{id}` must have the form {shape}, e.g. `domain.suspend` or `domain.block-stats`"));
    }
    let word = |s: &str| {
        s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    };
    let (namespaces, name) = segments.split_at(expected - 1);
    if let Some(bad) = namespaces.iter().find(|s| !word(s)) {
        return Err(format!(
            "id `{id}`: namespace `{bad}` must be lowercase letters and digits, starting with a letter"
        ));
    }
    let name = name.first().copied().unwrap_or_default();
    let parts: Vec<&str> = name.split('-').collect();
    let kebab = parts.first().is_some_and(|first| word(first))
        && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
    if !kebab {
        return Err(format!(
            "id `{id}`: name `{name}` must be kebab-case (lowercase letters, digits and single `-`), starting with a letter"
        ));
    }
    Ok(())
}

/// Parameter and field names are snake_case.
pub fn check_field_name(name: &str) -> Result<(), String> {
    let ok = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .split('_')
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(format!("`{name}` must be snake_case (lowercase letters, digits and single `_`), starting with a letter"))
    }
}

/// The severity of an acceptance rule at `stage`: `None` where the rule does not apply.
pub fn guard_severity(stage: Stage) -> Option<Severity> {
    match stage {
        Stage::Draft => Some(Severity::Warning),
        Stage::Experimental | Stage::Stable | Stage::Deprecated => Some(Severity::Error),
        Stage::Removed | Stage::Rejected => None,
    }
}

/// Text the scaffold leaves for the author to replace.
pub const PLACEHOLDER: &str = "TODO";

fn lint_model(info: Option<&RegistryFile>, types: &TypesFile, caps: &[(&str, &CapabilityFile)], out: &mut Out) {
    if let Some(info) = info {
        lint_registry_info(info, out);
    }
    lint_types(types, out);
    let by_id: HashMap<&str, &CapabilityFile> = caps.iter().map(|(_, doc)| (doc.id.as_str(), *doc)).collect();
    for (path, doc) in caps {
        let mut lint = CapabilityLint { path, doc, info, types, by_id: &by_id, out };
        lint.run();
    }
}

fn lint_registry_info(info: &RegistryFile, out: &mut Out) {
    let file = "registry.toml";
    let mut seen = HashSet::new();
    for (i, m) in info.maintainers.iter().enumerate() {
        if !seen.insert(m.name.as_str()) {
            let at = KeyPath::root().key("maintainers").index(i).key("name");
            out.push(file, at, Severity::Error, Rule::Review, format!("maintainer `{}` listed twice", m.name));
        }
    }
    if info.review.quorum == 0 {
        out.push(file, KeyPath::from(["review", "quorum"]), Severity::Error, Rule::Review, "quorum must be at least 1");
    } else if info.review.quorum as usize > seen.len() {
        out.push(
            file,
            KeyPath::from(["review", "quorum"]),
            Severity::Error,
            Rule::Review,
            format!(
                "quorum {} exceeds the {} maintainers: no proposal could ever be accepted",
                info.review.quorum,
                seen.len()
            ),
        );
    }
}

fn lint_types(types: &TypesFile, out: &mut Out) {
    let file = "types.toml";
    for (name, decl) in &types.types {
        if let Some(word) = hypervisor_word(name) {
            out.push(
                file,
                KeyPath::from(["types", name]),
                Severity::Error,
                Rule::HypervisorAgnostic,
                format!("type `{name}` names `{word}`; shared types describe every hypervisor"),
            );
        }
        for (i, field) in decl.fields.iter().enumerate() {
            let at = || KeyPath::root().key("types").key(name).key("fields").index(i).key("name");
            if let Err(why) = check_field_name(&field.name) {
                out.push(file, at(), Severity::Error, Rule::Naming, format!("record `{name}`: field {why}"));
            }
            if let Some(word) = hypervisor_word(&field.name) {
                out.push(
                    file,
                    at(),
                    Severity::Error,
                    Rule::HypervisorAgnostic,
                    format!(
                        "record `{name}`: field `{}` names `{word}`; shared types describe every hypervisor",
                        field.name
                    ),
                );
            }
        }
    }
}

struct CapabilityLint<'a, 'o> {
    path: &'a str,
    doc: &'a CapabilityFile,
    info: Option<&'a RegistryFile>,
    types: &'a TypesFile,
    by_id: &'a HashMap<&'a str, &'a CapabilityFile>,
    out: &'o mut Out,
}

impl CapabilityLint<'_, '_> {
    fn push(&mut self, at: KeyPath, severity: Severity, rule: Rule, message: String) {
        self.out.push(self.path, at, severity, rule, message);
    }

    fn param_at(index: usize, key: &str) -> KeyPath {
        KeyPath::root().key("params").index(index).key(key)
    }

    fn run(&mut self) {
        self.naming();
        self.hypervisor_agnostic();
        self.passthrough();
        self.completeness();
        self.stable_mappings();
        self.deprecated_replacement();
        self.review();
    }

    fn naming(&mut self) {
        if let Err(why) = check_id(&self.doc.id) {
            self.push(KeyPath::from(["id"]), Severity::Error, Rule::Naming, why);
        }
        for (i, param) in self.doc.params.iter().enumerate() {
            if let Err(why) = check_field_name(&param.name) {
                self.push(Self::param_at(i, "name"), Severity::Error, Rule::Naming, format!("parameter {why}"));
            }
        }
    }

    fn hypervisor_agnostic(&mut self) {
        let doc = self.doc;
        if is_vendor_scoped(&doc.id) {
            if matches!(doc.stage, Stage::Stable | Stage::Deprecated) {
                self.push(
                    KeyPath::from(["stage"]),
                    Severity::Error,
                    Rule::HypervisorAgnostic,
                    format!(
                        "`{}` is in the `{VENDOR_NAMESPACE}.` namespace, which can never reach stable: propose a hypervisor-agnostic capability instead",
                        doc.id
                    ),
                );
            }
            return;
        }
        let Some(severity) = guard_severity(doc.stage) else { return };
        if let Some(word) = hypervisor_word(&doc.id) {
            self.push(
                KeyPath::from(["id"]),
                severity,
                Rule::HypervisorAgnostic,
                format!(
                    "id `{}` names `{word}`: capabilities must make sense for every hypervisor (hypervisor-specific ones belong under `{VENDOR_NAMESPACE}.<vendor>.`, which never reaches stable)",
                    doc.id
                ),
            );
        }
        for (i, param) in doc.params.iter().enumerate() {
            if let Some(word) = hypervisor_word(&param.name) {
                self.push(
                    Self::param_at(i, "name"),
                    severity,
                    Rule::HypervisorAgnostic,
                    format!(
                        "parameter `{}` names `{word}`: parameters must make sense for every hypervisor",
                        param.name
                    ),
                );
            }
        }
    }

    fn passthrough(&mut self) {
        let Some(severity) = guard_severity(self.doc.stage) else { return };
        for (i, param) in self.doc.params.iter().enumerate() {
            if let Some(why) = passthrough_reason(self.types, param) {
                self.push(
                    Self::param_at(i, "type"),
                    severity,
                    Rule::Passthrough,
                    format!("parameter `{}` is {why}: hypervisor commands and untyped data would pass through unchecked; declare typed parameters instead", param.name),
                );
            }
        }
    }

    fn completeness(&mut self) {
        let doc = self.doc;
        let Some(severity) = guard_severity(doc.stage) else { return };
        for (key, text, what) in [
            ("title", &doc.title, "the title"),
            ("summary", &doc.summary, "what it is (`summary`)"),
            ("motivation", &doc.motivation, "how and why applications use it (`motivation`)"),
        ] {
            if let Some(problem) = unfinished(text) {
                self.push(KeyPath::from([key]), severity, Rule::Completeness, format!("{what} {problem}"));
            }
        }
        for (i, param) in doc.params.iter().enumerate() {
            if let Some(problem) = unfinished(&param.doc) {
                self.push(
                    Self::param_at(i, "doc"),
                    severity,
                    Rule::Completeness,
                    format!("the documentation of parameter `{}` {problem}", param.name),
                );
            }
        }
        if doc.result.doc.contains(PLACEHOLDER) {
            self.push(
                KeyPath::from(["result", "doc"]),
                severity,
                Rule::Completeness,
                "the result's documentation is still a placeholder".into(),
            );
        }
        if doc.mapping.is_empty() {
            self.push(
                KeyPath::root(),
                severity,
                Rule::Completeness,
                "no `[mapping.<driver>]`: say how each hypervisor would implement it".into(),
            );
        }
        for (driver, mapping) in &doc.mapping {
            if let Some(problem) = unfinished(&mapping.note) {
                self.push(
                    KeyPath::root().key("mapping").key(driver).key("note"),
                    severity,
                    Rule::Completeness,
                    format!("the `{driver}` mapping note {problem}"),
                );
            }
        }
        for (i, question) in doc.open_questions.iter().enumerate() {
            if doc.stage == Stage::Stable {
                self.push(
                    KeyPath::root().key("open_questions").index(i),
                    Severity::Error,
                    Rule::Completeness,
                    "open questions must be settled before a capability is stable".into(),
                );
            } else if question.contains(PLACEHOLDER) {
                self.push(
                    KeyPath::root().key("open_questions").index(i),
                    severity,
                    Rule::Completeness,
                    "an open question is still the scaffold's placeholder (settle it or remove it)".into(),
                );
            }
        }
    }

    fn stable_mappings(&mut self) {
        let doc = self.doc;
        if doc.stage != Stage::Stable {
            return;
        }
        let real: Vec<&str> = doc.mapping.keys().map(String::as_str).filter(|d| *d != "test").collect();
        if !doc.mapping.contains_key("test") || real.is_empty() {
            let have: Vec<&str> = doc.mapping.keys().map(String::as_str).collect();
            self.push(
                KeyPath::from(["stage"]),
                Severity::Error,
                Rule::StableMappings,
                format!(
                    "stable requires at least two driver implementations, the test driver and a real one, each with a `[mapping.<driver>]` note (has: {})",
                    if have.is_empty() { "none".to_string() } else { have.join(", ") }
                ),
            );
        }
        for (driver, mapping) in &doc.mapping {
            if mapping.note.trim().is_empty() {
                self.push(
                    KeyPath::root().key("mapping").key(driver).key("note"),
                    Severity::Error,
                    Rule::StableMappings,
                    format!("stable requires a mapping note for driver `{driver}`"),
                );
            }
        }
    }

    fn deprecated_replacement(&mut self) {
        let doc = self.doc;
        match (doc.stage, &doc.replaced_by) {
            (Stage::Deprecated, None) => self.push(
                KeyPath::from(["stage"]),
                Severity::Error,
                Rule::DeprecatedReplacement,
                "a deprecated capability must name its replacement (`replaced_by = \"…\"`)".into(),
            ),
            (Stage::Deprecated, Some(other)) => {
                let problem = if *other == doc.id {
                    Some("cannot replace itself".to_string())
                } else {
                    match self.by_id.get(other.as_str()) {
                        None => Some(format!("names `{other}`, which is not in the registry")),
                        Some(replacement) if !matches!(replacement.stage, Stage::Experimental | Stage::Stable) => {
                            Some(format!(
                                "names `{other}`, which is {} (the replacement must be experimental or stable)",
                                replacement.stage
                            ))
                        }
                        Some(_) => None,
                    }
                };
                if let Some(problem) = problem {
                    self.push(
                        KeyPath::from(["replaced_by"]),
                        Severity::Error,
                        Rule::DeprecatedReplacement,
                        format!("`replaced_by` {problem}"),
                    );
                }
            }
            (_, Some(other)) if !self.by_id.contains_key(other.as_str()) => self.push(
                KeyPath::from(["replaced_by"]),
                Severity::Warning,
                Rule::DeprecatedReplacement,
                format!("`replaced_by` names `{other}`, which is not in the registry"),
            ),
            _ => {}
        }
    }

    fn review(&mut self) {
        let doc = self.doc;
        let Some(info) = self.info else { return };
        let mut seen = HashSet::new();
        for (i, vote) in doc.review.votes.iter().enumerate() {
            let at = || KeyPath::root().key("review").key("votes").index(i).key("by");
            if !info.maintainers.iter().any(|m| m.name == vote.by) {
                self.push(
                    at(),
                    Severity::Error,
                    Rule::Review,
                    format!("vote by `{}`, who is not a maintainer in registry.toml", vote.by),
                );
            }
            if !seen.insert((vote.by.as_str(), vote.at_stage)) {
                self.push(
                    at(),
                    Severity::Error,
                    Rule::Review,
                    format!(
                        "`{}` voted twice at the same stage (one vote per maintainer and stage; `capvirt proposal review` replaces a vote)",
                        vote.by
                    ),
                );
            }
        }
        let quorum = info.review.quorum as usize;
        if doc.stage.is_callable() {
            let approvals = approvals(doc, info, None).len();
            if approvals < quorum {
                self.push(
                    KeyPath::from(["stage"]),
                    Severity::Error,
                    Rule::Review,
                    format!("stage {} requires approval by {quorum} maintainers (quorum); has {approvals}", doc.stage),
                );
            }
            if doc.review.decision != Decision::Accepted {
                self.push(
                    KeyPath::from(["review", "decision"]),
                    Severity::Error,
                    Rule::Review,
                    format!("stage {} requires `decision = \"accepted\"`", doc.stage),
                );
            }
        }
        if doc.stage == Stage::Rejected {
            if doc.review.decision != Decision::Rejected {
                self.push(
                    KeyPath::from(["review", "decision"]),
                    Severity::Error,
                    Rule::Review,
                    "a rejected proposal records `decision = \"rejected\"`".into(),
                );
            }
            if doc.review.record.trim().is_empty() {
                self.push(
                    KeyPath::from(["review"]),
                    Severity::Error,
                    Rule::Review,
                    "a rejected proposal keeps its decision record (`review.record`): why it was rejected".into(),
                );
            }
        }
    }
}

/// Why a text is not finished, if it is not.
fn unfinished(text: &str) -> Option<&'static str> {
    if text.trim().is_empty() {
        Some("is empty")
    } else if text.contains(PLACEHOLDER) {
        Some("is still the scaffold's placeholder")
    } else {
        None
    }
}

/// Maintainers whose vote approves the proposal, counting only votes cast at `at_stage` when
/// given (votes recorded without a stage count everywhere but there).
pub fn approvals<'a>(doc: &'a CapabilityFile, info: &RegistryFile, at_stage: Option<Stage>) -> Vec<&'a str> {
    votes_of_kind(doc, info, at_stage, VoteKind::Approve)
}

/// Distinct maintainers whose vote (at `at_stage`, when given) is `kind`.
pub fn votes_of_kind<'a>(
    doc: &'a CapabilityFile,
    info: &RegistryFile,
    at_stage: Option<Stage>,
    kind: VoteKind,
) -> Vec<&'a str> {
    let mut names: Vec<&str> = doc
        .review
        .votes
        .iter()
        .filter(|v| v.vote == kind)
        .filter(|v| at_stage.is_none() || v.at_stage == at_stage)
        .filter(|v| info.maintainers.iter().any(|m| m.name == v.by))
        .map(|v| v.by.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// The shape of a parameter's type, as far as passthrough is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// A string with no declared format: anything goes.
    FreeString,
    Bytes,
    /// A record with no fields, or a list of key/value records: an untyped map.
    OpaqueMap,
    Typed,
}

fn shape(types: &TypesFile, expr: &str) -> Shape {
    let expr = expr.trim();
    if let Some(inner) = expr.strip_prefix("list<").and_then(|rest| rest.strip_suffix('>')) {
        let inner = inner.trim();
        if let Some(TypeDecl { kind: TypeKind::Record, fields, .. }) = types.types.get(inner) {
            if is_key_value(types, fields) {
                return Shape::OpaqueMap;
            }
        }
        return match shape(types, inner) {
            Shape::FreeString => Shape::FreeString,
            other => other,
        };
    }
    match expr {
        "string" => Shape::FreeString,
        "bytes" => Shape::Bytes,
        name => match types.types.get(name) {
            Some(decl) => match decl.kind {
                TypeKind::String if decl.format.is_none() => Shape::FreeString,
                TypeKind::Bytes => Shape::Bytes,
                TypeKind::Record if decl.fields.is_empty() => Shape::OpaqueMap,
                _ => Shape::Typed,
            },
            None => Shape::Typed,
        },
    }
}

/// `{ key, value }`-like records: a map in disguise.
fn is_key_value(types: &TypesFile, fields: &[FieldDecl]) -> bool {
    let key =
        fields.iter().any(|f| matches!(f.name.as_str(), "key" | "name") && shape(types, &f.ty) == Shape::FreeString);
    let value = fields.iter().any(|f| {
        matches!(f.name.as_str(), "value" | "val" | "data")
            && matches!(shape(types, &f.ty), Shape::FreeString | Shape::Bytes)
    });
    fields.len() == 2 && key && value
}

/// Why `param` is a passthrough, if it is one.
fn passthrough_reason(types: &TypesFile, param: &FieldDecl) -> Option<String> {
    let shape = shape(types, &param.ty);
    if shape == Shape::OpaqueMap {
        return Some(format!("an opaque map (`{}`)", param.ty));
    }
    if !matches!(shape, Shape::FreeString | Shape::Bytes) {
        return None;
    }
    let name_tokens: Vec<String> = tokens(&param.name).collect();
    if shape == Shape::FreeString && name_tokens.iter().any(|t| COMMAND_WORDS.contains(&t.as_str())) {
        return Some("a free-form command string".into());
    }
    if name_tokens.iter().any(|t| MAP_WORDS.contains(&t.as_str())) {
        return Some(format!("an opaque blob of options (`{}`)", param.ty));
    }
    let doc = param.doc.to_ascii_lowercase();
    if ["passed through", "pass through", "passthrough", "free-form", "freeform", "raw command", "verbatim"]
        .iter()
        .any(|phrase| doc.contains(phrase))
    {
        return Some("free-form text passed through (its documentation says so)".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_convention() {
        for good in ["domain.suspend", "domain.block-stats", "host.info", "vendor.acme.gdb-server", "net2.list"] {
            assert_eq!(check_id(good), Ok(()), "{good}");
        }
        for bad in
            ["suspend", "domain.Suspend", "domain.block_stats", "domain.-x", "a.b.c", "domain.x--y", "domain.", "1d.x"]
        {
            assert!(check_id(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn hypervisor_words_are_tokens_or_prefixes() {
        assert_eq!(hypervisor_word("domain.monitor-command"), Some("monitor"));
        assert_eq!(hypervisor_word("qemu_args"), Some("qemu"));
        assert_eq!(hypervisor_word("domain.kvmclock"), Some("kvm"));
        assert_eq!(hypervisor_word("domain.block-stats"), None);
        assert_eq!(hypervisor_word("hypervisor_version"), None);
        assert_eq!(hypervisor_word("monitoring"), None, "protocol words are whole tokens");
    }
}

#[cfg(test)]
mod registry_tests {
    use super::*;
    use capvirt_host::registry::source::embedded_files;

    #[test]
    fn the_reviewed_registry_passes_its_own_lint() {
        let report = check(&embedded_files());
        assert!(report.findings.is_empty(), "{:#?}", report.findings);
    }
}
