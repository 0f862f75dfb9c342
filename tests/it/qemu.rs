//! The QEMU driver against real `qemu-system-x86_64` processes, through the `capvirt` CLI and
//! through the host library. Every test owns a [`Sandbox`] that kills its QEMUs on drop.

use std::{
    fs,
    sync::Mutex,
    time::{Duration, Instant},
};

use capvirt_host::{CallObserver, ErrorCategory, Host, HostConfig, Value};
use capvirt_tests::qemu::{
    output_within, peer, qemu_plugin_dir, signal, spec_toml, spec_value, under_test, wait_until, Qemu, Sandbox,
    COMMAND_TIMEOUT,
};

/// Bound on a freshly booted guest's firmware reading its disk (polled: it costs nothing when
/// the read comes early). QEMU 10's SeaBIOS reads seconds later than 7.2's, and a loaded
/// 2-core machine running TCG guests makes it later still.
const FIRMWARE_READ: Duration = Duration::from_secs(120);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn domain(name: &str) -> Value {
    Value::record([("domain", Value::string(name))])
}

/// Exits with `code`, saying `needle` on stderr.
fn assert_refused(out: &std::process::Output, code: i32, needle: &str) {
    assert_eq!(out.status.code(), Some(code), "expected exit {code}, stderr: {}", stderr(out));
    assert!(stderr(out).contains(needle), "stderr lacks {needle:?}: {}", stderr(out));
}

fn decode_png(path: &std::path::Path) -> (u32, u32) {
    let file = fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader =
        png::Decoder::new(std::io::BufReader::new(file)).read_info().unwrap_or_else(|e| panic!("not a PNG: {e}"));
    let mut pixels = vec![0; reader.output_buffer_size().unwrap_or_else(|| panic!("no buffer size"))];
    let frame = reader.next_frame(&mut pixels).unwrap_or_else(|e| panic!("PNG frame: {e}"));
    (frame.width, frame.height)
}

#[test]
fn cli_drives_a_domain_through_its_whole_life() {
    let sandbox = Sandbox::new();
    let disk = sandbox.boot_disk("boot");
    let spec = sandbox.write("vm.toml", &spec_toml("vm1", 64, &disk, false));
    let spec = spec.to_str().unwrap_or_default();

    sandbox.ok("a", &["define", spec]);
    assert_eq!(sandbox.json("a", &["list", "--all"]), serde_json::json!([{"name": "vm1", "state": "shut off"}]));
    assert_eq!(sandbox.json("a", &["list"]), serde_json::json!([]));
    sandbox.ok("a", &["start", "vm1"]);
    assert_eq!(sandbox.json("a", &["list"]), serde_json::json!([{"name": "vm1", "state": "running"}]));
    let info = sandbox.json("a", &["dominfo", "vm1"]);
    assert_eq!((info["vcpus"].as_u64(), info["memory_kib"].as_u64()), (Some(1), Some(65536)));
    assert_refused(&sandbox.run("a", &["start", "vm1"]), 6, "already running");
    assert_refused(&sandbox.run("a", &["undefine", "vm1"]), 6, "destroy it first");

    // suspend → resume (QMP stop/cont), each refused in the wrong state.
    sandbox.ok("a", &["suspend", "vm1"]);
    assert_eq!(sandbox.state("a", "vm1"), "paused");
    assert_refused(&sandbox.run("a", &["suspend", "vm1"]), 6, "not running (state: paused)");
    sandbox.ok("a", &["resume", "vm1"]);
    assert_eq!(sandbox.state("a", "vm1"), "running");
    assert_refused(&sandbox.run("a", &["resume", "vm1"]), 6, "not paused");

    // The firmware reads the boot disk: block statistics count it.
    assert!(
        wait_until(FIRMWARE_READ, || sandbox.json("a", &["domblkstat", "vm1", "vda"])["rd_req"].as_u64() > Some(0)),
        "SeaBIOS never read vda"
    );
    let total = sandbox.json("a", &["domblkstat", "vm1"]);
    assert!(total["rd_bytes"].as_u64() >= Some(512), "{total}");
    assert_refused(&sandbox.run("a", &["domblkstat", "vm1", "vdz"]), 5, "no disk 'vdz'");

    // USB hotplug of a tablet, then unplug (waits for DEVICE_DELETED).
    let tablet = sandbox.write("tablet.toml", "kind = \"usb-tablet\"\nid = \"tablet0\"\n");
    let tablet = tablet.to_str().unwrap_or_default();
    sandbox.ok("a", &["attach-device", "vm1", tablet]);
    assert_refused(&sandbox.run("a", &["attach-device", "vm1", tablet]), 2, "already has a device 'tablet0'");
    sandbox.ok("a", &["detach-device", "vm1", tablet]);
    assert_refused(&sandbox.run("a", &["detach-device", "vm1", tablet]), 5, "no device 'tablet0'");
    sandbox.ok("a", &["attach-device", "vm1", tablet]);

    // Screenshot: a valid PNG of the VGA text mode SeaBIOS leaves (720x400).
    let shot = sandbox.path().join("shot.png");
    sandbox.ok("a", &["screenshot", "vm1", shot.to_str().unwrap_or_default()]);
    assert_eq!(decode_png(&shot), (720, 400));

    // save → shut off; restore → running again, with the hot-plugged tablet.
    let saved = sandbox.path().join("vm1.save");
    let saved = saved.to_str().unwrap_or_default();
    sandbox.ok("a", &["save", "vm1", saved]);
    assert_eq!(sandbox.state("a", "vm1"), "shut off");
    assert_refused(&sandbox.run("a", &["save", "vm1", saved]), 2, "already exists");
    let other = sandbox.path().join("other.save");
    assert_refused(&sandbox.run("a", &["save", "vm1", other.to_str().unwrap_or_default()]), 6, "not running");
    assert!(!other.exists());
    let out = sandbox.ok("a", &["restore", saved]);
    assert!(out.contains("restored"), "{out}");
    assert_eq!(sandbox.state("a", "vm1"), "running");
    sandbox.ok("a", &["detach-device", "vm1", tablet]);

    // migrate to a second state root: the source ends shut off, the destination runs it.
    let dest = sandbox.uri("b", "");
    sandbox.ok("a", &["migrate", "vm1", &dest]);
    assert_eq!(sandbox.state("a", "vm1"), "shut off");
    assert_eq!(sandbox.json("b", &["list"]), serde_json::json!([{"name": "vm1", "state": "running"}]));
    assert_eq!(sandbox.json("b", &["domblkstat", "vm1"])["errs"].as_u64(), Some(0));

    // A guest without an OS ignores the ACPI power button: bounded wait, domain left running.
    let started = Instant::now();
    let out = sandbox.run("b", &["shutdown", "vm1", "--timeout-secs", "1"]);
    assert_refused(&out, 1, "did not power off within 1 s");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(sandbox.state("b", "vm1"), "running");
    sandbox.ok("b", &["destroy", "vm1"]);
    assert_eq!(sandbox.state("b", "vm1"), "shut off");
    assert_refused(&sandbox.run("b", &["destroy", "vm1"]), 6, "not running");

    sandbox.ok("b", &["undefine", "vm1"]);
    sandbox.ok("a", &["undefine", "vm1"]);
    assert_eq!(sandbox.json("a", &["list", "--all"]), serde_json::json!([]));
    assert_refused(&sandbox.run("a", &["dominfo", "vm1"]), 5, "not defined");
    assert!(sandbox.processes().is_empty(), "QEMU processes left: {:?}", sandbox.processes());
}

