//! `domain.events` / `capvirt events`: lifecycle events observed as they happen, on real QEMU
//! with the test guest (the CLI as a child process, another process changing the domain) and
//! on the in-memory test driver through the library (one thread watching, another changing).

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use capvirt_host::{
    convert::json_to_value,
    registry::{Bounds, Ty, ValuePath},
    CallObserver, Host, HostConfig, Registry, Value,
};
use capvirt_tests::{
    qemu::{guest_spec_toml, wait_until, Sandbox, GUEST_READY},
    test_plugin_dir,
};

/// Bound on one expected event reaching the watcher (the QEMU driver polls every 50 ms; QEMU
/// under TCG on a busy machine is slow to start).
pub(crate) const EVENT_WAIT: Duration = Duration::from_secs(60);
/// Bound on the test guest booting under TCG to its READY line.
const GUEST_BOOT: Duration = Duration::from_secs(180);
/// Bound on a watcher ending after Ctrl-C (it looks at its cancellation every 50 ms).
pub(crate) const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// Checks an event record against the registry's `DomainEvent` type.
pub(crate) fn assert_declared_shape(event: &Value) {
    let registry = Registry::embedded().unwrap_or_else(|e| panic!("registry: {e}"));
    let id = registry.types.lookup("DomainEvent").unwrap_or_else(|| panic!("no DomainEvent type"));
    let mut checked = event.clone();
    if let Err(e) = registry.types.validate(&Ty::Named(id), Bounds::default(), &mut checked, &ValuePath::root("event"))
    {
        panic!("event {event} does not match DomainEvent: {e}");
    }
}

/// A `capvirt events` child, killed (and reaped) when dropped, also when a test fails.
pub(crate) struct Watcher {
    pub(crate) child: Child,
    pub(crate) lines: mpsc::Receiver<String>,
    pub(crate) seen: Vec<serde_json::Value>,
}

impl Watcher {
    pub(crate) fn spawn(mut cmd: Command) -> Watcher {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn capvirt events: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Watcher { child, lines, seen: Vec::new() }
    }

