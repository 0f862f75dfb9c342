//! `qemu:///system` as root: QEMU runs as its unprivileged account (root's `[qemu] user`,
//! default `capvirt-qemu`) under QEMU's full seccomp filter, gets its images as descriptors
//! and cannot open root's files; a missing account or an unreachable state root refuses the
//! start. Real QEMU processes; every test's [`Sandbox`] kills its QEMUs on drop.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::{fs::MetadataExt, fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::Duration,
};

use capvirt_tests::qemu::{output_within, spec_toml, wait_until, Sandbox, COMMAND_TIMEOUT};

const ACCOUNT: &str = "capvirt-qemu";
/// The filter every QEMU of the driver runs under.
const FULL_FILTER: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// Bound on the test guest booting under TCG (polled).
const GUEST_BOOT: Duration = Duration::from_secs(180);

/// The account's uid and gid, creating it (as `.ci/run` does) when absent.
fn account() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let id = |flag: &str| {
            let mut cmd = Command::new("id");
            cmd.args([flag, ACCOUNT]);
            let out = output_within(cmd, COMMAND_TIMEOUT);
            String::from_utf8_lossy(&out.stdout).trim().parse::<u32>().ok()
        };
        if id("-u").is_none() {
            let mut useradd = Command::new("useradd");
            useradd.args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", ACCOUNT]);
            let out = output_within(useradd, COMMAND_TIMEOUT);
            // 9: another test process created it meanwhile.
            assert!(matches!(out.status.code(), Some(0 | 9)), "useradd: {}", String::from_utf8_lossy(&out.stderr));
        }
        match (id("-u"), id("-g")) {
            (Some(uid), Some(gid)) => (uid, gid),
            ids => panic!("no ids for {ACCOUNT}: {ids:?}"),
        }
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A sandbox the account can traverse (a fresh temporary directory is root's alone), with
/// root's system config in `etc/` (audit log in the sandbox, images confined to `images/`
/// plus `extra`).
fn system_sandbox(extra: &str) -> Sandbox {
    let sandbox = Sandbox::new();
    fs::set_permissions(sandbox.path(), fs::Permissions::from_mode(0o711)).unwrap_or_else(|e| panic!("{e}"));
    for dir in ["etc", "images"] {
        fs::create_dir(sandbox.path().join(dir)).unwrap_or_else(|e| panic!("{e}"));
    }
    let images = sandbox.path().join("images");
    let log = sandbox.path().join("system-audit.jsonl");
    sandbox.write(
        "etc/capvirt.toml",
        &format!("[audit]\npath = \"{}\"\n\n[images]\nallow = [\"{}\"]\n{extra}", log.display(), images.display()),
    );
    sandbox
}

fn system_uri(sandbox: &Sandbox, root: &str) -> String {
    sandbox.uri(root, "&accel=tcg").replacen("qemu:///session", "qemu:///system", 1)
}

/// Runs `capvirt -c URI ARGS…` with the sandbox's system config.
fn run(sandbox: &Sandbox, uri: &str, args: &[&str]) -> Output {
    let mut cmd = sandbox.capvirt_uri(uri);
    cmd.env("CAPVIRT_SYSCONFDIR", sandbox.path().join("etc")).args(args);
    output_within(cmd, COMMAND_TIMEOUT)
}

fn ok(sandbox: &Sandbox, uri: &str, args: &[&str]) {
    let out = run(sandbox, uri, args);
    assert_eq!(out.status.code(), Some(0), "capvirt {args:?}: {}", stderr(&out));
}

/// A root-owned image readable and writable by root alone, in the allowed directory.
fn root_only_image(sandbox: &Sandbox, name: &str, format: &str) -> PathBuf {
    let made = sandbox.blank_image(name, format);
    let path = sandbox.path().join("images").join(made.file_name().unwrap_or_default());
    fs::rename(&made, &path).unwrap_or_else(|e| panic!("{e}"));
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap_or_else(|e| panic!("{e}"));
    path
}

fn owner_and_mode(path: &Path) -> (u32, u32, u32) {
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.uid(), meta.gid(), meta.mode() & 0o7777)
}

