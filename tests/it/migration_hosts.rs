//! Live migration between two hosts through their daemons (issue 12): two network namespaces
//! joined by a veth pair on a private /30 stand for two machines, each with its own `capvirt
//! daemon` (a Unix socket, a TLS listener on its address, its own certificates, access policy,
//! audit log and QEMU state root). A client asks host A's daemon, over A's Unix socket, to
//! migrate the running test guest to `qemu+tls://B/…`; A's daemon runs the phases, reaching B's
//! daemon over TLS with its own client certificate, and QEMU's stream crosses the veth pair.
//! The guest then answers on B's console and A's copy is shut off. Refused migrations (B
//! unreachable, B's driver refusing to prepare) leave the guest running on A and nothing on B.
//!
//! Needs root (`ip netns`). CI's run on the second QEMU release needs `migration_hosts::` in
//! its filter.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use capvirt_host::{CallObserver, Host, HostConfig, Value};
use capvirt_tests::{
    capvirt,
    pki::Ca,
    qemu::{guest_spec_toml, output_within, qemu_plugin_dir, wait_until, Sandbox, COMMAND_TIMEOUT, GUEST_READY},
    set_mode,
};

/// Bound on the test guest booting under TCG to its READY line.
const GUEST_BOOT: Duration = Duration::from_secs(180);
/// Bound on a daemon listening after its start.
const START_BOUND: Duration = Duration::from_secs(30);
/// Bound on the guest's echo of a typed line showing in its console log.
const ECHO_WAIT: Duration = Duration::from_secs(30);
/// Bound on a QEMU exiting once its domain is reported shut off.
const EXIT_WAIT: Duration = Duration::from_secs(10);
/// The daemons' TLS port: each namespace has its own, so no other test can take it.
const TLS_PORT: u16 = 16514;
/// The console capabilities are experimental: each daemon enables them for the test's checks.
const CONSOLE: &str = "domain.console-read,domain.console-write";

