//! The container driver against real bubblewrap sandboxes, through the `capvirt` CLI (each call
//! a fresh process that finds running containers again) and the host library. Every test owns
//! a [`Sandbox`] that kills its containers and removes their cgroups on drop.

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use capvirt_host::{Host, HostConfig, Value};
use capvirt_tests::{
    artifacts,
    container::{alive, capvirt_cgroups, container_plugin_dir, root_and_out, signal, spec_toml, wait_until, Sandbox},
    plugin_dir,
};

/// Bound on a container's workload reaching a point the test waits for.
const WORKLOAD: Duration = Duration::from_secs(20);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exits with `code`, saying `needle` on stderr.
fn assert_refused(out: &std::process::Output, code: i32, needle: &str) {
    assert_eq!(out.status.code(), Some(code), "expected exit {code}, stderr: {}", stderr(out));
    assert!(stderr(out).contains(needle), "stderr lacks {needle:?}: {}", stderr(out));
}

fn cpu_time(sandbox: &Sandbox, root: &str, domain: &str) -> u64 {
    sandbox.json(root, &["dominfo", domain])["cpu_time_ns"].as_u64().unwrap_or(0)
}

/// A workload that writes 1 MiB to the shared directory (a real file system, so the writes
/// reach the storage layer), says so, then keeps one CPU busy.
const WRITER: &str = "dd if=/dev/zero of=/mnt/data bs=64k count=16 conv=fsync 2>/dev/null; \
                      echo $$ > /mnt/ready; while :; do :; done";

