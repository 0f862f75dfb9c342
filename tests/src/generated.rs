//! Generated registries for benchmarks and scale tests: the reviewed registry's
//! `registry.toml` and `types.toml` plus `n` realistic, lint-clean capabilities.

use capvirt_host::registry::{source, SourceFile};

/// The embedded registry's shared files plus `n` generated stable capabilities, each shaped
/// like a real proposal (two typed parameters, a record result, CLI hint, two driver
/// mappings, a review with two approvals).
pub fn registry_with(n: usize) -> Vec<SourceFile> {
    let mut files: Vec<SourceFile> =
        source::embedded_files().into_iter().filter(|f| !f.path.starts_with("capabilities/")).collect();
    for i in 0..n {
        let id = format!("domain.generated-{i:04}");
        files.push(SourceFile { path: format!("capabilities/{id}.toml"), text: capability(&id, i) });
    }
    files
}

fn capability(id: &str, i: usize) -> String {
    format!(
        r#"id = "{id}"
version = 1
title = "Generated capability {i}"
stage = "stable"
since = "1.0.0"
mutates = false
summary = "Returns read/write request and byte counters for one disk of a running domain (generated {i})."
motivation = "Monitoring and billing of storage I/O; spotting a guest that hammers its disk."
errors = ["not-found", "invalid-state"]

[[params]]
name = "domain"
type = "DomainName"
doc = "The domain to act on."

[[params]]
name = "device"
type = "DeviceName"
required = false
doc = "Disk target (e.g. `vda`); absent sums all disks."

[result]
type = "BlockStats"
doc = "Counters since the domain started."

[cli]
command = "generated-{i:04}"
positional = ["domain", "device"]
about = "Generated command {i}"

[mapping.test]
note = "Deterministic counters per disk."

[mapping.qemu]
note = "QMP `query-blockstats`."

[review]
decision = "accepted"
record = "Generated for benchmarks."

[[review.votes]]
by = "ada"
vote = "approve"
date = "2026-11-25"

[[review.votes]]
by = "brendan"
vote = "approve"
date = "2026-11-25"
"#
    )
}
