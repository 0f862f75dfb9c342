//! `domain.console-write` / `capvirt console-write DOMAIN TEXT`: a line typed on the serial
//! console reaches the guest, on real QEMU with the test guest and on the test driver.

use std::{
    io::{Read, Write},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

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

    // `capvirt console` with piped input: a line goes in, the guest's echo comes out, Ctrl-]
    // leaves with exit code 0.
    let mut cmd = sandbox.capvirt_uri(&uri);
    cmd.args(ENABLE).args(["console", "guest"]);
    let mut attached = Attached::spawn(cmd);
    attached.send(b"piped-line 7\n");
    let out = attached.wait_for("piped-line 7\r\n", ECHO_WAIT);
    assert!(!out.contains(GUEST_READY), "console showed output from before it attached: {out:?}");
    attached.send(&[0x1d]);
    assert_eq!(attached.exit_code(), Some(0));
    sandbox.ok_uri(&uri, &["destroy", "guest"]);
}

/// A `capvirt console` child with piped standard input and output, killed when dropped.
struct Attached {
    child: Child,
    output: mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl Attached {
    fn spawn(mut cmd: Command) -> Attached {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn: {e}"));
        let mut stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let (sender, output) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || sender.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Attached { child, output, seen: Vec::new() }
    }

    fn send(&mut self, bytes: &[u8]) {
        let stdin = self.child.stdin.as_mut().unwrap_or_else(|| panic!("no stdin"));
        stdin.write_all(bytes).and_then(|()| stdin.flush()).unwrap_or_else(|e| panic!("write: {e}"));
    }

    /// Waits until the output holds `text`; returns all output so far.
    fn wait_for(&mut self, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let shown = String::from_utf8_lossy(&self.seen).into_owned();
            if shown.contains(text) {
                return shown;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.seen.extend(chunk),
                Err(_) => panic!("no {text:?} from capvirt console within {within:?}; output: {shown:?}"),
            }
        }
    }

    /// All output until the child closes it (bounded).
    fn rest(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(chunk) = self.output.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            self.seen.extend(chunk);
        }
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap_or_else(|e| panic!("wait: {e}")) {
                return status.code();
            }
            assert!(Instant::now() < deadline, "capvirt console did not leave on Ctrl-]");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_interactive_console_restores_the_terminal_and_leaves_on_ctrl_bracket() {
    // A real terminal: `script` gives the command a pseudo-terminal; the terminal's settings
    // are printed before and after, and must be equal.
    let sandbox = capvirt_tests::Sandbox::new();
    let capvirt = capvirt_tests::artifacts().capvirt.display().to_string();
    let inner = format!(
        "stty -g; {capvirt} --enable domain.console-read --enable domain.console-write console test; echo exit=$?; stty -g"
    );
    let template = capvirt_tests::capvirt(&sandbox.plugins, sandbox.state.path());
    let mut script = Command::new("script");
    script.args(["-qec", &format!("sh -c '{inner}'"), "/dev/null"]);
    for (key, value) in template.get_envs() {
        match value {
            Some(value) => script.env(key, value),
            None => script.env_remove(key),
        };
    }
    let mut attached = Attached::spawn(script);
    attached.wait_for("escape character is ^]", ECHO_WAIT);
    // Typed text is echoed locally, then replaced by the guest's echo on Enter; Ctrl-C is no
    // console input (a bell), Ctrl-] leaves.
    attached.send(b"typed here\x03\r");
    attached.wait_for("typed here\r\n", ECHO_WAIT);
    attached.send(&[0x1d]);
    attached.wait_for("exit=0", ECHO_WAIT);
    let text = attached.rest();
    assert!(text.contains('\u{7}'), "no bell for Ctrl-C: {text:?}");
    let settings: Vec<&str> = text.lines().map(str::trim).filter(|l| l.matches(':').count() > 10).collect();
    assert_eq!(settings.len(), 2, "expected the settings before and after: {text:?}");
    assert_eq!(settings[0], settings[1], "the terminal was not restored: {text:?}");
    assert_eq!(attached.exit_code(), Some(0), "{text:?}");
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
