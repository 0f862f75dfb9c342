//! Support for tests and benchmarks that run real QEMU processes through the QEMU driver.
//!
//! A [`Sandbox`] owns a temporary directory holding state roots, disk images and specs; when
//! dropped (also when a test panics) it SIGKILLs every process whose command line mentions
//! that directory (the QEMUs it started: their pidfiles live there), waits for them to go,
//! then deletes the directory. Every wait here is bounded.
//!
//! The QEMU under test is `qemu-system-x86_64` on `PATH`, or the binary named by
//! `$CAPVIRT_TEST_QEMU` (CI runs the QEMU tests once per supported QEMU release that way);
//! `$CAPVIRT_TEST_QEMU_PEER` names a second one for the cross-version tests (default: the same).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use tempfile::TempDir;

pub use crate::output_within;
use crate::{artifacts, capvirt, plugin_dir};

/// A directory with only the QEMU driver, shared by the tests of one process.
pub fn qemu_plugin_dir() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| plugin_dir(&[("libcapvirt_driver_qemu.so", &artifacts().qemu_plugin)])).path()
}

/// Bound on one `capvirt` invocation in tests (the driver bounds its own waits well below it).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// A private directory for one test's QEMU domains, cleaned up on drop.
pub struct Sandbox {
    dir: TempDir,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        under_test();
        Sandbox { dir: TempDir::new().unwrap_or_else(|e| panic!("tempdir: {e}")) }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A state root inside the sandbox (not created: the driver creates it on first write).
    pub fn root(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// The connection URI of the state root `name` on the QEMU under test, with extra URI
    /// parameters (`&accel=tcg`).
    pub fn uri(&self, name: &str, extra: &str) -> String {
        self.uri_on(under_test(), name, extra)
    }

    /// The connection URI of the state root `name` on `qemu`.
    pub fn uri_on(&self, qemu: &Qemu, name: &str, extra: &str) -> String {
        let emulator = match &qemu.path {
            Some(path) => format!("&emulator={}", path.display()),
            None => String::new(),
        };
        format!("qemu:///session?root={}{emulator}{extra}", self.root(name).display())
    }

    /// The disk guests boot from: an empty qcow2 made with `qemu-img`. SeaBIOS reads its first
    /// sector looking for a boot sector (so block statistics count reads), finds none and
    /// idles at "No bootable device" (so the guest ignores ACPI power-button requests).
    pub fn boot_disk(&self, name: &str) -> PathBuf {
        self.blank_image(name, "qcow2")
    }

    /// An empty image made with `qemu-img create`.
    pub fn blank_image(&self, name: &str, format: &str) -> PathBuf {
        let path = self.path().join(format!("{name}.{format}"));
        let mut qemu_img = Command::new("qemu-img");
        qemu_img.args(["create", "-q", "-f", format]).arg(&path).arg("8M");
        let out = output_within(qemu_img, COMMAND_TIMEOUT);
        assert!(out.status.success(), "qemu-img create failed: {}", String::from_utf8_lossy(&out.stderr));
        path
    }

    /// Writes a file into the sandbox and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path().join(name);
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// A `capvirt` command on the state root `root`, checking results against the registry.
    pub fn capvirt(&self, root: &str) -> Command {
        self.capvirt_uri(&self.uri(root, ""))
    }

    /// A `capvirt -c URI` command, checking results against the registry.
    pub fn capvirt_uri(&self, uri: &str) -> Command {
        let mut cmd = capvirt(qemu_plugin_dir(), self.path());
        cmd.env("CAPVIRT_CHECK_RESULTS", "1").arg("-c").arg(uri);
        cmd
    }

    /// Runs `capvirt -c ROOT ARGS…` within [`COMMAND_TIMEOUT`].
    pub fn run(&self, root: &str, args: &[&str]) -> Output {
        self.run_uri(&self.uri(root, ""), args)
    }

    /// Runs `capvirt -c URI ARGS…` within [`COMMAND_TIMEOUT`].
    pub fn run_uri(&self, uri: &str, args: &[&str]) -> Output {
        let mut cmd = self.capvirt_uri(uri);
        cmd.args(args);
        output_within(cmd, COMMAND_TIMEOUT)
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, root: &str, args: &[&str]) -> String {
        self.ok_uri(&self.uri(root, ""), args)
    }

    /// [`Sandbox::ok`] on a URI.
    pub fn ok_uri(&self, uri: &str, args: &[&str]) -> String {
        let out = self.run_uri(uri, args);
        assert!(
            out.status.success(),
            "capvirt {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command that must succeed with `--output json`; returns its parsed output.
    pub fn json(&self, root: &str, args: &[&str]) -> serde_json::Value {
        self.json_uri(&self.uri(root, ""), args)
    }

    /// [`Sandbox::json`] on a URI.
    pub fn json_uri(&self, uri: &str, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let text = self.ok_uri(uri, &all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("capvirt {args:?}: not JSON ({e}): {text}"))
    }

    /// The state of `domain` as `dominfo` reports it.
    pub fn state(&self, root: &str, domain: &str) -> String {
        self.json(root, &["dominfo", domain])["state"].as_str().unwrap_or_default().to_string()
    }

    /// PID of the QEMU of `domain` in `root`, from its pidfile (in the one directory QEMU
    /// writes, `ROOT/emulator/NAME`).
    pub fn qemu_pid(&self, root: &str, domain: &str) -> i32 {
        let pidfile = self.root(root).join("emulator").join(domain).join("qemu.pid");
        let text = fs::read_to_string(&pidfile).unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()));
        text.trim().parse().unwrap_or_else(|e| panic!("pidfile {text:?}: {e}"))
    }

    /// PIDs of live processes whose command line mentions this sandbox.
    pub fn processes(&self) -> Vec<i32> {
        processes_mentioning(self.path())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.processes();
            if pids.is_empty() || Instant::now() >= deadline {
                break;
            }
            for pid in pids {
                signal(pid, rustix::process::Signal::KILL);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A QEMU build tests run against.
#[derive(Debug)]
pub struct Qemu {
    /// `None`: `qemu-system-x86_64` on `PATH`.
    pub path: Option<PathBuf>,
    /// What its `-version` says: `(major, minor, micro)` and the whole first line.
    pub version: (u32, u32, u32),
    pub banner: String,
}

impl Qemu {
    fn from_env(var: &str) -> Qemu {
        let path = std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from);
        let program = path.clone().unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        let mut command = Command::new(&program);
        command.arg("-version");
        let out = output_within(command, COMMAND_TIMEOUT);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let banner = text.lines().next().unwrap_or_default().to_string();
        let number = banner.strip_prefix("QEMU emulator version ").and_then(|rest| rest.split(' ').next());
        let parts: Vec<u32> = number.unwrap_or_default().split('.').filter_map(|p| p.parse().ok()).collect();
        let [major, minor, micro] = parts[..] else {
            panic!("{} (from ${var}) is not a QEMU: -version printed {text:?}", program.display())
        };
        Qemu { path, version: (major, minor, micro), banner }
    }

    /// The version as the driver reports it, without the package (`7.2.22`).
    pub fn number(&self) -> String {
        let (major, minor, micro) = self.version;
        format!("{major}.{minor}.{micro}")
    }
}

/// The QEMU under test (`$CAPVIRT_TEST_QEMU`, else `PATH`'s), named once on stderr so that the
/// test log says which QEMU the tests ran against.
pub fn under_test() -> &'static Qemu {
    static QEMU: OnceLock<Qemu> = OnceLock::new();
    QEMU.get_or_init(|| {
        let qemu = Qemu::from_env("CAPVIRT_TEST_QEMU");
        // Straight to the file descriptor: the test harness captures `eprintln!`.
        let where_from = qemu.path.as_ref().map_or("PATH".to_string(), |p| p.display().to_string());
        let _ = writeln!(std::io::stderr(), "QEMU tests run against {} ({where_from})", qemu.banner);
        qemu
    })
}

/// The second QEMU of the cross-version tests (`$CAPVIRT_TEST_QEMU_PEER`, else the one under test).
pub fn peer() -> &'static Qemu {
    static QEMU: OnceLock<Qemu> = OnceLock::new();
    QEMU.get_or_init(|| match std::env::var_os("CAPVIRT_TEST_QEMU_PEER").filter(|v| !v.is_empty()) {
        Some(_) => Qemu::from_env("CAPVIRT_TEST_QEMU_PEER"),
        None => Qemu::from_env("CAPVIRT_TEST_QEMU"),
    })
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: i32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Live (non-zombie) processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &Path) -> Vec<i32> {
    let needle = needle.as_os_str().as_encoded_bytes();
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| *pid != std::process::id() as i32)
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.windows(needle.len().max(1)).any(|w| w == needle)
        })
        .filter(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | None)
        })
        .collect()
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A domain spec as a value for the host library: one qcow2 disk on `bus`, headless.
pub fn spec_value(name: &str, disk: &Path, bus: &'static str) -> capvirt_host::Value {
    use capvirt_host::Value;
    Value::record([
        ("name", Value::string(name)),
        ("memory_mib", Value::UInt(64)),
        ("vcpus", Value::UInt(1)),
        (
            "disks",
            Value::list([Value::record([
                ("path", Value::string(disk.to_str().unwrap_or_default())),
                ("format", Value::from("qcow2")),
                ("bus", Value::from(bus)),
            ])]),
        ),
    ])
}