/// Records what a call reports.
#[derive(Default)]
struct Progress(Mutex<Vec<(u64, u64)>>);

impl CallObserver for Progress {
    fn progress(&self, done: u64, total: u64) {
        if let Ok(mut seen) = self.0.lock() {
            seen.push((done, total));
        }
    }
}

#[test]
fn host_library_drives_tcg_domains_and_reports_migration_progress() {
    let sandbox = Sandbox::new();
    let disk = sandbox.boot_disk("boot");
    let stick = sandbox.blank_image("stick", "raw");
    let host = Host::new(HostConfig {
        plugin_dirs: vec![qemu_plugin_dir().to_path_buf()],
        check_results: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let conn = host.connect(&sandbox.uri("a", "&accel=tcg"), false).unwrap_or_else(|e| panic!("{e}"));
    let call = |id: &str, args: Value| conn.call(id, args).unwrap_or_else(|e| panic!("{id}: {e}"));

    let host_info = call("host.info", Value::Unit);
    assert_eq!(host_info.get("hypervisor").and_then(Value::as_str), Some("QEMU"));
    let version = host_info.get("hypervisor_version").and_then(Value::as_str).unwrap_or_default();
    assert!(version.chars().next().is_some_and(|c| c.is_ascii_digit()), "version {version:?}");

    let spec = spec_value("tcg1", &disk, "sata");
    call("domain.define", Value::record([("spec", spec)]));
    call("domain.start", domain("tcg1"));
    let state = |conn: &capvirt_host::Connection| {
        let info = conn.call("domain.info", domain("tcg1")).unwrap_or_else(|e| panic!("info: {e}"));
        info.get("state").and_then(Value::as_str).unwrap_or_default().to_string()
    };
    assert_eq!(state(&conn), "running");
    for _ in 0..20 {
        call("domain.suspend", domain("tcg1"));
        call("domain.resume", domain("tcg1"));
    }
    call("domain.suspend", domain("tcg1"));
    assert_eq!(state(&conn), "paused");
    let twice = conn.call("domain.suspend", domain("tcg1")).err().map(|e| e.category());
    assert_eq!(twice, Some(ErrorCategory::InvalidState));
    call("domain.resume", domain("tcg1"));
    // The SATA disk (sda) is read by the firmware.
    let sda = Value::record([("domain", Value::from("tcg1")), ("device", Value::from("sda"))]);
    assert!(wait_until(FIRMWARE_READ, || {
        call("domain.block-stats", sda.clone()).get("rd_req").and_then(Value::as_u64) > Some(0)
    }));
    // A headless domain cannot be screenshotted.
    let shot = conn.call("domain.screenshot", domain("tcg1")).err().map(|e| e.category());
    assert_eq!(shot, Some(ErrorCategory::Unsupported));

    // A USB disk hot-plugged through blockdev-add + device_add has its own statistics.
    let usb_disk = Value::record([
        ("kind", Value::from("usb-disk")),
        ("id", Value::from("stick")),
        ("path", Value::string(stick.to_str().unwrap_or_default())),
        ("format", Value::from("raw")),
    ]);
    let with_device = |device: Value| Value::record([("domain", Value::from("tcg1")), ("device", device)]);
    call("domain.attach-device", with_device(usb_disk.clone()));
    let stick_stats = Value::record([("domain", Value::from("tcg1")), ("device", Value::from("stick"))]);
    assert_eq!(call("domain.block-stats", stick_stats.clone()).get("errs").and_then(Value::as_u64), Some(0));
    call("domain.detach-device", with_device(usb_disk));
    let gone = conn.call("domain.block-stats", stick_stats).err().map(|e| e.category());
    assert_eq!(gone, Some(ErrorCategory::NotFound));
    call("domain.reboot", domain("tcg1"));

    // Migration reports progress from query-migrate, up to done == total.
    let progress = Progress::default();
    let args =
        Value::record([("domain", Value::from("tcg1")), ("dest_uri", Value::string(&sandbox.uri("b", "&accel=tcg")))]);
    conn.call_observed("domain.migrate", args, &progress).unwrap_or_else(|e| panic!("migrate: {e}"));
    let seen = progress.0.lock().map(|s| s.clone()).unwrap_or_default();
    let last = seen.last().copied().unwrap_or_else(|| panic!("no progress reported"));
    assert!(last.1 >= 64 << 20 && last.0 == last.1, "progress {seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "progress went backwards: {seen:?}");
    assert_eq!(state(&conn), "shut off");
    let dest = host.connect(&sandbox.uri("b", "&accel=tcg"), false).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(state(&dest), "running");
    dest.call("domain.destroy", domain("tcg1")).unwrap_or_else(|e| panic!("destroy: {e}"));
    // Migrating to the source's own root is refused.
    let own = Value::record([("domain", Value::from("tcg1")), ("dest_uri", Value::string(&sandbox.uri("a", "")))]);
    assert_eq!(conn.call("domain.migrate", own).err().map(|e| e.category()), Some(ErrorCategory::Usage));
}

#[test]
fn sigkilled_qemu_is_reported_crashed_and_starts_again() {
    let sandbox = Sandbox::new();
    let disk = sandbox.boot_disk("boot");
    let spec = sandbox.write("vm.toml", &spec_toml("victim", 64, &disk, true));
    sandbox.ok("r", &["define", spec.to_str().unwrap_or_default()]);
    sandbox.ok("r", &["start", "victim"]);
    let pid = sandbox.qemu_pid("r", "victim");
    signal(pid, rustix::process::Signal::KILL);
    assert!(wait_until(Duration::from_secs(10), || !sandbox.processes().contains(&pid)), "QEMU survived SIGKILL");

    assert_eq!(sandbox.state("r", "victim"), "crashed");
    assert_eq!(sandbox.json("r", &["list", "--all"]), serde_json::json!([{"name": "victim", "state": "crashed"}]));
    assert_eq!(sandbox.json("r", &["list"]), serde_json::json!([]));
    assert_refused(&sandbox.run("r", &["suspend", "victim"]), 6, "crashed");
    sandbox.ok("r", &["start", "victim"]);
    assert_eq!(sandbox.state("r", "victim"), "running");
    assert_ne!(sandbox.qemu_pid("r", "victim"), pid);
    sandbox.ok("r", &["destroy", "victim"]);
    assert_eq!(sandbox.state("r", "victim"), "shut off");
}

#[test]
fn bad_specs_are_refused_and_nothing_is_written() {
    let sandbox = Sandbox::new();
    let qcow2 = sandbox.blank_image("q", "qcow2");
    let raw = sandbox.blank_image("r", "raw");
    let (qcow2, raw) = (qcow2.display().to_string(), raw.display().to_string());
    let missing = sandbox.path().join("missing.qcow2").display().to_string();
    let dir = sandbox.path().display().to_string();
    let disk = |path: &str, format: &str, bus: &str, extra: &str| {
        format!("\n[[disks]]\npath = \"{path}\"\nformat = \"{format}\"\nbus = \"{bus}\"\n{extra}")
    };
    let base = |name: &str, memory: u64| format!("name = \"{name}\"\nmemory_mib = {memory}\nvcpus = 1\n");
    let tablets: String = (0..9).map(|i| format!("\n[[devices]]\nkind = \"usb-tablet\"\nid = \"t{i}\"\n")).collect();
    let cases: Vec<(String, i32, &str)> = vec![
        (base("a", 64) + &disk(&missing, "qcow2", "virtio", ""), 2, "does not exist"),
        (base("a", 64) + &disk(&raw, "qcow2", "virtio", ""), 2, "is not a qcow2 image"),
        (base("a", 64) + &disk(&qcow2, "raw", "virtio", ""), 2, "is a qcow2 image but is declared raw"),
        (base("a", 64) + &disk(&dir, "raw", "virtio", ""), 2, "not a regular file"),
        (base("a", 1048576), 2, "exceeds this host"),
        (base("a", 64) + &disk(&raw, "raw", "sata", "readonly = true\n"), 2, "cannot be read-only"),
        (
            base("a", 64)
                + &disk(&raw, "raw", "virtio", "target = \"vda\"\n")
                + &disk(&qcow2, "qcow2", "virtio", "target = \"vda\"\n"),
            2,
            "used twice",
        ),
        (base("a", 64) + &disk(&raw, "raw", "virtio", "") + &disk(&raw, "raw", "sata", ""), 2, "used twice"),
        (base("a", 64) + "\n[[devices]]\nkind = \"usb-tablet\"\nid = \"0tab\"\n", 2, "start with a letter"),
        (base("a", 64) + "\n[[devices]]\nkind = \"usb-disk\"\nid = \"stick\"\n", 2, "needs `path` and `format`"),
        (base("a", 64) + &tablets, 2, "ports"),
        // Refused by the registry's formats before the driver sees them.
        (base("../evil", 64), 2, "name"),
        (base("a", 8), 2, "memory_mib"),
    ];
    for (index, (text, code, needle)) in cases.iter().enumerate() {
        let spec = sandbox.write(&format!("bad{index}.toml"), text);
        let out = sandbox.run("root", &["define", spec.to_str().unwrap_or_default()]);
        assert_refused(&out, *code, needle);
    }
    // A file that is no save file is refused too.
    let bogus = sandbox.write("bogus.save", "CAPVIRT-QEMU-SAVE 1\n99999999\n");
    assert_refused(
        &sandbox.run("root", &["restore", bogus.to_str().unwrap_or_default()]),
        2,
        "not a capvirt QEMU save file",
    );
    assert!(!sandbox.root("root").exists(), "a refused spec wrote into the state root");
    assert_eq!(sandbox.json("root", &["list", "--all"]), serde_json::json!([]));
}

#[test]
fn capabilities_are_reported_truthfully() {
    let sandbox = Sandbox::new();
    let reported = sandbox.json("r", &["capabilities"]);
    let registry = capvirt_host::Registry::embedded().unwrap_or_else(|e| panic!("{e}"));
    let rows = reported["capabilities"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), registry.capabilities().len());
    for cap in registry.capabilities() {
        let row = rows.iter().find(|r| r["id"] == cap.id()).unwrap_or_else(|| panic!("{} missing", cap.id()));
        // Every callable capability is implemented; drafts and the rejected monitor passthrough are not.
        assert_eq!(row["implemented"].as_bool(), Some(cap.stage().is_callable()), "{row}");
    }
    let plugins = sandbox.json("r", &["plugins"]);
    let qemu = plugins.as_array().and_then(|p| p.iter().find(|p| p["name"] == "qemu")).cloned();
    assert!(qemu.is_some(), "{plugins}");
}

#[test]
fn held_monitors_and_stopped_qemus_never_hang_other_callers() {
    let sandbox = Sandbox::new();
    let disk = sandbox.boot_disk("boot");
    let spec = sandbox.write("vm.toml", &spec_toml("busy", 64, &disk, true));
    sandbox.ok("r", &["define", spec.to_str().unwrap_or_default()]);
    sandbox.ok("r", &["start", "busy"]);

    // A long-lived library connection keeps one monitor channel...
    let host = Host::new(HostConfig { plugin_dirs: vec![qemu_plugin_dir().to_path_buf()], ..Default::default() })
        .unwrap_or_else(|e| panic!("{e}"));
    let conn = host.connect(&sandbox.uri("r", ""), false).unwrap_or_else(|e| panic!("{e}"));
    conn.call("domain.suspend", domain("busy")).unwrap_or_else(|e| panic!("{e}"));
    // ...while concurrent capvirt processes share the others.
    let children: Vec<_> = (0..6)
        .map(|_| {
            let mut cmd = sandbox.capvirt("r");
            cmd.args(["--output", "json", "dominfo", "busy"]);
            std::thread::spawn(move || output_within(cmd, COMMAND_TIMEOUT))
        })
        .collect();
    for child in children {
        let out = child.join().unwrap_or_else(|_| panic!("thread panicked"));
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("\"paused\""));
    }
    conn.call("domain.resume", domain("busy")).unwrap_or_else(|e| panic!("{e}"));

    // A stopped QEMU process cannot answer: callers get an answer anyway, in bounded time.
    let pid = sandbox.qemu_pid("r", "busy");
    signal(pid, rustix::process::Signal::STOP);
    let started = Instant::now();
    let out = sandbox.run("r", &["--output", "json", "dominfo", "busy"]);
    signal(pid, rustix::process::Signal::CONT);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"blocked\""), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    // Once it runs again, so does its monitor.
    assert_eq!(sandbox.state("r", "busy"), "running");
    conn.call("domain.suspend", domain("busy")).unwrap_or_else(|e| panic!("{e}"));
    sandbox.ok("r", &["destroy", "busy"]);
    // The library connection's cached channel is gone with its QEMU: a clear state error.
    let after = conn.call("domain.resume", domain("busy")).err().map(|e| e.category());
    assert_eq!(after, Some(ErrorCategory::InvalidState));
}