    /// Waits for the next event of `domain` (others are kept in `seen` too).
    pub(crate) fn next_of(&mut self, domain: &str, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!("no further event of '{domain}' within {within:?}; events so far: {:#?}", self.seen)
            });
            let event: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
            assert_declared_shape(&json_to_value(&event));
            self.seen.push(event.clone());
            if event["domain"] == domain {
                return event;
            }
        }
    }

    /// The next event of `domain`, which must be of `kind`.
    pub(crate) fn expect(&mut self, domain: &str, kind: &str) -> serde_json::Value {
        let event = self.next_of(domain, EVENT_WAIT);
        assert_eq!(event["kind"], kind, "expected '{kind}' next; events so far: {:#?}", self.seen);
        event
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends SIGINT (what Ctrl-C does) and waits, bounded, for the exit status.
pub(crate) fn interrupt(watcher: &mut Watcher) -> std::process::ExitStatus {
    let pid = rustix::process::Pid::from_raw(watcher.child.id() as i32).unwrap_or_else(|| panic!("pid"));
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap_or_else(|e| panic!("SIGINT: {e}"));
    let deadline = Instant::now() + CANCEL_WAIT;
    loop {
        if let Some(status) = watcher.child.try_wait().unwrap_or_else(|e| panic!("wait: {e}")) {
            return status;
        }
        assert!(Instant::now() < deadline, "capvirt events still runs {CANCEL_WAIT:?} after SIGINT");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn qemu_lifecycle_events_reach_a_watching_cli_in_order_and_ctrl_c_ends_it_cleanly() {
    let sandbox = Sandbox::new();
    let uri = sandbox.uri("e", "&accel=tcg");
    let mut cmd = sandbox.capvirt_uri(&uri);
    cmd.args(["--enable", "domain.events", "events", "--loop", "-o", "json"]);
    let mut watcher = Watcher::spawn(cmd);

    // The watcher's first look at the state root is its baseline, not news: a probe domain,
    // redefined until its event arrives, tells that it watches.
    let disk = sandbox.blank_image("data", "raw");
    let probe = sandbox.write("probe.toml", &guest_spec_toml("probe", &disk, 1));
    let watching = wait_until(EVENT_WAIT, || {
        sandbox.ok_uri(&uri, &["define", probe.to_str().unwrap_or_default()]);
        watcher.lines.recv_timeout(Duration::from_millis(300)).is_ok_and(|line| line.contains("\"probe\""))
    });
    assert!(watching, "the watcher reported no definition of the probe domain");
    sandbox.ok_uri(&uri, &["undefine", "probe"]);
    watcher.expect("probe", "undefined");

    let port = capvirt_tests::qemu::free_local_port();
    let spec = sandbox.write("guest.toml", &guest_spec_toml("guest", &disk, port));
    sandbox.ok_uri(&uri, &["define", spec.to_str().unwrap_or_default()]);
    let defined = watcher.expect("guest", "defined");
    assert_eq!(defined["detail"], "added");
    assert_eq!(defined["state"], "shut off");

    sandbox.ok_uri(&uri, &["start", "guest"]);
    let started = watcher.expect("guest", "started");
    assert_eq!(started["state"], "running");
    sandbox.ok_uri(&uri, &["suspend", "guest"]);
    assert_eq!(watcher.expect("guest", "suspended")["state"], "paused");
    sandbox.ok_uri(&uri, &["resume", "guest"]);
    assert_eq!(watcher.expect("guest", "resumed")["state"], "running");

    // The guest listens to its power button once it printed READY.
    let booted = wait_until(GUEST_BOOT, || {
        sandbox.ok_uri(&uri, &["--enable", "domain.console-read", "console-log", "guest", "-"]).contains(GUEST_READY)
    });
    assert!(booted, "the test guest printed no {GUEST_READY} within {GUEST_BOOT:?}");
    sandbox.ok_uri(&uri, &["shutdown", "guest", "--timeout-secs", "120"]);
    let shutdown = watcher.expect("guest", "shutdown");
    assert_eq!(shutdown["origin"], "guest", "the guest powered itself off: {shutdown}");
    let stopped = watcher.expect("guest", "stopped");
    assert_eq!(stopped["detail"], "shutdown");
    assert_eq!(stopped["state"], "shut off");

    // A destroyed run ends differently; a killed QEMU is a crash.
    sandbox.ok_uri(&uri, &["start", "guest"]);
    watcher.expect("guest", "started");
    sandbox.ok_uri(&uri, &["destroy", "guest"]);
    assert_eq!(watcher.expect("guest", "stopped")["detail"], "destroyed");
    sandbox.ok_uri(&uri, &["start", "guest"]);
    watcher.expect("guest", "started");
    capvirt_tests::qemu::signal(sandbox.qemu_pid("e", "guest"), rustix::process::Signal::KILL);
    assert_eq!(watcher.expect("guest", "crashed")["state"], "crashed");
    sandbox.ok_uri(&uri, &["destroy", "guest"]);

    // A save pauses the guest, then ends the run as saved; a restore starts it again.
    sandbox.ok_uri(&uri, &["start", "guest"]);
    watcher.expect("guest", "started");
    let saved = sandbox.path().join("guest.save");
    let saved = saved.to_str().unwrap_or_default();
    sandbox.ok_uri(&uri, &["save", "guest", saved]);
    assert_eq!(watcher.expect("guest", "suspended")["detail"], "save");
    watcher.expect("guest", "saved");
    assert_eq!(watcher.expect("guest", "stopped")["detail"], "saved");
    sandbox.ok_uri(&uri, &["restore", saved]);
    assert_eq!(watcher.expect("guest", "restored")["state"], "running");
    sandbox.ok_uri(&uri, &["destroy", "guest"]);
    assert_eq!(watcher.expect("guest", "stopped")["detail"], "destroyed");
    sandbox.ok_uri(&uri, &["undefine", "guest"]);
    watcher.expect("guest", "undefined");

    // Events came in time order, and Ctrl-C ends the watcher with exit code 0.
    let times: Vec<u64> = watcher.seen.iter().filter_map(|e| e["time_ms"].as_u64()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "events out of time order: {:#?}", watcher.seen);
    let status = interrupt(&mut watcher);
    assert_eq!(status.code(), Some(0), "capvirt events after SIGINT: {status}");
}

#[test]
fn events_without_loop_end_after_the_first_and_a_named_domain_must_exist() {
    let sandbox = Sandbox::new();
    let uri = sandbox.uri("one", "");
    // Unknown domain: refused before watching (exit code 5).
    let out = sandbox.run_uri(&uri, &["--enable", "domain.events", "events", "nosuch", "--timeout", "5"]);
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch"));
    // Without the capability enabled: refused by policy (exit code 3), naming the switch.
    let out = sandbox.run_uri(&uri, &["events", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--enable domain.events"));
    // A quiet state root: the time bound ends the call (exit code 0, nothing printed).
    let started = Instant::now();
    let out = sandbox.run_uri(&uri, &["--enable", "domain.events", "events", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(started.elapsed() >= Duration::from_secs(1));

    // Without --loop: the first event ends the command (the probe is redefined until then).
    let mut cmd = sandbox.capvirt_uri(&uri);
    cmd.args(["--enable", "domain.events", "events"]);
    let mut watcher = Watcher::spawn(cmd);
    let disk = sandbox.blank_image("d", "qcow2");
    let spec = sandbox.write("one.toml", &capvirt_tests::qemu::spec_toml("one", 64, &disk, true));
    let printed = wait_until(EVENT_WAIT, || {
        sandbox.ok_uri(&uri, &["define", spec.to_str().unwrap_or_default()]);
        watcher.lines.recv_timeout(Duration::from_millis(300)).is_ok_and(|line| line.contains(": defined"))
    });
    assert!(printed, "no human-readable defined line");
    let exited = wait_until(CANCEL_WAIT, || watcher.child.try_wait().ok().flatten().is_some());
    assert!(exited, "capvirt events without --loop did not end after its first event");
}

/// Collects the events a library call reports; cancels it on request.
#[derive(Default)]
pub(crate) struct Collector {
    pub(crate) events: Mutex<Vec<Value>>,
    pub(crate) cancel: AtomicBool,
}

impl CallObserver for Collector {
    fn event(&self, name: &str, data: &Value) {
        assert_eq!(name, "domain-event");
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push(data.clone());
    }
    fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

impl Collector {
    pub(crate) fn kinds_of(&self, domain: &str) -> Vec<String> {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events
            .iter()
            .filter(|e| e.get("domain").and_then(Value::as_str) == Some(domain))
            .filter_map(|e| e.get("kind").and_then(Value::as_str).map(str::to_string))
            .collect()
    }
}

#[test]
fn test_driver_events_reach_a_library_watcher_from_another_thread() {
    let mut config =
        HostConfig { plugin_dirs: vec![test_plugin_dir().to_path_buf()], check_results: true, ..Default::default() };
    for experimental in ["domain.events", "domain.snapshot-create", "domain.snapshot-revert", "domain.snapshot-delete"]
    {
        config.policy.enabled.insert(experimental.to_string());
    }
    let host = Host::new(config).unwrap_or_else(|e| panic!("host: {e}"));
    let watching = host.connect("test:///events-lib", false).unwrap_or_else(|e| panic!("connect: {e}"));
    let acting = host.connect("test:///events-lib", false).unwrap_or_else(|e| panic!("connect: {e}"));
    let spec = |name: &str| {
        Value::record([(
            "spec",
            Value::record([("name", Value::string(name)), ("memory_mib", Value::UInt(64)), ("vcpus", Value::UInt(1))]),
        )])
    };
    let domain = |name: &str| Value::record([("domain", Value::string(name))]);
    let snapshot = |name: &str| Value::record([("domain", Value::string("vm")), ("name", Value::string(name))]);
    let collector = Collector::default();
    thread::scope(|scope| {
        let watcher = scope.spawn(|| watching.call_observed("domain.events", Value::record_empty(), &collector));
        // Subscribed once a probe's definition is reported.
        let subscribed = wait_until(EVENT_WAIT, || {
            acting.call("domain.define", spec("probe")).unwrap_or_else(|e| panic!("define: {e}"));
            !collector.kinds_of("probe").is_empty()
        });
        assert!(subscribed, "the watcher never reported the probe");
        for (id, args) in [
            ("domain.define", spec("vm")),
            ("domain.start", domain("vm")),
            ("domain.suspend", domain("vm")),
            ("domain.resume", domain("vm")),
            // Taken running; reverting the paused domain to it resumes it, as QEMU does.
            ("domain.snapshot-create", snapshot("s1")),
            ("domain.suspend", domain("vm")),
            ("domain.snapshot-revert", snapshot("s1")),
            ("domain.snapshot-delete", snapshot("s1")),
            ("domain.reboot", domain("vm")),
            ("domain.shutdown", domain("vm")),
            ("domain.undefine", domain("vm")),
        ] {
            acting.call(id, args).unwrap_or_else(|e| panic!("{id}: {e}"));
        }
        // A refused call changes nothing and reports nothing.
        assert!(acting.call("domain.resume", domain("probe")).is_err());
        let expected = [
            "defined",
            "started",
            "suspended",
            "resumed",
            "suspended",
            "resumed",
            "reset",
            "shutdown",
            "stopped",
            "undefined",
        ];
        let all_in = wait_until(EVENT_WAIT, || collector.kinds_of("vm").len() >= expected.len());
        assert!(all_in, "events so far: {:?}", collector.kinds_of("vm"));
        collector.cancel.store(true, Ordering::Relaxed);
        let summary =
            watcher.join().unwrap_or_else(|_| panic!("watcher panicked")).unwrap_or_else(|e| panic!("events: {e}"));
        assert_eq!(collector.kinds_of("vm"), expected);
        assert_eq!(summary.get("ended").and_then(Value::as_str), Some("cancelled"), "{summary}");
        let delivered = collector.events.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
        assert_eq!(summary.get("events").and_then(Value::as_u64), Some(delivered), "{summary}");
    });
    let events = collector.events.lock().unwrap_or_else(|p| p.into_inner());
    for event in events.iter() {
        assert_declared_shape(event);
    }
    let vm: Vec<&Value> = events.iter().filter(|e| e.get("domain").and_then(Value::as_str) == Some("vm")).collect();
    assert_eq!(vm[7].get("origin").and_then(Value::as_str), Some("guest"), "{}", vm[7]);
    assert_eq!(vm[6].get("origin").and_then(Value::as_str), Some("host"), "{}", vm[6]);
    assert_eq!(vm[2].get("state").and_then(Value::as_str), Some("paused"), "{}", vm[2]);
    assert_eq!(vm[5].get("detail").and_then(Value::as_str), Some("snapshot-revert"), "{}", vm[5]);
    assert_eq!(vm[5].get("state").and_then(Value::as_str), Some("running"), "{}", vm[5]);
    assert!(vm[9].get("state").is_none_or(Value::is_unit), "{}", vm[9]);
}

#[test]
fn bounded_watches_end_by_themselves_and_unknown_domains_are_refused() {
    let mut config = HostConfig { plugin_dirs: vec![test_plugin_dir().to_path_buf()], ..Default::default() };
    config.policy.enabled.insert("domain.events".to_string());
    let host = Host::new(config).unwrap_or_else(|e| panic!("host: {e}"));
    let conn = host.connect("test:///events-bounds", false).unwrap_or_else(|e| panic!("connect: {e}"));
    let started = Instant::now();
    let summary = conn
        .call("domain.events", Value::record([("timeout_ms", Value::UInt(200))]))
        .unwrap_or_else(|e| panic!("events: {e}"));
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(summary.get("ended").and_then(Value::as_str), Some("timeout"));
    assert_eq!(summary.get("events").and_then(Value::as_u64), Some(0));
    let refused = conn.call("domain.events", Value::record([("domain", Value::string("nosuch"))]));
    let error = refused.err().unwrap_or_else(|| panic!("watching an unknown domain was accepted"));
    assert_eq!(error.category(), capvirt_host::ErrorCategory::NotFound, "{error}");
}
