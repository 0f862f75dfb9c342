//! QEMU processes: the command line a domain runs with, launching it detached from the
//! calling process (as the connection's account, see [`crate::privilege`]), stopping it, and
//! host facts.
//!
//! Everything a caller supplied reaches QEMU as typed data: image paths and device ids go
//! into JSON `-blockdev`/`-device` arguments serialized from the `qapi` crate's types (never
//! into `key=value,…` option strings, where a comma in a path would start a new option).

use std::{
    ffi::OsString,
    fs::{self, File, OpenOptions},
    io::Read,
    os::{
        fd::OwnedFd,
        unix::{fs::OpenOptionsExt, net::UnixListener, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use capvirt_plugin_api::PluginError;
use command_fds::{CommandFdExt, FdMapping};
use qapi::{qmp, Any};

use crate::{
    emulator::Emulator,
    monitor::{self, with_socket_path, Monitor, CHANNELS},
    privilege::{self, BootFiles, Runner},
    spec::{Adapter, Bus, Device, Format, Forward, Interface, Kind, Live, USB_PORTS},
    store::{self, DomainPaths, Liveness, Store},
    uri::Accel,
};

/// Bound on QEMU's start-up (until its monitor answers).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on a QEMU exiting after `quit` or a signal.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// First file descriptor number of the monitor sockets handed to QEMU.
const FIRST_CHANNEL_FD: i32 = 3;
/// The console's listening socket and log, after the monitor sockets.
const CONSOLE_SOCKET_FD: i32 = FIRST_CHANNEL_FD + CHANNELS as i32;
const CONSOLE_LOG_FD: i32 = CONSOLE_SOCKET_FD + 1;
/// The images' descriptors, after the console's: the disks, then the USB disks, in order.
const FIRST_IMAGE_FD: i32 = CONSOLE_LOG_FD + 1;
/// QEMU's fd set of disk number `index` is this plus `index` (hot-plugged disks get fresh
/// sets QEMU numbers from 0, which the console's set 1 and these never meet).
const FIRST_DISK_FDSET: usize = 1000;

/// How a QEMU is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Boot the guest.
    Boot,
    /// Wait for a migration stream (`-incoming defer`, then QMP `migrate-incoming`).
    Incoming,
}

/// The accelerator to start with: KVM only when whoever runs QEMU can use `/dev/kvm`.
pub fn resolve_accel(accel: Accel, runner: &Runner) -> Result<&'static str, PluginError> {
    let kvm_usable = || privilege::kvm_usable(runner);
    match accel {
        Accel::Tcg => Ok("tcg"),
        Accel::Auto => Ok(if kvm_usable() { "kvm" } else { "tcg" }),
        Accel::Kvm if kvm_usable() => Ok("kvm"),
        Accel::Kvm => Err(PluginError::unsupported(match runner {
            Runner::Caller => "accel=kvm was requested but /dev/kvm cannot be opened read-write".to_string(),
            Runner::Account(account) => format!(
                "accel=kvm was requested but QEMU's account '{}' cannot open /dev/kvm read-write (it gets its own \
                 uid and group only: make /dev/kvm's group its primary group, or use accel=tcg)",
                account.name
            ),
        })),
    }
}

/// The path QEMU opens for the descriptor in fd set `set`.
pub fn fdset_path(set: usize) -> PathBuf {
    PathBuf::from(format!("/dev/fdset/{set}"))
}

/// The image files QEMU gets as descriptors, in descriptor order: each disk (read-only or
/// not), then each USB disk of the live configuration.
/// The taps of the bridge interfaces (device id, tap name), in the order their descriptors
/// follow the images' (`FIRST_IMAGE_FD + images(live).len()` onwards).
fn bridged_taps(paths: &DomainPaths, live: &Live) -> Vec<(String, String)> {
    let nics = live.machine.interfaces.iter().enumerate().filter(|(_, nic)| nic.bridge.is_some());
    nics.map(|(index, nic)| {
        let id = nic.device_id(index);
        let tap = crate::tap::name(&paths.dir, &id);
        (id, tap)
    })
    .collect()
}

fn images(live: &Live) -> Vec<(&Path, bool)> {
    let machine = &live.machine;
    let disks = machine.disks.iter().map(|d| (d.path.as_path(), d.readonly));
    let usb =
        machine.devices.iter().filter(|d| d.format.is_some()).filter_map(|d| d.path.as_deref()).map(|p| (p, false));
    disks.chain(usb).collect()
}

/// Node name of the image of disk number `index` (node names are at most 31 characters, so
/// they are derived from positions, not from caller ids).
pub fn disk_node(index: usize) -> String {
    format!("capvirt-disk{index}")
}

/// Node name of the image of the USB disk on `port`.
pub fn usb_node(port: u8) -> String {
    format!("capvirt-usb{port}")
}

/// A format node over a file node, both named after `node`.
pub fn blockdev(node: &str, path: &Path, format: Format, readonly: bool) -> Result<qmp::BlockdevOptions, PluginError> {
    let filename = path
        .to_str()
        .ok_or_else(|| PluginError::invalid_argument(format!("image path {path:?} is not valid UTF-8")))?
        .to_string();
    let base = |name: String| qmp::BlockdevOptionsBase {
        auto_read_only: None,
        cache: None,
        detect_zeroes: None,
        discard: None,
        force_share: None,
        node_name: Some(name),
        read_only: Some(readonly),
    };
    let file = qmp::BlockdevOptions::file {
        base: base(format!("{node}-file")),
        file: qmp::BlockdevOptionsFile {
            aio: None,
            aio_max_batch: None,
            drop_cache: None,
            locking: None,
            pr_manager: None,
            x_check_cache_dropped: None,
            filename,
        },
    };
    let file = qmp::BlockdevRef::definition(Box::new(file));
    Ok(match format {
        Format::Qcow2 => {
            let mut qcow2: qmp::BlockdevOptionsQcow2 = file.into();
            // Never a backing file, whatever the image header says (images naming one are also
            // refused at define and start): QEMU opens only the file named here.
            qcow2.base.backing = Some(qmp::BlockdevRefOrNull::null(()));
            qmp::BlockdevOptions::qcow2 { base: base(node.to_string()), qcow2 }
        }
        Format::Raw => qmp::BlockdevOptions::raw { base: base(node.to_string()), raw: file.into() },
    })
}

fn props<const N: usize>(pairs: [(&str, Any); N]) -> Vec<(String, Any)> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The `device_add` arguments of a USB device on `port` (`node`: its image, for a disk).
pub fn usb_device(device: &Device, port: u8, node: Option<&str>) -> qmp::device_add {
    let driver = match device.kind {
        Kind::UsbTablet => "usb-tablet",
        Kind::UsbKeyboard => "usb-kbd",
        Kind::UsbDisk => "usb-storage",
    };
    let mut arguments = props([("port", Any::from(port.to_string()))]);
    if let Some(node) = node {
        arguments.push(("drive".into(), Any::from(node)));
    }
    qmp::device_add::new(driver, Some(device.id.clone()), Some("usb.0".to_string()), arguments)
}

/// The root port `port` kept for NIC hot-plug.
fn hotplug_port(port: u8) -> qmp::device_add {
    let chassis = u32::from(port) + 1;
    qmp::device_add::new("pcie-root-port", Some(hotplug_bus(port)), None, props([("chassis", Any::from(chassis))]))
}

fn hotplug_bus(port: u8) -> String {
    format!("capvirt-hp{port}")
}

/// The netdev of the interface with device id `device_id`.
pub fn netdev_id(device_id: &str) -> String {
    format!("capvirt-{device_id}")
}

fn netdev_type(nic: &Interface) -> &'static str {
    if nic.bridge.is_some() {
        "tap"
    } else {
        "user"
    }
}

