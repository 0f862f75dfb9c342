//! The domain definition as this driver stores and runs it, and the validation that turns the
//! registry's hypervisor-agnostic `DomainSpec` into it.
//!
//! The registry already checked types and formats; this re-checks whatever becomes a path or
//! a QEMU identifier, resolves image paths (they must exist, have the declared format and stay
//! valid whatever the caller's working directory), and refuses specs QEMU could not run.

use std::{
    collections::HashSet,
    fs::{File, Metadata},
    io::Read,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use capvirt_plugin_api::{
    types::{
        format_mac, parse_mac, random_mac, BootSpec, DeviceKind, DeviceSpec, DiskBus, DiskFormat, DiskSpec, DomainSpec,
        GraphicsAdapter, GraphicsSpec, InterfaceKind, InterfaceSpec, PortForward, PortProtocol,
    },
    PluginError, Value,
};
use serde::{Deserialize, Serialize};

/// USB2 ports of the xHCI controller every domain gets (boot USB disks and devices plus hot-plugged ones).
pub const USB_PORTS: u8 = 8;
/// Virtio disks (each takes a PCI slot on the root bus).
pub const MAX_VIRTIO_DISKS: usize = 16;
/// Network interfaces (each takes a PCI slot on the root bus).
pub const MAX_INTERFACES: usize = 8;
/// SATA ports of q35's built-in AHCI controller.
pub const SATA_PORTS: usize = 6;
/// The longest device id (registry `DeviceName`).
const MAX_DEVICE_ID_LEN: usize = 32;
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// The qcow2 header fields read: up to `incompatible_features` (version 3).
const QCOW2_HEADER_LEN: usize = 80;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    Virtio,
    Sata,
    Usb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(clippy::enum_variant_names)] // the registry's words: usb-tablet, usb-keyboard, usb-disk
pub enum Kind {
    UsbTablet,
    UsbKeyboard,
    UsbDisk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Adapter {
    Vga,
    Virtio,
}

/// A disk with its image path resolved and its guest target assigned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub path: PathBuf,
    pub format: Format,
    pub bus: Bus,
    pub target: String,
    #[serde(default)]
    pub readonly: bool,
}

/// A USB device; `path`/`format` only for `usb-disk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub kind: Kind,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
}

/// A transport protocol of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A host port on 127.0.0.1 forwarded to a guest port (both validated integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    pub protocol: Protocol,
    pub host_port: u16,
    pub guest_port: u16,
}

/// A virtio network interface with its MAC address (fixed at define, or at hot-plug): user-mode
/// NAT, or a tap on a host bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub mac: String,
    #[serde(default)]
    pub forwards: Vec<Forward>,
    /// `bridge` interfaces: the host bridge its tap joins; absent: user-mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Hot-plugged interfaces: the device id given at attach (interfaces of the definition
    /// are `net0`, `net1`, … by position).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl Interface {
    /// Its QEMU device id: the id given at hot-plug, else `net` + its position.
    pub fn device_id(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("net{index}"))
    }
}

/// The longest Linux network interface name (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// A validated domain definition (what `domain.toml` holds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u64,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub devices: Vec<Device>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graphics: Option<Adapter>,
    /// Direct kernel boot; absent: the firmware boots the disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<KernelBoot>,
    /// Network interfaces, in guest order (hot-plugged ones last, in the live configuration).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
}

#[cfg(test)]
impl Machine {
    /// One vCPU and nothing attached: the unit tests' starting point.
    pub fn bare(name: &str, memory_mib: u64) -> Machine {
        Machine {
            name: name.to_string(),
            memory_mib,
            vcpus: 1,
            disks: Vec::new(),
            devices: Vec::new(),
            graphics: None,
            boot: None,
            interfaces: Vec::new(),
        }
    }
}

/// A kernel (and initrd) QEMU loads itself, with the guest kernel's command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

impl From<DiskFormat> for Format {
    fn from(f: DiskFormat) -> Self {
        match f {
            DiskFormat::Raw => Format::Raw,
            DiskFormat::Qcow2 => Format::Qcow2,
        }
    }
}

impl From<Format> for DiskFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Raw => DiskFormat::Raw,
            Format::Qcow2 => DiskFormat::Qcow2,
        }
    }
}

impl From<DiskBus> for Bus {
    fn from(b: DiskBus) -> Self {
        match b {
            DiskBus::Virtio => Bus::Virtio,
            DiskBus::Sata => Bus::Sata,
            DiskBus::Usb => Bus::Usb,
        }
    }
}

impl From<Bus> for DiskBus {
    fn from(b: Bus) -> Self {
        match b {
            Bus::Virtio => DiskBus::Virtio,
            Bus::Sata => DiskBus::Sata,
            Bus::Usb => DiskBus::Usb,
        }
    }
}

impl From<DeviceKind> for Kind {
    fn from(k: DeviceKind) -> Self {
        match k {
            DeviceKind::UsbTablet => Kind::UsbTablet,
            DeviceKind::UsbKeyboard => Kind::UsbKeyboard,
            DeviceKind::UsbDisk => Kind::UsbDisk,
        }
    }
}

impl From<Kind> for DeviceKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::UsbTablet => DeviceKind::UsbTablet,
            Kind::UsbKeyboard => DeviceKind::UsbKeyboard,
            Kind::UsbDisk => DeviceKind::UsbDisk,
        }
    }
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        DeviceKind::from(self).as_str()
    }
}

