//! `capvirt registry diff OLD NEW`: every change between two registries, classified as
//! breaking, compatible or docs-only, the semver bump they require, and whether
//! `registry.toml`'s version bump is enough.
//!
//! The classification follows what callers and plugins can observe:
//! - only callable capabilities (experimental, stable, deprecated) are contract; changes to
//!   drafts, rejected and removed proposals are documents (docs-only), and so is a type that no
//!   callable capability reaches;
//! - breaking: a callable capability removed (or moved out of the callable stages), a
//!   parameter or field removed, a changed type, a new required parameter, optional→required,
//!   a removed enum value, tighter bounds or format, a changed default, a stable capability
//!   lowered to experimental, `mutates` turned on, a CLI command renamed or removed;
//! - compatible: a new callable capability, a new optional parameter, a deprecation, a new
//!   enum value, looser bounds, a new CLI command, new error kinds;
//! - contract changes to a capability that was *experimental* are compatible: experimental
//!   capabilities carry no stability promise (their removal is still breaking, because plugins
//!   implementing a removed capability are refused at load).

use std::collections::{BTreeMap, BTreeSet};

use semver::Version;
use serde::Serialize;

use capvirt_host::registry::{
    model::{CapabilityFile, Stage},
    Bounds, Capability, FieldDef, Registry, Ty, TypeBody, TypeTable,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChangeClass {
    DocsOnly,
    Compatible,
    Breaking,
}

impl ChangeClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeClass::DocsOnly => "docs-only",
            ChangeClass::Compatible => "compatible",
            ChangeClass::Breaking => "breaking",
        }
    }
}

/// A semver bump level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bump {
    None,
    Patch,
    Minor,
    Major,
}

impl Bump {
    pub fn as_str(self) -> &'static str {
        match self {
            Bump::None => "none",
            Bump::Patch => "patch",
            Bump::Minor => "minor",
            Bump::Major => "major",
        }
    }

    /// The bump a change class requires from `from` (below 1.0.0, breaking changes bump the
    /// minor and everything else the patch, as semver usage has it).
    pub fn required(class: Option<ChangeClass>, from: &Version) -> Bump {
        match (class, from.major) {
            (None, _) => Bump::None,
            (Some(ChangeClass::Breaking), 0) => Bump::Minor,
            (Some(_), 0) => Bump::Patch,
            (Some(ChangeClass::Breaking), _) => Bump::Major,
            (Some(ChangeClass::Compatible), _) => Bump::Minor,
            (Some(ChangeClass::DocsOnly), _) => Bump::Patch,
        }
    }

    /// The bump from `old` to `new`; `None` when the version went backwards.
    pub fn between(old: &Version, new: &Version) -> Option<Bump> {
        let (o, n) = ((old.major, old.minor, old.patch), (new.major, new.minor, new.patch));
        if n < o {
            None
        } else if n.0 > o.0 {
            Some(Bump::Major)
        } else if n.1 > o.1 {
            Some(Bump::Minor)
        } else if n.2 > o.2 {
            Some(Bump::Patch)
        } else {
            Some(Bump::None)
        }
    }

    /// `version` bumped by this level.
    pub fn apply(self, version: &Version) -> Version {
        let v = version;
        match self {
            Bump::None => v.clone(),
            Bump::Patch => Version::new(v.major, v.minor, v.patch + 1),
            Bump::Minor => Version::new(v.major, v.minor + 1, 0),
            Bump::Major => Version::new(v.major + 1, 0, 0),
        }
    }
}

impl std::fmt::Display for Bump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub class: ChangeClass,
    /// A capability id, `type NAME` or `registry.toml`.
    pub subject: String,
    pub description: String,
}

/// The outcome of a diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiffReport {
    pub old_version: Version,
    pub new_version: Version,
    /// Breaking first, then compatible, then docs-only; by subject within a class.
    pub changes: Vec<Change>,
    pub required_bump: Bump,
    /// `None` when the new version is lower than the old one.
    pub actual_bump: Option<Bump>,
}

impl DiffReport {
    /// `registry.toml`'s bump covers the changes.
    pub fn ok(&self) -> bool {
        self.actual_bump.is_some_and(|actual| actual >= self.required_bump)
    }

    /// The smallest version that would cover the changes.
    pub fn minimum_version(&self) -> Version {
        self.required_bump.apply(&self.old_version)
    }
}

