//! A daemon restart during a running QEMU guest loses nothing: the guest's QEMU outlives the
//! daemon (stopped with SIGTERM, then killed with SIGKILL), and the next daemon on the same
//! socket finds it again, same process, and drives it (info, suspend/resume, destroy). Real
//! daemons, real QEMU, the test guest answering HTTP throughout. And the daemon keeps a
//! domain's QEMU monitor connection open from one call to the next.

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use capvirt_tests::qemu::{
    free_local_port, guest_spec_toml, http_get, qemu_plugin_dir, signal, spec_toml, wait_until, Sandbox, GUEST_PAGE,
};
use rustix::process::Signal;

use crate::remote::Daemon;

/// Bound on the test guest booting under TCG until it serves HTTP.
const GUEST_BOOT: Duration = Duration::from_secs(180);
/// Bound on a daemon's exit after SIGTERM (no call is in flight).
const STOP_BOUND: Duration = Duration::from_secs(30);

/// A daemon serving the QEMU driver on `socket`, with a state directory of its own.
fn daemon(socket: &Path) -> Daemon {
    let state = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    Daemon::spawn_with(qemu_plugin_dir(), state, socket.to_path_buf(), &[], &[])
}

/// Stops `daemon` with `sig` and waits (bounded) for it to exit.
fn stop(mut daemon: Daemon, sig: Signal) {
    signal(daemon.child.id() as i32, sig);
    let started = Instant::now();
    while daemon.is_running() {
        assert!(started.elapsed() < STOP_BOUND, "the daemon did not exit within {STOP_BOUND:?} of {sig:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    if sig == Signal::TERM {
        let status = daemon.child.wait().map(|s| s.code());
        assert_eq!(status.ok().flatten(), Some(0), "SIGTERM: {}", daemon.stderr());
    }
}

fn is_alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | None)
}

fn serves_http(port: u16) -> bool {
    http_get(port, Duration::from_secs(5)).is_ok_and(|page| page.contains(GUEST_PAGE))
}

#[test]
fn a_daemon_restart_during_a_running_guest_loses_nothing() {
    let sandbox = Sandbox::new();
    let sockets = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let socket = sockets.path().join("capvirt-sock");
    let local = sandbox.uri("r", "&accel=tcg");
    let remote = format!("{}&socket={}", local.replacen("qemu://", "qemu+unix://", 1), socket.display());
    let port = free_local_port();
    let disk = sandbox.blank_image("data", "raw");
    let spec = sandbox.write("guest.toml", &guest_spec_toml("guest", &disk, port));

    let first = daemon(&socket);
    sandbox.ok_uri(&remote, &["define", spec.to_str().unwrap_or_default()]);
    sandbox.ok_uri(&remote, &["start", "guest"]);
    let pid = sandbox.qemu_pid("r", "guest");
    assert!(wait_until(GUEST_BOOT, || serves_http(port)), "the guest served no HTTP within {GUEST_BOOT:?}");

    let mut current = first;
    for sig in [Signal::TERM, Signal::KILL] {
        stop(current, sig);
        // No daemon: the guest runs on, served by nobody.
        assert!(is_alive(pid), "QEMU {pid} died with the daemon ({sig:?})");
        assert!(serves_http(port), "the guest stopped answering when the daemon got {sig:?}");

        current = daemon(&socket);
        let listed = sandbox.json_uri(&remote, &["list"]);
        assert_eq!(listed, serde_json::json!([{"name": "guest", "state": "running"}]), "after {sig:?}");
        let info = sandbox.json_uri(&remote, &["dominfo", "guest"]);
        assert_eq!((info["state"].as_str(), info["memory_kib"].as_u64()), (Some("running"), Some(131072)));
        assert_eq!(sandbox.qemu_pid("r", "guest"), pid, "another QEMU after {sig:?}");
        sandbox.ok_uri(&remote, &["suspend", "guest"]);
        assert_eq!(sandbox.json_uri(&remote, &["dominfo", "guest"])["state"], "paused");
        sandbox.ok_uri(&remote, &["resume", "guest"]);
        assert_eq!(sandbox.json_uri(&remote, &["dominfo", "guest"])["state"], "running");
        assert!(
            wait_until(Duration::from_secs(30), || serves_http(port)),
            "the resumed guest does not answer HTTP after {sig:?}"
        );
        assert!(is_alive(pid));
    }

    sandbox.ok_uri(&remote, &["destroy", "guest"]);
    let all = sandbox.json_uri(&remote, &["list", "--all"]);
    assert_eq!(all, serde_json::json!([{"name": "guest", "state": "shut off"}]));
    assert!(wait_until(Duration::from_secs(10), || !is_alive(pid)), "QEMU {pid} outlived destroy");
    sandbox.ok_uri(&remote, &["undefine", "guest"]);
    drop(current);
}

/// Inodes of the connected sockets on the QEMU monitor sockets under `run` (`qmp*.sock`), from
/// `/proc/net/unix`: an accepted connection carries the listening socket's path, and a new
/// connection is a new inode.
fn monitor_connections(run: &Path) -> BTreeSet<u64> {
    const CONNECTED: &str = "03";
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_else(|e| panic!("/proc/net/unix: {e}"));
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (state, inode, path) = (fields.get(5)?, fields.get(6)?, Path::new(fields.get(7)?));
            let monitor = path.parent() == Some(run)
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("qmp") && n.ends_with(".sock"));
            (monitor && *state == CONNECTED).then(|| inode.parse().ok()).flatten()
        })
        .collect()
}

#[test]
fn the_daemon_keeps_a_domains_monitor_connection_across_calls() {
    let sandbox = Sandbox::new();
    let sockets = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let socket = sockets.path().join("capvirt-sock");
    let local = sandbox.uri("m", "&accel=tcg");
    let remote = format!("{}&socket={}", local.replacen("qemu://", "qemu+unix://", 1), socket.display());
    let disk = sandbox.blank_image("vm", "qcow2");
    let spec = sandbox.write("vm.toml", &spec_toml("vm", 64, &disk, true));
    let run = sandbox.root("m").join("domains").join("vm").join("run");

    let daemon = daemon(&socket);
    sandbox.ok_uri(&remote, &["define", spec.to_str().unwrap_or_default()]);
    sandbox.ok_uri(&remote, &["start", "vm"]);
    sandbox.ok_uri(&remote, &["suspend", "vm"]);
    let open = monitor_connections(&run);
    assert!(!open.is_empty(), "no monitor connection is open after a call through the daemon");
    for _ in 0..3 {
        sandbox.ok_uri(&remote, &["resume", "vm"]);
        assert_eq!(sandbox.json_uri(&remote, &["dominfo", "vm"])["state"], "running");
        sandbox.ok_uri(&remote, &["suspend", "vm"]);
        assert_eq!(monitor_connections(&run), open, "the daemon connected to the monitor again");
    }
    // The check can fail: the next daemon has connections of its own (new inodes).
    stop(daemon, Signal::TERM);
    let daemon = self::daemon(&socket);
    sandbox.ok_uri(&remote, &["resume", "vm"]);
    let reopened = monitor_connections(&run);
    assert!(!reopened.is_empty() && reopened.is_disjoint(&open), "{open:?} then {reopened:?}");
    sandbox.ok_uri(&remote, &["destroy", "vm"]);
    sandbox.ok_uri(&remote, &["undefine", "vm"]);
    drop(daemon);
}