impl Machine {
    /// The registry's view of this definition.
    pub fn to_spec(&self) -> DomainSpec {
        let mut spec = DomainSpec::new(self.name.clone(), self.memory_mib, self.vcpus);
        for disk in &self.disks {
            let mut d = DiskSpec::new(disk.path.display().to_string(), disk.format.into(), disk.bus.into());
            d.target = Some(disk.target.clone());
            d.readonly = disk.readonly;
            spec.disks.push(d);
        }
        for device in &self.devices {
            let mut d = DeviceSpec::new(device.kind.into(), device.id.clone());
            d.path = device.path.as_ref().map(|p| p.display().to_string());
            d.format = device.format.map(Into::into);
            spec.devices.push(d);
        }
        spec.graphics = self.graphics.map(|a| {
            GraphicsSpec::new(match a {
                Adapter::Vga => GraphicsAdapter::Vga,
                Adapter::Virtio => GraphicsAdapter::Virtio,
            })
        });
        spec.boot = self.boot.as_ref().map(|boot| {
            let mut spec = BootSpec::default();
            spec.kernel = Some(boot.kernel.display().to_string());
            spec.initrd = boot.initrd.as_ref().map(|p| p.display().to_string());
            spec.cmdline = boot.cmdline.clone();
            spec
        });
        spec.interfaces = self
            .interfaces
            .iter()
            .map(|nic| {
                let kind = if nic.bridge.is_some() { InterfaceKind::Bridge } else { InterfaceKind::User };
                let mut spec = InterfaceSpec::new(kind);
                spec.mac = Some(nic.mac.clone());
                spec.bridge = nic.bridge.clone();
                spec.forwards = nic
                    .forwards
                    .iter()
                    .map(|f| {
                        let protocol = match f.protocol {
                            Protocol::Tcp => PortProtocol::Tcp,
                            Protocol::Udp => PortProtocol::Udp,
                        };
                        PortForward::new(protocol, u64::from(f.host_port), u64::from(f.guest_port))
                    })
                    .collect();
                spec
            })
            .collect();
        spec
    }

    /// Devices and disks that occupy a USB port.
    pub fn usb_port_users(&self) -> usize {
        self.disks.iter().filter(|d| d.bus == Bus::Usb).count() + self.devices.len()
    }
}

/// Facts about the host that bound what a domain may ask for.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits<'a> {
    pub memory_mib: u64,
    /// Where the connection's images may be.
    pub images: &'a ImagePolicy,
    /// Whether `bridge` interfaces are possible: `qemu:///system`, where the driver runs as
    /// root and creates taps.
    pub bridges: bool,
}

/// Host areas no image, kernel or save file may be in unless the allow list names a path
/// inside them: QEMU (as root for `qemu:///system`) would read or write host files there.
pub const DENIED_AREAS: [&str; 5] = ["/etc", "/proc", "/sys", "/boot", "/dev"];

/// Where a connection may open images, kernels and save files: the host's `image_allow`
/// connect option (root's `[images] allow` in `/etc/capvirt/capvirt.toml`; URI parameters are
/// the caller's and cannot widen it) and the fixed [`DENIED_AREAS`]. Paths are checked after
/// resolving symlinks, at define and again at start, attach, save and restore.
#[derive(Debug, Clone, Default)]
pub struct ImagePolicy {
    /// Canonical when they exist; empty: anywhere outside the denied areas.
    allow: Arc<[PathBuf]>,
}

