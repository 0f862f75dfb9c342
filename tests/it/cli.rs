//! Every CLI command on the test driver, as an operator runs it: output (snapshots), exit
//! codes and refusals. Each `capvirt` run is a fresh process, so state changes are checked
//! within one run or through files.

use capvirt_tests::{failed, json, ok, Sandbox};
use insta::assert_snapshot;

const WEB_STATE: &str = r#"
[[domains]]
state = "running"
[domains.spec]
name = "web"
memory_mib = 512
vcpus = 1
disks = [{ path = "/srv/web.qcow2", format = "qcow2", bus = "virtio" }, { path = "/srv/data.raw", format = "raw", bus = "sata" }]
devices = [{ kind = "usb-tablet", id = "tablet0" }]
graphics = { adapter = "vga" }

[[domains]]
[domains.spec]
name = "idle"
memory_mib = 256
vcpus = 1
"#;

#[test]
fn list_shows_the_running_default_domain() {
    let sb = Sandbox::new();
    assert_snapshot!("list", ok(&sb.capvirt(&["list"])));
    let explicit = sb.capvirt(&["--connect", "test:///default", "list"]);
    assert_eq!(ok(&explicit), ok(&sb.capvirt(&["list"])));
    assert_eq!(json(&sb.capvirt(&["-o", "json", "list"])), serde_json::json!([{"name": "test", "state": "running"}]));
}

#[test]
fn list_all_includes_inactive_domains() {
    let sb = Sandbox::new();
    let uri = format!("test://{}", sb.write("web.toml", WEB_STATE));
    assert_snapshot!("list_all", ok(&sb.capvirt(&["-c", &uri, "list", "--all"])));
    let active = json(&sb.capvirt(&["-c", &uri, "--output", "json", "list"]));
    assert_eq!(active, serde_json::json!([{"name": "web", "state": "running"}]));
}

#[test]
fn default_uri_comes_from_the_environment() {
    let sb = Sandbox::new();
    let uri = format!("test://{}", sb.write("web.toml", WEB_STATE));
    let run = sb.capvirt_env(&["list"], &[("CAPVIRT_DEFAULT_URI", &uri)]);
    assert!(ok(&run).contains("web"), "{}", run.stdout);
}

#[test]
fn dominfo_table_and_json() {
    let sb = Sandbox::new();
    assert_snapshot!("dominfo", ok(&sb.capvirt(&["dominfo", "test"])));
    let info = json(&sb.capvirt(&["-o", "json", "dominfo", "test"]));
    assert_eq!(info["name"], "test");
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_kib"], 2 * 1024 * 1024);
}

#[test]
fn lifecycle_commands_report_and_refuse_by_state() {
    let sb = Sandbox::new();
    assert_snapshot!("suspend", ok(&sb.capvirt(&["suspend", "test"])));
    assert_eq!(ok(&sb.capvirt(&["shutdown", "test"])), "Domain 'test' is being shutdown\n");
    assert_eq!(ok(&sb.capvirt(&["destroy", "test"])), "Domain 'test' destroyed\n");
    assert_eq!(ok(&sb.capvirt(&["reboot", "test"])), "Domain 'test' is being rebooted\n");
    // Fresh process, fresh default state: `test` runs, so these are invalid-state refusals.
    assert_snapshot!("resume_running", failed(&sb.capvirt(&["resume", "test"]), 6));
    failed(&sb.capvirt(&["start", "test"]), 6);
    failed(&sb.capvirt(&["undefine", "test"]), 6);
    assert_snapshot!("dominfo_missing", failed(&sb.capvirt(&["dominfo", "nosuch"]), 5));
}

#[test]
fn lifecycle_on_an_inactive_domain() {
    let sb = Sandbox::new();
    let uri = format!("test://{}", sb.write("web.toml", WEB_STATE));
    assert_eq!(ok(&sb.capvirt(&["-c", &uri, "start", "idle"])), "Domain 'idle' started\n");
    assert_eq!(ok(&sb.capvirt(&["-c", &uri, "undefine", "idle"])), "Domain 'idle' has been undefined\n");
    failed(&sb.capvirt(&["-c", &uri, "resume", "idle"]), 6);
    failed(&sb.capvirt(&["-c", &uri, "shutdown", "idle"]), 6);
    failed(&sb.capvirt(&["-c", &uri, "destroy", "idle"]), 6);
}