/// A domain spec in TOML: one virtio qcow2 disk, VGA unless `headless`.
pub fn spec_toml(name: &str, memory_mib: u64, disk: &Path, headless: bool) -> String {
    let graphics = if headless { "" } else { "\n[graphics]\nadapter = \"vga\"\n" };
    format!(
        "name = \"{name}\"\nmemory_mib = {memory_mib}\nvcpus = 1\n\n[[disks]]\npath = \"{}\"\nformat = \"qcow2\"\nbus = \"virtio\"\n{graphics}",
        disk.display()
    )
}

/// The test guest (`tests/guest/build`): a Debian kernel and a busybox initramfs whose init
/// brings up the network with DHCP, writes to its first virtio disk, serves HTTP on port 80,
/// prints [`GUEST_READY`] on the serial console and powers off on the ACPI power button.
#[derive(Debug)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The line the test guest prints on its console once it serves HTTP.
pub const GUEST_READY: &str = "CAPVIRT-GUEST-READY";
/// The text of the test guest's web page.
pub const GUEST_PAGE: &str = "CAPVIRT-GUEST-HTTP hello from the capvirt test guest";
/// The line the test guest writes at the start of its first virtio disk.
pub const GUEST_DISK_MARK: &[u8] = b"CAPVIRT-GUEST-DISK written by the test guest\n";
/// The kernel command line the test guest boots with (its console on the first serial port).
pub const GUEST_CMDLINE: &str = "console=ttyS0 quiet";
/// Bound on building the test guest (downloading two Debian packages included).
const GUEST_BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// The test guest: `$CAPVIRT_TEST_GUEST` (a directory `tests/guest/build` filled, as CI
/// does), else built once by the script into `target/capvirt-test-guest` (needs `apt-get
/// download` to reach Debian's packages; cached there between runs).
pub fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let dir = match std::env::var_os("CAPVIRT_TEST_GUEST").filter(|v| !v.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => {
                let target = std::env::var_os("CARGO_TARGET_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| crate::workspace_root().join("target"));
                let dir = target.join("capvirt-test-guest");
                let mut build = Command::new("bash");
                build.arg(crate::workspace_root().join("tests/guest/build")).arg(&dir);
                let out = output_within(build, GUEST_BUILD_TIMEOUT);
                assert!(
                    out.status.success(),
                    "tests/guest/build {} failed (set CAPVIRT_TEST_GUEST to a built guest): {}",
                    dir.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
                dir
            }
        };
        let guest = Guest { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img") };
        assert!(
            guest.kernel.is_file() && guest.initrd.is_file(),
            "no vmlinuz and initrd.img in {} (build them with tests/guest/build {})",
            dir.display(),
            dir.display()
        );
        guest
    })
}

