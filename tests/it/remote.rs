//! `capvirt daemon` and `DRIVER+unix://` URIs, as an operator runs them: a real daemon
//! process on a private socket, real `capvirt` clients (with no plugins of their own), and the
//! same outputs and exit codes as local calls.

use std::{
    io::Read,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use capvirt_tests::{capvirt, run, Run, Sandbox, TempDir};

/// A `capvirt daemon` child, killed (and reaped) on drop even when the test fails.
struct Daemon {
    child: Child,
    socket: PathBuf,
    /// Its state (audit log) and socket directory.
    dir: TempDir,
}

/// How long a daemon may take to listen.
const START_BOUND: Duration = Duration::from_secs(30);

impl Daemon {
    fn start(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let socket = dir.path().join("run/capvirt-sock");
        Daemon::spawn(dir, socket, extra)
    }

    /// A daemon keeping its state in `dir`, listening on `socket`.
    fn spawn(dir: TempDir, socket: PathBuf, extra: &[&str]) -> Daemon {
        let listen = format!("unix:{}", socket.display());
        let mut cmd = capvirt(capvirt_tests::test_plugin_dir(), dir.path());
        cmd.args(["daemon", "--listen", &listen])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start the daemon: {e}"));
        let mut daemon = Daemon { child, socket, dir };
        daemon.wait_listening();
        daemon
    }

    /// Polls until the socket accepts a connection (bounded), failing with the daemon's
    /// stderr if it exits first.
    fn wait_listening(&mut self) {
        let started = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the daemon exited ({status}): {}", self.stderr());
            }
            assert!(started.elapsed() < START_BOUND, "the daemon did not listen within {START_BOUND:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut text);
        }
        text
    }

    fn uri(&self) -> String {
        format!("test+unix:///default?socket={}", self.socket.display())
    }

    fn audit_records(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}"))).collect()
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client sandbox with an empty plugin directory: the daemon's plugins serve it.
fn client() -> Sandbox {
    Sandbox::with_plugin_dir(capvirt_tests::plugin_dir(&[]))
}

fn remote(sb: &Sandbox, daemon: &Daemon, args: &[&str]) -> Run {
    let uri = daemon.uri();
    let mut all = vec!["-c", uri.as_str()];
    all.extend_from_slice(args);
    sb.capvirt(&all)
}

fn ok(run: &Run) -> &str {
    assert_eq!(run.code, 0, "stderr: {}\nstdout: {}", run.stderr, run.stdout);
    &run.stdout
}

fn failed(run: &Run, code: i32) -> &str {
    assert_eq!(run.code, code, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    assert!(run.stderr.starts_with("error: "), "one error line expected: {:?}", run.stderr);
    assert_eq!(run.stderr.trim_end().lines().count(), 1, "one error line expected: {:?}", run.stderr);
    run.stderr.trim_end()
}

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(ok(run)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.stdout))
}

#[test]
fn main_commands_work_unchanged_against_the_daemon() {
    let daemon = Daemon::start(&[]);
    let sb = client();
    let local = Sandbox::new();
    // Reads render exactly like local ones.
    assert_eq!(ok(&remote(&sb, &daemon, &["list"])), ok(&local.capvirt(&["list"])));
    assert_eq!(ok(&remote(&sb, &daemon, &["list", "--all"])), ok(&local.capvirt(&["list", "--all"])));
    let info = json(&remote(&sb, &daemon, &["-o", "json", "dominfo", "test"]));
    assert_eq!(info["name"], "test");
    assert_eq!(info["state"], "running");
    assert_eq!(info["memory_kib"], 2097152);
    // State lives in the daemon: each change below is seen by the next client process.
    assert_eq!(ok(&remote(&sb, &daemon, &["suspend", "test"])), "Domain 'test' suspended\n");
    let listed = json(&remote(&sb, &daemon, &["-o", "json", "list"]));
    assert_eq!(listed, serde_json::json!([{"name": "test", "state": "paused"}]));
    assert_eq!(ok(&remote(&sb, &daemon, &["resume", "test"])), "Domain 'test' resumed\n");
    ok(&remote(&sb, &daemon, &["destroy", "test"]));
    let all = json(&remote(&sb, &daemon, &["-o", "json", "list", "--all"]));
    assert_eq!(all, serde_json::json!([{"name": "test", "state": "shut off"}]));
    ok(&remote(&sb, &daemon, &["start", "test"]));
    // A file argument is read by the client and sent as a value.
    let spec = sb.write(
        "vm1.toml",
        "name = \"vm1\"\nmemory_mib = 1024\nvcpus = 2\n[[disks]]\npath = \"/images/vm1.qcow2\"\nformat = \"qcow2\"\nbus = \"virtio\"\n",
    );
    assert_eq!(ok(&remote(&sb, &daemon, &["define", &spec])), "Domain 'vm1' defined\n");
    let vm1 = json(&remote(&sb, &daemon, &["-o", "json", "call", "domain.info", "--arg", "domain=vm1"]));
    assert_eq!((vm1["state"].as_str(), vm1["vcpus"].as_u64()), (Some("shut off"), Some(2)));
    assert_eq!(ok(&remote(&sb, &daemon, &["undefine", "vm1"])), "Domain 'vm1' has been undefined\n");
    failed(&remote(&sb, &daemon, &["dominfo", "vm1"]), 5);
}

