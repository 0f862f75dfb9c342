//! Replays the fuzz inputs kept in the repository through exactly the code the fuzz targets run
//! (`tests/fuzz/src/lib.rs`, included here: the fuzz workspace itself needs libFuzzer):
//! `tests/fuzz/regressions/TARGET/` holds every input that once made a target panic, hang or
//! allocate without bound (so a fixed bug that comes back fails here), `tests/fuzz/seeds/TARGET/`
//! the starting corpus (so the replay itself is known to reach the parsers).

use std::{
    fs,
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

/// One input of a target may take this long, at most (libFuzzer's `-timeout` in `.ci/fuzz`).
const PER_INPUT: Duration = Duration::from_secs(10);

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(kind).join(target);
    let mut files: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(entries) => entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    files.sort();
    files
}

/// Runs every kept input of `target`; returns how many ran.
fn replay(target: &str) -> usize {
    let run = harness::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, run)| *run)
        .unwrap_or_else(|| panic!("no fuzz target {target}"));
    let seeds = inputs("seeds", target);
    assert!(!seeds.is_empty(), "no seeds for {target}");
    let mut failures = Vec::new();
    let files: Vec<PathBuf> = seeds.into_iter().chain(inputs("regressions", target)).collect();
    for file in &files {
        let data = fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let started = Instant::now();
        if panic::catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failures.push(format!("{}: panicked", file.display()));
        } else if started.elapsed() > PER_INPUT {
            failures.push(format!("{}: took {:?}", file.display(), started.elapsed()));
        }
    }
    assert!(failures.is_empty(), "fuzz target {target}:\n{}", failures.join("\n"));
    files.len()
}

#[test]
fn registry() {
    replay("registry");
}

#[test]
fn domain_spec() {
    replay("domain_spec");
}

#[test]
fn device_spec() {
    replay("device_spec");
}

#[test]
fn validate_args() {
    replay("validate_args");
}

#[test]
fn qmp_reply() {
    replay("qmp_reply");
}

#[test]
fn every_fuzz_target_has_a_replay() {
    let replayed = ["registry", "domain_spec", "device_spec", "validate_args", "qmp_reply"];
    let targets: Vec<&str> = harness::TARGETS.iter().map(|(name, _)| *name).collect();
    assert_eq!(targets, replayed);
    let binaries = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for target in targets {
        assert!(binaries.join(format!("{target}.rs")).is_file(), "no cargo-fuzz binary for {target}");
    }
}