#[test]
fn define_from_a_spec_file() {
    let sb = Sandbox::new();
    let spec = sb.write(
        "vm1.toml",
        "name = \"vm1\"\nmemory_mib = 1024\nvcpus = 2\n[[disks]]\npath = \"/images/vm1.qcow2\"\nformat = \"qcow2\"\nbus = \"virtio\"\n",
    );
    assert_eq!(ok(&sb.capvirt(&["define", &spec])), "Domain 'vm1' defined\n");
}

#[test]
fn define_refuses_bad_specs_with_the_field_named() {
    let sb = Sandbox::new();
    let cases = [
        ("bad_name", "name = \"../etc\"\nmemory_mib = 64\nvcpus = 1\n", "spec.name"),
        ("absurd_memory", "name = \"x\"\nmemory_mib = 99999999999\nvcpus = 1\n", "spec.memory_mib"),
        (
            "unknown_field",
            "name = \"x\"\nmemory_mib = 64\nvcpus = 1\nqemu_args = \"-S\"\n",
            "unknown field `qemu_args`",
        ),
        ("missing_vcpus", "name = \"x\"\nmemory_mib = 64\n", "spec.vcpus"),
        (
            "bad_bus",
            "name = \"x\"\nmemory_mib = 64\nvcpus = 1\n[[disks]]\npath = \"/a\"\nformat = \"raw\"\nbus = \"ide\"\n",
            "expected one of virtio, sata, usb",
        ),
        ("mistyped", "name = \"x\"\nmemory_mib = \"lots\"\nvcpus = 1\n", "spec.memory_mib"),
    ];
    for (file, text, needle) in cases {
        let path = sb.write(&format!("{file}.toml"), text);
        let run = sb.capvirt(&["define", &path]);
        let message = failed(&run, 2);
        assert!(message.contains(needle), "{file}: {message}");
    }
    let run = sb.capvirt(&["define", &sb.path("absent.toml").display().to_string()]);
    assert!(failed(&run, 2).contains("cannot read"));
    let run = sb.capvirt(&["define", &sb.write("garbage.toml", "this is = = not toml")]);
    assert!(failed(&run, 2).contains("not valid TOML"));
    // The file's text never appears in the error, only where it is wrong.
    let run = sb.capvirt(&["define", &sb.write("secret.toml", "password = \"hunter2\" = oops\n")]);
    let message = failed(&run, 2);
    assert!(message.contains("line 1, column") && !message.contains("hunter2"), "{message}");
}

#[test]
fn argument_files_are_read_up_to_a_bound() {
    let sb = Sandbox::new();
    // A device would be read without end: it is cut at the bound and refused.
    let run = sb.capvirt(&["define", "/dev/zero"]);
    assert!(failed(&run, 2).contains("larger than the 1024 KiB allowed"));
    let big = format!("name = \"x\"\nmemory_mib = 64\nvcpus = 1\n#{}\n", "x".repeat(1 << 20));
    let run = sb.capvirt(&["define", &sb.write("big.toml", &big)]);
    assert!(failed(&run, 2).contains("larger than"));
    assert!(ok(&sb.capvirt(&["list", "--all"])).lines().all(|l| !l.contains(" x ")));
    // Echoed arguments are cut short.
    let long = "a".repeat(5000);
    let run =
        sb.capvirt(&["call", "domain.shutdown", "--arg", "domain=test", "--arg", &format!("timeout_secs={long}")]);
    let message = failed(&run, 2);
    assert!(message.contains("expected an unsigned integer") && message.len() < 300, "{message}");
}

#[test]
fn domblkstat_per_device_and_total() {
    let sb = Sandbox::new();
    let uri = format!("test://{}", sb.write("web.toml", WEB_STATE));
    assert_snapshot!("domblkstat", ok(&sb.capvirt(&["-c", &uri, "domblkstat", "web", "vda"])));
    let one = json(&sb.capvirt(&["-c", &uri, "-o", "json", "domblkstat", "web", "vda"]));
    let total = json(&sb.capvirt(&["-c", &uri, "-o", "json", "domblkstat", "web"]));
    for key in ["rd_req", "rd_bytes", "wr_req", "wr_bytes", "errs"] {
        assert!(one[key].is_u64(), "{key} missing: {one}");
    }
    assert!(total["rd_req"].as_u64() > one["rd_req"].as_u64(), "total sums both disks: {total} vs {one}");
    failed(&sb.capvirt(&["-c", &uri, "domblkstat", "web", "vdz"]), 5);
    failed(&sb.capvirt(&["-c", &uri, "domblkstat", "idle"]), 6);
}