#[test]
fn concurrent_processes_start_a_domain_once() {
    let sandbox = Sandbox::new();
    let disk = sandbox.boot_disk("boot");
    let spec = sandbox.write("vm.toml", &spec_toml("once", 64, &disk, true));
    sandbox.ok("r", &["define", spec.to_str().unwrap_or_default()]);
    // Racing starts are serialized by the domain lock: one QEMU, the others told it runs.
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let mut cmd = sandbox.capvirt("r");
            cmd.args(["start", "once"]);
            std::thread::spawn(move || output_within(cmd, COMMAND_TIMEOUT))
        })
        .collect();
    let outcomes: Vec<_> =
        racers.into_iter().map(|r| r.join().unwrap_or_else(|_| panic!("thread panicked")).status.code()).collect();
    assert_eq!(outcomes.iter().filter(|c| **c == Some(0)).count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|c| **c == Some(6)).count(), 3, "{outcomes:?}");
    assert_eq!(sandbox.processes().len(), 1, "{:?}", sandbox.processes());
    assert_eq!(sandbox.state("r", "once"), "running");
    sandbox.ok("r", &["destroy", "once"]);
}

#[test]
fn idle_connections_give_their_monitor_channels_back() {
    let sandbox = Sandbox::new();
    let disk = sandbox.boot_disk("boot");
    let spec = sandbox.write("vm.toml", &spec_toml("shared", 64, &disk, true));
    sandbox.ok("r", &["define", spec.to_str().unwrap_or_default()]);
    sandbox.ok("r", &["start", "shared"]);
    let host = Host::new(HostConfig { plugin_dirs: vec![qemu_plugin_dir().to_path_buf()], ..Default::default() })
        .unwrap_or_else(|e| panic!("{e}"));
    // More long-lived connections than the domain has monitor channels...
    let connections: Vec<_> = (0..8)
        .map(|_| {
            let conn = host.connect(&sandbox.uri("r", ""), false).unwrap_or_else(|e| panic!("{e}"));
            conn.call("domain.info", domain("shared")).unwrap_or_else(|e| panic!("{e}"));
            conn
        })
        .collect();
    // ...then go idle: their channels are released and another process gets one.
    let started = Instant::now();
    assert_eq!(sandbox.state("r", "shared"), "running");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    // An idle connection reconnects transparently.
    for conn in &connections {
        conn.call("domain.suspend", domain("shared")).unwrap_or_else(|e| panic!("{e}"));
        conn.call("domain.resume", domain("shared")).unwrap_or_else(|e| panic!("{e}"));
    }
    sandbox.ok("r", &["destroy", "shared"]);
}