/// `Field:` of `/proc/PID/status`.
fn status_field(pid: i32, field: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| panic!("{e}"));
    let prefix = format!("{field}:");
    status.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().to_string()).unwrap_or_default()
}

fn cmdline(pid: i32) -> Vec<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// A QMP exchange of this test's own on a monitor channel of the domain: what a caller that
/// bypasses capvirt's image policy could make QEMU do. Returns QEMU's reply line.
fn qmp_bypassing_capvirt(sandbox: &Sandbox, root: &str, domain: &str, command: &str) -> String {
    let socket = sandbox.root(root).join("domains").join(domain).join("run/qmp7.sock");
    let stream = UnixStream::connect(&socket).unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap_or_else(|e| panic!("{e}"));
    let mut writer = stream.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let mut reader = BufReader::new(stream);
    let mut next_line = || {
        let mut text = String::new();
        let read = reader.read_line(&mut text).unwrap_or_else(|e| panic!("QMP read: {e}"));
        assert!(read > 0, "QEMU closed the monitor");
        text
    };
    assert!(next_line().contains("\"QMP\""), "no QMP greeting");
    let mut reply = |line: &str| {
        writer.write_all(format!("{line}\n").as_bytes()).unwrap_or_else(|e| panic!("send: {e}"));
        loop {
            let text = next_line();
            if text.contains("\"return\"") || text.contains("\"error\"") {
                return text;
            }
        }
    };
    let capabilities = reply("{\"execute\": \"qmp_capabilities\"}");
    assert!(capabilities.contains("\"return\""), "{capabilities}");
    reply(command)
}

fn blockdev_add(node: &str, path: &Path) -> String {
    serde_json::json!({
        "execute": "blockdev-add",
        "arguments": {"driver": "raw", "node-name": node, "read-only": true,
                      "file": {"driver": "file", "filename": path.display().to_string()}}
    })
    .to_string()
}