fn ip(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    output_within(cmd, COMMAND_TIMEOUT)
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Two network namespaces joined by a veth pair (`A`: 10.231.0.1/30, `B`: 10.231.0.2/30),
/// deleted on drop (the veth pair goes with them).
struct TwoHosts {
    a: String,
    b: String,
}

impl TwoHosts {
    const A_ADDRESS: &'static str = "10.231.0.1";
    const B_ADDRESS: &'static str = "10.231.0.2";

    fn new() -> TwoHosts {
        assert!(
            rustix::process::geteuid().is_root(),
            "the two-host migration test makes network namespaces: run it as root"
        );
        let tag = format!("{:x}", std::process::id());
        let hosts = TwoHosts { a: format!("cvmig-a-{tag}"), b: format!("cvmig-b-{tag}") };
        for ns in [&hosts.a, &hosts.b] {
            let _ = ip(&["netns", "delete", ns]);
            ip_ok(&["netns", "add", ns]);
            ip_ok(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip_ok(&["-n", &hosts.a, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b", "netns", &hosts.b]);
        for (ns, dev, address) in [(&hosts.a, "veth-a", Self::A_ADDRESS), (&hosts.b, "veth-b", Self::B_ADDRESS)] {
            ip_ok(&["-n", ns, "addr", "add", &format!("{address}/30"), "dev", dev]);
            ip_ok(&["-n", ns, "link", "set", dev, "up"]);
        }
        hosts
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = ip(&["netns", "delete", ns]);
        }
    }
}

/// One host's daemon, run inside its namespace: a Unix socket (reachable from the test, path
/// sockets cross namespaces) and a TLS listener on the host's address. Killed on drop.
struct HostDaemon {
    child: Child,
    socket: PathBuf,
    /// Its state (audit log), configuration (`etc/access.toml`) and PKI (`etc/pki`).
    dir: PathBuf,
}

impl HostDaemon {
    /// Starts the daemon of `ns` at `address`, its server certificate and its client
    /// certificate (CN `cn`, for reaching the other host) issued by `ca`; `access` is its
    /// `access.toml`.
    fn start(ns: &str, dir: PathBuf, address: &str, cn: &str, ca: &Ca, access: &str) -> HostDaemon {
        let etc = dir.join("etc");
        std::fs::create_dir_all(&etc).unwrap_or_else(|e| panic!("mkdir {}: {e}", etc.display()));
        set_mode(&dir, 0o755);
        set_mode(&etc, 0o755);
        std::fs::write(etc.join("access.toml"), access).unwrap_or_else(|e| panic!("access.toml: {e}"));
        set_mode(&etc.join("access.toml"), 0o644);
        let pki = etc.join("pki");
        ca.issue(&pki, "server", cn, &[address], ca);
        ca.issue(&pki, "client", cn, &[], ca);
        let socket = dir.join("sock");
        let base = capvirt(qemu_plugin_dir(), &dir);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(base.get_program());
        for (key, value) in base.get_envs() {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        cmd.env("CAPVIRT_SYSCONFDIR", &etc).env("CAPVIRT_ENABLE", CONSOLE).arg("daemon");
        cmd.arg("--listen").arg(format!("unix:{}", socket.display()));
        cmd.arg("--listen").arg(format!("tcp:{address}:{TLS_PORT}"));
        for (option, file) in
            [("--tls-cert", "servercert.pem"), ("--tls-key", "serverkey.pem"), ("--tls-ca", "cacert.pem")]
        {
            cmd.arg(option).arg(pki.join(file));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::from(
            std::fs::File::create(dir.join("daemon.log")).unwrap_or_else(|e| panic!("daemon.log: {e}")),
        ));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start the daemon in {ns}: {e}"));
        let mut daemon = HostDaemon { child, socket, dir };
        // Every listener is bound before the Unix socket accepts.
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("the daemon of {ns} exited ({status}): {}", daemon.log());
            }
            assert!(started.elapsed() < START_BOUND, "the daemon of {ns} did not listen within {START_BOUND:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn pki(&self) -> PathBuf {
        self.dir.join("etc/pki")
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.join("audit.jsonl")).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}

impl Drop for HostDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `qemu:///session?root=…` of `sandbox`'s root `root` reached through the daemon's socket.
fn through_socket(local: &str, daemon: &HostDaemon) -> String {
    format!("{}&socket={}", local.replacen("qemu://", "qemu+unix://", 1), daemon.socket.display())
}

/// `qemu:///session?root=…` reached over TLS at `address:port`, with the certificates in `pki`.
fn over_tls(local: &str, address: &str, port: u16, pki: &Path) -> String {
    format!("{}&pkipath={}", local.replacen("qemu:///", &format!("qemu+tls://{address}:{port}/"), 1), pki.display())
}

fn console(sandbox: &Sandbox, uri: &str) -> String {
    sandbox.ok_uri(uri, &["console-log", "guest", "-"])
}

fn is_alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | None)
}

/// Progress reports with the time each arrived.
#[derive(Default)]
struct Progress(Mutex<Vec<(Instant, u64, u64)>>);

impl CallObserver for Progress {
    fn progress(&self, done: u64, total: u64) {
        if let Ok(mut seen) = self.0.lock() {
            seen.push((Instant::now(), done, total));
        }
    }
}

/// Refused, with one error line naming `needle`; returns the line.
fn refused(out: &std::process::Output, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert!(!out.status.success(), "accepted: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(stderr.lines().count(), 1, "one error line expected: {stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    stderr
}

#[test]
fn a_running_guest_migrates_between_two_hosts_through_their_daemons() {
    let hosts = TwoHosts::new();
    let sandbox = Sandbox::new();
    let ca = Ca::new("capvirt fleet CA");
    // A's daemon serves its root peer (the test); B's maps A's certificate to root, nobody else.
    let a = HostDaemon::start(&hosts.a, sandbox.path().join("host-a"), TwoHosts::A_ADDRESS, "host-a", &ca, "");
    let b_access = "default = [\"readonly\"]\n[certificates]\nhost-a = \"root\"\n";
    let b = HostDaemon::start(&hosts.b, sandbox.path().join("host-b"), TwoHosts::B_ADDRESS, "host-b", &ca, b_access);

    let (local_a, local_b) = (sandbox.uri("a", "&accel=tcg"), sandbox.uri("b", "&accel=tcg"));
    let on_a = through_socket(&local_a, &a);
    let on_b = through_socket(&local_b, &b);
    let to_b = over_tls(&local_b, TwoHosts::B_ADDRESS, TLS_PORT, &a.pki());

    let disk = sandbox.blank_image("data", "raw");
    let spec = sandbox.write("guest.toml", &guest_spec_toml("guest", &disk, 8080));
    sandbox.ok_uri(&on_a, &["define", spec.to_str().unwrap_or_default()]);
    sandbox.ok_uri(&on_a, &["start", "guest"]);
    let booted = wait_until(GUEST_BOOT, || console(&sandbox, &on_a).contains(GUEST_READY));
    assert!(booted, "no {GUEST_READY} within {GUEST_BOOT:?}: {}", console(&sandbox, &on_a));
    let pid_a = sandbox.qemu_pid("a", "guest");
    let running_on_a_only = || {
        assert_eq!(sandbox.json_uri(&on_a, &["dominfo", "guest"])["state"], "running");
        assert!(is_alive(pid_a), "A's QEMU {pid_a} is gone");
        assert_eq!(sandbox.json_uri(&on_b, &["list", "--all"]), serde_json::json!([]), "something was left on B");
        assert!(!sandbox.root("b").join("domains/guest").exists(), "B keeps a directory for the guest");
    };

    // B unreachable (no daemon on that port): refused before anything starts, naming the phase
    // and the host.
    let nowhere = over_tls(&local_b, TwoHosts::B_ADDRESS, TLS_PORT + 1, &a.pki());
    let line = refused(
        &sandbox.run_uri(&on_a, &["migrate", "guest", &nowhere]),
        "failed at connect on tls://10.231.0.2:16515",
    );
    assert!(line.contains("migration of domain 'guest'"), "{line}");
    eprintln!("migration_hosts: {line}");
    running_on_a_only();
    // B's driver refuses to prepare: the destination would run the guest on another accelerator.
    let elsewhere = over_tls(&sandbox.uri("b", "&accel=kvm"), TwoHosts::B_ADDRESS, TLS_PORT, &a.pki());
    let line = refused(
        &sandbox.run_uri(&on_a, &["migrate", "guest", &elsewhere]),
        "failed at prepare on tls://10.231.0.2:16514",
    );
    eprintln!("migration_hosts: {line}");
    running_on_a_only();

    // The phases' undo paths, called one by one as the orchestration would: prepare on B
    // defines the guest there and waits; perform to a port nobody listens on fails and the
    // guest runs on on A; confirm of an unsent domain is refused; finish without success
    // removes everything prepare made on B.
    let client = Host::new(HostConfig::default()).unwrap_or_else(|e| panic!("host: {e}"));
    let conn = client.connect(&on_a, false).unwrap_or_else(|e| panic!("connect to A: {e}"));
    let conn_b = client.connect(&on_b, false).unwrap_or_else(|e| panic!("connect to B: {e}"));
    let guest = || ("domain", Value::from("guest"));
    let description = conn.call("domain.migrate-begin", Value::record([guest()]));
    let description = description.unwrap_or_else(|e| panic!("begin: {e}"));
    let address = ("address", Value::from(TwoHosts::B_ADDRESS));
    let prepared =
        conn_b.call("domain.migrate-prepare", Value::record([guest(), ("description", description), address.clone()]));
    let endpoint = prepared.unwrap_or_else(|e| panic!("prepare: {e}"));
    assert_eq!(endpoint.get("address").and_then(Value::as_str), Some(TwoHosts::B_ADDRESS));
    assert!(endpoint.get("port").and_then(Value::as_u64).is_some_and(|p| p > 0), "{endpoint:?}");
    assert_eq!(sandbox.json_uri(&on_b, &["list", "--all"]), serde_json::json!([{"name": "guest", "state": "paused"}]));
    let perform = conn.call("domain.migrate-perform", Value::record([guest(), address, ("port", Value::UInt(9))]));
    assert!(
        perform.as_ref().is_err_and(|e| e.to_string().contains("migration of domain 'guest' failed")),
        "{perform:?}"
    );
    let confirm = conn.call("domain.migrate-confirm", Value::record([guest(), ("succeeded", Value::Bool(true))]));
    assert_eq!(confirm.err().map(|e| e.category()), Some(capvirt_host::ErrorCategory::InvalidState));
    let finish = conn_b.call("domain.migrate-finish", Value::record([guest(), ("succeeded", Value::Bool(false))]));
    assert!(finish.is_ok(), "finish: {finish:?}");
    running_on_a_only();

    // The migration, through the host library as a client of A's daemon, watching progress.
    let progress = Progress::default();
    let args = Value::record([("domain", Value::from("guest")), ("dest_uri", Value::string(&to_b))]);
    let started = Instant::now();
    let migrated = conn.call_observed("domain.migrate", args, &progress);
    let took = started.elapsed();
    assert!(migrated.is_ok(), "migrate: {migrated:?}\nA: {}\nB: {}", a.log(), b.log());
    let reports = progress.0.lock().map(|r| r.clone()).unwrap_or_default();
    let (first, last) = (reports.first().copied(), reports.last().copied());
    let Some(((t0, _, _), (t1, done, total))) = first.zip(last) else { panic!("no progress reported") };
    assert!(total > 0 && done == total, "progress ended at {done}/{total}");
    let streamed = t1.duration_since(t0).as_secs_f64();
    eprintln!(
        "migration_hosts: 128 MiB guest migrated A→B in {took:?} (wall, all phases); {} progress reports, {total} bytes of RAM, {:.0} MiB/s over {streamed:.3} s of transfer",
        reports.len(),
        total as f64 / f64::from(1 << 20) / streamed.max(1e-3)
    );

    // Alive on B: it runs there, and a line typed on its console comes back echoed by the guest.
    assert_eq!(sandbox.json_uri(&on_b, &["dominfo", "guest"])["state"], "running");
    let pid_b = sandbox.qemu_pid("b", "guest");
    assert_ne!(pid_a, pid_b);
    let before = console(&sandbox, &on_b).len();
    sandbox.ok_uri(&on_b, &["console-write", "guest", "alive-on-b"]);
    let mut text = String::new();
    let echoed = wait_until(ECHO_WAIT, || {
        text = console(&sandbox, &on_b);
        text.get(before..).is_some_and(|new| new.contains("alive-on-b\r\n"))
    });
    assert!(echoed, "the guest on B did not answer its console: {:?}", text.get(before..));
    // Shut off on A, its definition kept, its QEMU gone.
    assert_eq!(
        sandbox.json_uri(&on_a, &["list", "--all"]),
        serde_json::json!([{"name": "guest", "state": "shut off"}])
    );
    assert!(wait_until(EXIT_WAIT, || !is_alive(pid_a)), "A's QEMU {pid_a} outlived the migration");

    // Each side's phases went through its own daemon's dispatch path: B audited prepare and
    // finish as A's certificate, mapped to root; A audited perform and confirm as the test.
    let outcomes = |records: Vec<serde_json::Value>, id: &str| {
        records.into_iter().filter(|r| r["capability"] == id && r["event"] == "outcome").collect::<Vec<_>>()
    };
    for id in ["domain.migrate-prepare", "domain.migrate-finish"] {
        // The other successful one is the test's own call above, as its Unix peer.
        let ok: Vec<_> = outcomes(b.audit(), id).into_iter().filter(|r| r["outcome"] == "ok").collect();
        let by_a: Vec<_> = ok.iter().filter(|r| r["certificate"] == "CN=host-a").collect();
        assert_eq!((ok.len(), by_a.len()), (2, 1), "{id} on B: {:?}", b.audit());
        assert_eq!(by_a[0]["user"].as_str(), Some("root"));
    }
    for id in ["domain.migrate", "domain.migrate-perform", "domain.migrate-confirm"] {
        assert!(outcomes(a.audit(), id).iter().any(|r| r["outcome"] == "ok"), "{id} on A: {:?}", a.audit());
    }

    sandbox.ok_uri(&on_b, &["destroy", "guest"]);
    assert!(wait_until(EXIT_WAIT, || !is_alive(pid_b)), "B's QEMU {pid_b} outlived destroy");
}
