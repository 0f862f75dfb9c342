//! Network interfaces beyond user-mode NAT: `kind = "bridge"` on `qemu:///system` (a tap per
//! interface on a real host bridge, reached by the test guest's HTTP server over it) and NIC
//! hot-plug with `attach-device`/`detach-device` on real QEMU, the test driver and containers.

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv6Addr, SocketAddrV6, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use capvirt_host::{ErrorCategory, Host, HostConfig, Value};
use capvirt_tests::{
    container,
    qemu::{guest, output_within, wait_until, Sandbox, COMMAND_TIMEOUT, GUEST_CMDLINE, GUEST_PAGE},
    test_plugin_dir,
};

/// Bound on the test guest booting under TCG until its HTTP server answers.
const GUEST_BOOT: Duration = Duration::from_secs(180);
/// Bound on a tap or its carrier showing up or going away.
const LINK_WAIT: Duration = Duration::from_secs(10);
const SYS_NET: &str = "/sys/class/net";

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_refused(out: &std::process::Output, code: i32, needle: &str) {
    assert_eq!(out.status.code(), Some(code), "expected exit {code}, stderr: {}", stderr(out));
    assert!(stderr(out).contains(needle), "stderr lacks {needle:?}: {}", stderr(out));
}

fn ip(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    output_within(cmd, COMMAND_TIMEOUT)
}

/// A host bridge with a name unique to this test run, up, removed on drop (its ports with it).
struct Bridge {
    name: String,
}

impl Bridge {
    fn new(tag: &str) -> Bridge {
        let name = format!("cvt{tag}{:x}", std::process::id() & 0xffff);
        let _ = ip(&["link", "delete", "dev", &name]);
        let bridge = Bridge { name };
        let made = ip(&["link", "add", "dev", &bridge.name, "type", "bridge"]);
        assert!(made.status.success(), "ip link add {}: {}", bridge.name, stderr(&made));
        let up = ip(&["link", "set", "dev", &bridge.name, "up"]);
        assert!(up.status.success(), "ip link set up: {}", stderr(&up));
        bridge
    }