impl ImagePolicy {
    /// From the connect options (`image_allow`: a list of absolute paths; absent: no list).
    pub fn from_options(options: &Value) -> Result<ImagePolicy, PluginError> {
        let Some(list) = options.get("image_allow") else { return Ok(ImagePolicy::default()) };
        let bad = |why: String| PluginError::invalid_argument(format!("connect option image_allow: {why}"));
        let items = list.as_list().ok_or_else(|| bad(format!("expected a list, got {}", list.kind_name())))?;
        let mut allow = Vec::with_capacity(items.len());
        for item in items {
            let path =
                Path::new(item.as_str().ok_or_else(|| bad(format!("expected paths, got {}", item.kind_name())))?);
            if !path.is_absolute() {
                return Err(bad(format!("{} is not an absolute path", path.display())));
            }
            allow.push(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()));
        }
        Ok(ImagePolicy { allow: allow.into() })
    }

    /// An allow list as given (tests).
    pub fn allowing(paths: &[&Path]) -> ImagePolicy {
        ImagePolicy { allow: paths.iter().map(|p| p.to_path_buf()).collect::<Vec<_>>().into() }
    }

    /// Checks an existing, already resolved path (`given` as the caller wrote it, for messages).
    pub fn check(&self, given: &str, resolved: &Path, meta: &Metadata, what: &str) -> Result<(), PluginError> {
        let shown = if Path::new(given) == resolved {
            given.to_string()
        } else {
            format!("{given} (resolved: {})", resolved.display())
        };
        let refuse = |rule: String| PluginError::invalid_argument(format!("{what}: {shown} is refused: {rule}"));
        let mut allowing = self.allow.iter().filter(|a| resolved.starts_with(a));
        if !self.allow.is_empty() && allowing.clone().next().is_none() {
            return Err(refuse(format!(
                "it is outside this host's image directories ({}; [images] allow in /etc/capvirt/capvirt.toml)",
                self.allow.iter().map(|a| a.display().to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        let file_type = meta.file_type();
        if file_type.is_block_device() || file_type.is_char_device() {
            let listed = allowing.any(|a| a == resolved || a.starts_with("/dev"));
            if !listed {
                return Err(refuse(
                    "device nodes are images only when [images] allow in /etc/capvirt/capvirt.toml names them".into(),
                ));
            }
            return Ok(());
        }
        if let Some(area) = DENIED_AREAS.iter().find(|area| resolved.starts_with(area)) {
            let lifted = self.allow.iter().any(|a| resolved.starts_with(a) && a.starts_with(area));
            if !lifted {
                return Err(refuse(format!(
                    "nothing under {area} may be an image, kernel or save file unless [images] allow in /etc/capvirt/capvirt.toml names a path inside it"
                )));
            }
        }
        Ok(())
    }

    /// Checks a file about to be created (`domain.save`): its directory resolved, the name kept.
    pub fn check_new(&self, given: &str, target: &Path, what: &str) -> Result<(), PluginError> {
        let dir = target.parent().unwrap_or(Path::new("/"));
        let meta = std::fs::metadata(dir)
            .map_err(|e| PluginError::invalid_argument(format!("{what}: cannot access {}: {e}", dir.display())))?;
        self.check(given, target, &meta, what)
    }

    /// Resolves and checks an existing file (`domain.restore`).
    pub fn check_existing(&self, given: &str, what: &str) -> Result<(), PluginError> {
        let Ok(resolved) = std::fs::canonicalize(given) else {
            // Missing or unreadable: the open that follows reports it precisely.
            return Ok(());
        };
        let meta = std::fs::metadata(&resolved)
            .map_err(|e| PluginError::invalid_argument(format!("{what}: cannot access {given}: {e}")))?;
        if !meta.is_file() {
            // Not a regular file: refused by the open that follows, which says exactly that.
            return Ok(());
        }
        self.check(given, &resolved, &meta, what)
    }
}

/// Checks a domain name before it becomes a directory name (the registry checked it too; this
/// driver does not rely on that for anything that touches the file system).
pub fn check_name(name: &str) -> Result<(), PluginError> {
    capvirt_plugin_api::types::check_domain_name(name)
}

/// QEMU's rule for device ids (`id_wellformed`): a letter first, then letters, digits, `-._`.
pub fn check_device_id(id: &str, what: &str) -> Result<(), PluginError> {
    let ok = id.len() <= MAX_DEVICE_ID_LEN
        && id.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PluginError::invalid_argument(format!(
            "{what} {id:?}: QEMU device ids start with a letter and hold only letters, digits, '.', '_', '-' (at most {MAX_DEVICE_ID_LEN})"
        )))
    }
}

/// Resolves an image path: it must exist, be a regular file or block device, and hold the
/// declared format (a qcow2 image declared raw would hand the guest the image's metadata).
pub fn check_image(path: &str, format: Format, what: &str, images: &ImagePolicy) -> Result<PathBuf, PluginError> {
    if path.is_empty() || path.chars().any(char::is_control) {
        return Err(PluginError::invalid_argument(format!(
            "{what}: image path {path:?} is empty or has control characters"
        )));
    }
    let resolved = std::fs::canonicalize(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => PluginError::invalid_argument(format!("{what}: image {path} does not exist")),
        _ => PluginError::invalid_argument(format!("{what}: cannot access image {path}: {e}")),
    })?;
    if resolved.to_str().is_none() {
        return Err(PluginError::invalid_argument(format!("{what}: image path {path:?} is not valid UTF-8")));
    }
    let meta = std::fs::metadata(&resolved)
        .map_err(|e| PluginError::invalid_argument(format!("{what}: cannot access image {path}: {e}")))?;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err(PluginError::invalid_argument(format!("{what}: {path} is not a regular file or block device")));
    }
    images.check(path, &resolved, &meta, what)?;
    let header = read_header(&resolved)
        .map_err(|e| PluginError::invalid_argument(format!("{what}: cannot read image {path}: {e}")))?;
    let is_qcow2 = header.starts_with(&QCOW2_MAGIC);
    if is_qcow2 {
        check_qcow2_header(&header, path, what)?;
    }
    match (format, is_qcow2) {
        (Format::Qcow2, false) => Err(PluginError::invalid_argument(format!(
            "{what}: {path} is not a qcow2 image (declare format = \"raw\" for a raw image)"
        ))),
        (Format::Raw, true) => Err(PluginError::invalid_argument(format!(
            "{what}: {path} is a qcow2 image but is declared raw (declare format = \"qcow2\")"
        ))),
        _ => Ok(resolved),
    }
}

/// The first [`QCOW2_HEADER_LEN`] bytes of an image (fewer for a shorter file).
fn read_header(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut header = Vec::with_capacity(QCOW2_HEADER_LEN);
    File::open(path)?.take(QCOW2_HEADER_LEN as u64).read_to_end(&mut header)?;
    Ok(header)
}