#[test]
fn attach_and_detach_devices() {
    let sb = Sandbox::new();
    let uri = format!("test://{}", sb.write("web.toml", WEB_STATE));
    let keyboard = sb.write("kbd.toml", "kind = \"usb-keyboard\"\nid = \"kbd0\"\n");
    assert_eq!(ok(&sb.capvirt(&["-c", &uri, "attach-device", "web", &keyboard])), "Device attached successfully\n");
    let tablet = sb.write("tablet.toml", "kind = \"usb-tablet\"\nid = \"tablet0\"\n");
    assert_eq!(ok(&sb.capvirt(&["-c", &uri, "detach-device", "web", &tablet])), "Device detached successfully\n");
    // Already present at boot: attaching the same id again is refused.
    failed(&sb.capvirt(&["-c", &uri, "attach-device", "web", &tablet]), 2);
    failed(&sb.capvirt(&["-c", &uri, "detach-device", "web", &keyboard]), 5);
    let disk_without_image = sb.write("disk.toml", "kind = \"usb-disk\"\nid = \"stick\"\n");
    assert!(failed(&sb.capvirt(&["-c", &uri, "attach-device", "web", &disk_without_image]), 2).contains("needs `path`"));
}

#[test]
fn migrate_save_restore_and_screenshot() {
    let sb = Sandbox::new();
    assert_eq!(
        ok(&sb.capvirt(&["migrate", "test", "test:///elsewhere"])),
        "Domain 'test' migrated to test:///elsewhere\n"
    );
    failed(&sb.capvirt(&["migrate", "test", "test:///default"]), 2);
    failed(&sb.capvirt(&["migrate", "test", "qemu:///session"]), 2);

    let saved = sb.path("test.save").display().to_string();
    assert_eq!(ok(&sb.capvirt(&["save", "test", &saved])), format!("Domain 'test' saved to {saved}\n"));
    // Never overwrites.
    failed(&sb.capvirt(&["save", "test", &saved]), 2);
    // The default host already runs `test`: restore on an empty test host.
    assert_eq!(ok(&sb.capvirt(&["-c", "test:///empty", "restore", &saved])), format!("Domain restored from {saved}\n"));
    failed(&sb.capvirt(&["restore", &saved]), 6);
    failed(&sb.capvirt(&["restore", &sb.path("nope.save").display().to_string()]), 5);

    let png = sb.path("shot.png");
    let png_arg = png.display().to_string();
    assert_eq!(ok(&sb.capvirt(&["screenshot", "test", &png_arg])), format!("Screenshot saved to {png_arg}\n"));
    let bytes = std::fs::read(&png).unwrap_or_default();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    let height = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    assert_eq!((width, height), (64, 48));
    let meta = json(&sb.capvirt(&["-o", "json", "screenshot", "test", &sb.path("shot2.png").display().to_string()]));
    assert_eq!(meta["format"], "png");
    assert_eq!(meta["width"], 64);
}

#[test]
fn nodeinfo_and_capabilities() {
    let sb = Sandbox::new();
    assert_snapshot!("nodeinfo", ok(&sb.capvirt(&["nodeinfo"])));
    assert_snapshot!("capabilities", ok(&sb.capvirt(&["capabilities"])));
    let caps = json(&sb.capvirt(&["-o", "json", "capabilities"]));
    let implemented: Vec<&str> = caps["capabilities"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["implemented"] == true)
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(implemented.len(), 25);
    assert!(!implemented.contains(&"domain.monitor-command"));
}

#[test]
fn registry_list_and_show() {
    let sb = Sandbox::new();
    assert_snapshot!("registry_list", ok(&sb.capvirt(&["registry", "list"])));
    assert_snapshot!("registry_show_suspend", ok(&sb.capvirt(&["registry", "show", "domain.suspend"])));
    let shown = json(&sb.capvirt(&["-o", "json", "registry", "show", "domain.monitor-command"]));
    assert_eq!(shown["stage"], "rejected");
    failed(&sb.capvirt(&["registry", "show", "domain.teleport"]), 5);
}

