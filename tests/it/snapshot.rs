//! Domain snapshots (`domain.snapshot-*`): on a real QEMU booting the test guest, and the same
//! commands on the test driver. The QEMU tests live in `snapshot::qemu` so that CI's second
//! run on the other QEMU release (`-- qemu::`) includes them.

use std::{fs, path::Path};

/// The experimental capabilities these tests call.
pub(crate) const SNAPSHOT_CAPABILITIES: [&str; 4] =
    ["domain.snapshot-create", "domain.snapshot-list", "domain.snapshot-revert", "domain.snapshot-delete"];

/// A host config enabling the snapshot capabilities, in `config_home/capvirt/config.toml`
/// (both sandboxes point `XDG_CONFIG_HOME` at their own directory).
pub(crate) fn enable_snapshots(config_home: &Path) {
    let dir = config_home.join("capvirt");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let list: Vec<String> = SNAPSHOT_CAPABILITIES.iter().map(|id| format!("\"{id}\"")).collect();
    fs::write(dir.join("config.toml"), format!("enable = [{}]\n", list.join(", ")))
        .unwrap_or_else(|e| panic!("config: {e}"));
}

pub(crate) mod qemu {
    use std::{
        fs,
        io::{Read, Write},
        path::Path,
        process::Output,
        time::{Duration, Instant},
    };

    use capvirt_tests::qemu::{
        free_local_port, guest_spec_toml, output_within, spec_toml, wait_until, Sandbox, COMMAND_TIMEOUT, GUEST_READY,
    };

    use super::enable_snapshots;

    /// Bound on the test guest booting under TCG to its READY line (about 5 s idle; polled).
    const GUEST_BOOT: Duration = Duration::from_secs(180);
    /// Bound on the guest's web server answering again after a revert (its TCP stack is the
    /// snapshot's; QEMU's user-mode network forgets old connections).
    const GUEST_ANSWER: Duration = Duration::from_secs(60);
    /// Where the guest's `/cgi-bin/mark` writes on its first disk.
    const MARK_OFFSET: usize = 4096;

    fn stderr(out: &Output) -> String {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The call failed with exit code `code` and a message containing `words`.
    fn assert_refused(out: &Output, code: i32, words: &str) {
        assert_eq!(out.status.code(), Some(code), "expected exit {code}: {}", stderr(out));
        assert!(stderr(out).contains(words), "expected {words:?} in: {}", stderr(out));
    }

    /// One HTTP/1.0 GET of `path` on 127.0.0.1:`port`, bounded; the body, or why it failed.
    pub(crate) fn http(port: u16, path: &str) -> Result<String, String> {
        let timeout = Duration::from_secs(10);
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream =
            std::net::TcpStream::connect_timeout(&address, timeout).map_err(|e| format!("connect: {e}"))?;
        stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").map_err(|e| format!("send: {e}"))?;
        let mut answer = Vec::new();
        stream.take(1 << 20).read_to_end(&mut answer).map_err(|e| format!("receive: {e}"))?;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        match answer.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200") => Ok(body.to_string()),
            _ => Err(format!("unexpected answer: {answer:?}")),
        }
    }

    /// Polls `path` until the answer contains `expected`; the last answer.
    pub(crate) fn http_until(port: u16, path: &str, expected: &str) -> Result<String, String> {
        let mut answer = Err(String::from("never asked"));
        wait_until(GUEST_ANSWER, || {
            answer = http(port, path);
            answer.as_ref().is_ok_and(|a| a.contains(expected))
        });
        answer
    }

    /// The text at the guest's mark offset of a qcow2 image (read with QEMU's share flag, so
    /// that a running QEMU's lock does not refuse it).
    fn mark_on_image(sandbox: &Sandbox, image: &Path) -> String {
        let raw = sandbox.path().join("mark-read.raw");
        let _ = fs::remove_file(&raw);
        let mut convert = std::process::Command::new("qemu-img");
        convert.args(["convert", "-U", "-f", "qcow2", "-O", "raw"]).arg(image).arg(&raw);
        let out = output_within(convert, COMMAND_TIMEOUT);
        assert!(out.status.success(), "qemu-img convert: {}", stderr(&out));
        let bytes = fs::read(&raw).unwrap_or_default();
        let sector = bytes.get(MARK_OFFSET..MARK_OFFSET + 512).unwrap_or_default();
        String::from_utf8_lossy(sector).trim_end_matches('\0').trim().to_string()
    }

