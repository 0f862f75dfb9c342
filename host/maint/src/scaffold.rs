//! `capvirt proposal new ID`: a draft with every section a proposal needs, as the seed asks
//! of whoever wants new functionality: what it is, how and why applications use it, the
//! proposed typed API, how each hypervisor would implement it, and what is still open.
//!
//! The draft compiles (the host keeps working with it in the registry), and `proposal check`
//! warns about each placeholder until it is replaced.

use super::{capability_path, find_file, lint};
use capvirt_host::registry::{Registry, SourceFile};

/// A new proposal: its path relative to the registry root, and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaffold {
    pub path: String,
    pub text: String,
}

/// Why a proposal cannot be scaffolded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScaffoldError {
    #[error("{0}")]
    BadId(String),
    #[error("proposal `{id}` already exists ({path})")]
    Exists { id: String, path: String },
}

/// Scaffolds proposal `id` for the registry made of `files`.
pub fn scaffold(files: &[SourceFile], id: &str) -> Result<Scaffold, ScaffoldError> {
    lint::check_id(id).map_err(ScaffoldError::BadId)?;
    if !lint::is_vendor_scoped(id) {
        if let Some(word) = lint::hypervisor_word(id) {
            return Err(ScaffoldError::BadId(format!(
                "id `{id}` names `{word}`: capabilities must make sense for every hypervisor; describe the concept instead (or use `{}.<vendor>.…`, which can never become stable)",
                lint::VENDOR_NAMESPACE
            )));
        }
    }
    let path = capability_path(id);
    if find_file(files, &path).is_some() {
        return Err(ScaffoldError::Exists { id: id.to_string(), path });
    }
    let namespace = id.split('.').next().unwrap_or_default();
    // An example parameter only where the registry has a type for it, so the draft compiles.
    let subject = match namespace {
        "domain" => Some(("domain", "DomainName", "The domain to act on.")),
        _ => None,
    };
    let registry = Registry::from_sources(files).ok();
    let subject = subject.filter(|(_, ty, _)| registry.as_ref().is_none_or(|r| r.types.lookup(ty).is_some()));
    Ok(Scaffold { path, text: template(id, subject) })
}

fn template(id: &str, subject: Option<(&str, &str, &str)>) -> String {
    let todo = lint::PLACEHOLDER;
    let params = match subject {
        Some((name, ty, doc)) => format!(
            r#"[[params]]
name = "{name}"
type = "{ty}"
doc = "{doc}"

"#
        ),
        None => String::new(),
    };
    format!(
        r#"# Proposal for `{id}`. Replace every {todo}, then ask maintainers to review it:
#   capvirt proposal check
#   capvirt proposal review {id} --approve --as NAME
# See proposals/README.md for the whole process.
id = "{id}"
# Contract version of this capability; bumped with each compatible extension.
version = 1
title = "{todo}: a short imperative title"
stage = "draft"
# true when it changes state (refused on read-only connections, audited).
mutates = false
# What it is.
summary = "{todo}: what the functionality is, in terms that fit every hypervisor."
# How and why applications use it.
motivation = "{todo}: how and why an application would use it."
# Error kinds it may report: not-found, invalid-argument, invalid-state, unsupported,
# driver-failure, timeout.
errors = []
# What is still undecided; settle (and remove) before the capability becomes stable.
open_questions = ["{todo}: what is still undecided."]

# The proposed API: typed parameters (types from types.toml, primitives or list<T>) and the
# result. No free-form command strings or opaque maps: those are passthroughs.
{params}# [[params]]
# name = "example"
# type = "uint"
# required = false
# default = 0
# doc = "…"

[result]
type = "unit"
doc = ""

# How each hypervisor would implement it; stable needs the test driver and a real one.
[mapping.test]
note = "{todo}: how the in-memory test driver implements it."

# [mapping.qemu]
# note = "…"

# Optional virsh-style command derived from this proposal.
# [cli]
# command = "…"
# positional = ["domain"]
# about = "…"

[review]
decision = "pending"
record = ""
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use capvirt_host::registry::source::embedded_files;

    #[test]
    fn scaffold_compiles_and_only_warns() {
        let mut files = embedded_files();
        let draft = scaffold(&files, "domain.set-vcpus").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(draft.path, "capabilities/domain.set-vcpus.toml");
        files.push(SourceFile { path: draft.path.clone(), text: draft.text });
        let report = lint::check(&files);
        assert_eq!(report.errors(), 0, "{:#?}", report.findings);
        assert!(report.warnings() >= 4, "{:#?}", report.findings);
        assert!(report.findings.iter().all(|f| f.file == draft.path), "{:#?}", report.findings);
    }

    #[test]
    fn bad_existing_and_hypervisor_ids_are_refused() {
        let files = embedded_files();
        assert!(matches!(scaffold(&files, "domain.suspend"), Err(ScaffoldError::Exists { .. })));
        assert!(matches!(scaffold(&files, "Domain.Suspend"), Err(ScaffoldError::BadId(_))));
        let err = scaffold(&files, "domain.qemu-gdbserver").map(|s| s.path).unwrap_err().to_string();
        assert!(err.contains("names `qemu`"), "{err}");
        assert!(scaffold(&files, "vendor.qemu.gdbserver").is_ok());
    }
}