/// `MAJOR.MINOR` of a QEMU, as its versioned machine types name it.
fn release_line(qemu: &Qemu) -> (u32, u32) {
    (qemu.version.0, qemu.version.1)
}

#[test]
fn the_driver_reports_the_qemu_it_drives() {
    let sandbox = Sandbox::new();
    let qemu = under_test();
    let node = sandbox.json("a", &["nodeinfo"]);
    let reported = node["hypervisor_version"].as_str().unwrap_or_default();
    assert!(reported.starts_with(&qemu.number()), "nodeinfo says {reported:?}; the emulator says {}", qemu.banner);

    let disk = sandbox.boot_disk("boot");
    let spec = sandbox.write("vm.toml", &spec_toml("vm1", 64, &disk, true));
    sandbox.ok("a", &["define", spec.to_str().unwrap_or_default()]);
    assert_eq!(sandbox.json("a", &["dominfo", "vm1"]).get("hypervisor_version"), None, "shut off: no version");
    sandbox.ok("a", &["start", "vm1"]);
    let info = sandbox.json("a", &["dominfo", "vm1"]);
    let running = info["hypervisor_version"].as_str().unwrap_or_default();
    assert!(running.starts_with(&qemu.number()), "dominfo says {running:?}; the emulator says {}", qemu.banner);
    // A first start runs the emulator's newest q35 machine (a restore pins the saved one).
    let cmdline = fs::read(format!("/proc/{}/cmdline", sandbox.qemu_pid("a", "vm1"))).unwrap_or_default();
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    assert!(args.windows(2).any(|w| w == ["-machine", "q35"]), "first start runs q35: {args:?}");
    sandbox.ok("a", &["destroy", "vm1"]);
    assert_eq!(sandbox.json("a", &["dominfo", "vm1"]).get("hypervisor_version"), None);
}

