//! `capvirt proposal check` over a generated registry of 1,000 capabilities (~1 MB of TOML):
//! parse, compile exactly as the host does, and run every lint rule.
//! Target: ≤ 20 ms per check (issue 4). Run: `cargo bench -p capvirt-tests --bench registry`.
//! Measured on the project's 2-core machine: 11.2 ms median (idle; 13.5 ms with a parallel
//! build running). Parsing dominates: toml 0.8, as the host's own parser, took 28 ms, hence
//! the lint's faster parser on all cores.

use std::hint::black_box;

use capvirt_maint::lint;
use capvirt_tests::generated;
use criterion::{criterion_group, criterion_main, Criterion};

fn check_1000(c: &mut Criterion) {
    let files = generated::registry_with(1000);
    let report = lint::check(&files);
    assert!(
        report.findings.is_empty(),
        "the generated registry must be lint-clean: {:#?}",
        &report.findings[..report.findings.len().min(5)]
    );
    let mut group = c.benchmark_group("registry");
    group.sample_size(30);
    group.bench_function("proposal_check_1000_capabilities", |b| b.iter(|| lint::check(black_box(&files))));
    group.finish();
}

criterion_group!(benches, check_1000);
criterion_main!(benches);
