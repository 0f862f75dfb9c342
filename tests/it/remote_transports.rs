//! The TLS and SSH transports as an operator runs them: a real `capvirt daemon` with a
//! `tcp:` listener and certificates made here (a CA, the daemon's, clients'), a real `sshd`
//! on a private port reaching a daemon's Unix socket through `capvirt proxy`, and real
//! `capvirt` clients with no plugins of their own.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use capvirt_tests::{artifacts, capvirt, failed, json, ok, pki::Ca, run, set_mode, Run, Sandbox, TempDir};

/// How long a daemon or sshd may take to listen.
const START_BOUND: Duration = Duration::from_secs(30);

fn tempdir() -> TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A child process killed (and reaped) on drop even when the test fails.
struct Guarded(Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with stderr piped; its lines arrive on the returned channel.
fn spawn_with_stderr(mut cmd: Command) -> (Guarded, mpsc::Receiver<String>) {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let (tx, rx) = mpsc::channel();
    if let Some(stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    (Guarded(child), rx)
}

/// A daemon with a `tcp:` listener on an ephemeral port, its own system config directory
/// (for `access.toml`), audit log and PKI.
struct TlsDaemon {
    _child: Guarded,
    port: u16,
    dir: TempDir,
    ca: Ca,
}

impl TlsDaemon {
    fn start(access: Option<&str>) -> TlsDaemon {
        let dir = tempdir();
        set_mode(dir.path(), 0o755);
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap_or_else(|e| panic!("mkdir: {e}"));
        set_mode(&etc, 0o755);
        if let Some(text) = access {
            write(&etc.join("access.toml"), text);
            set_mode(&etc.join("access.toml"), 0o644);
        }
        let ca = Ca::new("capvirt test CA");
        let pki = etc.join("pki");
        ca.issue(&pki, "server", "daemon", &["127.0.0.1", "localhost"], &ca);
        let mut cmd = capvirt(capvirt_tests::test_plugin_dir(), dir.path());
        cmd.env("CAPVIRT_SYSCONFDIR", &etc).args(["daemon", "--listen", "tcp:127.0.0.1:0"]);
        let (child, lines) = spawn_with_stderr(cmd);
        let port = wait_for_port(&lines, &child);
        TlsDaemon { _child: child, port, dir, ca }
    }

    /// A client certificate directory: `cn`'s certificate signed by `by` (default: the
    /// daemon's CA), trusting the daemon's CA.
    fn client_pki(&self, name: &str, cn: &str, by: Option<&Ca>) -> PathBuf {
        let dir = self.dir.path().join("clients").join(name);
        by.unwrap_or(&self.ca).issue(&dir, "client", cn, &[], &self.ca);
        dir
    }

    fn uri(&self, pki: &Path) -> String {
        format!("test+tls://127.0.0.1:{}/default?pkipath={}", self.port, pki.display())
    }

    fn audit_records(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}"))).collect()
    }
}

/// Reads the daemon's stderr until it names its TCP port (bounded).
fn wait_for_port(lines: &mpsc::Receiver<String>, child: &Guarded) -> u16 {
    let started = Instant::now();
    let mut seen = Vec::new();
    while let Some(left) = START_BOUND.checked_sub(started.elapsed()) {
        match lines.recv_timeout(left) {
            Ok(line) => {
                let port = line
                    .split_once(" on tcp:127.0.0.1:")
                    .and_then(|(_, rest)| rest.split(' ').next())
                    .and_then(|p| p.parse::<u16>().ok());
                if let Some(port) = port {
                    return port;
                }
                seen.push(line);
            }
            Err(_) => break,
        }
    }
    panic!("the daemon (pid {}) named no TCP port within {START_BOUND:?}; it said: {seen:?}", child.0.id());
}

/// A client sandbox with an empty plugin directory: the daemon's plugins serve it.
fn client() -> Sandbox {
    Sandbox::with_plugin_dir(capvirt_tests::plugin_dir(&[]))
}

fn remote(sb: &Sandbox, uri: &str, args: &[&str]) -> Run {
    let mut all = vec!["-c", uri];
    all.extend_from_slice(args);
    sb.capvirt(&all)
}

/// The administrator's certificate maps to root; the operator's to nobody.
const ACCESS: &str = "default = [\"readonly\"]\n[certificates]\nadmin = \"root\"\noperator = \"nobody\"\n";

#[test]
fn main_commands_work_over_tls_with_a_mapped_certificate() {
    let daemon = TlsDaemon::start(Some(ACCESS));
    let uri = daemon.uri(&daemon.client_pki("admin", "admin", None));
    let sb = client();
    let local = Sandbox::new();
    assert_eq!(ok(&remote(&sb, &uri, &["list"])), ok(&local.capvirt(&["list"])));
    let info = json(&remote(&sb, &uri, &["-o", "json", "dominfo", "test"]));
    assert_eq!((info["name"].as_str(), info["state"].as_str()), (Some("test"), Some("running")));
    assert_eq!(ok(&remote(&sb, &uri, &["suspend", "test"])), "Domain 'test' suspended\n");
    let listed = json(&remote(&sb, &uri, &["-o", "json", "list"]));
    assert_eq!(listed, serde_json::json!([{"name": "test", "state": "paused"}]));
    assert_eq!(ok(&remote(&sb, &uri, &["resume", "test"])), "Domain 'test' resumed\n");
    // Refusals exit with the local codes and words.
    let cases: &[(&[&str], i32)] = &[
        (&["dominfo", "nope"], 5),
        (&["resume", "test"], 6),
        (&["call", "domain.teleport"], 3),
        (&["call", "domain.info", "--arg", "domain=test", "--arg", "colour=blue"], 2),
    ];
    for (args, code) in cases {
        let far = remote(&sb, &uri, args);
        let near = local.capvirt(args);
        assert_eq!(failed(&far, *code), failed(&near, *code), "{args:?}");
    }
    let line = failed(&remote(&sb, &uri, &["-r", "suspend", "test"]), 3).to_string();
    assert!(line.contains("read-only"), "{line}");
    // The daemon's audit names the local user the certificate maps to, and the certificate.
    let records = daemon.audit_records();
    let suspend = records.iter().find(|r| r["event"] == "outcome" && r["capability"] == "domain.suspend");
    let suspend = suspend.unwrap_or_else(|| panic!("no suspend outcome in {records:?}"));
    assert_eq!((suspend["uid"].as_u64(), suspend["user"].as_str()), (Some(0), Some("root")));
    assert_eq!(suspend["certificate"], "CN=admin");
}

#[test]
fn mapped_and_unmapped_non_root_certificates_get_the_policy_and_are_audited() {
    let daemon = TlsDaemon::start(Some(ACCESS));
    let sb = client();
    let operator = daemon.uri(&daemon.client_pki("operator", "operator", None));
    ok(&remote(&sb, &operator, &["dominfo", "test"]));
    let line = failed(&remote(&sb, &operator, &["suspend", "test"]), 3).to_string();
    assert!(line.contains("user nobody") && line.contains("certificate CN=operator"), "{line}");
    let stranger = daemon.uri(&daemon.client_pki("stranger", "stranger", None));
    ok(&remote(&sb, &stranger, &["list"]));
    let line = failed(&remote(&sb, &stranger, &["suspend", "test"]), 3).to_string();
    assert!(line.contains("certificate CN=stranger (mapped to no user)"), "{line}");
    let refused: Vec<(Option<u64>, Option<String>, String)> = daemon
        .audit_records()
        .iter()
        .filter(|r| r["event"] == "refused" && r["capability"] == "domain.suspend")
        .map(|r| (r["uid"].as_u64(), r["user"].as_str().map(str::to_owned), r["certificate"].to_string()))
        .collect();
    assert_eq!(
        refused,
        [
            (Some(65534), Some("nobody".to_string()), "\"CN=operator\"".to_string()),
            (Some(u64::from(u32::MAX)), None, "\"CN=stranger\"".to_string()),
        ]
    );
}

#[test]
fn certificates_of_another_ca_or_none_are_refused_clearly() {
    let daemon = TlsDaemon::start(None);
    let sb = client();
    let other = Ca::new("another CA");
    let pki = daemon.client_pki("mallory", "admin", Some(&other));
    let line = failed(&remote(&sb, &daemon.uri(&pki), &["list"]), 1).to_string();
    assert!(line.contains("refused this client's certificate"), "{line}");
    assert!(line.contains(&pki.join("clientcert.pem").display().to_string()), "{line}");
    // A client with no certificate: its file is named, as the caller's to fix (exit 2; the
    // daemon would refuse it too: see the handshake tests in capvirt-rpc).
    let empty = daemon.dir.path().join("clients/empty");
    std::fs::create_dir_all(&empty).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let line = failed(&remote(&sb, &daemon.uri(&empty), &["list"]), 2).to_string();
    assert!(
        line.contains(&empty.join("clientcert.pem").display().to_string()) && line.contains("No such file"),
        "{line}"
    );
    // A client key others can read is refused before anything is sent (exit 2, the fix named).
    let exposed = daemon.client_pki("exposed", "admin", None);
    capvirt_tests::set_mode(&exposed.join("clientkey.pem"), 0o644);
    let line = failed(&remote(&sb, &daemon.uri(&exposed), &["list"]), 2).to_string();
    assert!(line.contains("clientkey.pem") && line.contains("mode 0644") && line.contains("chmod 600"), "{line}");
    // A client that does not trust the daemon's CA refuses the daemon.
    let lost = daemon.dir.path().join("clients/lost");
    daemon.ca.issue(&lost, "client", "admin", &[], &other);
    let line = failed(&remote(&sb, &daemon.uri(&lost), &["list"]), 1).to_string();
    assert!(line.contains("daemon's certificate is not signed by this client's CA"), "{line}");
    // The daemon still serves a good client.
    ok(&remote(&sb, &daemon.uri(&daemon.client_pki("good", "good", None)), &["list"]));
}

#[test]
fn a_tcp_listener_without_certificates_is_refused() {
    let dir = tempdir();
    let mut cmd = capvirt(capvirt_tests::test_plugin_dir(), dir.path());
    cmd.env("CAPVIRT_SYSCONFDIR", dir.path().join("etc")).args(["daemon", "--listen", "tcp:127.0.0.1:0"]);
    let refused = run(cmd);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(
        refused.stderr.contains("needs TLS") && refused.stderr.contains("etc/pki/servercert.pem"),
        "{}",
        refused.stderr
    );
    let mut cmd = capvirt(capvirt_tests::test_plugin_dir(), dir.path());
    cmd.args(["daemon", "--listen", "tcp:localhost"]);
    assert_eq!(run(cmd).code, 2);
}

/// A private sshd on 127.0.0.1 accepting one generated key for root.
struct Sshd {
    _child: Guarded,
    port: u16,
    dir: TempDir,
}

impl Sshd {
    fn start() -> Sshd {
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(sshd.exists(), "/usr/sbin/sshd is missing: install openssh-server (and openssh-client for ssh)");
        // sshd's privilege separation directory.
        std::fs::create_dir_all("/run/sshd").unwrap_or_else(|e| panic!("mkdir /run/sshd: {e}"));
        let dir = tempdir();
        set_mode(dir.path(), 0o755);
        for key in ["hostkey", "userkey", "strangerkey"] {
            keygen(&dir.path().join(key));
        }
        let user_key = std::fs::read_to_string(dir.path().join("userkey.pub")).unwrap_or_else(|e| panic!("{e}"));
        write(&dir.path().join("authorized_keys"), &user_key);
        let config = dir.path().join("sshd_config");
        write(
            &config,
            &format!(
                "ListenAddress 127.0.0.1\nHostKey {0}/hostkey\nAuthorizedKeysFile {0}/authorized_keys\n\
                 PermitRootLogin prohibit-password\nStrictModes no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nPidFile none\n",
                dir.path().display()
            ),
        );
        // A free port: taken from the kernel, then handed to sshd (retried if lost meanwhile).
        let started = Instant::now();
        loop {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap_or_else(|e| panic!("free port: {e}"));
            let mut cmd = Command::new(sshd);
            cmd.arg("-D").arg("-e").arg("-f").arg(&config).arg("-p").arg(port.to_string());
            let (mut child, lines) = spawn_with_stderr(cmd);
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Sshd { _child: child, port, dir };
                }
                if let Ok(Some(status)) = child.0.try_wait() {
                    let said: Vec<String> = lines.try_iter().collect();
                    assert!(started.elapsed() < START_BOUND, "sshd exited ({status}): {said:?}");
                    break;
                }
                assert!(started.elapsed() < START_BOUND, "sshd did not listen within {START_BOUND:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn uri(&self, socket: &Path, key: &str) -> String {
        format!(
            "test+ssh://root@127.0.0.1:{}/default?socket={}&keyfile={}&no_verify=1&proxy={}",
            self.port,
            socket.display(),
            self.dir.path().join(key).display(),
            artifacts().capvirt.display()
        )
    }
}

fn keygen(path: &Path) {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path);
    let made = run(cmd);
    assert_eq!(made.code, 0, "ssh-keygen: {made:?}");
}

/// A daemon on a private Unix socket (the far side of the ssh connection).
fn unix_daemon(dir: &Path) -> (Guarded, PathBuf) {
    let socket = dir.join("sock");
    let mut cmd = capvirt(capvirt_tests::test_plugin_dir(), dir);
    cmd.args(["daemon", "--listen"]).arg(format!("unix:{}", socket.display()));
    let (mut child, lines) = spawn_with_stderr(cmd);
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("the daemon exited ({status}): {:?}", lines.try_iter().collect::<Vec<_>>());
        }
        assert!(started.elapsed() < START_BOUND, "the daemon did not listen within {START_BOUND:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, socket)
}

#[test]
fn commands_work_over_ssh_through_the_proxy() {
    let sshd = Sshd::start();
    let state = tempdir();
    let (_daemon, socket) = unix_daemon(state.path());
    let sb = client();
    let local = Sandbox::new();
    let uri = sshd.uri(&socket, "userkey");
    assert_eq!(ok(&remote(&sb, &uri, &["list"])), ok(&local.capvirt(&["list"])));
    let info = json(&remote(&sb, &uri, &["-o", "json", "dominfo", "test"]));
    assert_eq!((info["name"].as_str(), info["state"].as_str()), (Some("test"), Some("running")));
    assert_eq!(ok(&remote(&sb, &uri, &["suspend", "test"])), "Domain 'test' suspended\n");
    failed(&remote(&sb, &uri, &["dominfo", "nope"]), 5);
    // The daemon saw the proxy's credentials: the ssh login user, root.
    let text = std::fs::read_to_string(state.path().join("audit.jsonl")).unwrap_or_default();
    let suspend = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["event"] == "outcome" && r["capability"] == "domain.suspend");
    assert_eq!(suspend.map(|r| r["uid"].clone()), Some(serde_json::json!(0)));
    // Each client's ssh, and the proxy it ran, are gone once the client is.
    let key = sshd.dir.path().join("userkey").display().to_string();
    let proxy = format!("proxy --socket {}", socket.display());
    let started = Instant::now();
    loop {
        let left: Vec<String> =
            command_lines().into_iter().filter(|c| c.contains(&key) || c.contains(&proxy)).collect();
        if left.is_empty() {
            break;
        }
        assert!(started.elapsed() < START_BOUND, "still running after their clients: {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every process's command line, arguments joined by spaces.
fn command_lines() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .collect()
}

#[test]
fn ssh_failures_show_what_ssh_said() {
    let sshd = Sshd::start();
    let state = tempdir();
    let (_daemon, socket) = unix_daemon(state.path());
    let sb = client();
    // A key the server does not accept.
    let line = failed(&remote(&sb, &sshd.uri(&socket, "strangerkey"), &["list"]), 1).to_string();
    assert!(line.contains("through ssh") && line.contains("Permission denied"), "{line}");
    // No daemon behind the far side's socket: the proxy's own error comes back.
    let absent = state.path().join("absent-sock");
    let line = failed(&remote(&sb, &sshd.uri(&absent, "userkey"), &["list"]), 1).to_string();
    assert!(line.contains("cannot reach the capvirt daemon") && line.contains("absent-sock"), "{line}");
}