#[test]
fn emulators_that_are_no_supported_qemu_are_refused_and_nothing_is_written() {
    let sandbox = Sandbox::new();
    let old = sandbox.write("old-qemu", "#!/bin/sh\necho 'QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2)'\n");
    let plain = sandbox.write("plain", "not a program\n");
    fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod: {e}"));
    let dir = sandbox.path().display().to_string();
    let cases: [(&str, i32, &str); 6] = [
        ("/bin/echo", 2, "/bin/echo is not a QEMU emulator"),
        ("/bin/false", 2, "`-version` failed"),
        (old.to_str().unwrap_or_default(), 4, "is QEMU 6.2.0; the qemu driver supports QEMU 7.2.0 or newer"),
        (plain.to_str().unwrap_or_default(), 2, "not executable"),
        ("relative/qemu-system-x86_64", 2, "must be an absolute path"),
        (&dir, 2, "not a regular file"),
    ];
    for (emulator, code, needle) in cases {
        let uri = format!("qemu:///session?root={}&emulator={emulator}", sandbox.root("root").display());
        assert_refused(&sandbox.run_uri(&uri, &["nodeinfo"]), code, needle);
        assert!(!sandbox.root("root").exists(), "a refused emulator ({emulator}) wrote into the state root");
    }
    // A domain is never started on a QEMU older than supported.
    let disk = sandbox.boot_disk("boot");
    let spec = sandbox.write("vm.toml", &spec_toml("vm1", 64, &disk, true));
    sandbox.ok("root", &["define", spec.to_str().unwrap_or_default()]);
    let old_uri = format!("qemu:///session?root={}&emulator={}", sandbox.root("root").display(), old.display());
    assert_refused(&sandbox.run_uri(&old_uri, &["start", "vm1"]), 4, "6.2.0");
    assert_eq!(sandbox.state("root", "vm1"), "shut off");
}

/// A domain started on the QEMU under test, saved, then restored and migrated onto the peer
/// QEMU: a newer (or the same) QEMU runs it on the machine type it was started with and reports
/// its own version; an older one refuses it naming both versions, and nothing is left behind.
#[test]
fn saved_and_migrated_state_moves_to_newer_qemus_only() {
    let sandbox = Sandbox::new();
    let (here, there) = (under_test(), peer());
    let disk = sandbox.boot_disk("boot");
    let spec = sandbox.write("vm.toml", &spec_toml("vm1", 64, &disk, true));
    let source = sandbox.uri_on(here, "a", "&accel=tcg");
    sandbox.ok_uri(&source, &["define", spec.to_str().unwrap_or_default()]);
    sandbox.ok_uri(&source, &["start", "vm1"]);
    let save = sandbox.path().join("vm1.save");
    let save = save.to_str().unwrap_or_default();
    sandbox.ok_uri(&source, &["save", "vm1", save]);

    let restored = sandbox.uri_on(there, "b", "&accel=tcg");
    let out = sandbox.run_uri(&restored, &["restore", save]);
    let (major, minor) = release_line(here);
    if release_line(there) >= release_line(here) {
        assert!(out.status.success(), "restore on QEMU {} failed: {}", there.number(), stderr(&out));
        let info = sandbox.json_uri(&restored, &["dominfo", "vm1"]);
        assert_eq!(info["state"], "running");
        let version = info["hypervisor_version"].as_str().unwrap_or_default();
        assert!(version.starts_with(&there.number()), "restored domain reports {version:?}, runs {}", there.banner);
        let cmdline = fs::read(format!("/proc/{}/cmdline", sandbox.qemu_pid("b", "vm1"))).unwrap_or_default();
        let machine = format!("pc-q35-{major}.{minor}");
        assert!(
            cmdline.split(|b| *b == 0).any(|a| a == machine.as_bytes()),
            "restored domain does not run the saved machine {machine}"
        );
        sandbox.ok_uri(&restored, &["destroy", "vm1"]);
    } else {
        assert_refused(&out, 4, &format!("QEMU {}, which cannot run it", there.number()));
        assert!(stderr(&out).contains(&format!("QEMU {major}.{minor}")), "{}", stderr(&out));
        assert_eq!(sandbox.json_uri(&restored, &["list", "--all"]), serde_json::json!([]));
    }

    // The same rule for a running domain migrated onto the peer.
    sandbox.ok_uri(&source, &["restore", save]);
    let dest = sandbox.uri_on(there, "c", "&accel=tcg");
    let out = sandbox.run_uri(&source, &["migrate", "vm1", &dest]);
    if release_line(there) >= release_line(here) {
        assert!(out.status.success(), "migrate onto QEMU {} failed: {}", there.number(), stderr(&out));
        let version = sandbox.json_uri(&dest, &["dominfo", "vm1"])["hypervisor_version"].clone();
        assert!(version.as_str().unwrap_or_default().starts_with(&there.number()), "{version}");
    } else {
        assert_refused(&out, 4, "cannot run it");
        assert_eq!(sandbox.json_uri(&source, &["dominfo", "vm1"])["state"], "running");
    }
}

