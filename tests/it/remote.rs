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

use capvirt_tests::{capvirt, failed, json, ok, run, set_mode, Run, Sandbox, TempDir};

/// A `capvirt daemon` child, killed (and reaped) on drop even when the test fails.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) socket: PathBuf,
    /// Its state (audit log) and socket directory.
    pub(crate) dir: TempDir,
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
        Daemon::spawn_env(dir, socket, extra, &[])
    }

    /// The same with extra environment variables (e.g. `CAPVIRT_SYSCONFDIR`).
    fn spawn_env(dir: TempDir, socket: PathBuf, extra: &[&str], env: &[(&str, &Path)]) -> Daemon {
        Daemon::spawn_with(capvirt_tests::test_plugin_dir(), dir, socket, extra, env)
    }

    /// A daemon serving the plugins in `plugins`.
    pub(crate) fn spawn_with(
        plugins: &Path,
        dir: TempDir,
        socket: PathBuf,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Daemon {
        let listen = format!("unix:{}", socket.display());
        let mut cmd = capvirt(plugins, dir.path());
        cmd.envs(env.iter().copied());
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

    pub(crate) fn stderr(&mut self) -> String {
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

    pub(crate) fn is_running(&mut self) -> bool {
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

#[test]
fn main_commands_work_unchanged_against_the_daemon() {
    let daemon = Daemon::start(&[]);
    let sb = client();
    let local = Sandbox::new();
    // Reads render exactly like local ones.
    assert_eq!(ok(&remote(&sb, &daemon, &["list"])), ok(&local.capvirt(&["list"])));
    // `capabilities` describes the daemon's driver (the client loads no plugin): the same
    // table as in process, but for the URI line.
    let mut described = json(&remote(&sb, &daemon, &["-o", "json", "capabilities"]));
    let mut in_process = json(&local.capvirt(&["-o", "json", "capabilities"]));
    assert_eq!(described["driver"], "test");
    for doc in [&mut described, &mut in_process] {
        doc["uri"] = serde_json::Value::Null;
    }
    assert_eq!(described, in_process);
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

const NOBODY: u32 = 65534;
/// A group no account has here: only the test's client is in it.
const SOCKET_GROUP: u32 = 64998;

/// What a client running as nobody needs: a copy of `capvirt` it may run, a root-owned system
/// config directory and a home of its own, under a directory it may traverse.
struct UnprivilegedSetup {
    dir: TempDir,
}

impl UnprivilegedSetup {
    fn new(capvirt_toml: &str) -> UnprivilegedSetup {
        assert!(rustix::process::geteuid().is_root(), "the non-root peer tests start clients as nobody and need root");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        set_mode(dir.path(), 0o755);
        for sub in ["etc", "plugins", "home", "state"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap_or_else(|e| panic!("mkdir {sub}: {e}"));
            set_mode(&dir.path().join(sub), 0o755);
        }
        std::os::unix::fs::chown(dir.path().join("home"), Some(NOBODY), Some(NOBODY))
            .unwrap_or_else(|e| panic!("chown home: {e}"));
        let exe = dir.path().join("capvirt");
        std::fs::copy(&capvirt_tests::artifacts().capvirt, &exe).unwrap_or_else(|e| panic!("copy capvirt: {e}"));
        set_mode(&exe, 0o755);
        let config = dir.path().join("etc/capvirt.toml");
        std::fs::write(&config, capvirt_toml).unwrap_or_else(|e| panic!("write capvirt.toml: {e}"));
        set_mode(&config, 0o644);
        UnprivilegedSetup { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A daemon (as root) on `run/capvirt-sock`, with this setup's system config.
    fn daemon(&self, extra: &[&str]) -> Daemon {
        let state = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let etc = self.path("etc");
        Daemon::spawn_env(state, self.path("run/capvirt-sock"), extra, &[("CAPVIRT_SYSCONFDIR", &etc)])
    }

    /// `capvirt -c URI ARGS…` as uid nobody with primary group `gid` (std drops every
    /// supplementary group when it changes the uid).
    fn client(&self, daemon: &Daemon, gid: u32, args: &[&str]) -> Run {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(self.path("capvirt"));
        cmd.uid(NOBODY)
            .gid(gid)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.path("home"))
            .env("XDG_STATE_HOME", self.path("home"))
            .env("CAPVIRT_PLUGIN_DIR", self.path("plugins"))
            .env("CAPVIRT_SYSCONFDIR", self.path("etc"))
            .args(["-c", &daemon.uri()])
            .args(args);
        run(cmd)
    }
}

#[test]
fn a_non_root_peer_in_the_socket_group_connects_and_the_access_policy_judges_its_uid() {
    let setup =
        UnprivilegedSetup::new(&format!("[daemon]\nsocket_group = \"{SOCKET_GROUP}\"\nsocket_mode = \"0660\"\n"));
    let daemon = setup.daemon(&[]);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&daemon.socket).unwrap_or_else(|e| panic!("stat socket: {e}"));
    assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o660, SOCKET_GROUP));
    // The daemon made the socket's directory searchable, or no one but root could reach it.
    let run_dir = std::fs::metadata(setup.path("run")).unwrap_or_else(|e| panic!("stat run: {e}"));
    assert_eq!(run_dir.mode() & 0o777, 0o755);

    // Outside the group, the kernel refuses the connection.
    let outsider = setup.client(&daemon, NOBODY, &["list"]);
    let line = failed(&outsider, 1);
    assert!(line.contains("cannot reach the capvirt daemon") && line.contains("ermission denied"), "{line}");

    // In the group: nobody reads, under the built-in policy (others read-only)…
    let list = setup.client(&daemon, SOCKET_GROUP, &["list"]);
    assert!(ok(&list).contains("test") && list.stdout.contains("running"), "{}", list.stdout);
    let info = setup.client(&daemon, SOCKET_GROUP, &["-o", "json", "dominfo", "test"]);
    assert_eq!(json(&info)["state"], "running");
    // …but may not change state: the daemon judged uid 65534, not its own root.
    let denied = setup.client(&daemon, SOCKET_GROUP, &["suspend", "test"]);
    let line = failed(&denied, 3);
    assert!(line.contains("user nobody (uid 65534)") && line.contains("`domain.suspend`"), "{line}");
    let records = daemon.audit_records();
    let refused: Vec<_> = records.iter().filter(|r| r["event"] == "refused").collect();
    assert_eq!(refused.len(), 1, "{records:?}");
    assert_eq!(refused[0]["capability"], "domain.suspend");
    assert_eq!((refused[0]["uid"].as_u64(), refused[0]["gid"].as_u64()), (Some(65534), Some(u64::from(SOCKET_GROUP))));
    assert_eq!(refused[0]["user"], "nobody");
    // Root's client, on the same socket, still suspends.
    ok(&remote(&client(), &daemon, &["suspend", "test"]));
}

#[test]
fn socket_options_override_the_config_and_bad_ones_are_usage_errors() {
    let setup = UnprivilegedSetup::new("[daemon]\nsocket_mode = \"0660\"\n");
    let daemon = setup.daemon(&["--socket-mode", "0666", "--socket-group", &SOCKET_GROUP.to_string()]);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&daemon.socket).unwrap_or_else(|e| panic!("stat socket: {e}"));
    assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o666, SOCKET_GROUP));
    // Mode 0666: any user may connect, in the group or not; the policy still decides.
    let list = setup.client(&daemon, NOBODY, &["list"]);
    assert!(ok(&list).contains("running"), "{}", list.stdout);
    drop(daemon);

    let etc = setup.path("etc");
    let attempt = |args: &[&str]| {
        let state = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let listen = format!("unix:{}", setup.path("bad/sock").display());
        let mut cmd = capvirt(capvirt_tests::test_plugin_dir(), state.path());
        cmd.env("CAPVIRT_SYSCONFDIR", &etc).args(["daemon", "--listen", &listen]).args(args);
        run(cmd)
    };
    for (args, words) in [
        (&["--socket-mode", "4660"][..], "beyond 0777"),
        (&["--socket-mode", "0066"], "0600"),
        (&["--socket-mode", "rw-rw----"], "not an octal mode"),
        (&["--socket-group", "no-such-group-capvirt"], "no group named"),
    ] {
        let done = attempt(args);
        let line = failed(&done, 2);
        assert!(line.contains(words), "{args:?}: {line}");
    }
    // A bad [daemon] section names the file.
    std::fs::write(etc.join("capvirt.toml"), "[daemon]\nsocket_mode = \"0060\"\n").unwrap_or_else(|e| panic!("{e}"));
    let done = attempt(&[]);
    let line = failed(&done, 1);
    assert!(line.contains("capvirt.toml") && line.contains("[daemon]"), "{line}");
}