/// A forward in QEMU's `hostfwd` syntax, on the host's loopback address only.
fn hostfwd(f: &Forward) -> String {
    format!("{}:127.0.0.1:{}-:{}", f.protocol.as_str(), f.host_port, f.guest_port)
}

/// The virtio-net device of an interface; a hot-plugged one sits on root port `port`.
pub fn nic_device(nic: &Interface, device_id: &str, port: Option<u8>) -> qmp::device_add {
    let netdev = netdev_id(device_id);
    // No option ROM: guests boot their disks or a kernel, never the network.
    let arguments =
        props([("netdev", Any::from(netdev)), ("mac", Any::from(nic.mac.as_str())), ("romfile", Any::from(""))]);
    qmp::device_add::new("virtio-net-pci", Some(device_id.to_string()), port.map(hotplug_bus), arguments)
}

/// The descriptor name a hot-plugged bridge interface's tap is passed under (`getfd`).
pub fn tap_fd_name(device_id: &str) -> String {
    format!("capvirt-tap-{device_id}")
}

/// The `netdev_add` of a hot-plugged interface (for a bridge, its tap already passed to QEMU
/// with `getfd` under [`tap_fd_name`]).
pub fn netdev_add(nic: &Interface, device_id: &str) -> Result<qmp::netdev_add, PluginError> {
    let mut netdev = serde_json::json!({ "type": netdev_type(nic), "id": netdev_id(device_id) });
    if nic.bridge.is_some() {
        netdev["fd"] = tap_fd_name(device_id).into();
    }
    if !nic.forwards.is_empty() {
        let forwards: Vec<serde_json::Value> =
            nic.forwards.iter().map(|f| serde_json::json!({ "str": hostfwd(f) })).collect();
        netdev["hostfwd"] = forwards.into();
    }
    serde_json::from_value(netdev)
        .map(qmp::netdev_add)
        .map_err(|e| PluginError::internal(format!("cannot encode netdev_add for '{device_id}': {e}")))
}