/// Runs `qemu-img ARGS…`, which must succeed.
fn qemu_img(args: &[&str]) {
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.args(args);
    let out = output_within(cmd, COMMAND_TIMEOUT);
    assert!(out.status.success(), "qemu-img {args:?}: {}", stderr(&out));
}

#[test]
fn images_that_name_other_files_are_refused_at_define_and_at_start() {
    let sandbox = Sandbox::new();
    let secret = sandbox.write("secret.raw", "host secret\n");
    let evil = sandbox.path().join("evil.qcow2");
    let (secret, evil) = (secret.display().to_string(), evil.display().to_string());
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &secret, "-F", "raw", &evil, "8M"]);
    let spec = sandbox.write("evil.toml", &spec_toml("evil", 64, std::path::Path::new(&evil), true));
    assert_refused(&sandbox.run("r", &["define", spec.to_str().unwrap_or_default()]), 2, "has a backing file");

    let data = sandbox.path().join("data.raw").display().to_string();
    let external = sandbox.path().join("external.qcow2").display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &format!("data_file={data}"), &external, "8M"]);
    let spec = sandbox.write("external.toml", &spec_toml("external", 64, std::path::Path::new(&external), true));
    assert_refused(&sandbox.run("r", &["define", spec.to_str().unwrap_or_default()]), 2, "external file");
    assert!(!sandbox.root("r").exists(), "a refused image wrote into the state root");

    // An image swapped for a backed one after define is refused before QEMU opens it.
    let disk = sandbox.boot_disk("swapped");
    let spec = sandbox.write("swapped.toml", &spec_toml("swapped", 64, &disk, true));
    sandbox.ok("r", &["define", spec.to_str().unwrap_or_default()]);
    fs::copy(&evil, &disk).unwrap_or_else(|e| panic!("copy: {e}"));
    assert_refused(&sandbox.run("r", &["start", "swapped"]), 2, "has a backing file");
    assert_eq!(sandbox.state("r", "swapped"), "shut off");
    assert!(sandbox.processes().is_empty(), "a QEMU started: {:?}", sandbox.processes());
}

#[test]
fn a_held_or_deleted_monitor_socket_never_blocks_the_domain_or_fails_the_listing() {
    let sandbox = Sandbox::new();
    for name in ["held", "other"] {
        let disk = sandbox.boot_disk(name);
        let spec = sandbox.write(&format!("{name}.toml"), &spec_toml(name, 64, &disk, true));
        sandbox.ok("r", &["define", spec.to_str().unwrap_or_default()]);
        sandbox.ok("r", &["start", name]);
    }
    let run = sandbox.root("r").join("domains/held/run");
    // A client outside capvirt takes channel 0 and never lets go.
    let holder = std::os::unix::net::UnixStream::connect(run.join("qmp0.sock"))
        .unwrap_or_else(|e| panic!("connect to qmp0.sock: {e}"));
    let started = Instant::now();
    assert_eq!(sandbox.state("r", "held"), "running");
    sandbox.ok("r", &["suspend", "held"]);
    assert_eq!(sandbox.state("r", "held"), "paused");
    sandbox.ok("r", &["resume", "held"]);
    assert!(started.elapsed() < Duration::from_secs(5), "a held channel slowed calls: {:?}", started.elapsed());
    drop(holder);

    // One channel's socket deleted: the domain keeps its state and the listing works for all.
    fs::remove_file(run.join("qmp0.sock")).unwrap_or_else(|e| panic!("remove qmp0.sock: {e}"));
    assert_eq!(
        sandbox.json("r", &["list", "--all"]),
        serde_json::json!([{"name": "held", "state": "running"}, {"name": "other", "state": "running"}])
    );
    assert_refused(&sandbox.run("r", &["start", "held"]), 6, "already running");
    // Refusals name the state that caused them.
    assert_refused(&sandbox.run("r", &["resume", "held"]), 6, "is not paused (state: running)");
    sandbox.ok("r", &["destroy", "held"]);
    sandbox.ok("r", &["destroy", "other"]);
}

#[test]
fn restore_refuses_fifos_and_devices_without_waiting() {
    let sandbox = Sandbox::new();
    let fifo = sandbox.path().join("state.fifo");
    let mut mkfifo = std::process::Command::new("mkfifo");
    mkfifo.arg(&fifo);
    assert!(output_within(mkfifo, COMMAND_TIMEOUT).status.success());
    for path in [fifo.to_str().unwrap_or_default(), "/dev/zero"] {
        let started = Instant::now();
        assert_refused(&sandbox.run("r", &["restore", path]), 2, "not a regular file");
        assert!(started.elapsed() < Duration::from_secs(10), "{path}: took {:?}", started.elapsed());
    }
}

/// Bound on the test guest booting under TCG to its READY line (about 5 s on an idle 2-core
/// machine; polled).
const GUEST_BOOT: Duration = Duration::from_secs(180);
/// Bound on the test guest powering off after the ACPI power button (well under a second).
const GUEST_POWEROFF_SECS: u64 = 60;