#[test]
fn cli_drives_a_container_through_its_whole_life() {
    let sandbox = Sandbox::new();
    // Under the target directory, not the temporary one: wr_bytes counts writes that reach a
    // storage layer, and /tmp may be a tmpfs.
    let disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap_or_else(|e| panic!("tempdir: {e}"));
    let out = disk.path().to_path_buf();
    let spec = sandbox.write("c.toml", &spec_toml("c1", &["/bin/sh", "-c", WRITER], &root_and_out(&out)));

    sandbox.ok("a", &["define", &spec]);
    assert_eq!(sandbox.json("a", &["list", "--all"]), serde_json::json!([{"name": "c1", "state": "shut off"}]));
    assert_eq!(sandbox.json("a", &["list"]), serde_json::json!([]));
    sandbox.ok("a", &["start", "c1"]);
    assert!(wait_until(WORKLOAD, || out.join("ready").exists()), "the workload never wrote /mnt/ready");
    // init is the namespace's PID 2 (bwrap's reaper is PID 1).
    assert_eq!(fs::read_to_string(out.join("ready")).unwrap_or_default().trim(), "2");
    assert_eq!(sandbox.json("a", &["list"]), serde_json::json!([{"name": "c1", "state": "running"}]));
    let info = sandbox.json("a", &["dominfo", "c1"]);
    assert_eq!((info["vcpus"].as_u64(), info["max_memory_kib"].as_u64()), (Some(1), Some(65536)), "{info}");
    assert_eq!(
        info["hypervisor_version"].as_str().map(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.')),
        Some(true)
    );
    assert_refused(&sandbox.run("a", &["start", "c1"]), 6, "already running");
    assert_refused(&sandbox.run("a", &["undefine", "c1"]), 6, "destroy it first");

    // suspend: the freezer stops every process, so the tree's CPU time stands still.
    sandbox.ok("a", &["suspend", "c1"]);
    assert_eq!(sandbox.state("a", "c1"), "paused");
    let frozen = cpu_time(&sandbox, "a", "c1");
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_millis(300) {
        assert_eq!(cpu_time(&sandbox, "a", "c1"), frozen, "CPU time advanced while suspended");
    }
    assert_refused(&sandbox.run("a", &["suspend", "c1"]), 6, "not running (state: paused)");
    assert_refused(&sandbox.run("a", &["shutdown", "c1"]), 6, "not running (state: paused)");
    sandbox.ok("a", &["resume", "c1"]);
    assert_eq!(sandbox.state("a", "c1"), "running");
    assert!(wait_until(WORKLOAD, || cpu_time(&sandbox, "a", "c1") > frozen), "CPU time did not advance after resume");
    assert_refused(&sandbox.run("a", &["resume", "c1"]), 6, "not paused");

    // Block statistics: /proc/PID/io summed over the tree; dd's writes were reaped into sh's.
    let stats = sandbox.json("a", &["domblkstat", "c1"]);
    assert!(stats["wr_bytes"].as_u64() >= Some(1 << 20), "{stats}");
    assert!(stats["wr_req"].as_u64() >= Some(16), "{stats}");
    assert_eq!(stats["errs"].as_u64(), Some(0), "{stats}");
    assert_refused(&sandbox.run("a", &["domblkstat", "c1", "vda"]), 5, "no block devices");

    // shutdown: SIGTERM to init, which the shell's default action obeys.
    sandbox.ok("a", &["shutdown", "c1", "--timeout-secs", "10"]);
    assert_eq!(sandbox.state("a", "c1"), "shut off");
    assert_refused(&sandbox.run("a", &["shutdown", "c1"]), 6, "not running");

    // start again, then destroy: no process of the tree and none of its cgroups is left.
    fs::remove_file(out.join("ready")).unwrap_or_else(|e| panic!("{e}"));
    sandbox.ok("a", &["start", "c1"]);
    assert!(wait_until(WORKLOAD, || out.join("ready").exists()));
    let tree = sandbox.tree("a", "c1");
    assert!(tree.len() >= 3, "bwrap, its PID 1 and init: {tree:?}");
    let ns_init = sandbox.recorded_pid("a", "c1", "ns_init").unwrap_or_else(|| panic!("no ns_init recorded"));
    let cgroups = capvirt_cgroups(ns_init);
    assert!(cgroups.len() >= 4, "memory, cpu, cpuacct, freezer, pids: {cgroups:?}");
    // init is in them too: it descends from the PID 1 that was moved before it ran.
    let init = sandbox.recorded_pid("a", "c1", "init").unwrap_or_else(|| panic!("no init recorded"));
    assert_eq!(capvirt_cgroups(init), cgroups);
    // The limits are the kernel's: 64 MiB of memory, one CPU's worth of quota per period.
    let read = |cgroup: &Path, file: &str| fs::read_to_string(cgroup.join(file)).ok().map(|t| t.trim().to_string());
    for cgroup in &cgroups {
        if let Some(limit) = read(cgroup, "memory.limit_in_bytes") {
            assert_eq!(limit, (64u64 << 20).to_string(), "{}", cgroup.display());
        }
        if let (Some(quota), Some(period)) = (read(cgroup, "cpu.cfs_quota_us"), read(cgroup, "cpu.cfs_period_us")) {
            assert_eq!(quota, period, "{}", cgroup.display());
        }
    }
    sandbox.ok("a", &["destroy", "c1"]);
    let left: Vec<i32> = tree.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left after destroy: {left:?}");
    let kept: Vec<_> = cgroups.iter().filter(|c| c.exists()).collect();
    assert!(kept.is_empty(), "cgroups left after destroy: {kept:?}");
    assert_eq!(sandbox.state("a", "c1"), "shut off");
    assert_refused(&sandbox.run("a", &["destroy", "c1"]), 6, "not running");

    sandbox.ok("a", &["undefine", "c1"]);
    assert_eq!(sandbox.json("a", &["list", "--all"]), serde_json::json!([]));
    assert_refused(&sandbox.run("a", &["dominfo", "c1"]), 5, "not defined");
}

#[test]
fn a_tree_killed_from_outside_is_reported_crashed_and_a_clean_exit_shut_off() {
    let sandbox = Sandbox::new();
    let spec = sandbox.write("victim.toml", &spec_toml("victim", &["/bin/sleep", "1000"], ""));
    sandbox.ok("r", &["define", &spec]);
    sandbox.ok("r", &["start", "victim"]);
    let init = sandbox.recorded_pid("r", "victim", "init").unwrap_or_else(|| panic!("no init recorded"));
    let tree = sandbox.tree("r", "victim");
    signal(init, rustix::process::Signal::KILL);
    assert!(wait_until(WORKLOAD, || tree.iter().all(|p| !alive(*p))), "the tree outlived its init");
    assert_eq!(sandbox.state("r", "victim"), "crashed");
    assert_eq!(sandbox.json("r", &["list", "--all"]), serde_json::json!([{"name": "victim", "state": "crashed"}]));
    assert_eq!(sandbox.json("r", &["list"]), serde_json::json!([]));
    assert_refused(&sandbox.run("r", &["suspend", "victim"]), 6, "crashed");
    // A crashed container starts again; destroy clears a crash's leftovers.
    sandbox.ok("r", &["start", "victim"]);
    assert_eq!(sandbox.state("r", "victim"), "running");
    assert_ne!(sandbox.recorded_pid("r", "victim", "init"), Some(init));
    let monitor = sandbox.recorded_pid("r", "victim", "monitor").unwrap_or_default();
    signal(monitor, rustix::process::Signal::KILL);
    // bwrap's outer process is not the tree: the container still runs without it.
    assert_eq!(sandbox.state("r", "victim"), "running");
    let ns_init = sandbox.recorded_pid("r", "victim", "ns_init").unwrap_or_default();
    signal(ns_init, rustix::process::Signal::KILL);
    assert!(wait_until(WORKLOAD, || sandbox.state("r", "victim") == "crashed"));
    sandbox.ok("r", &["destroy", "victim"]);
    assert_eq!(sandbox.state("r", "victim"), "shut off");

    // init exiting 0 is a clean stop (shut off), even when it ends before start sees it run.
    let spec = sandbox.write("ok.toml", &spec_toml("ok", &["/bin/true"], ""));
    sandbox.ok("r", &["define", &spec]);
    sandbox.ok("r", &["start", "ok"]);
    assert!(wait_until(WORKLOAD, || sandbox.state("r", "ok") == "shut off"));
    // A failing init is a crash, or a failed start when it fails before start sees it run.
    let spec = sandbox.write("fails.toml", &spec_toml("fails", &["/bin/false"], ""));
    sandbox.ok("r", &["define", &spec]);
    let out = sandbox.run("r", &["start", "fails"]);
    if out.status.success() {
        assert!(wait_until(WORKLOAD, || sandbox.state("r", "fails") == "crashed"));
    } else {
        assert_refused(&out, 1, "init exited with status 1");
        assert_eq!(sandbox.state("r", "fails"), "shut off");
    }
}

#[test]
fn two_containers_see_neither_each_others_processes_nor_files() {
    let sandbox = Sandbox::new();
    let script = "touch /tmp/mine-$(hostname); sleep 1000 & \
                  while [ ! -e /mnt/go ]; do sleep 0.02; done; \
                  ls /proc | grep -E '^[0-9]+$' > /mnt/pids; ls /tmp > /mnt/tmp; hostname > /mnt/hostname; \
                  tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' > /mnt/net; echo done > /mnt/ready; wait";
    let mut outs = Vec::new();
    for name in ["alpha", "beta"] {
        let out = sandbox.dir(name);
        let spec =
            sandbox.write(&format!("{name}.toml"), &spec_toml(name, &["/bin/sh", "-c", script], &root_and_out(&out)));
        sandbox.ok("r", &["define", &spec]);
        sandbox.ok("r", &["start", name]);
        outs.push(out);
    }
    // Both run before either looks around.
    assert_eq!(sandbox.json("r", &["list"]).as_array().map(Vec::len), Some(2));
    for out in &outs {
        fs::write(out.join("go"), "").unwrap_or_else(|e| panic!("{e}"));
    }
    for (name, out) in ["alpha", "beta"].iter().zip(&outs) {
        assert!(wait_until(WORKLOAD, || out.join("ready").exists()), "{name} never finished looking");
        let read = |file: &str| fs::read_to_string(out.join(file)).unwrap_or_default();
        assert_eq!(read("hostname").trim(), *name);
        assert_eq!(read("tmp").trim(), format!("mine-{name}"), "{name} sees other files in /tmp");
        assert_eq!(read("net").trim(), "lo", "{name} has other network interfaces");
        let pids: Vec<u32> = read("pids").lines().filter_map(|l| l.parse().ok()).collect();
        // PID 1 (bwrap), 2 (sh), sleep, and the pipeline's own processes: nothing else.
        assert!(pids.contains(&1) && pids.contains(&2) && pids.len() <= 8, "{name} sees PIDs {pids:?}");
    }
    for name in ["alpha", "beta"] {
        sandbox.ok("r", &["destroy", name]);
    }
}

#[test]
fn bad_specs_are_refused_and_nothing_is_written() {
    let sandbox = Sandbox::new();
    let missing = sandbox.path().join("missing").display().to_string();
    let file = sandbox.write("plain-file", "");
    let init = "\n[boot]\ninit = [\"/bin/true\"]\n";
    let base = |name: &str| format!("name = \"{name}\"\nmemory_mib = 64\nvcpus = 1\n");
    let fs_entry =
        |source: &str, target: &str| format!("\n[[filesystems]]\nsource = \"{source}\"\ntarget = \"{target}\"\n");
    let cases: Vec<(String, &str)> = vec![
        (base("a") + init + "\n[[disks]]\npath = \"/x.qcow2\"\nformat = \"qcow2\"\nbus = \"virtio\"\n", "no disks"),
        (base("a"), "needs boot.init"),
        (base("a") + "\n[boot]\ninit = []\n", "needs boot.init"),
        (base("a") + "\n[boot]\ninit = [\"sh\", \"-c\", \"true\"]\n", "absolute path"),
        (base("a") + "\n[boot]\ninit = [\"--bind\", \"/\", \"/x\"]\n", "absolute path"),
        (base("a") + "\n[boot]\nkernel = \"/boot/vmlinuz\"\ninit = [\"/bin/true\"]\n", "boot.kernel"),
        (base("a") + init + "\n[graphics]\nadapter = \"vga\"\n", "no display"),
        (base("a") + init + "\n[[devices]]\nkind = \"usb-tablet\"\nid = \"t0\"\n", "no USB devices"),
        (base("a") + init + &fs_entry("/usr", "usr"), "target"),
        (base("a") + init + &fs_entry("/usr", "/a/../../etc"), "`..`"),
        (base("a") + init + &fs_entry("/usr", "/proc"), "reserved"),
        (base("a") + init + &fs_entry(&missing, "/x"), "does not exist"),
        (base("a") + init + &fs_entry(&file, "/x"), "not a directory"),
        // Refused by the registry's formats before the driver sees them.
        (base("../evil") + init, "name"),
        (base("a/b") + init, "name"),
        (base(".hidden") + init, "name"),
    ];
    for (index, (text, needle)) in cases.iter().enumerate() {
        let spec = sandbox.write(&format!("bad{index}.toml"), text);
        assert_refused(&sandbox.run("root", &["define", &spec]), 2, needle);
    }
    assert!(!sandbox.root("root").exists(), "a refused spec wrote into the state root");
    assert_eq!(sandbox.json("root", &["list", "--all"]), serde_json::json!([]));

    // An init that does not exist inside the container fails the start with bwrap's words.
    let spec = sandbox.write("missing-init.toml", &(base("lost") + "\n[boot]\ninit = [\"/nonexistent/init\"]\n"));
    sandbox.ok("other", &["define", &spec]);
    assert_refused(&sandbox.run("other", &["start", "lost"]), 1, "execvp /nonexistent/init");
    assert_eq!(sandbox.state("other", "lost"), "shut off");
}

#[test]
fn undeclared_capabilities_are_unsupported_and_bwrap_is_required() {
    let sandbox = Sandbox::new();
    let spec = sandbox.write("c.toml", &spec_toml("c", &["/bin/sleep", "1000"], ""));
    sandbox.ok("r", &["define", &spec]);
    sandbox.ok("r", &["start", "c"]);
    let device = sandbox.write("tablet.toml", "kind = \"usb-tablet\"\nid = \"tablet0\"\n");
    let elsewhere = sandbox.uri("other");
    let save = sandbox.path().join("c.save").display().to_string();
    let shot = sandbox.path().join("c.png").display().to_string();
    for args in [
        vec!["migrate", "c", elsewhere.as_str()],
        vec!["save", "c", save.as_str()],
        vec!["restore", save.as_str()],
        vec!["screenshot", "c", shot.as_str()],
        vec!["attach-device", "c", device.as_str()],
        vec!["detach-device", "c", device.as_str()],
    ] {
        let out = sandbox.run("r", &args);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {}", stderr(&out));
    }
    // `capabilities` reports exactly what the manifest declares.
    let reported = sandbox.json("r", &["capabilities"]);
    let implemented: BTreeSet<String> = reported["capabilities"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|row| row["implemented"] == true)
        .filter_map(|row| row["id"].as_str().map(str::to_string))
        .collect();
    let declared: BTreeSet<String> = capvirt_driver_container_capabilities().iter().map(|c| c.to_string()).collect();
    assert_eq!(implemented, declared);
    sandbox.ok("r", &["destroy", "c"]);

    // Without bwrap on PATH, connecting says what is missing.
    let mut cmd = sandbox.capvirt_uri(&sandbox.uri("r"));
    cmd.env("PATH", sandbox.dir("empty-path")).arg("list");
    let out = capvirt_tests::output_within(cmd, Duration::from_secs(60));
    assert_refused(&out, 4, "bubblewrap");
}

/// The driver's declared capabilities, as its manifest lists them.
fn capvirt_driver_container_capabilities() -> Vec<&'static str> {
    vec![
        "host.info",
        "domain.list",
        "domain.info",
        "domain.define",
        "domain.undefine",
        "domain.start",
        "domain.shutdown",
        "domain.destroy",
        "domain.reboot",
        "domain.suspend",
        "domain.resume",
        "domain.block-stats",
    ]
}