/// Compares two compiled registries.
pub fn diff(old: &Registry, new: &Registry) -> DiffReport {
    let mut changes = Changes::default();
    registry_info(old, new, &mut changes);
    capabilities(old, new, &mut changes);
    types(old, new, &mut changes);
    let mut changes = changes.0;
    changes.sort_by(|a, b| b.class.cmp(&a.class).then_with(|| a.subject.cmp(&b.subject)));
    let max = changes.iter().map(|c| c.class).max();
    let old_version = old.version().clone();
    let new_version = new.version().clone();
    DiffReport {
        required_bump: Bump::required(max, &old_version),
        actual_bump: Bump::between(&old_version, &new_version),
        old_version,
        new_version,
        changes,
    }
}

#[derive(Default)]
struct Changes(Vec<Change>);

impl Changes {
    fn push(&mut self, class: ChangeClass, subject: &str, description: impl Into<String>) {
        self.0.push(Change { class, subject: subject.to_string(), description: description.into() });
    }
}

fn registry_info(old: &Registry, new: &Registry, out: &mut Changes) {
    let (o, n) = (&old.info, &new.info);
    let mut what = Vec::new();
    if o.description != n.description {
        what.push("description");
    }
    if o.review != n.review {
        what.push("review quorum");
    }
    if o.maintainers != n.maintainers {
        what.push("maintainers");
    }
    if !what.is_empty() {
        out.push(ChangeClass::DocsOnly, "registry.toml", format!("{} changed", what.join(", ")));
    }
}

fn capabilities(old: &Registry, new: &Registry, out: &mut Changes) {
    let ids: BTreeSet<&str> = old.capabilities().iter().chain(new.capabilities()).map(Capability::id).collect();
    for id in ids {
        match (old.lookup(id), new.lookup(id)) {
            (Some(o), None) if o.stage().is_callable() => {
                out.push(ChangeClass::Breaking, id, format!("removed capability (was {})", o.stage()));
            }
            (Some(o), None) => out.push(ChangeClass::DocsOnly, id, format!("{} proposal deleted", o.stage())),
            (None, Some(n)) if n.stage().is_callable() => {
                out.push(ChangeClass::Compatible, id, format!("new capability ({})", n.stage()));
            }
            (None, Some(n)) => out.push(ChangeClass::DocsOnly, id, format!("new {} proposal", n.stage())),
            (Some(o), Some(n)) => capability(o, n, old, new, out),
            (None, None) => {}
        }
    }
}

fn capability(o: &Capability, n: &Capability, old: &Registry, new: &Registry, out: &mut Changes) {
    let id = o.id();
    let (os, ns) = (o.stage(), n.stage());
    match (os.is_callable(), ns.is_callable()) {
        (false, false) => {
            if o.doc != n.doc {
                let stage =
                    if os == ns { format!("{ns} proposal changed") } else { format!("{os} proposal moved to {ns}") };
                out.push(ChangeClass::DocsOnly, id, stage);
            }
            return;
        }
        (false, true) => {
            out.push(ChangeClass::Compatible, id, format!("new capability ({os} → {ns})"));
            return;
        }
        (true, false) => {
            let what = match ns {
                Stage::Removed => "removed capability",
                Stage::Rejected => "capability withdrawn (rejected)",
                _ => "capability no longer callable",
            };
            out.push(ChangeClass::Breaking, id, format!("{what} ({os} → {ns})"));
            return;
        }
        (true, true) => {}
    }
    // From here on both are callable. Experimental capabilities promise nothing: what would
    // break a stable contract is only compatible for them.
    let lenient = os == Stage::Experimental;
    let mut push = |class: ChangeClass, text: String| {
        if class == ChangeClass::Breaking && lenient {
            out.push(ChangeClass::Compatible, id, format!("{text} (experimental: no stability promise)"));
        } else {
            out.push(class, id, text);
        }
    };
    let breaking = ChangeClass::Breaking;
    if os != ns {
        match (os, ns) {
            (Stage::Stable | Stage::Deprecated, Stage::Experimental) => {
                push(ChangeClass::Breaking, format!("stage lowered from {os} to {ns}"))
            }
            (_, Stage::Deprecated) => push(
                ChangeClass::Compatible,
                match &n.doc.replaced_by {
                    Some(r) => format!("deprecated ({os} → {ns}), replaced by `{r}`"),
                    None => format!("deprecated ({os} → {ns})"),
                },
            ),
            _ => push(ChangeClass::Compatible, format!("stage {os} → {ns}")),
        }
    }
    match (o.mutates(), n.mutates()) {
        (false, true) => push(breaking, "now mutates state (refused on read-only connections)".into()),
        (true, false) => push(ChangeClass::Compatible, "no longer mutates state".into()),
        _ => {}
    }
    match o.doc.version.cmp(&n.doc.version) {
        std::cmp::Ordering::Less => {
            push(ChangeClass::Compatible, format!("contract version {} → {}", o.doc.version, n.doc.version))
        }
        std::cmp::Ordering::Greater => {
            push(ChangeClass::Breaking, format!("contract version lowered {} → {}", o.doc.version, n.doc.version))
        }
        std::cmp::Ordering::Equal => {}
    }
    let mut field_changes = Vec::new();
    compare_fields("parameter", &o.params, &n.params, &old.types, &new.types, &mut field_changes);
    for (class, text) in field_changes {
        push(class, text);
    }
    let (ort, nrt) = (old.types.type_name(&o.result), new.types.type_name(&n.result));
    if ort != nrt {
        push(breaking, format!("result type changed from `{ort}` to `{nrt}`"));
    }
    if o.doc.errors != n.doc.errors {
        push(ChangeClass::Compatible, "declared error kinds changed".into());
    }
    match (&o.doc.cli, &n.doc.cli) {
        (None, Some(cli)) => push(ChangeClass::Compatible, format!("new CLI command `{}`", cli.command)),
        (Some(cli), None) => push(breaking, format!("CLI command `{}` removed", cli.command)),
        (Some(a), Some(b)) => {
            if a.command != b.command {
                push(breaking, format!("CLI command renamed from `{}` to `{}`", a.command, b.command));
            } else if (&a.positional, &a.file_args, &a.output_file) != (&b.positional, &b.file_args, &b.output_file) {
                push(breaking, format!("CLI command `{}` takes different arguments", a.command));
            }
        }
        (None, None) => {}
    }
    let docs = documentation_changes(&o.doc, &n.doc, &o.params, &n.params);
    if !docs.is_empty() {
        push(ChangeClass::DocsOnly, format!("documentation changed: {}", docs.join(", ")));
    }
}