/// Takes a free hot-plug root port for a new interface.
pub fn take_nic_port(live: &mut Live, device_id: &str) -> Option<u8> {
    let port = live.free_nic_port()?;
    live.nic_ports.insert(device_id.to_string(), port);
    Some(port)
}

/// QEMU's arguments for a domain. Images are named only as fd sets (see [`images`]); `boot`
/// says where QEMU reads the kernel and initrd.
pub fn command_line(
    paths: &DomainPaths,
    live: &Live,
    mode: StartMode,
    boot: &BootFiles,
) -> Result<Vec<OsString>, PluginError> {
    let machine = &live.machine;
    let mut args = Args::default();
    args.add(&["-name", &format!("guest={}", machine.name)]);
    // A first start takes the emulator's newest q35; a restore or migration destination
    // recreates the versioned machine its state was saved from (see `record_runtime`).
    args.add(&["-machine", live.machine_type.as_deref().unwrap_or("q35"), "-accel", &live.accel]);
    args.add(&["-m", &format!("{}M", machine.memory_mib), "-smp", &machine.vcpus.to_string()]);
    args.add(&["-nodefaults", "-no-user-config", "-display", "none", "-msg", "timestamp=on"]);
    // Not `-daemonize`: it forks and calls setsid once the filter denies both (`launch`
    // detaches QEMU instead).
    args.add(&["-sandbox", privilege::SANDBOX]);
    args.0.extend(["-pidfile".into(), paths.pidfile.clone().into_os_string()]);
    let mut fdsets = Vec::new();
    for (index, _) in images(live).iter().enumerate() {
        let (fd, set) = (FIRST_IMAGE_FD + index as i32, FIRST_DISK_FDSET + index);
        args.add(&["-add-fd", &format!("fd={fd},set={set},opaque=capvirt-image{index}")]);
        fdsets.push(fdset_path(set));
    }
    let mut fdsets = fdsets.into_iter();
    let mut next_image = || fdsets.next().ok_or_else(|| PluginError::internal("an image without a descriptor"));
    for channel in 0..CHANNELS {
        let fd = FIRST_CHANNEL_FD + channel as i32;
        args.add(&["-chardev", &format!("socket,id=qmp{channel},fd={fd},server=on,wait=off")]);
        args.add(&["-mon", &format!("chardev=qmp{channel},mode=control")]);
    }
    let xhci = qmp::device_add::new(
        "qemu-xhci",
        Some("usb".to_string()),
        None,
        props([("p2", Any::from(USB_PORTS)), ("p3", Any::from(USB_PORTS))]),
    );
    args.json("-device", &xhci)?;
    let mut sata_port = 0;
    for (index, disk) in machine.disks.iter().enumerate() {
        let node = disk_node(index);
        args.json("-blockdev", &blockdev(&node, &next_image()?, disk.format, disk.readonly)?)?;
        let boot = [("drive", Any::from(node.as_str())), ("bootindex", Any::from(index + 1))];
        let device = match disk.bus {
            Bus::Virtio => qmp::device_add::new("virtio-blk-pci", Some(disk.target.clone()), None, props(boot)),
            Bus::Sata => {
                let bus = format!("ide.{sata_port}");
                sata_port += 1;
                qmp::device_add::new("ide-hd", Some(disk.target.clone()), Some(bus), props(boot))
            }
            Bus::Usb => {
                let port = live.port(&disk.target).ok_or_else(|| no_port(&disk.target))?;
                let mut arguments = props(boot);
                arguments.push(("port".into(), Any::from(port.to_string())));
                qmp::device_add::new("usb-storage", Some(disk.target.clone()), Some("usb.0".to_string()), arguments)
            }
        };
        args.json("-device", &device)?;
    }
    for device in &machine.devices {
        let port = live.port(&device.id).ok_or_else(|| no_port(&device.id))?;
        let node = match (&device.path, device.format) {
            (Some(_), Some(format)) => {
                let node = usb_node(port);
                args.json("-blockdev", &blockdev(&node, &next_image()?, format, false)?)?;
                Some(node)
            }
            _ => None,
        };
        args.json("-device", &usb_device(device, port, node.as_deref()))?;
    }
    if let Some(adapter) = machine.graphics {
        let driver = match adapter {
            Adapter::Vga => "VGA",
            Adapter::Virtio => "virtio-vga",
        };
        args.json("-device", &qmp::device_add::new(driver, Some("video0".to_string()), None, std::iter::empty()))?;
    }
    for port in 0..live.hotplug_ports {
        args.json("-device", &hotplug_port(port))?;
    }
    // Taps are opened here and handed over (see `launch_in`), after the images.
    let first_tap_fd = FIRST_IMAGE_FD + images(live).len() as i32;
    let tap_ids: Vec<String> = bridged_taps(paths, live).into_iter().map(|(id, _)| id).collect();
    for (index, nic) in machine.interfaces.iter().enumerate() {
        let id = nic.device_id(index);
        // The option text holds only fixed words, validated integers and derived names.
        let mut options = format!("{},id={}", netdev_type(nic), netdev_id(&id));
        if let Some(position) = tap_ids.iter().position(|t| *t == id) {
            options.push_str(&format!(",fd={}", first_tap_fd + position as i32));
        }
        for f in &nic.forwards {
            options.push_str(&format!(",hostfwd={}", hostfwd(f)));
        }
        args.add(&["-netdev", &options]);
        let port = nic.id.as_ref().and_then(|id| live.nic_ports.get(id).copied());
        args.json("-device", &nic_device(nic, &id, port))?;
    }
    // The first serial port, on a socket that logs what the guest prints (`domain.console-read`)
    // and takes typed lines (`domain.console-write`).
    args.0.extend(crate::console::options(CONSOLE_SOCKET_FD, CONSOLE_LOG_FD).map(OsString::from));
    if let (Some(spec), Some(kernel)) = (&machine.boot, &boot.kernel) {
        // Plain file names and the guest's command line: none is parsed as QEMU options.
        args.0.extend(["-kernel".into(), kernel.clone().into_os_string()]);
        if let Some(initrd) = &boot.initrd {
            args.0.extend(["-initrd".into(), initrd.clone().into_os_string()]);
        }
        if let Some(cmdline) = &spec.cmdline {
            args.add(&["-append", cmdline]);
        }
    }
    if mode == StartMode::Incoming {
        args.add(&["-incoming", "defer"]);
    }
    Ok(args.0)
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn add(&mut self, items: &[&str]) {
        self.0.extend(items.iter().map(OsString::from));
    }

    /// An option whose value is a QAPI value in JSON (the form `-device`/`-blockdev` accept).
    fn json<T: serde::Serialize>(&mut self, option: &str, value: &T) -> Result<(), PluginError> {
        let text = serde_json::to_string(value)
            .map_err(|e| PluginError::internal(format!("cannot encode a QEMU {option} option: {e}")))?;
        self.0.extend([OsString::from(option), OsString::from(text)]);
        Ok(())
    }
}