#[test]
fn call_reaches_any_accepted_capability_with_typed_arguments() {
    let sb = Sandbox::new();
    let info = json(&sb.capvirt(&["-o", "json", "call", "domain.info", "--arg", "domain=test"]));
    assert_eq!(info["vcpus"], 2);
    let all = json(&sb.capvirt(&["-o", "json", "call", "domain.list", "--arg", "all=true"]));
    assert_eq!(all[0]["name"], "test");
    let inline = sb.capvirt(&[
        "call",
        "domain.attach-device",
        "--arg",
        "domain=test",
        "--arg",
        r#"device={ kind = "usb-tablet", id = "t1" }"#,
    ]);
    assert_eq!(ok(&inline), "Device attached successfully\n");
    let stats =
        json(&sb.capvirt(&["-o", "json", "call", "domain.block-stats", "--arg", "domain=test", "--arg", "device=vda"]));
    assert!(stats["rd_req"].as_u64() > Some(0));
}

#[test]
fn call_refuses_what_the_registry_does_not_allow() {
    let sb = Sandbox::new();
    assert_snapshot!("refuse_unknown", failed(&sb.capvirt(&["call", "domain.teleport", "--arg", "domain=test"]), 3));
    assert_snapshot!(
        "refuse_rejected_passthrough",
        failed(
            &sb.capvirt(&["call", "domain.monitor-command", "--arg", "domain=test", "--arg", "command=info registers"]),
            3
        )
    );
    assert_snapshot!(
        "refuse_unknown_arg",
        failed(&sb.capvirt(&["call", "domain.info", "--arg", "domain=test", "--arg", "verbose=1"]), 2)
    );
    assert_snapshot!("refuse_missing_arg", failed(&sb.capvirt(&["call", "domain.info"]), 2));
    assert_snapshot!("refuse_mistyped_arg", failed(&sb.capvirt(&["call", "domain.list", "--arg", "all=maybe"]), 2));
    failed(&sb.capvirt(&["call", "domain.shutdown", "--arg", "domain=test", "--arg", "timeout_secs=-5"]), 2);
    failed(&sb.capvirt(&["call", "domain.info", "--arg", "domain"]), 2);
    failed(&sb.capvirt(&["call", "domain.info", "--arg", "domain=a", "--arg", "domain=b"]), 2);
}

#[test]
fn readonly_connections_refuse_mutating_capabilities() {
    let sb = Sandbox::new();
    assert_snapshot!("readonly_suspend", failed(&sb.capvirt(&["-r", "suspend", "test"]), 3));
    failed(&sb.capvirt(&["--readonly", "call", "domain.destroy", "--arg", "domain=test"]), 3);
    let spec = sb.write("vm.toml", "name = \"vm\"\nmemory_mib = 64\nvcpus = 1\n");
    failed(&sb.capvirt(&["-r", "define", &spec]), 3);
    // Reading still works.
    ok(&sb.capvirt(&["-r", "dominfo", "test"]));
    ok(&sb.capvirt(&["-r", "list"]));
}

#[test]
fn mutating_calls_are_audited_as_json_lines() {
    let sb = Sandbox::new();
    ok(&sb.capvirt(&["suspend", "test"]));
    ok(&sb.capvirt(&["dominfo", "test"]));
    failed(&sb.capvirt(&["-r", "destroy", "test"]), 3);
    failed(&sb.capvirt(&["resume", "test"]), 6);
    let records = sb.audit_records();
    let events: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r["event"].as_str().unwrap_or_default(), r["capability"].as_str().unwrap_or_default()))
        .collect();
    // Only mutating calls are audited: an intent before the driver, an outcome after;
    // a refusal is one record.
    assert_eq!(
        events,
        [
            ("intent", "domain.suspend"),
            ("outcome", "domain.suspend"),
            ("refused", "domain.destroy"),
            ("intent", "domain.resume"),
            ("outcome", "domain.resume"),
        ],
        "{records:?}"
    );
    assert_eq!(records[0]["uri"], "test:///default");
    assert_eq!(records[0]["args"], serde_json::json!({"domain": "test"}));
    assert_eq!(records[1]["outcome"], "ok");
    assert_eq!(records[2]["outcome"], "denied");
    assert_eq!(records[4]["outcome"], "failed");
    assert!(records[4]["error"].as_str().unwrap_or_default().contains("not paused"));
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    let sb = Sandbox::new();
    assert_eq!(sb.capvirt(&["dominfo"]).code, 2);
    assert_eq!(sb.capvirt(&["frobnicate"]).code, 2);
    assert_eq!(sb.capvirt(&["--output", "yaml", "list"]).code, 2);
    let help = sb.capvirt(&["--help"]);
    assert_eq!(help.code, 0);
    assert_snapshot!("help", help.stdout);
    let bad_uri = sb.capvirt(&["-c", "not a uri", "list"]);
    failed(&bad_uri, 2);
    let no_driver = sb.capvirt(&["-c", "xen:///system", "list"]);
    assert!(failed(&no_driver, 4).contains("no loaded plugin serves the `xen` scheme"));
}