/// Which purely descriptive parts of a proposal changed.
fn documentation_changes(
    o: &CapabilityFile,
    n: &CapabilityFile,
    op: &[FieldDef],
    np: &[FieldDef],
) -> Vec<&'static str> {
    let mut what = Vec::new();
    let mut check = |changed: bool, name: &'static str| {
        if changed {
            what.push(name);
        }
    };
    check(o.title != n.title, "title");
    check(o.summary != n.summary, "summary");
    check(o.motivation != n.motivation, "motivation");
    check(o.since != n.since, "since");
    check(o.result.doc != n.result.doc, "result doc");
    let param_docs = |params: &[FieldDef]| -> BTreeMap<String, (String, Option<String>)> {
        params.iter().map(|p| (p.name.clone(), (p.doc.clone(), p.label.clone()))).collect()
    };
    let (opd, npd) = (param_docs(op), param_docs(np));
    check(opd.iter().any(|(name, d)| npd.get(name).is_some_and(|nd| nd != d)), "parameter docs");
    check(o.mapping != n.mapping, "driver mappings");
    check(o.replaced_by != n.replaced_by, "replaced_by");
    check(o.open_questions != n.open_questions, "open questions");
    check(o.review != n.review, "review record");
    // A contract describes what drivers already must do; `plugin verify` checks it.
    check(o.contract != n.contract, "contract");
    if let (Some(a), Some(b)) = (&o.cli, &n.cli) {
        check((&a.about, &a.message, a.progress) != (&b.about, &b.message, b.progress), "CLI help");
    }
    what
}

/// Compares parameters or record fields by name.
fn compare_fields(
    what: &str,
    old: &[FieldDef],
    new: &[FieldDef],
    old_types: &TypeTable,
    new_types: &TypeTable,
    out: &mut Vec<(ChangeClass, String)>,
) {
    use ChangeClass::{Breaking, Compatible};
    for o in old {
        let Some(n) = new.iter().find(|n| n.name == o.name) else {
            out.push((Breaking, format!("{what} `{}` removed", o.name)));
            continue;
        };
        let name = &o.name;
        let (ot, nt) = (old_types.type_name(&o.ty), new_types.type_name(&n.ty));
        if ot != nt {
            out.push((Breaking, format!("{what} `{name}` changed type from `{ot}` to `{nt}`")));
        }
        match (o.required, n.required) {
            (false, true) => out.push((Breaking, format!("{what} `{name}` is now required"))),
            (true, false) => out.push((Compatible, format!("{what} `{name}` is now optional"))),
            _ => {}
        }
        if o.default != n.default && !n.required {
            let show =
                |d: &Option<capvirt_plugin_api::Value>| d.as_ref().map_or("none".to_string(), ToString::to_string);
            out.push((
                Breaking,
                format!("{what} `{name}`: default changed from {} to {}", show(&o.default), show(&n.default)),
            ));
        }
        bounds_change(&format!("{what} `{name}`"), o.bounds, n.bounds, out);
    }
    for n in new.iter().filter(|n| !old.iter().any(|o| o.name == n.name)) {
        if n.required {
            out.push((Breaking, format!("new required {what} `{}`", n.name)));
        } else {
            out.push((Compatible, format!("new optional {what} `{}`", n.name)));
        }
    }
}