/// `capvirtd` (what `capvirt.service` runs) under `systemd-socket-activate -l SOCKET` (what
/// systemd does with `capvirt.socket`): the daemon starts at the first connection, serves the socket it was
/// passed (LISTEN_FDS, fd 3), says READY=1 on NOTIFY_SOCKET, and leaves the socket in place.
struct Activated {
    dir: TempDir,
    socket: PathBuf,
}

impl Activated {
    fn new() -> Activated {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let socket = dir.path().join("capvirt-sock");
        Activated { dir, socket }
    }

    /// `systemd-socket-activate` listening, about to run `capvirtd ARGS…` (its pid becomes
    /// the daemon's: it execs in place).
    fn spawn(&self, args: &[&str]) -> KillOnDrop {
        let mut cmd = std::process::Command::new("systemd-socket-activate");
        cmd.arg("-l").arg(&self.socket);
        // It passes its children only what -E names.
        let env = [
            ("CAPVIRT_PLUGIN_DIR", capvirt_tests::test_plugin_dir().to_path_buf()),
            ("CAPVIRT_AUDIT_LOG", self.dir.path().join("audit.jsonl")),
            ("XDG_CACHE_HOME", self.dir.path().to_path_buf()),
            ("NOTIFY_SOCKET", self.dir.path().join("notify")),
        ];
        for (name, value) in env {
            cmd.arg("-E").arg(format!("{name}={}", value.display()));
        }
        cmd.arg(&capvirt_tests::artifacts().capvirtd).args(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run systemd-socket-activate (package systemd): {e}"));
        let child = KillOnDrop(child);
        wait_for(START_BOUND, "systemd-socket-activate to listen", || self.socket.exists());
        child
    }

    fn uri(&self) -> String {
        format!("test+unix:///default?socket={}", self.socket.display())
    }
}

#[test]
fn the_daemon_serves_a_socket_passed_by_systemd_and_notifies_readiness() {
    let activated = Activated::new();
    let notify = std::os::unix::net::UnixDatagram::bind(activated.dir.path().join("notify"))
        .unwrap_or_else(|e| panic!("bind the notify socket: {e}"));
    notify.set_read_timeout(Some(START_BOUND)).unwrap_or_else(|e| panic!("{e}"));
    let mut daemon = activated.spawn(&[]);
    // The first connection starts the daemon, which answers it.
    let sb = client();
    let listed = sb.capvirt(&["-c", &activated.uri(), "-o", "json", "list"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(ok(&listed)).ok(),
        Some(serde_json::json!([{"name": "test", "state": "running"}]))
    );
    let mut message = [0u8; 256];
    let len = notify.recv(&mut message).unwrap_or_else(|e| panic!("no readiness notification: {e}"));
    assert_eq!(String::from_utf8_lossy(&message[..len]).trim_end(), "READY=1");
    ok(&sb.capvirt(&["-c", &activated.uri(), "suspend", "test"]));
    let audit = std::fs::read_to_string(activated.dir.path().join("audit.jsonl")).unwrap_or_default();
    assert!(audit.contains("domain.suspend"), "{audit}");
    // SIGTERM: a clean exit that leaves systemd's socket where it is (systemd owns it).
    capvirt_tests::qemu::signal(daemon.0.id() as i32, rustix::process::Signal::TERM);
    let status = wait_exit(&mut daemon.0);
    assert_eq!(status, Some(0));
    assert!(activated.socket.exists(), "the daemon removed systemd's socket");
}

#[test]
fn options_that_say_where_to_listen_are_refused_with_a_passed_socket() {
    let activated = Activated::new();
    let mut daemon = activated.spawn(&["--listen", "unix:/tmp/elsewhere", "--socket-mode", "0660"]);
    let _trigger = std::os::unix::net::UnixStream::connect(&activated.socket);
    assert_eq!(wait_exit(&mut daemon.0), Some(2));
    let mut stderr = String::new();
    if let Some(mut err) = daemon.0.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    assert!(
        stderr.contains("--listen, --socket-mode cannot be used with a socket passed by systemd")
            && stderr.contains("SocketMode="),
        "{stderr}"
    );
}

/// The exit code of `child`, waited for within [`START_BOUND`].
fn wait_exit(child: &mut Child) -> Option<i32> {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        assert!(started.elapsed() < START_BOUND, "the daemon did not exit within {START_BOUND:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_systemd_units_verify() {
    let dist = capvirt_tests::workspace_root().join("host/dist");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let socket = std::fs::read_to_string(dist.join("capvirt.socket")).unwrap_or_else(|e| panic!("capvirt.socket: {e}"));
    let service =
        std::fs::read_to_string(dist.join("capvirt.service")).unwrap_or_else(|e| panic!("capvirt.service: {e}"));
    assert!(socket.contains("\nListenStream=/run/capvirt/capvirt-sock\n") && socket.contains("\nSocketMode=0600\n"));
    // Restarting the daemon must not take its QEMUs with it (systemd's default kills the cgroup).
    assert!(service.contains("\nKillMode=process\n") && service.contains("\nType=notify\n"));
    // systemd-analyze wants ExecStart's program to exist: the one just built stands in.
    let exe = capvirt_tests::artifacts().capvirtd.display().to_string();
    std::fs::write(dir.path().join("capvirt.socket"), socket).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("capvirt.service"), service.replace("/usr/bin/capvirtd", &exe))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut verify = std::process::Command::new("systemd-analyze");
    verify.arg("verify").arg(dir.path().join("capvirt.socket")).arg(dir.path().join("capvirt.service"));
    let out = capvirt_tests::output_within(verify, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys are only warnings for systemd-analyze: any output fails the test.
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}