#[test]
fn a_system_qemu_runs_as_its_account_under_the_full_filter_and_opens_only_its_images() {
    let (uid, gid) = account();
    let sandbox = system_sandbox("");
    let uri = system_uri(&sandbox, "sys");
    let disk = root_only_image(&sandbox, "boot", "qcow2");
    let stick = root_only_image(&sandbox, "stick", "raw");
    let secret = sandbox.write("secret.raw", "root's secret\n");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap_or_else(|e| panic!("{e}"));
    let before = [owner_and_mode(&disk), owner_and_mode(&stick)];
    assert_eq!(before[0], (0, 0, 0o600));

    let spec = sandbox.write("vm.toml", &spec_toml("vm", 64, &disk, false));
    ok(&sandbox, &uri, &["define", spec.to_str().unwrap_or_default()]);
    ok(&sandbox, &uri, &["start", "vm"]);
    let pid = sandbox.qemu_pid("sys", "vm");

    // Its account, no capability, no supplementary group, QEMU's seccomp filter.
    assert_eq!(status_field(pid, "Uid"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(status_field(pid, "Gid"), format!("{gid}\t{gid}\t{gid}\t{gid}"));
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    let args = cmdline(pid);
    let filter = args.iter().position(|a| a == "-sandbox").and_then(|i| args.get(i + 1));
    assert_eq!(filter.map(String::as_str), Some(FULL_FILTER), "{args:?}");
    assert!(!args.iter().any(|a| a == "-daemonize"), "{args:?}");
    // Images are named nowhere: QEMU got them as descriptors.
    let disk_text = disk.display().to_string();
    assert!(!args.iter().any(|a| a.contains(&disk_text)), "{args:?}");
    let fds: Vec<PathBuf> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(Result::ok)
        .filter_map(|e| fs::read_link(e.path()).ok())
        .collect();
    assert!(fds.contains(&disk), "QEMU does not hold its disk: {fds:?}");

    // Hot-plug of a root-only image works (the driver hands it over)...
    let stick_spec = sandbox.write(
        "stick.toml",
        &format!("kind = \"usb-disk\"\nid = \"stick\"\npath = \"{}\"\nformat = \"raw\"\n", stick.display()),
    );
    ok(&sandbox, &uri, &["attach-device", "vm", stick_spec.to_str().unwrap_or_default()]);
    // ...a file outside the allowed images is refused by the image policy...
    let secret_spec = sandbox.write(
        "secret.toml",
        &format!("kind = \"usb-disk\"\nid = \"secret\"\npath = \"{}\"\nformat = \"raw\"\n", secret.display()),
    );
    let refused = run(&sandbox, &uri, &["attach-device", "vm", secret_spec.to_str().unwrap_or_default()]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("outside this host's image directories"), "{}", stderr(&refused));
    // ...and past the policy, QEMU itself cannot open it: root's file is not its account's.
    let denied = qmp_bypassing_capvirt(&sandbox, "sys", "vm", &blockdev_add("peek", &secret));
    assert!(denied.contains("\"error\"") && denied.contains("Permission denied"), "{denied}");
    // Nor the definitions and logs of its own state root.
    let definition = sandbox.root("sys").join("domains/vm/domain.toml");
    let denied = qmp_bypassing_capvirt(&sandbox, "sys", "vm", &blockdev_add("peek2", &definition));
    assert!(denied.contains("\"error\"") && denied.contains("Permission denied"), "{denied}");
    // The refusal is the kernel's: the same request for a file the account may read succeeds.
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap_or_else(|e| panic!("{e}"));
    let opened = qmp_bypassing_capvirt(&sandbox, "sys", "vm", &blockdev_add("peek3", &secret));
    assert!(opened.contains("\"return\""), "{opened}");

    // Screenshots still work (QEMU writes them into a descriptor), and so do save/restore.
    let shot = sandbox.path().join("shot.png");
    ok(&sandbox, &uri, &["screenshot", "vm", shot.to_str().unwrap_or_default()]);
    assert!(fs::metadata(&shot).is_ok_and(|m| m.len() > 0));
    let saved = sandbox.path().join("images/vm.save");
    ok(&sandbox, &uri, &["save", "vm", saved.to_str().unwrap_or_default()]);
    ok(&sandbox, &uri, &["restore", saved.to_str().unwrap_or_default()]);
    assert_eq!(status_field(sandbox.qemu_pid("sys", "vm"), "Uid"), format!("{uid}\t{uid}\t{uid}\t{uid}"));

    // Images never changed hands: no owner to restore after destroy.
    assert_eq!([owner_and_mode(&disk), owner_and_mode(&stick)], before);
    ok(&sandbox, &uri, &["destroy", "vm"]);
    assert_eq!([owner_and_mode(&disk), owner_and_mode(&stick)], before);
    assert!(!sandbox.root("sys").join("emulator/vm").exists(), "QEMU's directory outlived it");
    assert!(sandbox.processes().is_empty(), "QEMU left: {:?}", sandbox.processes());
}

#[test]
fn a_missing_account_or_an_unreachable_state_root_refuses_the_start() {
    account();
    let sandbox = system_sandbox("\n[qemu]\nuser = \"capvirt-no-such-account\"\n");
    let uri = system_uri(&sandbox, "sys");
    let disk = root_only_image(&sandbox, "boot", "qcow2");
    let spec = sandbox.write("vm.toml", &spec_toml("vm", 64, &disk, true));
    ok(&sandbox, &uri, &["define", spec.to_str().unwrap_or_default()]);
    let out = run(&sandbox, &uri, &["start", "vm"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(message.contains("'capvirt-no-such-account', which does not exist"), "{message}");
    assert!(
        message.contains("useradd --system --no-create-home --shell /usr/sbin/nologin capvirt-no-such-account"),
        "{message}"
    );
    assert!(sandbox.processes().is_empty(), "a QEMU started: {:?}", sandbox.processes());

    // The default account, but a state root below a directory only root may enter.
    fs::write(sandbox.path().join("etc/capvirt.toml"), "")
        .and_then(|()| {
            let log = sandbox.path().join("system-audit.jsonl");
            fs::write(sandbox.path().join("etc/capvirt.toml"), format!("[audit]\npath = \"{}\"\n", log.display()))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let private = sandbox.path().join("private");
    fs::create_dir(&private).unwrap_or_else(|e| panic!("{e}"));
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap_or_else(|e| panic!("{e}"));
    let hidden = system_uri(&sandbox, "private/sys");
    ok(&sandbox, &hidden, &["define", spec.to_str().unwrap_or_default()]);
    let out = run(&sandbox, &hidden, &["start", "vm"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(
        message.contains(&format!("directory {} (mode 0700, uid 0) is not searchable", private.display())),
        "{message}"
    );
    assert!(sandbox.processes().is_empty(), "a QEMU started: {:?}", sandbox.processes());

    // qemu:///session is unchanged: its QEMU runs as the caller (here root), under the same filter.
    let session = sandbox.uri("session", "&accel=tcg");
    ok(&sandbox, &session, &["define", spec.to_str().unwrap_or_default()]);
    ok(&sandbox, &session, &["start", "vm"]);
    let pid = sandbox.qemu_pid("session", "vm");
    assert_eq!(status_field(pid, "Uid"), "0\t0\t0\t0");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    ok(&sandbox, &session, &["destroy", "vm"]);
}

#[test]
fn a_real_guest_boots_from_root_only_files_as_the_account_and_powers_off_cleanly() {
    use capvirt_tests::qemu::{free_local_port, guest, guest_spec_toml, GUEST_DISK_MARK, GUEST_READY};
    let (uid, _) = account();
    let sandbox = system_sandbox("");
    let uri = system_uri(&sandbox, "sys");
    // Kernel, initrd and disk readable by root alone: QEMU's account gets copies of the boot
    // files for the start and descriptors of the disk.
    let kernel = sandbox.path().join("images/vmlinuz");
    let initrd = sandbox.path().join("images/initrd.img");
    for (from, to) in [(&guest().kernel, &kernel), (&guest().initrd, &initrd)] {
        fs::copy(from, to).unwrap_or_else(|e| panic!("{e}"));
        fs::set_permissions(to, fs::Permissions::from_mode(0o600)).unwrap_or_else(|e| panic!("{e}"));
    }
    let disk = root_only_image(&sandbox, "data", "raw");
    let text = guest_spec_toml("guest", &disk, free_local_port())
        .replace(&guest().kernel.display().to_string(), &kernel.display().to_string())
        .replace(&guest().initrd.display().to_string(), &initrd.display().to_string());
    let spec = sandbox.write("guest.toml", &text);
    ok(&sandbox, &uri, &["define", spec.to_str().unwrap_or_default()]);
    ok(&sandbox, &uri, &["start", "guest"]);
    let pid = sandbox.qemu_pid("sys", "guest");
    assert_eq!(status_field(pid, "Uid"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    // The copies are gone once QEMU read them; only its pidfile is left in its directory.
    let left: Vec<String> = fs::read_dir(sandbox.root("sys").join("emulator/guest"))
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["qemu.pid"]);

    let console = || {
        let out = run(&sandbox, &uri, &["--enable", "domain.console-read", "console-log", "guest", "-"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(wait_until(GUEST_BOOT, || console().contains(GUEST_READY)), "no {GUEST_READY}: {}", console());
    // The guest's power-off ends QEMU by itself (no wait here: capvirt removes nothing), and
    // QEMU removes its own pidfile: the domain reads shut off, not crashed.
    ok(&sandbox, &uri, &["shutdown", "guest", "--timeout-secs", "0"]);
    let mut state = String::new();
    let off = wait_until(GUEST_BOOT, || {
        let out = run(&sandbox, &uri, &["--output", "json", "dominfo", "guest"]);
        state = String::from_utf8_lossy(&out.stdout).into_owned();
        !state.contains("\"running\"")
    });
    assert!(off && state.contains("\"shut off\""), "after the guest's power-off: {state}");
    let image = fs::read(&disk).unwrap_or_default();
    assert!(image.starts_with(GUEST_DISK_MARK), "the guest did not write its root-only disk");
    assert_eq!(owner_and_mode(&disk), (0, 0, 0o600));
}
