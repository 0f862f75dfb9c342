//! Issue 11's whole "Done when" chain in one test, in order, with one `capvirt events` watcher
//! watching from before the definition: on a real QEMU booting the test guest, then the same
//! commands on the in-memory test driver and on the container driver (each step implemented or
//! answered unsupported, exit code 4). The pieces are tested in depth by `qemu`, `snapshot`,
//! `events`, `console` and `container`; this test checks that they hold together.
//!
//! CI's run on the second QEMU release needs `guest_chain::` in its filter (the name carries
//! no `qemu::`).

use std::{
    path::Path,
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use capvirt_cli::args::read_toml_file;
use capvirt_host::{CallError, Connection, Host, HostConfig, Value};
use capvirt_tests::{
    container,
    qemu::{free_local_port, guest_spec_toml, http_get, wait_until, Sandbox, GUEST_PAGE, GUEST_READY},
    test_plugin_dir,
};

use crate::{
    events::{assert_declared_shape, interrupt, Collector, Watcher, EVENT_WAIT},
    snapshot::{
        enable_snapshots,
        qemu::{http, http_until},
    },
};

/// Bound on the test guest booting under TCG to its READY line (about 5 s idle; polled).
const GUEST_BOOT: Duration = Duration::from_secs(180);
/// Bound on the guest's web server answering through the forwarded port once READY.
const GUEST_ANSWER: Duration = Duration::from_secs(60);
/// Bound on the guest powering off after the ACPI power button (well under a second idle).
const GUEST_POWEROFF: Duration = Duration::from_secs(60);
/// Bound on the watcher's last lines arriving once it exited.
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// The domain every driver's part of the chain defines.
const DOMAIN: &str = "guest";
/// Capabilities of the chain that are experimental (enabled per command with `--enable` or in
/// the host config).
const CONSOLE_READ: &str = "domain.console-read";
const CONSOLE_WRITE: &str = "domain.console-write";
const EVENTS: &str = "domain.events";

/// The chain's spec: the test guest's kernel, initrd and command line in `[boot]`, a qcow2 disk
/// (snapshots need one) and a user-mode interface forwarding `host_port` to the guest's port 80.
fn chain_spec(disk: &Path, host_port: u16) -> String {
    let spec = guest_spec_toml(DOMAIN, disk, host_port);
    let qcow2 = spec.replace("format = \"raw\"", "format = \"qcow2\"");
    assert_ne!(spec, qcow2, "guest_spec_toml no longer writes a raw disk: {spec}");
    qcow2
}

#[test]
fn guest_chain_define_boot_serve_snapshot_revert_and_power_off_on_every_driver() {
    on_real_qemu();
    on_the_test_driver();
    on_the_container_driver();
}

/// The whole chain on real QEMU under TCG with the test guest.
fn on_real_qemu() {
    let sandbox = Sandbox::new();
    enable_snapshots(sandbox.path());
    let uri = sandbox.uri("chain", "&accel=tcg");
    let ok = |args: &[&str]| sandbox.ok_uri(&uri, args);

    // The watcher's first look at the state root is its baseline, not news: a probe domain,
    // redefined until its event arrives, tells that it watches.
    let mut watch = sandbox.capvirt_uri(&uri);
    watch.args(["--enable", EVENTS, "events", "--loop", "-o", "json"]);
    let mut watcher = Watcher::spawn(watch);
    let probe_disk = sandbox.blank_image("probe", "raw");
    let probe = sandbox.write("probe.toml", &guest_spec_toml("probe", &probe_disk, 1));
    let watching = wait_until(EVENT_WAIT, || {
        ok(&["define", probe.to_str().unwrap_or_default()]);
        watcher.lines.recv_timeout(Duration::from_millis(300)).is_ok_and(|line| line.contains("\"probe\""))
    });
    assert!(watching, "the watcher reported no definition of the probe domain");
    ok(&["undefine", "probe"]);
    watcher.expect("probe", "undefined");

    // define → start → the console shows the marker.
    let disk = sandbox.boot_disk("chain");
    let port = free_local_port();
    let spec = sandbox.write("chain.toml", &chain_spec(&disk, port));
    let defined_at = Instant::now();
    ok(&["define", spec.to_str().unwrap_or_default()]);
    ok(&["start", DOMAIN]);
    let mut console = String::new();
    let booted = wait_until(GUEST_BOOT, || {
        console = ok(&["--enable", CONSOLE_READ, "console-log", DOMAIN, "-"]);
        console.contains(GUEST_READY)
    });
    assert!(booted, "no {GUEST_READY} on the console within {GUEST_BOOT:?}; console so far:\n{console}");
    eprintln!("guest_chain: define to console marker took {:?} on {}", defined_at.elapsed(), uri);

    // A TCP connection to the forwarded host port gets the guest's page.
    let mut page = Err(String::from("never asked"));
    let served = wait_until(GUEST_ANSWER, || {
        page = http_get(port, Duration::from_secs(10));
        page.as_ref().is_ok_and(|a| a.contains(GUEST_PAGE))
    });
    assert!(served, "no page from the guest on 127.0.0.1:{port}: {page:?}");

    // The guest wrote its first disk at boot.
    let stats = sandbox.json_uri(&uri, &["domblkstat", DOMAIN, "vda"]);
    assert!(stats["wr_bytes"].as_u64() > Some(0) && stats["wr_req"].as_u64() > Some(0), "{stats}");

    // Marked "before", snapshot, the guest changes its disk to "after", revert: "before" again.
    let before = http_until(port, "/cgi-bin/mark?before", "CAPVIRT-GUEST-MARK before");
    assert!(before.as_ref().is_ok_and(|a| a.contains("CAPVIRT-GUEST-MARK before")), "{before:?}");
    let created = sandbox.json_uri(&uri, &["snapshot-create", DOMAIN, "s1"]);
    assert_eq!((created["name"].as_str(), created["state"].as_str()), (Some("s1"), Some("running")), "{created}");
    let after = http(port, "/cgi-bin/mark?after");
    assert!(after.as_ref().is_ok_and(|a| a.contains("CAPVIRT-GUEST-MARK after")), "{after:?}");
    let changed = http(port, "/cgi-bin/read");
    assert!(changed.as_ref().is_ok_and(|a| a.contains("CAPVIRT-GUEST-MARK after")), "{changed:?}");
    ok(&["snapshot-revert", DOMAIN, "s1"]);
    assert_eq!(sandbox.state("chain", DOMAIN), "running");
    let reverted = http_until(port, "/cgi-bin/read", "CAPVIRT-GUEST-MARK");
    assert!(
        reverted.as_ref().is_ok_and(|a| a.contains("CAPVIRT-GUEST-MARK before") && !a.contains("after")),
        "the guest's change survived the revert: {reverted:?}"
    );

    // shutdown asks (timeout 0: returns at once); the guest powers off by itself, polled.
    ok(&["shutdown", DOMAIN, "--timeout-secs", "0"]);
    let mut state = String::new();
    let off = wait_until(GUEST_POWEROFF, || {
        state = sandbox.state("chain", DOMAIN);
        state == "shut off"
    });
    assert!(off, "still '{state}' {GUEST_POWEROFF:?} after shutdown");

    // The watcher saw the chain in order: defined, started, the snapshot jobs' pauses (QEMU
    // stops the guest for snapshot-save and snapshot-load), the guest's shutdown, stopped.
    let defined = watcher.expect(DOMAIN, "defined");
    assert_eq!((defined["detail"].as_str(), defined["state"].as_str()), (Some("added"), Some("shut off")));
    assert_eq!(watcher.expect(DOMAIN, "started")["state"], "running");
    let mut pauses = 0;
    let shutdown = loop {
        let event = watcher.next_of(DOMAIN, EVENT_WAIT);
        if event["kind"] != "suspended" {
            break event;
        }
        pauses += 1;
        assert!(pauses <= 2, "more pauses than snapshot jobs: {:#?}", watcher.seen);
        assert_eq!(event["state"], "paused", "{event}");
        assert_eq!(watcher.expect(DOMAIN, "resumed")["state"], "running");
    };
    assert_eq!(shutdown["kind"], "shutdown", "events so far: {:#?}", watcher.seen);
    assert_eq!(shutdown["origin"], "guest", "the guest powered itself off: {shutdown}");
    let stopped = watcher.expect(DOMAIN, "stopped");
    assert_eq!((stopped["detail"].as_str(), stopped["state"].as_str()), (Some("shutdown"), Some("shut off")));

    let kinds: Vec<String> = watcher
        .seen
        .iter()
        .map(|e| format!("{} {}", e["domain"].as_str().unwrap_or("?"), e["kind"].as_str().unwrap_or("?")))
        .collect();
    eprintln!("guest_chain: the watcher saw {kinds:?}");
    let times: Vec<u64> = watcher.seen.iter().filter_map(|e| e["time_ms"].as_u64()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "events out of time order: {:#?}", watcher.seen);
    let status = interrupt(&mut watcher);
    assert_eq!(status.code(), Some(0), "capvirt events after SIGINT: {status}");
    // Nothing followed (no late crash or second stop).
    let deadline = Instant::now() + DRAIN_WAIT;
    while let Ok(line) = watcher.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        assert!(!line.contains(&format!("\"{DOMAIN}\"")), "an event after the chain: {line}");
    }
}