/// QEMU must open exactly the files a spec names: a qcow2 image that names another file in
/// its header (a backing file, or an external data file) would make QEMU open that file, which
/// no spec declared (as root: any host file). Such images are refused; flatten them first.
fn check_qcow2_header(header: &[u8], path: &str, what: &str) -> Result<(), PluginError> {
    let be_u32 = |at: usize| header.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
    let be_u64 = |at: usize| header.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
    let refuse = |why: &str| PluginError::invalid_argument(format!("{what}: qcow2 image {path} {why}"));
    let (Some(version), Some(backing_offset)) = (be_u32(4), be_u64(8)) else {
        return Err(refuse("has a truncated header"));
    };
    if backing_offset != 0 {
        return Err(refuse(
            "has a backing file; capvirt opens only the images a spec names (flatten it: qemu-img convert -O qcow2)",
        ));
    }
    // Version 3 headers carry feature bits; bit 2 of the incompatible ones is an external data file.
    if version >= 3 {
        let incompatible = be_u64(72).ok_or_else(|| refuse("has a truncated header"))?;
        if incompatible & (1 << 2) != 0 {
            return Err(refuse("keeps its data in an external file; capvirt opens only the images a spec names"));
        }
    }
    Ok(())
}

/// Validates a device to attach (or listed in a spec): ids, backing image.
pub fn device(device: &DeviceSpec, images: &ImagePolicy) -> Result<Device, PluginError> {
    check_device_id(&device.id, "device")?;
    let backing = device.disk_backing()?;
    let (path, format) = match backing {
        Some((path, format)) => {
            let what = format!("device {}", device.id);
            (Some(check_image(path, format.into(), &what, images)?), Some(Format::from(format)))
        }
        None => (None, None),
    };
    Ok(Device { kind: device.kind.into(), id: device.id.clone(), path, format })
}

/// The direct kernel boot a `[boot]` table asks for (`None`: boot the disks).
fn kernel_boot(boot: &BootSpec, images: &ImagePolicy) -> Result<Option<KernelBoot>, PluginError> {
    if !boot.init.is_empty() {
        return Err(PluginError::invalid_argument(
            "boot.init names a container's first process; a virtual machine boots its disks or boot.kernel".to_string(),
        ));
    }
    let Some(kernel) = &boot.kernel else {
        return match (&boot.initrd, &boot.cmdline) {
            (None, None) => Ok(None),
            _ => Err(PluginError::invalid_argument("boot.initrd and boot.cmdline need boot.kernel".to_string())),
        };
    };
    if let Some(cmdline) = boot.cmdline.as_deref().filter(|c| c.chars().any(char::is_control)) {
        return Err(PluginError::invalid_argument(format!("boot.cmdline {cmdline:?} has control characters")));
    }
    Ok(Some(KernelBoot {
        kernel: check_boot_file(kernel, "boot.kernel", images)?,
        initrd: boot.initrd.as_deref().map(|p| check_boot_file(p, "boot.initrd", images)).transpose()?,
        cmdline: boot.cmdline.clone(),
    }))
}

/// Resolves a kernel or initrd path: an existing regular file.
pub fn check_boot_file(path: &str, what: &str, images: &ImagePolicy) -> Result<PathBuf, PluginError> {
    if path.is_empty() || path.chars().any(char::is_control) {
        return Err(PluginError::invalid_argument(format!("{what}: path {path:?} is empty or has control characters")));
    }
    let resolved = std::fs::canonicalize(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => PluginError::invalid_argument(format!("{what}: {path} does not exist")),
        _ => PluginError::invalid_argument(format!("{what}: cannot access {path}: {e}")),
    })?;
    let meta = std::fs::metadata(&resolved)
        .map_err(|e| PluginError::invalid_argument(format!("{what}: cannot access {path}: {e}")))?;
    if !meta.is_file() {
        return Err(PluginError::invalid_argument(format!("{what}: {path} is not a regular file")));
    }
    images.check(path, &resolved, &meta, what)?;
    Ok(resolved)
}

/// A port number of a forward: 1 to 65535.
fn port(value: u64, what: &str) -> Result<u16, PluginError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| PluginError::invalid_argument(format!("{what} {value} is not a port number (1 to 65535)")))
}

/// Checks a host bridge name before it reaches `ip` or QEMU: a Linux interface name.
pub fn check_bridge_name(bridge: &str, what: &str) -> Result<(), PluginError> {
    let ok = !bridge.is_empty()
        && bridge.len() <= MAX_IFNAME_LEN
        && bridge.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !bridge.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(PluginError::invalid_argument(format!(
            "{what}: bridge {bridge:?} is not a Linux interface name (1 to {MAX_IFNAME_LEN} letters, digits, '.', '_', '-')"
        )))
    }
}

/// Validates one interface (`what` names it in errors); `seed` seeds a generated MAC.
pub fn interface(nic: &InterfaceSpec, what: &str, seed: &str, bridges: bool) -> Result<Interface, PluginError> {
    let bridge = match nic.kind {
        InterfaceKind::User => {
            if nic.bridge.is_some() {
                return Err(PluginError::invalid_argument(format!("{what}: `bridge` applies to kind \"bridge\" only")));
            }
            None
        }
        InterfaceKind::Bridge => {
            if !bridges {
                return Err(PluginError::unsupported(format!(
                    "{what}: kind \"bridge\" needs qemu:///system (the driver creates a tap device as root); \
                     qemu:///session offers kind = \"user\" with forwards"
                )));
            }
            let bridge = nic.bridge.as_deref().ok_or_else(|| {
                PluginError::invalid_argument(format!(
                    "{what}: kind \"bridge\" needs `bridge` (the host bridge's name)"
                ))
            })?;
            check_bridge_name(bridge, what)?;
            if !nic.forwards.is_empty() {
                return Err(PluginError::invalid_argument(format!(
                    "{what}: `forwards` apply to kind \"user\" only (a bridged guest is reached at its own address)"
                )));
            }
            Some(bridge.to_string())
        }
    };
    let mac = match &nic.mac {
        Some(text) => format_mac(parse_mac(text).ok_or_else(|| {
            PluginError::invalid_argument(format!(
                "{what}: mac {text:?} is not a unicast Ethernet address (six hex pairs separated by ':')"
            ))
        })?),
        None => random_mac(seed),
    };
    let mut forwards = Vec::with_capacity(nic.forwards.len());
    let mut host_ports = HashSet::new();
    for f in &nic.forwards {
        let protocol = match f.protocol {
            PortProtocol::Tcp => Protocol::Tcp,
            PortProtocol::Udp => Protocol::Udp,
        };
        let forward = Forward {
            protocol,
            host_port: port(f.host_port, &format!("{what}: host_port"))?,
            guest_port: port(f.guest_port, &format!("{what}: guest_port"))?,
        };
        if !host_ports.insert((protocol, forward.host_port)) {
            return Err(forwarded_twice(what, forward));
        }
        forwards.push(forward);
    }
    Ok(Interface { mac, forwards, bridge, id: None })
}

