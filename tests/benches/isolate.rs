//! The cost of `--isolate`: `domain.info` through the whole dispatch path with the test driver
//! in this process, and with it in a child process reached over capvirt's RPC protocol on a
//! socket pair. Target: isolation adds ≤ 25 µs per call.
//!
//! Run: `cargo bench -p capvirt-tests --bench isolate`.

use std::{hint::black_box, time::Duration};

use capvirt_host::{isolate::Isolation, Host, HostConfig, Value};
use capvirt_tests::{artifacts, test_plugin_dir};
use criterion::{criterion_group, criterion_main, Criterion};

fn isolate(c: &mut Criterion) {
    let in_process = Host::new(HostConfig { plugin_dirs: vec![test_plugin_dir().to_path_buf()], ..Default::default() })
        .unwrap_or_else(|e| panic!("host: {e}"));
    let isolation = Isolation { program: artifacts().capvirt.clone(), idle_timeout: Duration::from_secs(60) };
    let isolated = Host::new(HostConfig {
        plugin_dirs: vec![test_plugin_dir().to_path_buf()],
        isolation: Some(isolation),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("host: {e}"));
    for (name, host) in [("in-process", &in_process), ("isolated", &isolated)] {
        let conn = host.connect("test:///default", false).unwrap_or_else(|e| panic!("connect: {e}"));
        c.bench_function(&format!("domain.info, {name}"), |b| {
            b.iter(|| {
                let info = conn.call("domain.info", Value::record([("domain", "test")]));
                black_box(info).unwrap_or_else(|e| panic!("{e}"))
            })
        });
    }
}

criterion_group!(benches, isolate);
criterion_main!(benches);