#[test]
fn refusals_exit_with_the_same_codes_and_words_as_local_ones() {
    let daemon = Daemon::start(&[]);
    let sb = client();
    let local = Sandbox::new();
    let cases: &[(&[&str], i32)] = &[
        (&["dominfo", "nope"], 5),
        (&["resume", "test"], 6),
        (&["call", "domain.teleport"], 3),
        (&["-r", "suspend", "test"], 3),
        (&["call", "domain.info", "--arg", "domain=test", "--arg", "colour=blue"], 2),
    ];
    for (args, code) in cases {
        let far = remote(&sb, &daemon, args);
        let near = local.capvirt(args);
        let (far, near) = (failed(&far, *code), failed(&near, *code));
        // The read-only refusal names the URI the daemon serves; everything else is the same line.
        if args[0] == "-r" {
            assert!(far.contains("`domain.suspend` changes state") && far.contains("read-only"), "{far}");
        } else {
            assert_eq!(far, near, "{args:?}");
        }
    }
}

#[test]
fn the_daemon_audits_remote_calls_and_the_client_needs_no_plugin() {
    let daemon = Daemon::start(&[]);
    let sb = client();
    ok(&remote(&sb, &daemon, &["suspend", "test"]));
    failed(&remote(&sb, &daemon, &["-r", "resume", "test"]), 3);
    let events: Vec<(String, String)> = daemon
        .audit_records()
        .iter()
        .map(|r| (r["event"].as_str().unwrap_or("").to_string(), r["capability"].as_str().unwrap_or("").to_string()))
        .collect();
    for expected in [("intent", "domain.suspend"), ("outcome", "domain.suspend"), ("refused", "domain.resume")] {
        assert!(
            events.iter().any(|(e, c)| (e.as_str(), c.as_str()) == expected),
            "{expected:?} missing from the daemon's audit log: {events:?}"
        );
    }
    // Without the remote transport, the client has no driver for the scheme at all.
    failed(&sb.capvirt(&["list"]), 4);
}

#[test]
fn the_daemon_survives_a_client_killed_mid_call() {
    let mut daemon = Daemon::start(&[]);
    let sb = client();
    let uri = daemon.uri();
    let mut cmd = capvirt(&sb.plugins, sb.state.path());
    cmd.args([
        "-c",
        &uri,
        "bench",
        "call",
        "domain.info",
        "--arg",
        "domain=test",
        "--clients",
        "2",
        "--calls",
        "100000000",
    ]);
    let mut load =
        KillOnDrop(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("spawn: {e}")));
    // Calls are in flight once the daemon has answered a few; then the client dies mid-stream.
    wait_for(Duration::from_secs(30), "the load's calls to reach the daemon", || {
        load.0.try_wait().ok().flatten().is_none() && connections_of(&daemon.socket) >= 2
    });
    std::thread::sleep(Duration::from_millis(100));
    let _ = load.0.kill();
    let _ = load.0.wait();
    assert!(daemon.is_running(), "the daemon died with its client");
    let info = json(&remote(&sb, &daemon, &["-o", "json", "dominfo", "test"]));
    assert_eq!(info["state"], "running");
}

/// Established connections to `socket` (from /proc/net/unix: the daemon's accepted ends
/// carry the socket's path).
fn connections_of(socket: &Path) -> usize {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let path = socket.display().to_string();
    // State 03 is SS_CONNECTED; the listening socket is 01.
    table.lines().filter(|l| l.ends_with(&path) && l.split_whitespace().nth(5) == Some("03")).count()
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(bound: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < bound, "timed out after {bound:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_oversized_argument_is_refused_with_the_limit_named() {
    let daemon = Daemon::start(&["--max-message-size", "4096"]);
    let sb = client();
    let pad = format!("pad={}", "x".repeat(8192));
    let run = remote(&sb, &daemon, &["call", "domain.info", "--arg", "domain=test", "--arg", &pad]);
    let line = failed(&run, 2);
    assert!(line.contains("message too large") && line.contains("4096"), "{line}");
    // The daemon keeps serving.
    ok(&remote(&sb, &daemon, &["dominfo", "test"]));
}

#[test]
fn the_socket_is_private_and_a_second_daemon_is_refused() {
    let mut daemon = Daemon::start(&[]);
    let meta = std::fs::symlink_metadata(&daemon.socket).unwrap_or_else(|e| panic!("stat socket: {e}"));
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let listen = format!("unix:{}", daemon.socket.display());
    let mut second = capvirt(capvirt_tests::test_plugin_dir(), daemon.dir.path());
    second.args(["daemon", "--listen", &listen]);
    let second = run(second);
    assert_eq!(second.code, 1, "{second:?}");
    assert!(second.stderr.contains("another capvirt daemon is serving"), "{}", second.stderr);
    assert!(daemon.is_running());
    // A daemon killed without cleanup leaves a stale socket; the next one replaces it.
    let socket = daemon.socket.clone();
    let _ = daemon.child.kill();
    let _ = daemon.child.wait();
    assert!(socket.exists(), "SIGKILL leaves the socket behind");
    let next = Daemon::spawn(tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")), socket, &[]);
    ok(&remote(&client(), &next, &["list"]));
}

#[test]
fn without_a_daemon_the_error_names_the_socket() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let socket = dir.path().join("absent-sock");
    let sb = client();
    let uri = format!("test+unix:///default?socket={}", socket.display());
    let line = failed(&sb.capvirt(&["-c", &uri, "list"]), 1).to_string();
    assert!(line.contains("cannot reach the capvirt daemon") && line.contains(&socket.display().to_string()), "{line}");
    let line = failed(&sb.capvirt(&["-c", "qemu+tcp://host/system", "list"]), 4).to_string();
    assert!(line.contains("`tcp` transport is not supported"), "{line}");
    // ssh's own words come back when it cannot log in.
    let line = failed(&sb.capvirt(&["-c", "qemu+ssh://no-such-host.invalid/system", "list"]), 1).to_string();
    assert!(line.contains("through ssh: ssh: Could not resolve hostname no-such-host.invalid"), "{line}");
}