fn forwarded_twice(what: &str, forward: Forward) -> PluginError {
    PluginError::invalid_argument(format!(
        "{what}: host port {}/{} is forwarded twice",
        forward.host_port,
        forward.protocol.as_str()
    ))
}

/// Refuses a new interface whose MAC or forwarded host ports another interface already uses.
pub fn check_conflicts(existing: &[Interface], nic: &Interface, what: &str) -> Result<(), PluginError> {
    if existing.iter().any(|other| other.mac == nic.mac) {
        return Err(PluginError::invalid_argument(format!("{what}: mac {} is used twice", nic.mac)));
    }
    for forward in &nic.forwards {
        let taken = existing
            .iter()
            .flat_map(|other| &other.forwards)
            .any(|f| f.protocol == forward.protocol && f.host_port == forward.host_port);
        if taken {
            return Err(forwarded_twice(what, *forward));
        }
    }
    Ok(())
}

/// Validates network interfaces; generates the MAC addresses the spec leaves out.
fn interfaces(spec: &DomainSpec, bridges: bool) -> Result<Vec<Interface>, PluginError> {
    if spec.interfaces.len() > MAX_INTERFACES {
        return Err(PluginError::invalid_argument(format!("more than {MAX_INTERFACES} network interfaces")));
    }
    let mut out: Vec<Interface> = Vec::with_capacity(spec.interfaces.len());
    for (index, nic) in spec.interfaces.iter().enumerate() {
        let what = format!("interface {index}");
        let nic = interface(nic, &what, &format!("{}/{index}", spec.name), bridges)?;
        check_conflicts(&out, &nic, &what)?;
        out.push(nic);
    }
    Ok(out)
}

/// Validates a whole domain spec into the stored definition. Touches nothing on disk but
/// reads the images' first bytes.
pub fn validate(spec: &DomainSpec, limits: HostLimits) -> Result<Machine, PluginError> {
    check_name(&spec.name)?;
    if spec.memory_mib < 16 {
        return Err(PluginError::invalid_argument(format!("memory_mib {} is below 16 MiB", spec.memory_mib)));
    }
    // 0: the host's memory is unknown (no /proc/meminfo); QEMU will refuse what it cannot map.
    if limits.memory_mib > 0 && spec.memory_mib > limits.memory_mib {
        return Err(PluginError::invalid_argument(format!(
            "memory_mib {} exceeds this host's {} MiB of memory",
            spec.memory_mib, limits.memory_mib
        )));
    }
    if !(1..=255).contains(&spec.vcpus) {
        return Err(PluginError::invalid_argument(format!("vcpus {} is outside 1..=255", spec.vcpus)));
    }
    let mut ids = HashSet::new();
    let mut paths = HashSet::new();
    let mut disks = Vec::with_capacity(spec.disks.len());
    for (disk, target) in spec.disks.iter().zip(spec.disk_targets()) {
        let what = format!("disk {target}");
        check_device_id(&target, "disk target")?;
        if !ids.insert(target.clone()) {
            return Err(PluginError::invalid_argument(format!("disk target {target} is used twice")));
        }
        let bus = Bus::from(disk.bus);
        if disk.readonly && bus == Bus::Sata {
            return Err(PluginError::invalid_argument(format!(
                "{what}: QEMU's SATA disks cannot be read-only; use bus \"virtio\" or \"usb\""
            )));
        }
        let path = check_image(&disk.path, disk.format.into(), &what, limits.images)?;
        if !paths.insert(path.clone()) {
            return Err(PluginError::invalid_argument(format!("{what}: image {} is used twice", path.display())));
        }
        disks.push(Disk { path, format: disk.format.into(), bus, target, readonly: disk.readonly });
    }
    let count = |bus| disks.iter().filter(|d| d.bus == bus).count();
    if count(Bus::Virtio) > MAX_VIRTIO_DISKS {
        return Err(PluginError::invalid_argument(format!("more than {MAX_VIRTIO_DISKS} virtio disks")));
    }
    if count(Bus::Sata) > SATA_PORTS {
        return Err(PluginError::invalid_argument(format!("more than {SATA_PORTS} SATA disks")));
    }
    let mut devices = Vec::with_capacity(spec.devices.len());
    for dev in &spec.devices {
        let dev = device(dev, limits.images)?;
        if !ids.insert(dev.id.clone()) {
            return Err(PluginError::invalid_argument(format!("device id {} is used twice", dev.id)));
        }
        if let Some(path) = &dev.path {
            if !paths.insert(path.clone()) {
                return Err(PluginError::invalid_argument(format!(
                    "device {}: image {} is used twice",
                    dev.id,
                    path.display()
                )));
            }
        }
        devices.push(dev);
    }
    let graphics = spec.graphics.as_ref().map(|g| match g.adapter {
        GraphicsAdapter::Vga => Adapter::Vga,
        GraphicsAdapter::Virtio => Adapter::Virtio,
    });
    if !spec.filesystems.is_empty() {
        return Err(PluginError::unsupported(
            "the qemu driver does not share host directories (`filesystems`) with virtual machines yet; use a disk image"
                .to_string(),
        ));
    }
    let boot = spec.boot.as_ref().map(|b| kernel_boot(b, limits.images)).transpose()?.flatten();
    let interfaces = interfaces(spec, limits.bridges)?;
    let machine = Machine {
        name: spec.name.clone(),
        memory_mib: spec.memory_mib,
        vcpus: spec.vcpus,
        disks,
        devices,
        graphics,
        boot,
        interfaces,
    };
    if machine.usb_port_users() > usize::from(USB_PORTS) {
        return Err(PluginError::invalid_argument(format!(
            "USB disks and devices need {} ports; a domain has {USB_PORTS}",
            machine.usb_port_users()
        )));
    }
    Ok(machine)
}

