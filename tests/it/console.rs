//! `domain.console-write` / `capvirt console-write DOMAIN TEXT`: a line typed on the serial
//! console reaches the guest, on real QEMU with the test guest and on the test driver.

use std::time::Duration;

use capvirt_host::{Host, HostConfig, Value};
use capvirt_tests::{
    qemu::{guest_spec_toml, wait_until, Sandbox, GUEST_READY},
    test_plugin_dir,
};

/// Bound on the test guest booting under TCG to its READY line.
const GUEST_BOOT: Duration = Duration::from_secs(180);
/// Bound on the guest's echo of a typed line showing in the console log.
const ECHO_WAIT: Duration = Duration::from_secs(30);

const ENABLE: [&str; 4] = ["--enable", "domain.console-read", "--enable", "domain.console-write"];

fn console(sandbox: &Sandbox, uri: &str) -> String {
    let mut args = ENABLE.to_vec();
    args.extend(["console-log", "guest", "-"]);
    sandbox.ok_uri(uri, &args)
}

fn write(sandbox: &Sandbox, uri: &str, domain: &str, text: &str) -> std::process::Output {
    let mut args = ENABLE.to_vec();
    args.extend(["console-write", domain, text]);
    sandbox.run_uri(uri, &args)
}

#[test]
fn a_line_typed_on_the_qemu_console_reaches_the_guest() {
    let sandbox = Sandbox::new();
    let uri = sandbox.uri("c", "&accel=tcg");
    let disk = sandbox.blank_image("data", "raw");
    let spec = sandbox.write("guest.toml", &guest_spec_toml("guest", &disk, capvirt_tests::qemu::free_local_port()));
    sandbox.ok_uri(&uri, &["define", spec.to_str().unwrap_or_default()]);
    // Not running: refused as invalid state (exit code 6).
    let out = write(&sandbox, &uri, "guest", "too early");
    assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stderr));

    sandbox.ok_uri(&uri, &["start", "guest"]);
    let booted = wait_until(GUEST_BOOT, || console(&sandbox, &uri).contains(GUEST_READY));
    assert!(booted, "no {GUEST_READY} within {GUEST_BOOT:?}: {}", console(&sandbox, &uri));
    let before = console(&sandbox, &uri).len();

    let line = "capvirt-typed-line 42\there";
    let out = write(&sandbox, &uri, "guest", line);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // The guest's terminal echoes what its serial port received, ending the line with CR LF
    // (its `onlcr`): proof that the guest got it, not just that the host kept it (text sent
    // with QMP `ringbuf-write` came back from the ring as sent, with a bare LF).
    let echoed = format!("{line}\r\n");
    let mut text = String::new();
    let seen = wait_until(ECHO_WAIT, || {
        text = console(&sandbox, &uri);
        text.get(before..).is_some_and(|new| new.contains(&echoed))
    });
    assert!(seen, "the guest did not echo {echoed:?}; console after READY: {:?}", text.get(before..));

    // Control characters are refused before anything is sent (exit code 2).
    let out = write(&sandbox, &uri, "guest", "rm -rf /\u{3}");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("U+0003"));
    let out = write(&sandbox, &uri, "nosuch", "x");
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    sandbox.ok_uri(&uri, &["destroy", "guest"]);
}

#[test]
fn the_test_driver_echoes_a_typed_line_like_a_terminal() {
    let mut config = HostConfig { plugin_dirs: vec![test_plugin_dir().to_path_buf()], ..Default::default() };
    config.policy.enabled.extend(["domain.console-read".to_string(), "domain.console-write".to_string()]);
    let host = Host::new(config).unwrap_or_else(|e| panic!("host: {e}"));
    let conn = host.connect("test:///console-write", false).unwrap_or_else(|e| panic!("connect: {e}"));
    let spec = Value::record([(
        "spec",
        Value::record([("name", Value::string("vm")), ("memory_mib", Value::UInt(64)), ("vcpus", Value::UInt(1))]),
    )]);
    conn.call("domain.define", spec).unwrap_or_else(|e| panic!("define: {e}"));
    let line = |text: &str| Value::record([("domain", Value::string("vm")), ("text", Value::string(text))]);
    let refused = conn.call("domain.console-write", line("early")).err().unwrap_or_else(|| panic!("accepted"));
    assert_eq!(refused.category(), capvirt_host::ErrorCategory::InvalidState, "{refused}");
    conn.call("domain.start", Value::record([("domain", Value::string("vm"))])).unwrap_or_else(|e| panic!("{e}"));
    conn.call("domain.console-write", line("hello\tthere")).unwrap_or_else(|e| panic!("console-write: {e}"));
    let read = conn
        .call("domain.console-read", Value::record([("domain", Value::string("vm"))]))
        .unwrap_or_else(|e| panic!("console-read: {e}"));
    let data = read.get("data").and_then(Value::as_bytes).unwrap_or_default();
    assert!(String::from_utf8_lossy(data).ends_with("CAPVIRT-GUEST-READY\r\nhello\tthere\r\n"), "{read}");
    let refused = conn.call("domain.console-write", line("a\u{1b}[2J")).err().unwrap_or_else(|| panic!("accepted"));
    assert_eq!(refused.category(), capvirt_host::ErrorCategory::Usage, "{refused}");
}