/// A port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_local_port() -> u16 {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap_or_else(|e| panic!("bind 127.0.0.1:0: {e}"));
    listener.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}")).port()
}

/// A spec booting the test guest: one raw virtio disk, one user-mode interface forwarding
/// 127.0.0.1:`host_port` to the guest's HTTP port.
pub fn guest_spec_toml(name: &str, disk: &Path, host_port: u16) -> String {
    let guest = guest();
    format!(
        "name = \"{name}\"\nmemory_mib = 128\nvcpus = 1\n\n[[disks]]\npath = \"{}\"\nformat = \"raw\"\nbus = \"virtio\"\n\n\
         [boot]\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"{GUEST_CMDLINE}\"\n\n[[interfaces]]\nkind = \"user\"\n\n\
         [[interfaces.forwards]]\nprotocol = \"tcp\"\nhost_port = {host_port}\nguest_port = 80\n",
        disk.display(),
        guest.kernel.display(),
        guest.initrd.display()
    )
}

/// One HTTP/1.0 GET of `/` on 127.0.0.1:`port`, bounded; the whole answer, or why it failed.
pub fn http_get(port: u16, timeout: Duration) -> Result<String, String> {
    use std::io::Read;
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&address, timeout).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n").map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    stream.take(1 << 20).read_to_end(&mut answer).map_err(|e| format!("receive: {e}"))?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}