fn keys(value: &serde_json::Value) -> BTreeSet<String> {
    value.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

#[test]
fn json_shapes_match_the_test_driver_and_fresh_processes_find_running_containers() {
    let plugins = plugin_dir(&[
        ("libcapvirt_driver_test.so", &artifacts().test_plugin),
        ("libcapvirt_driver_container.so", &artifacts().container_plugin),
    ]);
    let sandbox = Sandbox::new();
    let uri = sandbox.uri("r");
    let ok = |uri: &str, args: &[&str]| {
        let mut cmd = capvirt_tests::capvirt(plugins.path(), sandbox.path());
        cmd.env("CAPVIRT_CHECK_RESULTS", "1").args(["-c", uri, "--output", "json"]).args(args);
        let out = capvirt_tests::output_within(cmd, Duration::from_secs(60));
        assert!(out.status.success(), "{args:?} on {uri}: {}", stderr(&out));
        out.stdout
    };
    let json = |uri: &str, args: &[&str]| {
        serde_json::from_slice::<serde_json::Value>(&ok(uri, args)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    };

    // Started through the host library, in this process...
    let host = Host::new(HostConfig {
        plugin_dirs: vec![container_plugin_dir().to_path_buf()],
        check_results: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let conn = host.connect(&uri, false).unwrap_or_else(|e| panic!("{e}"));
    let spec = Value::record([
        ("name", Value::from("test")),
        ("memory_mib", Value::UInt(64)),
        ("vcpus", Value::UInt(2)),
        ("boot", Value::record([("init", Value::list([Value::from("/bin/sleep"), Value::from("1000")]))])),
    ]);
    conn.call("domain.define", Value::record([("spec", spec)])).unwrap_or_else(|e| panic!("define: {e}"));
    conn.call("domain.start", Value::record([("domain", Value::from("test"))]))
        .unwrap_or_else(|e| panic!("start: {e}"));
    drop(conn);
    drop(host);

    // ...found by fresh capvirt processes, with the same shapes as test:///default's.
    let info = json(&uri, &["dominfo", "test"]);
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(keys(&info), keys(&json("test:///default", &["dominfo", "test"])));
    let list = json(&uri, &["list", "--all"]);
    assert_eq!(list, serde_json::json!([{"name": "test", "state": "running"}]));
    let test_list = json("test:///default", &["list", "--all"]);
    assert_eq!(keys(&list[0]), keys(&test_list[0]));
    let node = json(&uri, &["nodeinfo"]);
    assert_eq!(keys(&node), keys(&json("test:///default", &["nodeinfo"])));
    assert_eq!(node["hypervisor"], "bubblewrap");
    let stats = json(&uri, &["domblkstat", "test"]);
    assert_eq!(keys(&stats), keys(&json("test:///default", &["domblkstat", "test"])));

    // reboot restarts init: a new process, still running.
    let before = sandbox.recorded_pid("r", "test", "init");
    ok(&uri, &["reboot", "test"]);
    assert_ne!(sandbox.recorded_pid("r", "test", "init"), before);
    assert_eq!(json(&uri, &["dominfo", "test"])["state"], "running");
    ok(&uri, &["destroy", "test"]);
    assert!(Path::new(&sandbox.root("r")).exists());
}

#[test]
fn without_root_limits_are_not_enforced_and_info_says_so() {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Sandbox::new();
    // As root, run capvirt as `nobody` (setpriv, from util-linux): no cgroup is writable then,
    // and bwrap needs a user namespace. Not root: this user is already unprivileged.
    let as_nobody = rustix::process::geteuid().is_root();
    let chmod = |path: &Path, mode: u32| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()))
    };
    let home = sandbox.dir("home");
    let plugins = plugin_dir(&[("libcapvirt_driver_container.so", &artifacts().container_plugin)]);
    if as_nobody {
        chmod(sandbox.path(), 0o711);
        chmod(plugins.path(), 0o755);
        std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap_or_else(|e| panic!("chown: {e}"));
    }
    // Root's access policy lets this unprivileged user manage domains (the default: read-only).
    let sysconf = sandbox.dir("etc");
    chmod(&sysconf, 0o755);
    fs::write(sysconf.join("access.toml"), "[users]\n\"65534\" = [\"*\"]\n").unwrap_or_else(|e| panic!("{e}"));
    chmod(&sysconf.join("access.toml"), 0o644);
    let spec = home.join("c.toml");
    fs::write(&spec, spec_toml("plain", &["/bin/sleep", "1000"], "")).unwrap_or_else(|e| panic!("{e}"));
    chmod(&spec, 0o644);
    // The state root is `home` itself, where the sandbox guard looks for runtime records.
    let uri = format!("container:///session?root={}", home.display());
    let run = |args: &[&str]| {
        let mut cmd = if as_nobody {
            let mut cmd = std::process::Command::new("setpriv");
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&artifacts().capvirt);
            cmd
        } else {
            std::process::Command::new(&artifacts().capvirt)
        };
        cmd.env("CAPVIRT_PLUGIN_DIR", plugins.path())
            .env("CAPVIRT_AUDIT_LOG", home.join("audit.jsonl"))
            .env("XDG_STATE_HOME", &home)
            .env("XDG_CONFIG_HOME", &home)
            .env("CAPVIRT_SYSCONFDIR", &sysconf)
            .env("CAPVIRT_CHECK_RESULTS", "1")
            .env_remove("CAPVIRT_CONFIG")
            .env_remove("CAPVIRT_DEFAULT_URI")
            .env_remove("CAPVIRT_ENABLE")
            .args(["-c", &uri, "--output", "json"])
            .args(args);
        let out = capvirt_tests::output_within(cmd, Duration::from_secs(60));
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let info = || serde_json::from_str::<serde_json::Value>(&run(&["dominfo", "plain"])).unwrap_or_default();
    run(&["define", &spec.display().to_string()]);
    run(&["start", "plain"]);
    let running = info();
    assert_eq!(running["state"], "running", "{running}");
    // No memory cgroup could take the limit: the maximum says "none enforced".
    assert_eq!(running["max_memory_kib"], 0, "{running}");
    assert!(running["memory_kib"].as_u64() > Some(0), "RSS of the tree: {running}");
    let state_dir = home.join("domains/plain/run/runtime.toml");
    let runtime = fs::read_to_string(&state_dir).unwrap_or_default();
    assert!(runtime.contains("controllers = []"), "{runtime}");

    // Suspend without a freezer: every process of the tree is stopped (state T).
    run(&["suspend", "plain"]);
    assert_eq!(info()["state"], "paused");
    let tree = sandbox.tree("home", "plain");
    assert!(!tree.is_empty(), "no tree recorded");
    for pid in &tree {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).unwrap_or_default();
        assert_eq!(state, "T", "process {pid} is not stopped: {stat}");
    }
    run(&["resume", "plain"]);
    assert_eq!(info()["state"], "running");
    run(&["destroy", "plain"]);
    assert!(tree.iter().all(|p| !alive(*p)), "processes left after destroy");
    run(&["undefine", "plain"]);
}