    /// The taps enslaved to it now.
    fn ports(&self) -> Vec<String> {
        let dir = Path::new(SYS_NET).join(&self.name).join("brif");
        let mut ports: Vec<String> = fs::read_dir(dir)
            .map(|entries| entries.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        ports.sort();
        ports
    }

    fn index(&self) -> u32 {
        let text = fs::read_to_string(Path::new(SYS_NET).join(&self.name).join("ifindex")).unwrap_or_default();
        text.trim().parse().unwrap_or_else(|e| panic!("ifindex of {}: {e}", self.name))
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = ip(&["link", "delete", "dev", &self.name]);
    }
}

fn exists(link: &str) -> bool {
    Path::new(SYS_NET).join(link).exists()
}

/// Whether a process (QEMU) holds the tap open.
fn carrier(tap: &str) -> bool {
    fs::read_to_string(Path::new(SYS_NET).join(tap).join("carrier")).is_ok_and(|c| c.trim() == "1")
}

/// The IPv6 link-local address a Linux guest derives from its MAC (EUI-64): reachable over
/// the bridge without any DHCP server or address on the host side.
fn link_local(mac: &str) -> Ipv6Addr {
    let b: Vec<u16> =
        mac.split(':').map(|p| u16::from_str_radix(p, 16).unwrap_or_else(|e| panic!("{mac}: {e}"))).collect();
    Ipv6Addr::new(0xfe80, 0, 0, 0, ((b[0] ^ 0x02) << 8) | b[1], (b[2] << 8) | 0xff, 0xfe00 | b[3], (b[4] << 8) | b[5])
}

/// One HTTP/1.0 GET of `/` on `[address%scope]:80`, bounded.
fn http_get_v6(address: Ipv6Addr, scope: u32, timeout: Duration) -> Result<String, String> {
    let target = SocketAddrV6::new(address, 80, 0, scope);
    let mut stream = TcpStream::connect_timeout(&target.into(), timeout).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n").map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    stream.take(1 << 20).read_to_end(&mut answer).map_err(|e| format!("receive: {e}"))?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The test guest with one interface (`interface`: the body of its `[[interfaces]]` table).
fn guest_spec(name: &str, disk: &Path, interface: &str) -> String {
    let guest = guest();
    format!(
        "name = \"{name}\"\nmemory_mib = 128\nvcpus = 1\n\n[[disks]]\npath = \"{}\"\nformat = \"raw\"\nbus = \"virtio\"\n\n\
         [boot]\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"{GUEST_CMDLINE}\"\n\n[[interfaces]]\n{interface}",
        disk.display(),
        guest.kernel.display(),
        guest.initrd.display()
    )
}

/// `qemu:///system` on the sandbox's state root `root` (the tests run as root).
fn system_uri(sandbox: &Sandbox, root: &str) -> String {
    sandbox.uri(root, "&accel=tcg").replacen("qemu:///session", "qemu:///system", 1)
}

/// The state of `domain` as `dominfo` reports it.
fn state(sandbox: &Sandbox, uri: &str, domain: &str) -> String {
    sandbox.json_uri(uri, &["dominfo", domain])["state"].as_str().unwrap_or_default().to_string()
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

#[test]
fn a_bridged_guest_is_reached_over_its_tap_and_nics_hot_plug() {
    let sandbox = Sandbox::new();
    let bridge = Bridge::new("b");
    let uri = system_uri(&sandbox, "sys");
    let disk = sandbox.blank_image("data", "raw");
    let mac = "52:54:00:c5:00:01";
    let spec = sandbox.write(
        "bridged.toml",
        &guest_spec("bridged", &disk, &format!("kind = \"bridge\"\nbridge = \"{}\"\nmac = \"{mac}\"\n", bridge.name)),
    );

    // qemu:///session cannot create taps: refused at define, naming where it works.
    let session = sandbox.uri("session", "&accel=tcg");
    assert_refused(&sandbox.run_uri(&session, &["define", text(&spec)]), 4, "needs qemu:///system");

    sandbox.ok_uri(&uri, &["define", text(&spec)]);
    sandbox.ok_uri(&uri, &["start", "bridged"]);
    let ports = bridge.ports();
    assert_eq!(ports.len(), 1, "one tap on {}: {ports:?}", bridge.name);
    let tap = ports[0].clone();
    assert!(tap.len() <= 15 && tap.starts_with("cv"), "{tap}");
    assert!(wait_until(LINK_WAIT, || carrier(&tap)), "QEMU never opened {tap}");

    // The guest's HTTP server answers on its link-local address, over the tap and the bridge.
    let started = Instant::now();
    let address = link_local(mac);
    let mut last = String::new();
    let answered = wait_until(GUEST_BOOT, || match http_get_v6(address, bridge.index(), Duration::from_secs(5)) {
        Ok(answer) => {
            last = answer;
            last.contains(GUEST_PAGE)
        }
        Err(e) => {
            last = e;
            false
        }
    });
    assert!(answered, "no HTTP answer from [{address}%{}] within {GUEST_BOOT:?}: {last}", bridge.name);
    eprintln!("bridged guest answered HTTP {:?} after start", started.elapsed());
    let received: u64 = fs::read_to_string(Path::new(SYS_NET).join(&tap).join("statistics/rx_packets"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    assert!(received > 0, "{tap} counted no packet from the guest");

    // Hot-plug a bridged NIC: its own tap, opened by QEMU; and a user NIC with a forward,
    // whose host port QEMU listens on.
    let hot_tap_file = sandbox.write(
        "hot-bridge.toml",
        &format!("kind = \"nic\"\nid = \"hot0\"\n\n[interface]\nkind = \"bridge\"\nbridge = \"{}\"\n", bridge.name),
    );
    let plugged = Instant::now();
    sandbox.ok_uri(&uri, &["attach-device", "bridged", text(&hot_tap_file)]);
    eprintln!("bridged NIC hot-plugged in {:?} (CLI call)", plugged.elapsed());
    let ports = bridge.ports();
    let hot_tap = ports.iter().find(|p| **p != tap).cloned().unwrap_or_else(|| panic!("no second tap: {ports:?}"));
    assert!(wait_until(LINK_WAIT, || carrier(&hot_tap)), "QEMU never opened {hot_tap}");
    assert_refused(
        &sandbox.run_uri(&uri, &["attach-device", "bridged", text(&hot_tap_file)]),
        2,
        "already has a device 'hot0'",
    );

    let port = capvirt_tests::qemu::free_local_port();
    let hot_user = sandbox.write(
        "hot-user.toml",
        &format!(
            "kind = \"nic\"\nid = \"hot1\"\n\n[interface]\nkind = \"user\"\n\n[[interface.forwards]]\nhost_port = {port}\nguest_port = 80\n"
        ),
    );
    sandbox.ok_uri(&uri, &["attach-device", "bridged", text(&hot_user)]);
    // dominfo lists every interface: the tap of each bridged one, the MAC generated at attach.
    let info = sandbox.json_uri(&uri, &["dominfo", "bridged"]);
    let nics = info["interfaces"].as_array().cloned().unwrap_or_default();
    let summary: Vec<(&str, &str, Option<&str>)> = nics
        .iter()
        .map(|n| (n["id"].as_str().unwrap_or(""), n["kind"].as_str().unwrap_or(""), n["host_device"].as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("net0", "bridge", Some(tap.as_str())),
            ("hot0", "bridge", Some(hot_tap.as_str())),
            ("hot1", "user", None)
        ],
        "{info}"
    );
    assert_eq!(nics[0]["mac"], mac);
    let generated = nics[2]["mac"].as_str().unwrap_or_default().to_string();
    assert!(generated.starts_with("52:54:00:") && generated.len() == 17, "{generated}");
    assert_ne!(nics[1]["mac"], nics[2]["mac"]);
    let listening = || TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).is_ok();
    assert!(listening(), "QEMU does not listen on the hot-plugged NIC's forwarded port {port}");

    // Save drops every tap with its QEMU; restore brings the hot-plugged NICs back on their
    // ports (the device model must match the saved state) with their taps and MACs.
    let saved = sandbox.path().join("bridged.save");
    sandbox.ok_uri(&uri, &["save", "bridged", text(&saved)]);
    assert!(!exists(&tap) && !exists(&hot_tap), "taps left after save");
    sandbox.ok_uri(&uri, &["restore", text(&saved)]);
    assert_eq!(bridge.ports(), {
        let mut both = vec![tap.clone(), hot_tap.clone()];
        both.sort();
        both
    });
    assert!(wait_until(LINK_WAIT, || carrier(&hot_tap)), "restored QEMU never opened {hot_tap}");
    let restored = sandbox.json_uri(&uri, &["dominfo", "bridged"]);
    assert_eq!(restored["interfaces"], info["interfaces"], "interfaces changed across save/restore");
    assert!(wait_until(LINK_WAIT, listening), "forwarded port {port} not back after restore");

    // Missing and malformed ones are refused before QEMU sees them.
    let missing = sandbox.write(
        "missing.toml",
        "kind = \"nic\"\nid = \"hot2\"\n\n[interface]\nkind = \"bridge\"\nbridge = \"cvnosuchbr\"\n",
    );
    assert_refused(
        &sandbox.run_uri(&uri, &["attach-device", "bridged", text(&missing)]),
        5,
        "bridge 'cvnosuchbr' does not exist",
    );
    let bare = sandbox.write("bare.toml", "kind = \"nic\"\nid = \"hot2\"\n");
    assert_refused(&sandbox.run_uri(&uri, &["attach-device", "bridged", text(&bare)]), 2, "needs `interface`");
    let boot_nic = sandbox.write("net0.toml", "kind = \"nic\"\nid = \"net0\"\n");
    assert_refused(
        &sandbox.run_uri(&uri, &["detach-device", "bridged", text(&boot_nic)]),
        4,
        "only hot-plugged interfaces",
    );

    // Detach: the guest releases each (ACPI hot-unplug), QEMU drops the netdev, the tap goes.
    let unplugged = Instant::now();
    sandbox.ok_uri(&uri, &["detach-device", "bridged", text(&hot_tap_file)]);
    eprintln!("bridged NIC unplugged in {:?} (CLI call, guest release included)", unplugged.elapsed());
    assert!(!exists(&hot_tap), "{hot_tap} left after detach");
    sandbox.ok_uri(&uri, &["detach-device", "bridged", text(&hot_user)]);
    assert!(wait_until(LINK_WAIT, || !listening()), "port {port} still forwarded after detach");
    assert_refused(
        &sandbox.run_uri(&uri, &["detach-device", "bridged", text(&hot_user)]),
        5,
        "no network interface 'hot1'",
    );
    assert_eq!(bridge.ports(), vec![tap.clone()]);

    // Destroy removes the tap; starts and destroys again leave none behind; so does a crash
    // cleared by destroy.
    sandbox.ok_uri(&uri, &["destroy", "bridged"]);
    assert!(!exists(&tap), "{tap} left after destroy");
    for _ in 0..2 {
        sandbox.ok_uri(&uri, &["start", "bridged"]);
        assert_eq!(bridge.ports(), vec![tap.clone()], "the same tap name at every start");
        sandbox.ok_uri(&uri, &["destroy", "bridged"]);
        assert!(!exists(&tap), "{tap} left after destroy");
    }
    sandbox.ok_uri(&uri, &["start", "bridged"]);
    let pid = sandbox.qemu_pid("sys", "bridged");
    capvirt_tests::qemu::signal(pid, rustix::process::Signal::KILL);
    assert!(wait_until(LINK_WAIT, || state(&sandbox, &uri, "bridged") == "crashed"), "no crash seen");
    sandbox.ok_uri(&uri, &["destroy", "bridged"]);
    assert!(!exists(&tap), "{tap} left after a crash was cleared");
    sandbox.ok_uri(&uri, &["undefine", "bridged"]);
    assert!(sandbox.processes().is_empty(), "QEMU processes left: {:?}", sandbox.processes());
}

#[test]
fn a_missing_bridge_fails_the_start_and_leaves_nothing() {
    let sandbox = Sandbox::new();
    let uri = system_uri(&sandbox, "sys");
    let disk = sandbox.blank_image("data", "raw");
    let define = |bridge: &str| {
        let spec =
            sandbox.write("vm.toml", &guest_spec("vm", &disk, &format!("kind = \"bridge\"\nbridge = \"{bridge}\"\n")));
        sandbox.ok_uri(&uri, &["define", text(&spec)]);
    };
    // The domain's tap name, from a first start on a real bridge.
    let tap = {
        let bridge = Bridge::new("m");
        define(&bridge.name);
        sandbox.ok_uri(&uri, &["start", "vm"]);
        let ports = bridge.ports();
        sandbox.ok_uri(&uri, &["destroy", "vm"]);
        assert_eq!(ports.len(), 1, "{ports:?}");
        ports[0].clone()
    };
    assert!(!exists(&tap), "{tap} left after destroy");

    // A stale tap of that name (as a crash of the host would leave) and a bridge that is gone:
    // the start fails naming the bridge, and neither tap nor QEMU nor runtime files remain.
    let made = ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
    assert!(made.status.success(), "{}", stderr(&made));
    let absent = format!("cvtnone{:x}", std::process::id() & 0xffff);
    define(&absent);
    assert_refused(&sandbox.run_uri(&uri, &["start", "vm"]), 5, &format!("bridge '{absent}' does not exist"));
    assert_eq!(state(&sandbox, &uri, "vm"), "shut off");
    assert!(!exists(&tap), "{tap} left behind by a failed start");
    assert!(sandbox.processes().is_empty(), "QEMU processes left: {:?}", sandbox.processes());
    assert!(!sandbox.root("sys").join("domains/vm/run").exists(), "runtime files left");

    // A stale tap is replaced at the next start on an existing bridge.
    let bridge = Bridge::new("n");
    define(&bridge.name);
    let made = ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
    assert!(made.status.success(), "{}", stderr(&made));
    sandbox.ok_uri(&uri, &["start", "vm"]);
    assert_eq!(bridge.ports(), vec![tap.clone()]);
    assert!(wait_until(LINK_WAIT, || carrier(&tap)), "QEMU never opened {tap}");
    sandbox.ok_uri(&uri, &["destroy", "vm"]);
    assert!(!exists(&tap), "{tap} left after destroy");

    // An interface that is no bridge is refused (`lo`), and a malformed name at define.
    define("lo");
    assert_refused(&sandbox.run_uri(&uri, &["start", "vm"]), 2, "not a bridge");
    assert!(!exists(&tap), "{tap} left behind by a failed start");
    let bad = sandbox
        .write("bad.toml", &guest_spec("bad", &disk, "kind = \"bridge\"\nbridge = \"a-bridge-name-too-long\"\n"));
    assert_refused(&sandbox.run_uri(&uri, &["define", text(&bad)]), 2, "not a Linux interface name");
    sandbox.ok_uri(&uri, &["undefine", "vm"]);
}

fn domain(name: &str) -> Value {
    Value::record([("domain", Value::string(name))])
}

fn nic(id: &str, interface: Option<Value>) -> Value {
    let mut device = Value::record([("kind", Value::string("nic")), ("id", Value::string(id))]);
    if let Some(interface) = interface {
        device.set("interface", interface);
    }
    Value::record([("domain", Value::string("vm")), ("device", device)])
}

#[test]
fn the_test_driver_hot_plugs_nics_in_memory() {
    let config = HostConfig { plugin_dirs: vec![test_plugin_dir().to_path_buf()], ..Default::default() };
    let host = Host::new(config).unwrap_or_else(|e| panic!("host: {e}"));
    let conn = host.connect("test:///nic-hotplug", false).unwrap_or_else(|e| panic!("connect: {e}"));
    let spec =
        Value::record([("name", Value::string("vm")), ("memory_mib", Value::UInt(64)), ("vcpus", Value::UInt(1))]);
    conn.call("domain.define", Value::record([("spec", spec)])).unwrap_or_else(|e| panic!("define: {e}"));
    let user = || Value::record([("kind", Value::string("user"))]);
    let refused = conn.call("domain.attach-device", nic("hot0", Some(user()))).err();
    assert_eq!(refused.map(|e| e.category()), Some(ErrorCategory::InvalidState), "attach to a shut-off domain");
    conn.call("domain.start", domain("vm")).unwrap_or_else(|e| panic!("{e}"));
    conn.call("domain.attach-device", nic("hot0", Some(user()))).unwrap_or_else(|e| panic!("attach: {e}"));
    let info = conn.call("domain.info", domain("vm")).unwrap_or_else(|e| panic!("info: {e}"));
    let nics = info.get("interfaces").and_then(Value::as_list).unwrap_or(&[]);
    assert_eq!(nics.len(), 1, "{info}");
    assert_eq!(nics[0].get("id").and_then(Value::as_str), Some("hot0"));
    let generated = nics[0].get("mac").and_then(Value::as_str).unwrap_or_default();
    assert!(generated.starts_with("52:54:00:"), "no generated MAC reported: {info}");
    let twice = conn.call("domain.attach-device", nic("hot0", Some(user()))).err();
    assert_eq!(twice.map(|e| e.category()), Some(ErrorCategory::Usage));
    let bare = conn.call("domain.attach-device", nic("hot1", None)).err().unwrap_or_else(|| panic!("accepted"));
    assert!(bare.to_string().contains("needs `interface`"), "{bare}");
    let unnamed = Value::record([("kind", Value::string("bridge"))]);
    let refused =
        conn.call("domain.attach-device", nic("hot1", Some(unnamed))).err().unwrap_or_else(|| panic!("accepted"));
    assert!(refused.to_string().contains("needs `bridge`"), "{refused}");
    let bridged = Value::record([("kind", Value::string("bridge")), ("bridge", Value::string("br0"))]);
    conn.call("domain.attach-device", nic("hot1", Some(bridged))).unwrap_or_else(|e| panic!("attach: {e}"));
    conn.call("domain.detach-device", nic("hot0", None)).unwrap_or_else(|e| panic!("detach: {e}"));
    let gone = conn.call("domain.detach-device", nic("hot0", None)).err();
    assert_eq!(gone.map(|e| e.category()), Some(ErrorCategory::NotFound));
    // A stop forgets hot-plugged interfaces (live only).
    conn.call("domain.destroy", domain("vm")).unwrap_or_else(|e| panic!("{e}"));
    conn.call("domain.start", domain("vm")).unwrap_or_else(|e| panic!("{e}"));
    let forgotten = conn.call("domain.detach-device", nic("hot1", None)).err();
    assert_eq!(forgotten.map(|e| e.category()), Some(ErrorCategory::NotFound));
}

#[test]
fn containers_answer_nic_hot_plug_unsupported() {
    let sandbox = container::Sandbox::new();
    let device = sandbox.write("nic.toml", "kind = \"nic\"\nid = \"hot0\"\n\n[interface]\nkind = \"user\"\n");
    let out = sandbox.run("c", &["attach-device", "box", &device]);
    assert_refused(&out, 4, "attach-device");
    let out = sandbox.run("c", &["detach-device", "box", &device]);
    assert_refused(&out, 4, "detach-device");
}