/// The configuration a running QEMU was started with, plus hot-plugged devices, with the USB
/// port of every USB disk and device. A migration destination or a restore starts from it, so
/// that the device model (ports included) matches the saved state exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Live {
    /// `kvm` or `tcg`: a saved or migrated state resumes only on the same accelerator.
    pub accel: String,
    pub machine: Machine,
    /// USB port of each disk target or device id on the xHCI controller.
    pub usb_ports: std::collections::BTreeMap<String, u8>,
    /// The versioned machine type QEMU runs (`pc-q35-7.2`), recorded at the first start so
    /// that a restore or migration destination on another QEMU recreates the same machine.
    /// Absent in states recorded by driver 1.0 (`q35` then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_type: Option<String>,
    /// The running QEMU's own version (QMP `query-version`), shown by `domain.info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_version: Option<String>,
    /// PCIe root ports kept free for hot-plugged network interfaces (q35's root bus takes no
    /// hot-plug). 0 in states recorded by drivers without NIC hot-plug, whose QEMUs have none:
    /// a restore or migration destination recreates exactly what the state was saved with.
    #[serde(default)]
    pub hotplug_ports: u8,
    /// Root port of each hot-plugged interface (by device id).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub nic_ports: std::collections::BTreeMap<String, u8>,
}

/// PCIe root ports every domain started by this driver gets for NIC hot-plug.
pub const HOTPLUG_PORTS: u8 = 4;
/// The most hot-plug ports a saved live configuration may ask for.
pub const MAX_HOTPLUG_PORTS: u8 = 16;

/// Gives interfaces re-validated from a save file (`to_spec` knows no device ids) the
/// hot-plug ids they had, position by position.
pub fn keep_nic_ids(validated: &mut Machine, saved: &Machine) {
    for (nic, was) in validated.interfaces.iter_mut().zip(&saved.interfaces) {
        nic.id = was.id.clone();
    }
}

impl Live {
    /// Assigns USB ports in definition order: USB disks, then devices.
    pub fn new(machine: Machine, accel: &str) -> Live {
        let users = machine
            .disks
            .iter()
            .filter(|d| d.bus == Bus::Usb)
            .map(|d| d.target.clone())
            .chain(machine.devices.iter().map(|d| d.id.clone()));
        let usb_ports = users.zip(1..=USB_PORTS).collect();
        Live {
            accel: accel.to_string(),
            machine,
            usb_ports,
            machine_type: None,
            qemu_version: None,
            hotplug_ports: HOTPLUG_PORTS,
            nic_ports: Default::default(),
        }
    }

    /// The lowest USB port nobody uses.
    pub fn free_port(&self) -> Option<u8> {
        (1..=USB_PORTS).find(|port| !self.usb_ports.values().any(|p| p == port))
    }

    pub fn port(&self, id: &str) -> Option<u8> {
        self.usb_ports.get(id).copied()
    }

    /// The lowest hot-plug root port no interface uses.
    pub fn free_nic_port(&self) -> Option<u8> {
        (0..self.hotplug_ports).find(|port| !self.nic_ports.values().any(|p| p == port))
    }

    /// Checks the hot-plug records of a live configuration read from a save file (caller
    /// data): at most [`MAX_HOTPLUG_PORTS`] ports, each hot-plugged interface (valid id) on
    /// its own port, no port for anything else.
    pub fn check_nic_ports(&self) -> Result<(), String> {
        if self.hotplug_ports > MAX_HOTPLUG_PORTS {
            return Err(format!("{} hot-plug ports (at most {MAX_HOTPLUG_PORTS})", self.hotplug_ports));
        }
        let plugged: Vec<&str> = self.machine.interfaces.iter().filter_map(|n| n.id.as_deref()).collect();
        let mut seen = Vec::new();
        for id in &plugged {
            check_device_id(id, "interface").map_err(|e| e.message.to_string())?;
            let port = self.nic_ports.get(*id).copied().ok_or_else(|| format!("no hot-plug port for '{id}'"))?;
            if port >= self.hotplug_ports || seen.contains(&port) {
                return Err(format!("invalid hot-plug port {port} for '{id}'"));
            }
            seen.push(port);
        }
        if self.nic_ports.len() != plugged.len() {
            return Err("hot-plug ports for unknown interfaces".into());
        }
        Ok(())
    }