#[test]
fn shutdown_is_bounded_and_racing_starts_run_one_tree() {
    let sandbox = Sandbox::new();
    let stubborn = "trap '' TERM; while :; do sleep 0.05; done";
    let spec = sandbox.write("s.toml", &spec_toml("stubborn", &["/bin/sh", "-c", stubborn], ""));
    sandbox.ok("r", &["define", &spec]);
    // Racing starts are serialized by the domain lock: one tree, the others told it runs.
    let racers: Vec<_> = (0..4)
        .map(|_| {
            let mut cmd = sandbox.capvirt_uri(&sandbox.uri("r"));
            cmd.args(["start", "stubborn"]);
            std::thread::spawn(move || capvirt_tests::output_within(cmd, Duration::from_secs(60)))
        })
        .collect();
    let codes: Vec<_> =
        racers.into_iter().map(|r| r.join().unwrap_or_else(|_| panic!("thread panicked")).status.code()).collect();
    assert_eq!(codes.iter().filter(|c| **c == Some(0)).count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == Some(6)).count(), 3, "{codes:?}");

    // init ignores SIGTERM: the bounded wait ends in the timeout error, the container runs on.
    let started = Instant::now();
    assert_refused(&sandbox.run("r", &["shutdown", "stubborn", "--timeout-secs", "1"]), 1, "did not stop within 1 s");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert_eq!(sandbox.state("r", "stubborn"), "running");
    assert_refused(&sandbox.run("r", &["define", &spec]), 6, "is running");
    // A frozen tree is destroyed as thoroughly as a running one.
    sandbox.ok("r", &["suspend", "stubborn"]);
    assert_refused(&sandbox.run("r", &["reboot", "stubborn"]), 6, "not running (state: paused)");
    let tree = sandbox.tree("r", "stubborn");
    sandbox.ok("r", &["destroy", "stubborn"]);
    let left: Vec<i32> = tree.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left after destroying a paused container: {left:?}");
    assert_eq!(sandbox.state("r", "stubborn"), "shut off");
}

#[test]
fn the_sandbox_guard_leaves_no_process_and_no_cgroup_behind() {
    let (tree, cgroups) = {
        let sandbox = Sandbox::new();
        let spec = sandbox.write("c.toml", &spec_toml("left", &["/bin/sleep", "1000"], ""));
        sandbox.ok("deep/down", &["define", &spec]);
        sandbox.ok("deep/down", &["start", "left"]);
        sandbox.ok("deep/down", &["suspend", "left"]);
        let ns_init = sandbox.recorded_pid("deep/down", "left", "ns_init").unwrap_or_else(|| panic!("no ns_init"));
        (sandbox.tree("deep/down", "left"), capvirt_cgroups(ns_init))
        // Dropped here with the container running (frozen), as when a test fails.
    };
    assert!(!tree.is_empty() && !cgroups.is_empty());
    let left: Vec<i32> = tree.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "the guard left processes {left:?}");
    let kept: Vec<_> = cgroups.iter().filter(|c| c.exists()).collect();
    assert!(kept.is_empty(), "the guard left cgroups {kept:?}");
}