/// The test guest's console as `console-log DOMAIN -` prints it.
fn console(sandbox: &Sandbox, uri: &str, domain: &str) -> String {
    sandbox.ok_uri(uri, &["--enable", "domain.console-read", "console-log", domain, "-"])
}

#[test]
fn a_real_guest_boots_prints_serves_writes_and_obeys_the_power_button() {
    use capvirt_tests::qemu::{free_local_port, guest_spec_toml, http_get, GUEST_DISK_MARK, GUEST_PAGE, GUEST_READY};
    let sandbox = Sandbox::new();
    // TCG whatever the machine offers: the same guest timing everywhere.
    let uri = sandbox.uri("g", "&accel=tcg");
    let disk = sandbox.blank_image("data", "raw");
    let port = free_local_port();
    let spec = sandbox.write("guest.toml", &guest_spec_toml("guest", &disk, port));
    sandbox.ok_uri(&uri, &["define", spec.to_str().unwrap_or_default()]);
    // The MAC address generated at define is stored with the definition.
    let stored = fs::read_to_string(sandbox.root("g").join("domains/guest/domain.toml")).unwrap_or_default();
    assert!(stored.contains("mac = \"52:54:00:"), "{stored}");

    sandbox.ok_uri(&uri, &["start", "guest"]);
    let mut text = String::new();
    let booted = wait_until(GUEST_BOOT, || {
        text = console(&sandbox, &uri, "guest");
        text.contains(GUEST_READY)
    });
    assert!(booted, "no {GUEST_READY} on the console within {GUEST_BOOT:?}; console so far:\n{text}");
    assert!(text.contains("CAPVIRT-GUEST-DHCP eth0 10.0.2.15/24"), "{text}");

    // Reading does not consume: the same text again, then nothing past its end.
    let again = console(&sandbox, &uri, "guest");
    assert!(again.starts_with(&text), "{again:?} does not continue {text:?}");
    let read =
        sandbox.json_uri(&uri, &["--enable", "domain.console-read", "console-log", "guest", "-", "--offset", "5"]);
    assert_eq!(read["offset"], 5, "{read}");
    assert!(read["next_offset"].as_u64() >= Some(again.len() as u64), "{read}");

    // The forwarded host port reaches the guest's web server.
    let mut answer = Err(String::new());
    let served = wait_until(Duration::from_secs(30), || {
        answer = http_get(port, Duration::from_secs(10));
        answer.as_ref().is_ok_and(|a| a.contains(GUEST_PAGE))
    });
    assert!(served, "no page from the guest on 127.0.0.1:{port}: {answer:?}");

    // The guest wrote its first disk.
    let stats = sandbox.json_uri(&uri, &["domblkstat", "guest", "vda"]);
    assert!(stats["wr_bytes"].as_u64() > Some(0) && stats["wr_req"].as_u64() > Some(0), "{stats}");

    // Reboot resets the running guest: it boots again within the same run (the console keeps
    // both boots) and the domain stays running throughout.
    sandbox.ok_uri(&uri, &["reboot", "guest"]);
    assert_eq!(sandbox.json_uri(&uri, &["dominfo", "guest"])["state"], "running");
    let came_back = wait_until(GUEST_BOOT, || {
        text = console(&sandbox, &uri, "guest");
        text.matches(GUEST_READY).count() == 2
    });
    assert!(came_back, "the guest did not boot again after reboot; console:\n{text}");

    // Graceful shutdown: the guest's init powers off on the ACPI power button.
    let started = Instant::now();
    let timeout = GUEST_POWEROFF_SECS.to_string();
    sandbox.ok_uri(&uri, &["shutdown", "guest", "--timeout-secs", &timeout]);
    let took = started.elapsed();
    assert_eq!(sandbox.json_uri(&uri, &["dominfo", "guest"])["state"], "shut off");
    assert!(took < Duration::from_secs(GUEST_POWEROFF_SECS), "shutdown took {took:?}");
    assert!(sandbox.processes().is_empty(), "QEMU still running after shutdown: {:?}", sandbox.processes());
    let image = fs::read(&disk).unwrap_or_default();
    assert!(image.starts_with(GUEST_DISK_MARK), "{:?}", String::from_utf8_lossy(&image[..64.min(image.len())]));
    // The last run's console stays readable once the domain is off.
    assert!(console(&sandbox, &uri, "guest").contains(GUEST_READY));

    // A second run starts a fresh console, and destroy keeps what the guest printed before it
    // although nobody read the console meanwhile (the guest prints its DHCP line before it
    // writes its disk).
    sandbox.ok_uri(&uri, &["start", "guest"]);
    let wrote =
        wait_until(GUEST_BOOT, || sandbox.json_uri(&uri, &["domblkstat", "guest", "vda"])["wr_req"].as_u64() > Some(0));
    assert!(wrote, "the guest did not write its disk on its second boot");
    sandbox.ok_uri(&uri, &["destroy", "guest"]);
    let second = console(&sandbox, &uri, "guest");
    assert_eq!(second.matches("CAPVIRT-GUEST-DHCP").count(), 1, "{second}");
}