    /// The internal snapshots `qemu-img snapshot -l` lists in `image`.
    fn image_snapshots(image: &Path) -> String {
        let mut list = std::process::Command::new("qemu-img");
        list.args(["snapshot", "-U", "-l"]).arg(image);
        let out = output_within(list, COMMAND_TIMEOUT);
        assert!(out.status.success(), "qemu-img snapshot -l: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn console(sandbox: &Sandbox, uri: &str) -> String {
        sandbox.ok_uri(uri, &["--enable", "domain.console-read", "console-log", "guest", "-"])
    }

    #[test]
    fn reverting_a_booted_guest_undoes_its_disk_change_and_keeps_it_running() {
        let sandbox = Sandbox::new();
        enable_snapshots(sandbox.path());
        let uri = sandbox.uri("g", "&accel=tcg");
        let disk = sandbox.boot_disk("data");
        let port = free_local_port();
        let spec = guest_spec_toml("guest", &disk, port).replace("format = \"raw\"", "format = \"qcow2\"");
        let spec = sandbox.write("guest.toml", &spec);
        sandbox.ok_uri(&uri, &["define", spec.to_str().unwrap_or_default()]);
        sandbox.ok_uri(&uri, &["start", "guest"]);
        let mut text = String::new();
        let booted = wait_until(GUEST_BOOT, || {
            text = console(&sandbox, &uri);
            text.contains(GUEST_READY)
        });
        assert!(booted, "no {GUEST_READY} on the console within {GUEST_BOOT:?}; console so far:\n{text}");

        // The guest marks its disk "before", the snapshot is taken, then it marks "after".
        let before = http_until(port, "/cgi-bin/mark?before", "CAPVIRT-GUEST-MARK before");
        assert!(before.as_ref().is_ok_and(|a| a.contains("CAPVIRT-GUEST-MARK before")), "{before:?}");
        let created = sandbox.json_uri(&uri, &["snapshot-create", "guest", "s1", "--description", "marked before"]);
        assert_eq!(created["name"], "s1", "{created}");
        assert_eq!(created["state"], "running", "{created}");
        assert_eq!(created["description"], "marked before", "{created}");
        assert_eq!(sandbox.state("g", "guest"), "running");
        let after = http(port, "/cgi-bin/mark?after");
        assert!(after.as_ref().is_ok_and(|a| a.contains("CAPVIRT-GUEST-MARK after")), "{after:?}");
        let read = http(port, "/cgi-bin/read");
        assert!(read.as_ref().is_ok_and(|a| a.contains("CAPVIRT-GUEST-MARK after")), "{read:?}");
        assert_eq!(mark_on_image(&sandbox, &disk), "CAPVIRT-GUEST-MARK after");
        assert!(image_snapshots(&disk).contains("s1"), "{}", image_snapshots(&disk));

        // Revert: the guest runs on, and both what it sees and what the image holds are "before".
        sandbox.ok_uri(&uri, &["snapshot-revert", "guest", "s1"]);
        assert_eq!(sandbox.state("g", "guest"), "running");
        let reverted = http_until(port, "/cgi-bin/read", "CAPVIRT-GUEST-MARK");
        assert!(reverted.as_ref().is_ok_and(|a| a.contains("CAPVIRT-GUEST-MARK before")), "{reverted:?}");
        assert_eq!(mark_on_image(&sandbox, &disk), "CAPVIRT-GUEST-MARK before");

        let list = sandbox.json_uri(&uri, &["snapshot-list", "guest"]);
        let names: Vec<&str> = list.as_array().into_iter().flatten().filter_map(|s| s["name"].as_str()).collect();
        assert_eq!(names, ["s1"], "{list}");
        assert!(list[0]["created"].as_u64() > Some(1_700_000_000), "{list}");

        // Paused snapshots revert to paused, from a running guest.
        sandbox.ok_uri(&uri, &["suspend", "guest"]);
        sandbox.ok_uri(&uri, &["snapshot-create", "guest", "p1"]);
        sandbox.ok_uri(&uri, &["resume", "guest"]);
        sandbox.ok_uri(&uri, &["snapshot-revert", "guest", "p1"]);
        assert_eq!(sandbox.state("g", "guest"), "paused");
        sandbox.ok_uri(&uri, &["snapshot-revert", "guest", "s1"]);
        assert_eq!(sandbox.state("g", "guest"), "running");

        // Deleting while it runs takes the snapshot out of the image too.
        sandbox.ok_uri(&uri, &["snapshot-delete", "guest", "p1"]);
        assert!(!image_snapshots(&disk).contains("p1"), "{}", image_snapshots(&disk));

        // A snapshot with memory reverts only an active domain; undefine waits for the
        // snapshots to go; deleting on a shut off domain goes through the image.
        sandbox.ok_uri(&uri, &["destroy", "guest"]);
        assert_refused(&sandbox.run_uri(&uri, &["snapshot-revert", "guest", "s1"]), 6, "start it first");
        assert_refused(&sandbox.run_uri(&uri, &["undefine", "guest"]), 6, "s1");
        sandbox.ok_uri(&uri, &["snapshot-delete", "guest", "s1"]);
        assert_eq!(sandbox.json_uri(&uri, &["snapshot-list", "guest"]), serde_json::json!([]));
        assert!(!image_snapshots(&disk).contains("s1"), "{}", image_snapshots(&disk));
        sandbox.ok_uri(&uri, &["undefine", "guest"]);
    }

    #[test]
    fn raw_and_missing_disks_unknown_and_taken_names_are_refused() {
        let sandbox = Sandbox::new();
        enable_snapshots(sandbox.path());
        let boot = sandbox.boot_disk("boot");
        let raw = sandbox.blank_image("scratch", "raw");
        let mixed = format!(
            "{}\n[[disks]]\npath = \"{}\"\nformat = \"raw\"\nbus = \"virtio\"\n",
            spec_toml("mixed", 64, &boot, true),
            raw.display()
        );
        let mixed = sandbox.write("mixed.toml", &mixed);
        sandbox.ok("r", &["define", mixed.to_str().unwrap_or_default()]);
        let raw_path = raw.display().to_string();
        // Unsupported (exit 4), naming the disk: whatever the state, that domain cannot have one.
        assert_refused(&sandbox.run("r", &["snapshot-create", "mixed", "s"]), 4, &raw_path);
        sandbox.ok("r", &["start", "mixed"]);
        assert_refused(&sandbox.run("r", &["snapshot-create", "mixed", "s"]), 4, &raw_path);
        assert_eq!(sandbox.state("r", "mixed"), "running");
        assert_eq!(sandbox.json("r", &["snapshot-list", "mixed"]), serde_json::json!([]));

        let diskless = sandbox.write("diskless.toml", "name = \"diskless\"\nmemory_mib = 64\nvcpus = 1\n");
        sandbox.ok("r", &["define", diskless.to_str().unwrap_or_default()]);
        assert_refused(&sandbox.run("r", &["snapshot-create", "diskless", "s"]), 4, "no writable disk");

        // Unknown snapshots and domains are not found (5); bad or taken names are usage errors (2).
        let qcow = sandbox.write("vm.toml", &spec_toml("vm", 64, &sandbox.boot_disk("vm"), true));
        sandbox.ok("r", &["define", qcow.to_str().unwrap_or_default()]);
        assert_refused(&sandbox.run("r", &["snapshot-revert", "vm", "nope"]), 5, "no snapshot named 'nope'");
        assert_refused(&sandbox.run("r", &["snapshot-delete", "vm", "nope"]), 5, "no snapshot named 'nope'");
        assert_refused(&sandbox.run("r", &["snapshot-create", "ghost", "s"]), 5, "ghost");
        assert_refused(&sandbox.run("r", &["snapshot-list", "ghost"]), 5, "ghost");
        assert_refused(&sandbox.run("r", &["snapshot-create", "vm", "../x"]), 2, "name");
        sandbox.ok("r", &["snapshot-create", "vm", "s"]);
        assert_refused(&sandbox.run("r", &["snapshot-create", "vm", "s"]), 2, "already has a snapshot named 's'");
    }

    #[test]
    fn a_shut_off_domain_snapshots_and_reverts_its_images() {
        let sandbox = Sandbox::new();
        enable_snapshots(sandbox.path());
        let disk = sandbox.boot_disk("off");
        let spec = sandbox.write("off.toml", &spec_toml("off", 64, &disk, true));
        sandbox.ok("o", &["define", spec.to_str().unwrap_or_default()]);
        let created = sandbox.json("o", &["snapshot-create", "off", "clean"]);
        assert_eq!(created["state"], "shut off", "{created}");
        assert!(image_snapshots(&disk).contains("clean"), "{}", image_snapshots(&disk));

        // Something writes the image while the domain is off; revert brings back the zeros.
        let mut io = std::process::Command::new("qemu-io");
        io.args(["-f", "qcow2", "-c", "write -P 0x41 4096 512"]).arg(&disk);
        let out = output_within(io, COMMAND_TIMEOUT);
        assert!(out.status.success(), "qemu-io: {}", stderr(&out));
        assert!(mark_on_image(&sandbox, &disk).starts_with("AAAA"));
        let started = Instant::now();
        sandbox.ok("o", &["snapshot-revert", "off", "clean"]);
        assert!(started.elapsed() < COMMAND_TIMEOUT);
        assert_eq!(mark_on_image(&sandbox, &disk), "");
        assert_eq!(sandbox.state("o", "off"), "shut off");

        // A disk-only snapshot reverts only a shut off domain.
        sandbox.ok("o", &["start", "off"]);
        assert_refused(&sandbox.run("o", &["snapshot-revert", "off", "clean"]), 6, "destroy it first");
        sandbox.ok("o", &["snapshot-delete", "off", "clean"]);
        assert_eq!(sandbox.json("o", &["snapshot-list", "off"]), serde_json::json!([]));
    }
}

mod test_driver {
    use capvirt_host::{ErrorCategory, Host, HostConfig, Value};
    use capvirt_tests::{test_plugin_dir, Sandbox};