    /// Every QEMU device id in use (disks, USB devices, interfaces and the driver's own).
    pub fn device_ids(&self) -> Vec<String> {
        let machine = &self.machine;
        let mut ids: Vec<String> = machine.disks.iter().map(|d| d.target.clone()).collect();
        ids.extend(machine.devices.iter().map(|d| d.id.clone()));
        ids.extend(machine.interfaces.iter().enumerate().map(|(i, nic)| nic.device_id(i)));
        ids.extend(["usb".to_string(), "video0".to_string()]);
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_follow_qemu_rules() {
        assert!(check_device_id("tablet0", "device").is_ok());
        for bad in ["0tab", "", "a b", "a,b", "a/b"] {
            assert!(check_device_id(bad, "device").is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn images_stay_out_of_host_areas_and_inside_the_allow_list() {
        let dir = std::env::temp_dir().join(format!("capvirt-qemu-images-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let disk = dir.join("disk.raw");
        std::fs::write(&disk, [0u8; 512]).unwrap_or_else(|e| panic!("{e}"));
        let link = dir.join("passwd.raw");
        let _ = std::os::unix::fs::symlink("/etc/passwd", &link);
        let text = |p: &Path| p.display().to_string();
        let message = |r: Result<PathBuf, PluginError>| r.err().map(|e| e.message.to_string()).unwrap_or_default();
        let anywhere = ImagePolicy::default();
        assert!(check_image(&text(&disk), Format::Raw, "disk vda", &anywhere).is_ok());
        let etc = message(check_image("/etc/passwd", Format::Raw, "disk vda", &anywhere));
        assert!(etc.contains("/etc/passwd is refused") && etc.contains("nothing under /etc"), "{etc}");
        let via_link = message(check_image(&text(&link), Format::Raw, "disk vda", &anywhere));
        assert!(via_link.contains("resolved: /etc/passwd") && via_link.contains("under /etc"), "{via_link}");
        let kernel =
            check_boot_file("/proc/self/status", "boot.kernel", &anywhere).err().map(|e| e.message.to_string());
        assert!(kernel.is_some_and(|m| m.contains("/proc")));
        // An allow list confines images to it, and only an entry inside a denied area lifts it.
        let elsewhere = ImagePolicy::allowing(&[Path::new("/srv/nowhere")]);
        assert!(message(check_image(&text(&disk), Format::Raw, "disk vda", &elsewhere)).contains("outside"));
        let inside_etc = ImagePolicy::allowing(&[Path::new("/etc/passwd")]);
        assert!(check_image("/etc/passwd", Format::Raw, "disk vda", &inside_etc).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_allow_list_comes_from_connect_options() {
        let options = Value::record([("image_allow", Value::list(["/srv/vm"]))]);
        let policy = ImagePolicy::from_options(&options).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&*policy.allow, [PathBuf::from("/srv/vm")]);
        assert!(ImagePolicy::from_options(&Value::record([("image_allow", Value::list(["vm"]))])).is_err());
        assert!(ImagePolicy::from_options(&Value::record([("image_allow", Value::from(true))])).is_err());
        assert!(ImagePolicy::from_options(&Value::record_empty()).is_ok_and(|p| p.allow.is_empty()));
    }

    #[test]
    fn boot_tables_become_kernel_boots_or_are_refused() {
        let images = ImagePolicy::default();
        assert_eq!(kernel_boot(&BootSpec::default(), &images).ok(), Some(None));
        let refused =
            |boot: BootSpec| kernel_boot(&boot, &images).err().map(|e| e.message.to_string()).unwrap_or_default();
        assert!(refused(BootSpec::init(["/bin/sh"])).contains("container"));
        let mut orphan = BootSpec::default();
        orphan.cmdline = Some("quiet".into());
        assert!(refused(orphan).contains("need boot.kernel"));
        let mut missing = BootSpec::default();
        missing.kernel = Some("/nonexistent/vmlinuz".into());
        assert!(refused(missing).contains("does not exist"));
        let mut directory = BootSpec::default();
        directory.kernel = Some("/".into());
        assert!(refused(directory).contains("not a regular file"));
        let mut control = BootSpec::default();
        control.kernel = Some("/bin/sh".into());
        control.cmdline = Some("a\nb".into());
        assert!(refused(control).contains("control characters"));
    }

    #[test]
    fn interfaces_get_macs_and_refuse_what_qemu_cannot_do() {
        let mut spec = DomainSpec::new("vm", 64, 1);
        let mut nic = InterfaceSpec::new(InterfaceKind::User);
        nic.forwards.push(PortForward::new(PortProtocol::Tcp, 8080, 80));
        nic.forwards.push(PortForward::new(PortProtocol::Udp, 8080, 53));
        spec.interfaces.push(nic.clone());
        let mut named = InterfaceSpec::new(InterfaceKind::User);
        named.mac = Some("52:54:00:AA:BB:CC".into());
        spec.interfaces.push(named);
        let nics = interfaces(&spec, false).unwrap_or_else(|e| panic!("{e}"));
        assert!(parse_mac(&nics[0].mac).is_some(), "{}", nics[0].mac);
        assert_eq!(nics[1].mac, "52:54:00:aa:bb:cc");
        assert_eq!(nics[0].forwards[1], Forward { protocol: Protocol::Udp, host_port: 8080, guest_port: 53 });

        let refused =
            |spec: &DomainSpec| interfaces(spec, true).err().map(|e| e.message.to_string()).unwrap_or_default();
        let mut twice = DomainSpec::new("vm", 64, 1);
        let mut dup = nic.clone();
        dup.forwards.push(PortForward::new(PortProtocol::Tcp, 8080, 81));
        twice.interfaces.push(dup);
        assert!(refused(&twice).contains("forwarded twice"));
        let mut zero = DomainSpec::new("vm", 64, 1);
        let mut bad_port = InterfaceSpec::new(InterfaceKind::User);
        bad_port.forwards.push(PortForward::new(PortProtocol::Tcp, 70000, 80));
        zero.interfaces.push(bad_port);
        assert!(refused(&zero).contains("not a port number"));
        let mut multicast = DomainSpec::new("vm", 64, 1);
        let mut group = InterfaceSpec::new(InterfaceKind::User);
        group.mac = Some("01:00:5e:00:00:01".into());
        multicast.interfaces.push(group);
        assert!(refused(&multicast).contains("not a unicast"));
        let mut bridged = DomainSpec::new("vm", 64, 1);
        let mut bridge = InterfaceSpec::new(InterfaceKind::Bridge);
        bridge.bridge = Some("br0".into());
        bridged.interfaces.push(bridge);
        // qemu:///session cannot create taps: unsupported, saying where it works.
        let error = interfaces(&bridged, false).err();
        assert_eq!(error.as_ref().map(|e| e.kind), Some(capvirt_plugin_api::ErrorKind::Unsupported));
        assert!(error.is_some_and(|e| e.message.contains("needs qemu:///system")));
        let nics = interfaces(&bridged, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(nics[0].bridge.as_deref(), Some("br0"));
        assert_eq!(Machine { interfaces: nics, ..machine() }.to_spec().interfaces[0].bridge.as_deref(), Some("br0"));
        let mut unnamed = DomainSpec::new("vm", 64, 1);
        unnamed.interfaces.push(InterfaceSpec::new(InterfaceKind::Bridge));
        assert!(refused(&unnamed).contains("needs `bridge`"));
        let mut forwarded = bridged.clone();
        forwarded.interfaces[0].forwards.push(PortForward::new(PortProtocol::Tcp, 8080, 80));
        assert!(refused(&forwarded).contains("`forwards` apply to kind \"user\" only"));
        for bad in ["br0 x", "a-very-long-bridge-name", "-br", "br/0", ""] {
            let mut spec = bridged.clone();
            spec.interfaces[0].bridge = Some(bad.into());
            assert!(refused(&spec).contains("not a Linux interface name"), "{bad:?}: {}", refused(&spec));
        }
    }

    #[test]
    fn saved_hot_plug_records_are_checked() {
        let mut live = Live::new(machine(), "tcg");
        let plugged =
            Interface { mac: "52:54:00:00:00:09".into(), forwards: Vec::new(), bridge: None, id: Some("hot0".into()) };
        live.machine.interfaces.push(plugged);
        assert!(live.check_nic_ports().is_err_and(|e| e.contains("no hot-plug port")));
        live.nic_ports.insert("hot0".into(), HOTPLUG_PORTS);
        assert!(live.check_nic_ports().is_err_and(|e| e.contains("invalid hot-plug port")));
        live.nic_ports.insert("hot0".into(), 0);
        assert_eq!(live.check_nic_ports(), Ok(()));
        live.nic_ports.insert("ghost".into(), 1);
        assert!(live.check_nic_ports().is_err_and(|e| e.contains("unknown interfaces")));
        // A save file's interfaces lose their ids in `to_spec`; `keep_nic_ids` puts them back.
        let mut validated = live.machine.clone();
        validated.interfaces[0].id = None;
        keep_nic_ids(&mut validated, &live.machine);
        assert_eq!(validated, live.machine);
    }

    #[test]
    fn names_never_become_paths() {
        for bad in ["../x", "a/b", ".x", "a..b", ""] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn machine() -> Machine {
        Machine::bare("vm", 64)
    }

    #[test]
    fn machine_round_trips_through_toml() {
        let machine = Machine {
            name: "vm".into(),
            memory_mib: 64,
            vcpus: 1,
            disks: vec![Disk {
                path: "/img/a.qcow2".into(),
                format: Format::Qcow2,
                bus: Bus::Virtio,
                target: "vda".into(),
                readonly: false,
            }],
            devices: vec![Device { kind: Kind::UsbTablet, id: "tab".into(), path: None, format: None }],
            graphics: Some(Adapter::Vga),
            boot: Some(KernelBoot {
                kernel: "/boot/vmlinuz".into(),
                initrd: None,
                cmdline: Some("console=ttyS0 quiet".into()),
            }),
            interfaces: vec![
                Interface {
                    mac: "52:54:00:12:34:56".into(),
                    forwards: vec![Forward { protocol: Protocol::Tcp, host_port: 8080, guest_port: 80 }],
                    bridge: None,
                    id: None,
                },
                Interface {
                    mac: "52:54:00:12:34:57".into(),
                    forwards: Vec::new(),
                    bridge: Some("br0".into()),
                    id: Some("hot0".into()),
                },
            ],
        };
        let text = toml::to_string(&machine).unwrap_or_else(|e| panic!("{e}"));
        let back: Machine = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, machine);
    }
}