/// Tighter bounds refuse values that were accepted: breaking; looser ones are compatible.
fn bounds_change(subject: &str, o: Bounds, n: Bounds, out: &mut Vec<(ChangeClass, String)>) {
    let min_tighter = match (o.min, n.min) {
        (None, Some(_)) => Some(true),
        (Some(_), None) => Some(false),
        (Some(a), Some(b)) if a != b => Some(b > a),
        _ => None,
    };
    let max_tighter = match (o.max, n.max) {
        (None, Some(_)) => Some(true),
        (Some(_), None) => Some(false),
        (Some(a), Some(b)) if a != b => Some(b < a),
        _ => None,
    };
    let show = |b: Bounds| {
        format!(
            "{}..={}",
            b.min.map_or(String::new(), |m| m.to_string()),
            b.max.map_or(String::new(), |m| m.to_string())
        )
    };
    if min_tighter == Some(true) || max_tighter == Some(true) {
        out.push((ChangeClass::Breaking, format!("{subject}: bounds tightened from {} to {}", show(o), show(n))));
    } else if min_tighter.is_some() || max_tighter.is_some() {
        out.push((ChangeClass::Compatible, format!("{subject}: bounds loosened from {} to {}", show(o), show(n))));
    }
}

/// Names of the types reachable from the callable capabilities of `registry`.
fn contract_types(registry: &Registry) -> BTreeSet<String> {
    fn visit(types: &TypeTable, ty: &Ty, seen: &mut BTreeSet<String>) {
        match ty {
            Ty::List(inner) => visit(types, inner, seen),
            Ty::Named(id) => {
                let def = types.get(*id);
                if seen.insert(def.name.clone()) {
                    match &def.body {
                        TypeBody::Scalar { base, .. } => visit(types, base, seen),
                        TypeBody::Record { fields } => fields.iter().for_each(|f| visit(types, &f.ty, seen)),
                        TypeBody::Enum { .. } => {}
                    }
                }
            }
            _ => {}
        }
    }
    let mut seen = BTreeSet::new();
    for cap in registry.capabilities().iter().filter(|c| c.stage().is_callable()) {
        cap.params.iter().for_each(|p| visit(&registry.types, &p.ty, &mut seen));
        visit(&registry.types, &cap.result, &mut seen);
    }
    seen
}

