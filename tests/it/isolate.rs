//! Isolated drivers (`--isolate`): a driver that segfaults, aborts or hangs fails its call with
//! a typed error naming the plugin and the capability; the host keeps serving other plugins
//! and restarts the dead driver at its next call.

use std::time::{Duration, Instant};

use capvirt_host::{isolate::Isolation, CallError, ErrorKind, Host, HostConfig, Value};
use capvirt_tests::{artifacts, plugin_dir, Sandbox, TempDir};

/// The fixture plugin (as `fixture://`) and the test driver, side by side.
fn plugins() -> TempDir {
    plugin_dir(&[
        ("libcapvirt_driver_fixture.so", &artifacts().fixture_plugin),
        ("libcapvirt_driver_test.so", &artifacts().test_plugin),
    ])
}

fn isolated_host(dir: &TempDir, idle_timeout: Duration) -> Host {
    let isolation = Isolation { program: artifacts().capvirt.clone(), idle_timeout };
    Host::new(HostConfig {
        plugin_dirs: vec![dir.path().to_path_buf()],
        isolation: Some(isolation),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("host: {e}"))
}

fn domain(name: &'static str) -> Value {
    Value::record([("domain", name)])
}

/// The driver error of a failed call, with its message.
fn driver_error(outcome: Result<Value, CallError>) -> (ErrorKind, String) {
    match outcome {
        Err(CallError::Driver { error, .. }) => (error.kind, error.message.to_string()),
        other => panic!("expected a driver error, got {other:?}"),
    }
}

/// The fixture's `domain.info` of `victim` kills or hangs its child; the error names the plugin,
/// the capability and the cause; a healthy plugin's call succeeds meanwhile; the fixture serves
/// again at its next call (a new child).
fn survives(victim: &'static str, expected_kind: ErrorKind, cause: &str) {
    let dir = plugins();
    let host = isolated_host(&dir, Duration::from_secs(2));
    let fixture = host.connect("fixture:///x", false).unwrap_or_else(|e| panic!("connect: {e}"));
    let healthy = host.connect("test:///default", false).unwrap_or_else(|e| panic!("connect: {e}"));
    assert!(fixture.call("domain.list", Value::record([("all", true)])).is_ok());

    let started = Instant::now();
    let (kind, message) = driver_error(fixture.call("domain.info", domain(victim)));
    assert_eq!(kind, expected_kind, "{message}");
    for needle in ["driver plugin `fixture`", "libcapvirt_driver_fixture.so", "`domain.info`", cause] {
        assert!(message.contains(needle), "{needle:?} missing from: {message}");
    }
    // Bounded: a crash is seen at once, a hang after the idle bound (2 s) plus the kill.
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());

    let info = healthy.call("domain.info", domain("test")).unwrap_or_else(|e| panic!("healthy plugin: {e}"));
    assert_eq!(info.get("state").and_then(Value::as_str), Some("running"));
    // Restarted: the same connection works again.
    let listed = fixture.call("domain.list", Value::record([("all", true)]));
    assert!(listed.is_ok(), "fixture not restarted: {listed:?}");
}

#[test]
fn a_segfaulting_driver_fails_its_call_only() {
    survives("segv", ErrorKind::DriverFailure, "killed by signal 11 (SIGSEGV)");
}

#[test]
fn an_aborting_driver_fails_its_call_only() {
    survives("abort", ErrorKind::DriverFailure, "killed by signal 6 (SIGABRT)");
}

#[test]
fn a_hanging_driver_is_stopped_after_its_idle_bound() {
    survives("hang", ErrorKind::Timeout, "did not answer `domain.info` within 2 s");
}

#[test]
fn isolated_calls_answer_like_in_process_ones() {
    let dir = plugins();
    let host = isolated_host(&dir, Isolation::DEFAULT_IDLE_TIMEOUT);
    let conn = host.connect("test:///default", false).unwrap_or_else(|e| panic!("connect: {e}"));
    // State lives in the child across calls; driver errors keep their kind.
    conn.call("domain.suspend", domain("test")).unwrap_or_else(|e| panic!("{e}"));
    let info = conn.call("domain.info", domain("test")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.get("state").and_then(Value::as_str), Some("paused"));
    let (kind, message) = driver_error(conn.call("domain.suspend", domain("test")));
    assert_eq!(kind, ErrorKind::InvalidState, "{message}");
    let (kind, _) = driver_error(conn.call("domain.info", domain("nope")));
    assert_eq!(kind, ErrorKind::NotFound);
    // A URI the driver refuses is refused at connect, as in process.
    let refused = host.connect("test:///x?unknown=1", false);
    let in_process = Host::new(HostConfig { plugin_dirs: vec![dir.path().to_path_buf()], ..Default::default() })
        .unwrap_or_else(|e| panic!("{e}"))
        .connect("test:///x?unknown=1", false);
    assert_eq!(
        refused.is_err(),
        in_process.is_err(),
        "isolated {:?} vs in-process {:?}",
        refused.err(),
        in_process.err()
    );
}

#[test]
fn the_cli_isolates_with_a_flag_and_names_the_crashed_plugin() {
    let sb = Sandbox::with_plugin_dir(plugins());
    let crashed = sb.capvirt(&["--isolate", "-c", "fixture:///x", "dominfo", "segv"]);
    assert_eq!(crashed.code, 1, "{}", crashed.stderr);
    assert!(
        crashed.stderr.contains("driver plugin `fixture`") && crashed.stderr.contains("SIGSEGV"),
        "{}",
        crashed.stderr
    );
    assert_eq!(crashed.stderr.trim_end().lines().count(), 1, "{}", crashed.stderr);
    let hung = sb.capvirt(&["--isolate", "--isolate-timeout", "1", "-c", "fixture:///x", "dominfo", "hang"]);
    assert_eq!(hung.code, 1, "{}", hung.stderr);
    assert!(hung.stderr.contains("within 1 s"), "{}", hung.stderr);
    let listed = sb.capvirt(&["--isolate", "-o", "json", "list"]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert!(listed.stdout.contains("\"test\""), "{}", listed.stdout);
}