fn no_port(id: &str) -> PluginError {
    PluginError::internal(format!("live configuration has no USB port for '{id}'"))
}

/// Starts the domain's QEMU detached from this process (its own process group: QEMU outlives
/// every `capvirt` invocation and never gets the terminal's signals), as `runner`, with its
/// monitor sockets bound here and its images opened here, all handed over as file
/// descriptors. Returns once QEMU has initialized (its monitor answers) and its version and
/// machine type are recorded in the live configuration, with its PID.
pub fn launch(
    store: &Store,
    paths: &DomainPaths,
    live: &Live,
    mode: StartMode,
    emulator: &Emulator,
    runner: &Runner,
) -> Result<i32, PluginError> {
    store::remove_runtime(paths)?;
    store::make_private_dir(&paths.run)?;
    crate::console::Log::open(paths)?.reset()?;
    // Taps of bridge interfaces, owned by the account QEMU runs as so it can open them; a
    // failed start removes them with the runtime files.
    let result = crate::tap::setup(&paths.dir, &live.machine, runner.tap_owner())
        .and_then(|()| privilege::prepare(store, paths, runner))
        .and_then(|dir| BootFiles::stage(&live.machine, &dir, runner))
        .and_then(|boot| {
            let launched = launch_in(store, paths, live, mode, emulator, runner, &boot);
            boot.remove_copies();
            launched
        });
    if result.is_err() {
        kill_running(store, paths);
        let _ = store::remove_runtime(paths);
    }
    result
}

