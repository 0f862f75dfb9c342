//! Runs N registry-gated `domain.info` calls (or suspend+resume pairs) through the test driver.
//! Used with callgrind to count instructions per call, which unlike wall time does not depend
//! on what else the machine is doing:
//!
//! ```sh
//! cargo build --release -p capvirt-tests --example call_loop
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.1k  target/release/examples/call_loop info 1000
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.11k target/release/examples/call_loop info 11000
//! # instructions per call = (total(11k) - total(1k)) / 10000
//! ```
//!
//! A third argument `unchecked` turns off checking results against their declared types
//! (`checked` keeps it on); an optional fourth argument is an audit log path: the host then
//! audits as the CLI does (`domain.info` is not audited; each suspend and resume writes a
//! synced intent and an outcome).

use std::hint::black_box;

use capvirt_host::{audit::AuditSetting, Host, HostConfig, Value};

fn main() {
    let mut args = std::env::args().skip(1);
    let what = args.next().unwrap_or_else(|| "info".into());
    let count: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    // `unchecked`: without checking results against their declared types (the default checks).
    let check_results = args.next().as_deref() != Some("unchecked");
    let plugin_dir = capvirt_tests::test_plugin_dir();
    let audit = match args.next() {
        Some(path) => AuditSetting::Log { path: Some(path.into()), fail_open: false },
        None => AuditSetting::Off,
    };
    let host = Host::new(HostConfig {
        plugin_dirs: vec![plugin_dir.to_path_buf()],
        check_results,
        audit,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("host: {e}"));
    let conn = host.connect("test:///default", false).unwrap_or_else(|e| panic!("connect: {e}"));
    for _ in 0..count {
        match what.as_str() {
            "info" => {
                black_box(
                    conn.call("domain.info", Value::record([("domain", "test")])).unwrap_or_else(|e| panic!("{e}")),
                );
            }
            _ => {
                conn.call("domain.suspend", Value::record([("domain", "test")])).unwrap_or_else(|e| panic!("{e}"));
                conn.call("domain.resume", Value::record([("domain", "test")])).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}