    use super::{enable_snapshots, SNAPSHOT_CAPABILITIES};

    fn host() -> Host {
        let mut config = HostConfig {
            plugin_dirs: vec![test_plugin_dir().to_path_buf()],
            check_results: true,
            ..Default::default()
        };
        config.policy.enabled = SNAPSHOT_CAPABILITIES.iter().map(|id| id.to_string()).collect();
        Host::new(config).unwrap_or_else(|e| panic!("host: {e}"))
    }

    fn args(domain: &str, name: &str) -> Value {
        Value::record([("domain", Value::string(domain)), ("name", Value::string(name))])
    }

    fn domain(name: &str) -> Value {
        Value::record([("domain", Value::string(name))])
    }

    fn state(conn: &capvirt_host::Connection, name: &str) -> String {
        let info = conn.call("domain.info", domain(name)).unwrap_or_else(|e| panic!("{e}"));
        info.get("state").and_then(Value::as_str).unwrap_or_default().to_string()
    }

    #[test]
    fn snapshots_in_memory_follow_the_qemu_drivers_rules() {
        let host = host();
        let conn = host.connect("test:///snapshot-rules", false).unwrap_or_else(|e| panic!("{e}"));
        let spec =
            Value::record([("name", Value::from("vm")), ("memory_mib", Value::Int(64)), ("vcpus", Value::Int(1))]);
        conn.call("domain.define", Value::record([("spec", spec)])).unwrap_or_else(|e| panic!("{e}"));
        conn.call("domain.start", domain("vm")).unwrap_or_else(|e| panic!("{e}"));

        let mut create = args("vm", "s1");
        create.set("description", "first");
        let record = conn.call("domain.snapshot-create", create).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(record.get("name").and_then(Value::as_str), Some("s1"));
        assert_eq!(record.get("state").and_then(Value::as_str), Some("running"));
        assert_eq!(record.get("description").and_then(Value::as_str), Some("first"));
        let taken = conn.call("domain.snapshot-create", args("vm", "s1")).expect_err("taken");
        assert_eq!(taken.category(), ErrorCategory::Usage, "{taken}");

        // Revert undoes what happened since: paused → running again.
        conn.call("domain.suspend", domain("vm")).unwrap_or_else(|e| panic!("{e}"));
        conn.call("domain.snapshot-revert", args("vm", "s1")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state(&conn, "vm"), "running");

        let missing = conn.call("domain.snapshot-revert", args("vm", "nope")).expect_err("unknown");
        assert_eq!(missing.category(), ErrorCategory::NotFound, "{missing}");
        let ghost = conn.call("domain.snapshot-list", domain("ghost")).expect_err("unknown domain");
        assert_eq!(ghost.category(), ErrorCategory::NotFound, "{ghost}");

        // Shut off: the running snapshot is refused, a disk-only one is taken and reverts.
        conn.call("domain.destroy", domain("vm")).unwrap_or_else(|e| panic!("{e}"));
        let needs_active = conn.call("domain.snapshot-revert", args("vm", "s1")).expect_err("off");
        assert_eq!(needs_active.category(), ErrorCategory::InvalidState, "{needs_active}");
        let off = conn.call("domain.snapshot-create", args("vm", "off")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(off.get("state").and_then(Value::as_str), Some("shut off"));
        conn.call("domain.snapshot-revert", args("vm", "off")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state(&conn, "vm"), "shut off");

        let list = conn.call("domain.snapshot-list", domain("vm")).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> =
            list.as_list().into_iter().flatten().filter_map(|s| s.get("name").and_then(Value::as_str)).collect();
        assert_eq!(names, ["s1", "off"]);

        let undefine = conn.call("domain.undefine", domain("vm")).expect_err("has snapshots");
        assert_eq!(undefine.category(), ErrorCategory::InvalidState, "{undefine}");
        for name in ["s1", "off"] {
            conn.call("domain.snapshot-delete", args("vm", name)).unwrap_or_else(|e| panic!("{e}"));
        }
        let gone = conn.call("domain.snapshot-delete", args("vm", "s1")).expect_err("deleted");
        assert_eq!(gone.category(), ErrorCategory::NotFound, "{gone}");
        conn.call("domain.undefine", domain("vm")).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn the_cli_on_test_default_answers_like_the_qemu_driver() {
        let sb = Sandbox::new();
        let enable = [(
            "CAPVIRT_ENABLE",
            "domain.snapshot-create,domain.snapshot-list,domain.snapshot-revert,domain.snapshot-delete",
        )];
        let run = sb.capvirt_env(&["-c", "test:///default", "snapshot-create", "test", "s1"], &enable);
        // The CLI shows the record it returns.
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert!(run.stdout.contains("s1") && run.stdout.contains("running"), "{}", run.stdout);
        let run = sb.capvirt_env(&["-c", "test:///default", "-o", "json", "snapshot-list", "test"], &enable);
        assert_eq!((run.code, run.stdout.trim()), (0, "[]"), "each CLI run is a fresh test host: {}", run.stderr);
        for (args, code, words) in [
            (&["snapshot-revert", "test", "nope"][..], 5, "no snapshot named 'nope'"),
            (&["snapshot-delete", "test", "nope"][..], 5, "no snapshot named 'nope'"),
            (&["snapshot-list", "ghost"][..], 5, "ghost"),
            (&["snapshot-create", "test", "../x"][..], 2, "name"),
        ] {
            let mut all = vec!["-c", "test:///default"];
            all.extend_from_slice(args);
            let run = sb.capvirt_env(&all, &enable);
            assert_eq!(run.code, code, "{args:?}: {}", run.stderr);
            assert!(run.stderr.contains(words), "{args:?}: {}", run.stderr);
        }
        // Experimental: refused by policy (3) until enabled, here through the host config.
        let run = sb.capvirt(&["-c", "test:///default", "snapshot-list", "test"]);
        assert_eq!(run.code, 3, "{}", run.stderr);
        enable_snapshots(sb.state.path());
        let run = sb.capvirt(&["-c", "test:///default", "snapshot-list", "test"]);
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
}