/// The entry of `query-machines` the driver reads.
#[derive(serde::Deserialize)]
struct MachineEntry {
    name: String,
    #[serde(default)]
    alias: Option<String>,
}

/// Records what the QEMU just started runs: its own version (`query-version`, which stays
/// true for this process after the package is upgraded) and, on a first start, the versioned
/// machine type behind `q35` — a restore or a migration destination, possibly on a newer
/// QEMU, must recreate that machine, not the newest one.
fn record_runtime(paths: &DomainPaths, live: &Live, monitor: &mut Monitor) -> Result<(), PluginError> {
    let failed = |e| PluginError::driver_failure(format!("QEMU of domain '{}': {e}", paths.name));
    let version = monitor.qmp.execute(&qmp::query_version {}).map_err(failed)?;
    let mut recorded = live.clone();
    let triple = &version.qemu;
    let number = format!("{}.{}.{}", triple.major, triple.minor, triple.micro);
    recorded.qemu_version = Some(match version.package.trim() {
        "" => number,
        package => format!("{number} ({package})"),
    });
    if recorded.machine_type.is_none() {
        let machines: Vec<MachineEntry> = monitor.qmp.execute_loose(&qmp::query_machines {}).map_err(failed)?;
        recorded.machine_type = machines.into_iter().find(|m| m.alias.as_deref() == Some("q35")).map(|m| m.name);
    }
    store::write_toml(&paths.live, &recorded)
}

