//! The host library's one dispatch path, in-process, against the real test-driver cdylib.

use std::sync::{Arc, Mutex};

use capvirt_host::{CallError, CallObserver, ErrorCategory, ErrorKind, Host, HostConfig, Value};
use capvirt_tests::test_plugin_dir;

fn host() -> Host {
    Host::new(HostConfig {
        plugin_dirs: vec![test_plugin_dir().to_path_buf()],
        check_results: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("host: {e}"))
}

fn domain(name: &'static str) -> Value {
    Value::record([("domain", name)])
}

#[test]
fn calls_go_through_and_change_state() {
    let host = host();
    // A private test host so that parallel tests do not share the default one.
    let conn = host.connect("test:///dispatch-state", false).unwrap_or_else(|e| panic!("{e}"));
    let spec = Value::record([("name", Value::from("vm1")), ("memory_mib", Value::Int(128)), ("vcpus", Value::Int(1))]);
    conn.call("domain.define", Value::record([("spec", spec)])).unwrap_or_else(|e| panic!("{e}"));
    conn.call("domain.start", domain("vm1")).unwrap_or_else(|e| panic!("{e}"));
    conn.call("domain.suspend", domain("vm1")).unwrap_or_else(|e| panic!("{e}"));
    let info = conn.call("domain.info", domain("vm1")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.get("state").and_then(Value::as_str), Some("paused"));
    assert_eq!(info.get("memory_kib").and_then(Value::as_u64), Some(128 * 1024));
    let err = conn.call("domain.suspend", domain("vm1")).expect_err("already paused");
    assert_eq!(err.category(), ErrorCategory::InvalidState);
    conn.call("domain.resume", domain("vm1")).unwrap_or_else(|e| panic!("{e}"));
    conn.call("domain.destroy", domain("vm1")).unwrap_or_else(|e| panic!("{e}"));
    conn.call("domain.undefine", domain("vm1")).unwrap_or_else(|e| panic!("{e}"));
    let err = conn.call("domain.info", domain("vm1")).expect_err("gone");
    assert!(matches!(&err, CallError::Driver { error, .. } if error.kind == ErrorKind::NotFound), "{err}");
}

#[test]
fn every_result_matches_its_declared_type() {
    // check_results is on: a result of the wrong shape would fail the call.
    let host = host();
    let conn = host.connect("test:///dispatch-shapes", false).unwrap_or_else(|e| panic!("{e}"));
    let spec = Value::record([
        ("name", Value::from("vm")),
        ("memory_mib", Value::Int(64)),
        ("vcpus", Value::Int(1)),
        ("disks", Value::list([Value::record([("path", "/x.img"), ("format", "raw"), ("bus", "virtio")])])),
        ("graphics", Value::record([("adapter", "vga")])),
    ]);
    conn.call("domain.define", Value::record([("spec", spec)])).unwrap_or_else(|e| panic!("{e}"));
    conn.call("domain.start", domain("vm")).unwrap_or_else(|e| panic!("{e}"));
    for (id, args) in [
        ("host.info", Value::Unit),
        ("domain.list", Value::record([("all", true)])),
        ("domain.info", domain("vm")),
        ("domain.block-stats", domain("vm")),
        ("domain.screenshot", domain("vm")),
    ] {
        let result = conn.call(id, args).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert!(!result.is_unit(), "{id} returned nothing");
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("vm.save").display().to_string();
    conn.call("domain.save", Value::record([("domain", Value::from("vm")), ("path", Value::from(path.clone()))]))
        .unwrap_or_else(|e| panic!("{e}"));
    let name =
        conn.call("domain.restore", Value::record([("path", Value::from(path))])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(name.as_str(), Some("vm"));
}

#[test]
fn refusals_are_typed() {
    let host = host();
    let conn = host.connect("test:///default", false).unwrap_or_else(|e| panic!("{e}"));
    let unknown = conn.call("domain.teleport", domain("test")).expect_err("unknown");
    assert!(matches!(unknown, CallError::Unknown { .. }));
    assert_eq!(unknown.category(), ErrorCategory::Denied);

    let rejected = conn
        .call("domain.monitor-command", Value::record([("domain", "test"), ("command", "info")]))
        .expect_err("rejected");
    assert!(matches!(rejected, CallError::Refused { .. }), "{rejected}");
    assert_eq!(rejected.category(), ErrorCategory::Denied);

    for bad in [
        Value::record([("domain", Value::from("test")), ("extra", Value::Bool(true))]),
        Value::record_empty(),
        Value::record([("domain", Value::Int(7))]),
        Value::record([("domain", Value::from("a/b"))]),
        Value::from("test"),
    ] {
        let err = conn.call("domain.info", bad.clone()).expect_err("invalid");
        assert!(matches!(err, CallError::InvalidArguments { .. }), "{bad}: {err}");
        assert_eq!(err.category(), ErrorCategory::Usage);
    }

    let readonly = host.connect("test:///default", true).unwrap_or_else(|e| panic!("{e}"));
    let err = readonly.call("domain.destroy", domain("test")).expect_err("readonly");
    assert!(matches!(err, CallError::ReadOnly { .. }));
    assert!(readonly.call("domain.info", domain("test")).is_ok());
}

#[test]
fn connections_are_usable_from_many_threads() {
    let host = host();
    let conn = Arc::new(host.connect("test:///dispatch-threads", false).unwrap_or_else(|e| panic!("{e}")));
    let spec = Value::record([("name", Value::from("t")), ("memory_mib", Value::Int(64)), ("vcpus", Value::Int(1))]);
    conn.call("domain.define", Value::record([("spec", spec)])).unwrap_or_else(|e| panic!("{e}"));
    conn.call("domain.start", domain("t")).unwrap_or_else(|e| panic!("{e}"));
    std::thread::scope(|scope| {
        for _ in 0..4 {
            let conn = Arc::clone(&conn);
            scope.spawn(move || {
                for _ in 0..500 {
                    let info = conn.call("domain.info", domain("t")).unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(info.get("name").and_then(Value::as_str), Some("t"));
                }
            });
        }
    });
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(u64, u64)>>);

impl CallObserver for Recorder {
    fn progress(&self, done: u64, total: u64) {
        if let Ok(mut seen) = self.0.lock() {
            seen.push((done, total));
        }
    }
}

#[test]
fn long_operations_report_progress_to_the_caller() {
    let host = host();
    let conn = host.connect("test:///dispatch-migrate-src", false).unwrap_or_else(|e| panic!("{e}"));
    let spec = Value::record([("name", Value::from("m")), ("memory_mib", Value::Int(64)), ("vcpus", Value::Int(1))]);
    conn.call("domain.define", Value::record([("spec", spec)])).unwrap_or_else(|e| panic!("{e}"));
    conn.call("domain.start", domain("m")).unwrap_or_else(|e| panic!("{e}"));
    let recorder = Recorder::default();
    conn.call_observed(
        "domain.migrate",
        Value::record([("domain", "m"), ("dest_uri", "test:///dispatch-migrate-dst")]),
        &recorder,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let seen = recorder.0.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "progress goes forward: {seen:?}");
    assert_eq!(seen.last().map(|(d, t)| d == t), Some(true), "{seen:?}");
    let dest = host.connect("test:///dispatch-migrate-dst", false).unwrap_or_else(|e| panic!("{e}"));
    let moved = dest.call("domain.info", domain("m")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(moved.get("state").and_then(Value::as_str), Some("running"));
    let source = conn.call("domain.info", domain("m")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(source.get("state").and_then(Value::as_str), Some("shut off"));
}

#[test]
fn interfaces_get_a_mac_at_define_that_the_stored_spec_keeps() {
    let host = host();
    let conn = host.connect("test:///dispatch-interfaces", false).unwrap_or_else(|e| panic!("{e}"));
    let forward = Value::record([("host_port", Value::UInt(8080)), ("guest_port", Value::UInt(80))]);
    let nic = Value::record([("kind", Value::from("user")), ("forwards", Value::list([forward]))]);
    let spec = Value::record([
        ("name", Value::from("net")),
        ("memory_mib", Value::UInt(64)),
        ("vcpus", Value::UInt(1)),
        ("interfaces", Value::list([nic])),
    ]);
    conn.call("domain.define", Value::record([("spec", spec)])).unwrap_or_else(|e| panic!("{e}"));
    conn.call("domain.start", domain("net")).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let saved = dir.path().join("net.save");
    let path = Value::from(saved.display().to_string());
    conn.call("domain.save", Value::record([("domain", Value::from("net")), ("path", path)]))
        .unwrap_or_else(|e| panic!("{e}"));
    let text = std::fs::read_to_string(&saved).unwrap_or_else(|e| panic!("{e}"));
    let mac = text.lines().find_map(|l| l.trim().strip_prefix("mac = ")).map(|m| m.trim_matches('"').to_string());
    let mac = mac.unwrap_or_else(|| panic!("no generated mac in the stored spec: {text}"));
    assert!(mac.starts_with("52:54:00:") && mac.len() == 17, "{mac}");
    assert!(text.contains("host_port = 8080"), "{text}");
}
