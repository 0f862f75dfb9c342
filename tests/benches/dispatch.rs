//! The registry-gated in-process call path, through a real test-driver cdylib:
//! registry lookup → policy → argument validation → driver → audit.
//! (The first three benches run without an audit log, as library users may; the last one
//! measures an audited mutating call.)
//!
//! Run: `cargo bench -p capvirt-tests --bench dispatch`.
//! Peer: `tests/benches/libvirt_info.c` times libvirt 9.0's in-process `virDomainGetInfo` on
//! its test driver; run it in the same session (1.2–1.3 µs against 185 ns here, 2026-11-26).
//! Target: ≥ 5× libvirt's wall time, ≤ 1,500 instructions per checked call (callgrind,
//! `tests/examples/call_loop.rs`).

use std::hint::black_box;

use capvirt_host::{audit::AuditSetting, Host, HostConfig, Value};
use capvirt_tests::test_plugin_dir;
use criterion::{criterion_group, criterion_main, Criterion};

fn dispatch(c: &mut Criterion) {
    let host = Host::new(HostConfig { plugin_dirs: vec![test_plugin_dir().to_path_buf()], ..Default::default() })
        .unwrap_or_else(|e| panic!("host: {e}"));
    let conn = host.connect("test:///default", false).unwrap_or_else(|e| panic!("connect: {e}"));

    c.bench_function("domain.info (registry-gated, in-process test driver)", |b| {
        b.iter(|| {
            let info = conn.call("domain.info", Value::record([("domain", "test")]));
            black_box(info).unwrap_or_else(|e| panic!("{e}"))
        })
    });

    c.bench_function("domain.suspend + domain.resume", |b| {
        b.iter(|| {
            conn.call("domain.suspend", Value::record([("domain", "test")])).unwrap_or_else(|e| panic!("{e}"));
            conn.call("domain.resume", Value::record([("domain", "test")])).unwrap_or_else(|e| panic!("{e}"))
        })
    });

    c.bench_function("refused: unknown capability", |b| {
        b.iter(|| black_box(conn.call("domain.teleport", Value::record([("domain", "test")]))).is_err())
    });

    // The same pair with the audit log on: per call an intent record (fdatasync'ed before the
    // driver runs) and an outcome record, each under flock. Dominated by the sync, so it
    // depends on the file system of the temporary directory.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let audited_host = Host::new(HostConfig {
        plugin_dirs: vec![test_plugin_dir().to_path_buf()],
        audit: AuditSetting::Log { path: Some(dir.path().join("audit.jsonl")), fail_open: false },
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("host: {e}"));
    let audited = audited_host.connect("test:///default", false).unwrap_or_else(|e| panic!("connect: {e}"));
    c.bench_function("domain.suspend + domain.resume, audited to a file", |b| {
        b.iter(|| {
            audited.call("domain.suspend", Value::record([("domain", "test")])).unwrap_or_else(|e| panic!("{e}"));
            audited.call("domain.resume", Value::record([("domain", "test")])).unwrap_or_else(|e| panic!("{e}"))
        })
    });
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