#[allow(clippy::too_many_arguments)]
fn launch_in(
    store: &Store,
    paths: &DomainPaths,
    live: &Live,
    mode: StartMode,
    emulator: &Emulator,
    runner: &Runner,
    boot: &BootFiles,
) -> Result<i32, PluginError> {
    store::write_toml(&paths.live, live)?;
    let mut mappings = Vec::with_capacity(CHANNELS + 2);
    for channel in 0..CHANNELS {
        let socket = paths.monitor_socket(channel);
        let listener = with_socket_path(&socket, |path| UnixListener::bind(path))
            .map_err(|e| store::io_failure(&socket, "bind monitor socket", &e))?;
        mappings.push(FdMapping { parent_fd: OwnedFd::from(listener), child_fd: FIRST_CHANNEL_FD + channel as i32 });
    }
    let console = paths.console_socket();
    let listener = with_socket_path(&console, |path| UnixListener::bind(path))
        .map_err(|e| store::io_failure(&console, "bind console socket", &e))?;
    mappings.push(FdMapping { parent_fd: OwnedFd::from(listener), child_fd: CONSOLE_SOCKET_FD });
    // Write-only, as QEMU opens a chardev log (an fd set hands out matching descriptors only).
    let console_log = OpenOptions::new()
        .append(true)
        .open(&paths.console)
        .map_err(|e| store::io_failure(&paths.console, "open", &e))?;
    mappings.push(FdMapping { parent_fd: OwnedFd::from(console_log), child_fd: CONSOLE_LOG_FD });
    // Opened here, read-write or read-only as QEMU will ask for them through their fd sets:
    // QEMU needs no right to any image path.
    for (index, (path, readonly)) in images(live).into_iter().enumerate() {
        let file = privilege::open_image(path, readonly)?;
        mappings.push(FdMapping { parent_fd: OwnedFd::from(file), child_fd: FIRST_IMAGE_FD + index as i32 });
    }
    // Taps too: QEMU never opens /dev/net/tun itself.
    let first_tap_fd = FIRST_IMAGE_FD + images(live).len() as i32;
    for (position, (_, tap)) in bridged_taps(paths, live).into_iter().enumerate() {
        let fd = crate::tap::open(&tap).map_err(PluginError::from)?;
        mappings.push(FdMapping { parent_fd: fd, child_fd: first_tap_fd + position as i32 });
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&paths.log)
        .map_err(|e| store::io_failure(&paths.log, "create", &e))?;
    let log_err = log.try_clone().map_err(|e| store::io_failure(&paths.log, "open", &e))?;
    let mut command = Command::new(emulator.program());
    command
        .args(command_line(paths, live, mode, boot)?)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .process_group(0);
    if let Runner::Account(account) = runner {
        // std drops the supplementary groups, then sets the gid and the uid before exec.
        command.uid(account.uid).gid(account.gid);
    }
    command
        .fd_mappings(mappings)
        .map_err(|e| PluginError::internal(format!("cannot pass descriptors to QEMU: {e}")))?;
    let spawned = command.spawn();
    // The listening sockets' last copies outside QEMU go here: a QEMU that dies now closes
    // them, which ends the readiness wait at once.
    drop(command);
    let mut child = spawned.map_err(|e| PluginError::driver_failure(format!("cannot run {emulator}: {e}")))?;
    let ready = wait_ready(&mut child, paths, emulator)
        .and_then(|mut monitor| record_runtime(paths, live, &mut monitor))
        .and_then(|()| match store.liveness(paths)? {
            Liveness::Alive(pid) => Ok(pid),
            _ => Err(PluginError::driver_failure(format!(
                "QEMU exited right after starting domain '{}': {}",
                paths.name,
                log_summary(&paths.log, emulator).unwrap_or_else(|| "no message".into())
            ))),
        });
    if ready.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        return ready;
    }
    reap_later(child);
    ready
}