#[test]
fn interfaces_refuse_bridges_and_a_taken_host_port_fails_the_start_only() {
    let sandbox = Sandbox::new();
    let disk = sandbox.boot_disk("boot");
    let base = spec_toml("net", 64, &disk, true);
    let bridge =
        sandbox.write("bridge.toml", &format!("{base}\n[[interfaces]]\nkind = \"bridge\"\nbridge = \"br0\"\n"));
    assert_refused(&sandbox.run("a", &["define", bridge.to_str().unwrap_or_default()]), 4, "needs qemu:///system");
    // A host port someone else listens on: define is fine, start says which rule failed.
    let holder = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap_or_else(|e| panic!("bind: {e}"));
    let port = holder.local_addr().map(|a| a.port()).unwrap_or_else(|e| panic!("{e}"));
    let spec = sandbox.write(
        "net.toml",
        &format!(
            "{base}\n[[interfaces]]\nkind = \"user\"\n\n[[interfaces.forwards]]\nhost_port = {port}\nguest_port = 22\n"
        ),
    );
    sandbox.ok("a", &["define", spec.to_str().unwrap_or_default()]);
    let out = sandbox.run("a", &["start", "net"]);
    assert_refused(&out, 1, &format!("tcp:127.0.0.1:{port}-:22"));
    assert_eq!(stderr(&out).trim_end().lines().count(), 1, "{}", stderr(&out));
    assert_eq!(sandbox.state("a", "net"), "shut off");
    drop(holder);
}

/// A domain spec with one raw virtio disk at `path` (written as given: no escaping needed here).
fn raw_disk_spec(name: &str, path: &str) -> String {
    format!("name = \"{name}\"\nmemory_mib = 64\nvcpus = 1\n\n[[disks]]\npath = \"{path}\"\nformat = \"raw\"\nbus = \"virtio\"\n")
}

#[test]
fn host_files_devices_and_symlinks_into_host_areas_are_refused_at_define_and_at_start() {
    let sandbox = Sandbox::new();
    let define = |name: &str, path: &str| {
        let spec = sandbox.write(&format!("{name}.toml"), &raw_disk_spec(name, path));
        sandbox.run("r", &["define", spec.to_str().unwrap_or_default()])
    };
    let etc = define("etc", "/etc/passwd");
    assert_refused(&etc, 2, "disk vda: /etc/passwd is refused: nothing under /etc may be an image");

    let link = sandbox.path().join("link.raw");
    std::os::unix::fs::symlink("/etc/passwd", &link).unwrap_or_else(|e| panic!("symlink: {e}"));
    let linked = define("linked", &link.display().to_string());
    assert_refused(&linked, 2, "(resolved: /etc/passwd) is refused");

    let block = sandbox.path().join("loop.blk");
    let mut mknod = std::process::Command::new("mknod");
    mknod.arg(&block).args(["b", "7", "0"]);
    assert!(output_within(mknod, COMMAND_TIMEOUT).status.success(), "mknod failed");
    assert_refused(&define("block", &block.display().to_string()), 2, "device nodes are images only when");
    assert!(!sandbox.root("r").exists(), "a refused image wrote into the state root");

    // A directory swapped for a symlink into /etc after define is caught at start.
    let images = sandbox.path().join("images");
    fs::create_dir(&images).unwrap_or_else(|e| panic!("{e}"));
    fs::write(images.join("passwd"), vec![0u8; 1 << 20]).unwrap_or_else(|e| panic!("{e}"));
    sandbox.ok(
        "r",
        &[
            "define",
            sandbox
                .write("swap.toml", &raw_disk_spec("swap", &images.join("passwd").display().to_string()))
                .to_str()
                .unwrap_or_default(),
        ],
    );
    fs::rename(&images, sandbox.path().join("images.old")).unwrap_or_else(|e| panic!("{e}"));
    std::os::unix::fs::symlink("/etc", &images).unwrap_or_else(|e| panic!("symlink: {e}"));
    assert_refused(&sandbox.run("r", &["start", "swap"]), 2, "(resolved: /etc/passwd) is refused");
    assert_eq!(sandbox.state("r", "swap"), "shut off");
    assert!(sandbox.processes().is_empty(), "a QEMU started: {:?}", sandbox.processes());

    // Save and restore files are held to the same rules.
    assert_refused(&sandbox.run("r", &["save", "swap", "/etc/capvirt-test.save"]), 2, "nothing under /etc");
    assert!(!std::path::Path::new("/etc/capvirt-test.save").exists());
    assert_refused(&sandbox.run("r", &["restore", "/proc/self/status"]), 2, "nothing under /proc");
}

#[test]
fn an_allow_list_in_roots_system_config_confines_images() {
    let sandbox = Sandbox::new();
    let allowed = sandbox.path().join("allowed");
    fs::create_dir(&allowed).unwrap_or_else(|e| panic!("{e}"));
    fs::create_dir(sandbox.path().join("etc")).unwrap_or_else(|e| panic!("{e}"));
    sandbox.write("etc/capvirt.toml", &format!("[images]\nallow = [\"{}\"]\n", allowed.display()));
    let run = |args: &[&str]| {
        let mut cmd = sandbox.capvirt_uri(&sandbox.uri("r", ""));
        cmd.env("CAPVIRT_SYSCONFDIR", sandbox.path().join("etc")).args(args);
        output_within(cmd, COMMAND_TIMEOUT)
    };
    let outside = sandbox.blank_image("outside", "raw");
    let spec = sandbox.write("outside.toml", &raw_disk_spec("outside", &outside.display().to_string()));
    assert_refused(&run(&["define", spec.to_str().unwrap_or_default()]), 2, "outside this host's image directories");
    let inside = allowed.join("inside.raw");
    fs::rename(&outside, &inside).unwrap_or_else(|e| panic!("{e}"));
    let spec = sandbox.write("inside.toml", &raw_disk_spec("inside", &inside.display().to_string()));
    let defined = run(&["define", spec.to_str().unwrap_or_default()]);
    assert_eq!(defined.status.code(), Some(0), "{}", stderr(&defined));
    // Without root's config the same URI accepts the outside image: the list is root's, not the URI's.
    let outside = sandbox.blank_image("outside2", "raw");
    let spec = sandbox.write("outside2.toml", &raw_disk_spec("outside2", &outside.display().to_string()));
    sandbox.ok("r", &["define", spec.to_str().unwrap_or_default()]);
}