fn types(old: &Registry, new: &Registry, out: &mut Changes) {
    use ChangeClass::{Breaking, Compatible, DocsOnly};
    let mut in_contract = contract_types(old);
    in_contract.extend(contract_types(new));
    let names: BTreeSet<&str> =
        old.types.iter().map(|d| d.name.as_str()).chain(new.types.iter().map(|d| d.name.as_str())).collect();
    for name in names {
        let subject = format!("type {name}");
        let o = old.types.lookup(name).map(|id| old.types.get(id));
        let n = new.types.lookup(name).map(|id| new.types.get(id));
        let mut found: Vec<(ChangeClass, String)> = Vec::new();
        match (o, n) {
            (Some(_), None) => found.push((Breaking, "removed".into())),
            (None, Some(_)) => found.push((Compatible, "new type".into())),
            (Some(o), Some(n)) => {
                match (&o.body, &n.body) {
                    (TypeBody::Enum { values: ov }, TypeBody::Enum { values: nv }) => {
                        for v in ov.iter().filter(|v| !nv.contains(v)) {
                            found.push((Breaking, format!("enum value `{v}` removed")));
                        }
                        for v in nv.iter().filter(|v| !ov.contains(v)) {
                            found.push((Compatible, format!("new enum value `{v}`")));
                        }
                    }
                    (TypeBody::Record { fields: of }, TypeBody::Record { fields: nf }) => {
                        compare_fields("field", of, nf, &old.types, &new.types, &mut found);
                    }
                    (
                        TypeBody::Scalar { base: ob, format: of, max_len: ol, bounds: obd },
                        TypeBody::Scalar { base: nb, format: nf, max_len: nl, bounds: nbd },
                    ) => {
                        let (obn, nbn) = (old.types.type_name(ob), new.types.type_name(nb));
                        if obn != nbn {
                            found.push((Breaking, format!("base type changed from `{obn}` to `{nbn}`")));
                        }
                        match (of, nf) {
                            (a, b) if a == b => {}
                            (Some(_), None) => found.push((Compatible, "format constraint dropped".into())),
                            (a, b) => found.push((Breaking, format!("format changed from {a:?} to {b:?}"))),
                        }
                        match (ol, nl) {
                            (a, b) if a == b => {}
                            (Some(a), Some(b)) if b > a => {
                                found.push((Compatible, format!("max_len raised {a} → {b}")))
                            }
                            (Some(_), None) => found.push((Compatible, "max_len dropped".into())),
                            (a, b) => found.push((Breaking, format!("max_len lowered {a:?} → {b:?}"))),
                        }
                        bounds_change("bounds", *obd, *nbd, &mut found);
                    }
                    _ => found.push((Breaking, "kind changed".into())),
                }
                if o.doc != n.doc || documentation_of(&o.body) != documentation_of(&n.body) {
                    found.push((DocsOnly, "documentation changed".into()));
                }
            }
            (None, None) => {}
        }
        let reached = in_contract.contains(name);
        for (class, text) in found {
            if reached {
                out.push(class, &subject, text);
            } else {
                out.push(DocsOnly, &subject, format!("{text} (no callable capability uses it)"));
            }
        }
    }
}

fn documentation_of(body: &TypeBody) -> Vec<(String, String, Option<String>)> {
    match body {
        TypeBody::Record { fields } => {
            fields.iter().map(|f| (f.name.clone(), f.doc.clone(), f.label.clone())).collect()
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bump_arithmetic() {
        let v = |s: &str| Version::parse(s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Bump::required(Some(ChangeClass::Breaking), &v("1.2.3")), Bump::Major);
        assert_eq!(Bump::required(Some(ChangeClass::Breaking), &v("0.2.3")), Bump::Minor);
        assert_eq!(Bump::required(Some(ChangeClass::DocsOnly), &v("1.2.3")), Bump::Patch);
        assert_eq!(Bump::required(None, &v("1.2.3")), Bump::None);
        assert_eq!(Bump::between(&v("1.2.3"), &v("2.0.0")), Some(Bump::Major));
        assert_eq!(Bump::between(&v("1.2.3"), &v("1.3.0")), Some(Bump::Minor));
        assert_eq!(Bump::between(&v("1.2.3"), &v("1.2.4")), Some(Bump::Patch));
        assert_eq!(Bump::between(&v("1.2.3"), &v("1.2.3")), Some(Bump::None));
        assert_eq!(Bump::between(&v("1.2.3"), &v("1.1.9")), None);
        assert_eq!(Bump::Minor.apply(&v("1.2.3")), v("1.3.0"));
        assert_eq!(Bump::Major.apply(&v("1.2.3")), v("2.0.0"));
    }

    #[test]
    fn contracts_are_documentation() {
        let files = capvirt_host::registry::source::embedded_files();
        let strip = |text: &str| text.split("\n[contract]").next().unwrap_or(text).to_string();
        let without: Vec<_> = files
            .iter()
            .map(|f| capvirt_host::registry::SourceFile { path: f.path.clone(), text: strip(&f.text) })
            .collect();
        let old = Registry::from_sources(&without).unwrap_or_else(|e| panic!("{e}"));
        let new = Registry::from_sources(&files).unwrap_or_else(|e| panic!("{e}"));
        let report = diff(&old, &new);
        assert!(!report.changes.is_empty());
        for change in &report.changes {
            assert_eq!(change.class, ChangeClass::DocsOnly, "{change:?}");
        }
        assert!(report.changes.iter().any(|c| c.subject == "domain.suspend"), "{:#?}", report.changes);
        assert_eq!(report.required_bump, Bump::Patch);
    }

    #[test]
    fn identical_registries_need_no_bump() {
        let registry = Registry::embedded().unwrap_or_else(|e| panic!("{e}"));
        let report = diff(&registry, &registry);
        assert!(report.changes.is_empty(), "{:#?}", report.changes);
        assert_eq!(report.required_bump, Bump::None);
        assert!(report.ok());
    }
}