/// Waits until the QEMU just spawned answers on a monitor channel (its main loop runs: it has
/// initialized), or exits, or [`START_TIMEOUT`] passes.
fn wait_ready(child: &mut Child, paths: &DomainPaths, emulator: &Emulator) -> Result<Monitor, PluginError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(PluginError::driver_failure(format!(
                "QEMU failed to start domain '{}': {}",
                paths.name,
                log_summary(&paths.log, emulator).unwrap_or_else(|| status.to_string())
            )));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(PluginError::timeout(format!(
                "QEMU did not finish starting domain '{}' within {} s",
                paths.name,
                START_TIMEOUT.as_secs()
            )));
        }
        match monitor::open(paths, left.min(Duration::from_secs(1))) {
            Ok(monitor) => return Ok(monitor),
            // Not listening yet, or gone (the next round reads its exit status).
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// QEMU is this process's child: a thread collects its exit status whenever it comes, so that
/// a long-lived host (a daemon, an isolated driver) keeps no zombie.
fn reap_later(mut child: Child) {
    let reaper = thread::Builder::new().name("capvirt-qemu-reaper".into()).stack_size(64 << 10);
    let _ = reaper.spawn(move || {
        let _ = child.wait();
    });
}

/// QEMU's own error lines from its log (its messages start with the program name).
fn log_summary(log: &Path, emulator: &Emulator) -> Option<String> {
    let mut text = String::new();
    File::open(log).ok()?.take(64 << 10).read_to_string(&mut text).ok()?;
    let program = emulator.message_prefix();
    let prefix = format!("{program}: ");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(&program) && !l.contains("warning:"))
        .map(|l| l.split_once(&prefix).map_or(l, |(_, msg)| msg))
        .collect();
    let pick = if lines.is_empty() { text.lines().rev().take(3).collect::<Vec<_>>() } else { lines };
    let summary = pick.join("; ");
    (!summary.trim().is_empty()).then(|| summary.chars().take(600).collect())
}

/// Best effort: SIGKILL whatever QEMU holds the domain's pidfile.
fn kill_running(store: &Store, paths: &DomainPaths) {
    if let Ok(Liveness::Alive(pid)) = store.liveness(paths) {
        let _ = signal(pid, rustix::process::Signal::KILL);
        wait_exit(store, paths, pid, EXIT_TIMEOUT);
    }
}

fn signal(pid: i32, sig: rustix::process::Signal) -> Result<(), PluginError> {
    let pid = rustix::process::Pid::from_raw(pid).ok_or_else(|| PluginError::internal("invalid pid"))?;
    rustix::process::kill_process(pid, sig)
        .map_err(|e| PluginError::driver_failure(format!("cannot signal QEMU process {}: {e}", pid.as_raw_nonzero())))
}

/// Waits until the QEMU `pid` no longer holds the domain's pidfile.
pub fn wait_exit(store: &Store, paths: &DomainPaths, pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match store.liveness(paths) {
            Ok(Liveness::Alive(holder)) if holder == pid => {}
            _ => return true,
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Stops the domain's QEMU: QMP `quit` when a monitor is at hand, SIGKILL if it outlives
/// [`EXIT_TIMEOUT`]; then removes its runtime files.
pub fn stop(store: &Store, paths: &DomainPaths, pid: i32, monitor: Option<Monitor>) -> Result<(), PluginError> {
    let mut exited = false;
    if let Some(mut monitor) = monitor {
        // `quit` may close the connection before its reply arrives: only the exit counts.
        let _ = monitor.qmp.execute(&qmp::quit {});
        drop(monitor);
        exited = wait_exit(store, paths, pid, EXIT_TIMEOUT);
    }
    if !exited {
        signal(pid, rustix::process::Signal::KILL)?;
        if !wait_exit(store, paths, pid, EXIT_TIMEOUT) {
            return Err(PluginError::driver_failure(format!(
                "QEMU process {pid} of domain '{}' survived SIGKILL for {} s",
                paths.name,
                EXIT_TIMEOUT.as_secs()
            )));
        }
    }
    store::remove_runtime(paths)
}

/// CPU time consumed by a process, from `/proc/PID/stat` (utime + stime).
pub fn cpu_time_ns(pid: i32) -> u64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some((_, after_name)) = stat.rsplit_once(')') else { return 0 };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    (ticks(11) + ticks(12)).saturating_mul(1_000_000_000 / per_second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_nodes_never_open_a_backing_file() {
        let node = blockdev("capvirt-disk0", Path::new("/img/a,b.qcow2"), Format::Qcow2, false)
            .unwrap_or_else(|e| panic!("{e}"));
        let json = serde_json::to_value(&node).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(json["driver"], "qcow2");
        assert_eq!(json["backing"], serde_json::Value::Null);
        assert!(json.as_object().is_some_and(|o| o.contains_key("backing")), "{json}");
        // The path travels as a JSON string: the comma starts no new option.
        assert_eq!(json["file"]["filename"], "/img/a,b.qcow2");
    }
}