#[test]
fn registry_override_warns_and_a_broken_registry_is_refused() {
    let sb = Sandbox::new();
    let copy = sb.path("registry");
    copy_dir(&capvirt_tests::workspace_root().join("proposals"), &copy);
    let run = sb.capvirt(&["--registry", &copy.display().to_string(), "list"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("warning: using registry from"), "{}", run.stderr);

    // An unreviewed registry cannot turn a state change into a read: read-only connections and
    // auditing keep following the reviewed registry's `mutates`.
    let suspend = copy.join("capabilities/domain.suspend.toml");
    let text = std::fs::read_to_string(&suspend).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&suspend, text.replace("mutates = true", "mutates = false")).unwrap_or_else(|e| panic!("{e}"));
    let run = sb.capvirt(&["-r", "--registry", &copy.display().to_string(), "suspend", "test"]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("`domain.suspend` changes state"), "{}", run.stderr);
    assert_eq!(json(&sb.capvirt(&["-o", "json", "dominfo", "test"]))["state"], "running");

    std::fs::write(copy.join("capabilities/domain.info.toml"), "id = \"domain.info\"\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let broken = sb.capvirt(&["--registry", &copy.display().to_string(), "list"]);
    assert_eq!(broken.code, 1);
    assert!(broken.stderr.contains("capabilities/domain.info.toml"), "{}", broken.stderr);
}

pub(crate) fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{e}")).flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn console_log_reads_the_test_guests_console_from_an_offset() {
    let sb = Sandbox::new();
    // Experimental: refused until enabled.
    failed(&sb.capvirt(&["console-log", "test", "-"]), 3);
    let all = ok(&sb.capvirt(&["--enable", "domain.console-read", "console-log", "test", "-"])).to_string();
    assert!(all.contains("CAPVIRT-GUEST-READY\r\n"), "{all:?}");
    let tail = ok(&sb.capvirt(&[
        "--enable",
        "domain.console-read",
        "console-log",
        "test",
        "-",
        "--offset",
        "8",
        "--max-bytes",
        "4",
    ]))
    .to_string();
    assert_eq!(tail, all[8..12]);
    let meta = json(&sb.capvirt(&[
        "--enable",
        "domain.console-read",
        "-o",
        "json",
        "console-log",
        "test",
        "-",
        "--offset",
        "1000",
    ]));
    assert_eq!(meta["offset"], all.len());
    assert_eq!(meta["next_offset"], all.len());
    let file = sb.path("console.txt").display().to_string();
    assert_eq!(
        ok(&sb.capvirt(&["--enable", "domain.console-read", "console-log", "test", &file])),
        format!("Console output of 'test' saved to {file}\n")
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap_or_default(), all);
    failed(&sb.capvirt(&["--enable", "domain.console-read", "console-log", "nope", "-"]), 5);
    failed(&sb.capvirt(&["--enable", "domain.console-read", "console-log", "test", "-", "--max-bytes", "0"]), 2);
}

#[test]
fn define_refuses_bad_interfaces_with_the_reason() {
    let sb = Sandbox::new();
    let bridge =
        sb.write("bridge.toml", "name = \"b\"\nmemory_mib = 64\nvcpus = 1\n[[interfaces]]\nkind = \"bridge\"\n");
    assert!(failed(&sb.capvirt(&["define", &bridge]), 2).contains("needs `bridge`"));
    let bad = sb.write(
        "bad.toml",
        "name = \"b\"\nmemory_mib = 64\nvcpus = 1\n[[interfaces]]\nkind = \"user\"\nmac = \"01:00:5e:00:00:01\"\n",
    );
    assert!(failed(&sb.capvirt(&["define", &bad]), 2).contains("not a unicast"));
    let port = sb.write(
        "port.toml",
        "name = \"b\"\nmemory_mib = 64\nvcpus = 1\n[[interfaces]]\nkind = \"user\"\n[[interfaces.forwards]]\nhost_port = 0\nguest_port = 80\n",
    );
    assert!(failed(&sb.capvirt(&["define", &port]), 2).contains("host_port"));
}