/// Sets the collector's cancel flag when dropped, so that a failing step still ends the
/// watching thread (and the scope joining it) instead of hanging.
struct CancelOnDrop<'a>(&'a Collector);

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        self.0.cancel.store(true, Ordering::Relaxed);
    }
}

fn call(conn: &Connection, id: &str, args: Value) -> Result<Value, CallError> {
    conn.call(id, args)
}

fn domain_args(extra: &[(&'static str, Value)]) -> Value {
    let mut args = Value::record([("domain", Value::string(DOMAIN))]);
    for (name, value) in extra {
        args.set(*name, value.clone());
    }
    args
}

/// The same chain on `test:///default` through the host library: each CLI run is a fresh
/// test host there, so one connection keeps the in-memory domain across the steps and a
/// second one on another thread watches.
fn on_the_test_driver() {
    let mut config =
        HostConfig { plugin_dirs: vec![test_plugin_dir().to_path_buf()], check_results: true, ..Default::default() };
    config.policy.enabled = crate::snapshot::SNAPSHOT_CAPABILITIES
        .iter()
        .chain(&[CONSOLE_READ, CONSOLE_WRITE, EVENTS])
        .map(|id| id.to_string())
        .collect();
    let host = Host::new(config).unwrap_or_else(|e| panic!("host: {e}"));
    let watching = host.connect("test:///default", false).unwrap_or_else(|e| panic!("connect: {e}"));
    let acting = host.connect("test:///default", false).unwrap_or_else(|e| panic!("connect: {e}"));
    let files = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let spec_path = files.path().join("chain.toml");
    std::fs::write(&spec_path, chain_spec(&files.path().join("chain.qcow2"), free_local_port()))
        .unwrap_or_else(|e| panic!("write spec: {e}"));
    let spec = read_toml_file("spec", &spec_path).unwrap_or_else(|e| panic!("spec: {e:?}"));
    let probe = Value::record([(
        "spec",
        Value::record([("name", Value::from("probe")), ("memory_mib", Value::UInt(64)), ("vcpus", Value::UInt(1))]),
    )]);
    let collector = Collector::default();
    let ok = |id: &str, args: Value| call(&acting, id, args).unwrap_or_else(|e| panic!("{id}: {e}"));

    thread::scope(|scope| {
        let _cancel = CancelOnDrop(&collector);
        // A time bound as well: the watch ends by itself even if nothing cancels it.
        let bound = Value::record([("timeout_ms", Value::UInt(600_000))]);
        let watcher = scope.spawn(|| watching.call_observed("domain.events", bound, &collector));
        let subscribed = wait_until(EVENT_WAIT, || {
            ok("domain.define", probe.clone());
            !collector.kinds_of("probe").is_empty()
        });
        assert!(subscribed, "the watcher never reported the probe");
        ok("domain.undefine", Value::record([("domain", Value::string("probe"))]));

        ok("domain.define", Value::record([("spec", spec.clone())]));
        ok("domain.start", domain_args(&[]));
        let console = ok("domain.console-read", domain_args(&[]));
        let booted = String::from_utf8_lossy(console.get("data").and_then(Value::as_bytes).unwrap_or_default());
        assert!(booted.contains(GUEST_READY), "{console}");
        let stats = ok("domain.block-stats", domain_args(&[("device", Value::string("vda"))]));
        assert!(stats.get("wr_bytes").and_then(Value::as_u64) > Some(0), "{stats}");
        assert!(stats.get("wr_req").and_then(Value::as_u64) > Some(0), "{stats}");
        let created = ok("domain.snapshot-create", domain_args(&[("name", Value::string("s1"))]));
        assert_eq!(created.get("state").and_then(Value::as_str), Some("running"), "{created}");
        // In memory the guest's change is a line on its console (the test driver echoes what
        // is typed), which the snapshot's copy of the console does not hold.
        let console_text = || {
            let read = ok("domain.console-read", domain_args(&[]));
            String::from_utf8_lossy(read.get("data").and_then(Value::as_bytes).unwrap_or_default()).into_owned()
        };
        ok("domain.console-write", domain_args(&[("text", Value::string("CAPVIRT-GUEST-MARK after"))]));
        assert!(console_text().contains("CAPVIRT-GUEST-MARK after"), "{}", console_text());
        ok("domain.snapshot-revert", domain_args(&[("name", Value::string("s1"))]));
        assert!(!console_text().contains("CAPVIRT-GUEST-MARK after"), "the change survived the revert");
        assert!(console_text().contains(GUEST_READY), "{}", console_text());
        let info = ok("domain.info", domain_args(&[]));
        assert_eq!(info.get("state").and_then(Value::as_str), Some("running"), "{info}");
        ok("domain.shutdown", domain_args(&[("timeout_secs", Value::UInt(0))]));
        let info = ok("domain.info", domain_args(&[]));
        assert_eq!(info.get("state").and_then(Value::as_str), Some("shut off"), "{info}");

        let expected = ["defined", "started", "shutdown", "stopped"];
        let all_in = wait_until(EVENT_WAIT, || collector.kinds_of(DOMAIN).len() >= expected.len());
        assert!(all_in, "events so far: {:?}", collector.kinds_of(DOMAIN));
        collector.cancel.store(true, Ordering::Relaxed);
        let summary =
            watcher.join().unwrap_or_else(|_| panic!("watcher panicked")).unwrap_or_else(|e| panic!("events: {e}"));
        assert_eq!(summary.get("ended").and_then(Value::as_str), Some("cancelled"), "{summary}");
        // The revert reports nothing of its own on the test driver: it restores in place.
        assert_eq!(collector.kinds_of(DOMAIN), expected);
    });
    let events = collector.events.lock().unwrap_or_else(|p| p.into_inner());
    let chain: Vec<&Value> =
        events.iter().filter(|e| e.get("domain").and_then(Value::as_str) == Some(DOMAIN)).collect();
    for event in &chain {
        assert_declared_shape(event);
    }
    assert_eq!(chain[2].get("origin").and_then(Value::as_str), Some("guest"), "{}", chain[2]);
    assert_eq!(chain[3].get("state").and_then(Value::as_str), Some("shut off"), "{}", chain[3]);
}

/// The same commands on `container:///`: what a container has is implemented, the rest is
/// refused as unsupported (exit code 4), and a VM's spec is refused as an invalid argument.
fn on_the_container_driver() {
    let sandbox = container::Sandbox::new();
    enable_snapshots(sandbox.path());
    let run = |args: &[&str]| sandbox.run("chain", args);
    let code_of = |args: &[&str]| {
        let out = run(args);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let expect = |args: &[&str], code: i32, words: &str| {
        let (got, stderr) = code_of(args);
        assert_eq!(got, Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(words), "{args:?}: expected {words:?} in {stderr}");
    };

    // No watcher: the container driver keeps no channel to watch.
    expect(&["--enable", EVENTS, "events", "--loop", "-o", "json"], 4, "does not implement");
    // The VM's spec (disk, kernel) is not a container's.
    let vm_disk = sandbox.path().join("chain.qcow2");
    std::fs::write(&vm_disk, b"").unwrap_or_else(|e| panic!("{}: {e}", vm_disk.display()));
    let vm_spec = sandbox.write("vm.toml", &chain_spec(&vm_disk, free_local_port()));
    expect(&["define", &vm_spec], 2, "containers have no disks");
    // A container of the same name (its init obeys SIGTERM) walks what applies.
    let spec = sandbox.write("chain.toml", &container::spec_toml(DOMAIN, &["/bin/sleep", "1000"], ""));
    sandbox.ok("chain", &["define", &spec]);
    sandbox.ok("chain", &["start", DOMAIN]);
    expect(&["--enable", CONSOLE_READ, "console-log", DOMAIN, "-"], 4, "does not implement");
    let stats = sandbox.json("chain", &["domblkstat", DOMAIN]);
    assert_eq!(stats["errs"].as_u64(), Some(0), "{stats}");
    expect(&["domblkstat", DOMAIN, "vda"], 5, "no block devices");
    expect(&["snapshot-create", DOMAIN, "s1"], 4, "does not implement");
    expect(&["snapshot-revert", DOMAIN, "s1"], 4, "does not implement");
    sandbox.ok("chain", &["shutdown", DOMAIN, "--timeout-secs", "30"]);
    assert_eq!(sandbox.state("chain", DOMAIN), "shut off");
}
