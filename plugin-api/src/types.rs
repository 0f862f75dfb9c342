//! Typed Rust mirrors of the registry's shared value types (`proposals/types.toml`), so that
//! drivers read a domain spec and build results without hand-walking records.
//!
//! They are SDK conveniences, not part of the ABI: values cross the boundary as [`Value`].
//! The registry stays the owner of the shapes; a host test checks that these mirrors match it.
//! Structs are `#[non_exhaustive]` because registry minors may add optional fields.

use abi_stable::std_types::RVec;

use crate::{Field, PluginError, Text, Value};

/// Lifecycle state of a domain (registry type `DomainState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DomainState {
    Running,
    Blocked,
    Paused,
    InShutdown,
    ShutOff,
    Crashed,
    PmSuspended,
}

impl DomainState {
    pub const ALL: [DomainState; 7] = [
        DomainState::Running,
        DomainState::Blocked,
        DomainState::Paused,
        DomainState::InShutdown,
        DomainState::ShutOff,
        DomainState::Crashed,
        DomainState::PmSuspended,
    ];

    /// The virsh word for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Blocked => "blocked",
            DomainState::Paused => "paused",
            DomainState::InShutdown => "in shutdown",
            DomainState::ShutOff => "shut off",
            DomainState::Crashed => "crashed",
            DomainState::PmSuspended => "pmsuspended",
        }
    }

    pub fn parse(s: &str) -> Option<DomainState> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// Whether the domain has a running hypervisor instance (not shut off or crashed).
    pub fn is_active(self) -> bool {
        !matches!(self, DomainState::ShutOff | DomainState::Crashed)
    }
}

/// Image format of a disk (registry type `DiskFormat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub const ALL: [DiskFormat; 2] = [DiskFormat::Raw, DiskFormat::Qcow2];
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Guest bus of a disk (registry type `DiskBus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskBus {
    Virtio,
    Sata,
    Usb,
}

impl DiskBus {
    pub const ALL: [DiskBus; 3] = [DiskBus::Virtio, DiskBus::Sata, DiskBus::Usb];
    pub fn as_str(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Sata => "sata",
            DiskBus::Usb => "usb",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
    /// Conventional guest device name prefix (`vd`, `sd`).
    pub fn target_prefix(self) -> &'static str {
        match self {
            DiskBus::Virtio => "vd",
            DiskBus::Sata | DiskBus::Usb => "sd",
        }
    }
}

/// Hot-pluggable device model (registry type `DeviceKind`), the USB models. The registry's
/// fourth word, `nic` ([`NicDevice::KIND`]), is no variant here: this enum is exhaustive since
/// 1.0 and drivers match on it, so network interfaces come through [`AnyDevice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    UsbTablet,
    UsbKeyboard,
    UsbDisk,
}

impl DeviceKind {
    pub const ALL: [DeviceKind; 3] = [DeviceKind::UsbTablet, DeviceKind::UsbKeyboard, DeviceKind::UsbDisk];
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::UsbTablet => "usb-tablet",
            DeviceKind::UsbKeyboard => "usb-keyboard",
            DeviceKind::UsbDisk => "usb-disk",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Display adapter model (registry type `GraphicsAdapter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GraphicsAdapter {
    Vga,
    Virtio,
}

impl GraphicsAdapter {
    pub const ALL: [GraphicsAdapter; 2] = [GraphicsAdapter::Vga, GraphicsAdapter::Virtio];
    pub fn as_str(self) -> &'static str {
        match self {
            GraphicsAdapter::Vga => "vga",
            GraphicsAdapter::Virtio => "virtio",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// A disk (registry type `DiskSpec`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiskSpec {
    pub path: String,
    pub format: DiskFormat,
    pub bus: DiskBus,
    pub target: Option<String>,
    pub readonly: bool,
}

impl DiskSpec {
    pub fn new(path: impl Into<String>, format: DiskFormat, bus: DiskBus) -> Self {
        DiskSpec { path: path.into(), format, bus, target: None, readonly: false }
    }
}

/// A device (registry type `DeviceSpec`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceSpec {
    pub kind: DeviceKind,
    pub id: String,
    pub path: Option<String>,
    pub format: Option<DiskFormat>,
}

impl DeviceSpec {
    pub fn new(kind: DeviceKind, id: impl Into<String>) -> Self {
        DeviceSpec { kind, id: id.into(), path: None, format: None }
    }
}

/// A network interface hot-plugged into or unplugged from a running domain (a registry
/// `DeviceSpec` of kind `nic`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NicDevice {
    pub id: String,
    /// The interface to plug (`attach-device`: required); a detach names the device by `id` only.
    pub interface: Option<InterfaceSpec>,
}

impl NicDevice {
    /// The registry's `DeviceKind` word of a network interface.
    pub const KIND: &'static str = "nic";

    pub fn new(id: impl Into<String>, interface: Option<InterfaceSpec>) -> Self {
        NicDevice { id: id.into(), interface }
    }

    /// The interface to plug, or an invalid-argument error saying it is missing.
    pub fn require_interface(&self) -> Result<&InterfaceSpec, PluginError> {
        self.interface.as_ref().ok_or_else(|| {
            PluginError::invalid_argument(format!("device `{}`: kind \"nic\" needs `interface`", self.id))
        })
    }

    pub fn to_value(&self) -> Value {
        let mut v = Value::record([("kind", Value::from(Self::KIND)), ("id", Value::from(self.id.clone()))]);
        if let Some(interface) = &self.interface {
            v.set("interface", interface.to_value());
        }
        v
    }
}

/// Any registry `DeviceSpec`: a USB device or a network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AnyDevice {
    Usb(DeviceSpec),
    Nic(NicDevice),
}

impl AnyDevice {
    pub fn from_value(v: &Value) -> Result<Self, PluginError> {
        if str_field(v, "device", "kind")? != NicDevice::KIND {
            return DeviceSpec::from_value(v).map(AnyDevice::Usb);
        }
        let id = str_field(v, "device", "id")?.to_string();
        if v.get("path").is_some() || v.get("format").is_some() {
            return Err(PluginError::invalid_argument(format!("device `{id}`: nic takes no `path` or `format`")));
        }
        let interface = v.get("interface").map(InterfaceSpec::from_value).transpose()?;
        Ok(AnyDevice::Nic(NicDevice { id, interface }))
    }

    /// The device id, whatever the kind.
    pub fn id(&self) -> &str {
        match self {
            AnyDevice::Usb(device) => &device.id,
            AnyDevice::Nic(nic) => &nic.id,
        }
    }

    /// The registry's kind word.
    pub fn kind_str(&self) -> &'static str {
        match self {
            AnyDevice::Usb(device) => device.kind.as_str(),
            AnyDevice::Nic(_) => NicDevice::KIND,
        }
    }

    pub fn to_value(&self) -> Value {
        match self {
            AnyDevice::Usb(device) => device.to_value(),
            AnyDevice::Nic(nic) => nic.to_value(),
        }
    }
}

/// A display adapter (registry type `GraphicsSpec`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GraphicsSpec {
    pub adapter: GraphicsAdapter,
}

impl GraphicsSpec {
    pub fn new(adapter: GraphicsAdapter) -> Self {
        GraphicsSpec { adapter }
    }
}

/// How a domain boots (registry type `BootSpec`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BootSpec {
    /// Containers: the first process and its arguments (empty: not given).
    pub init: Vec<String>,
    /// Virtual machines: direct kernel boot.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
}

impl BootSpec {
    /// A container's boot: run `init` (program and arguments).
    pub fn init<S: Into<String>>(init: impl IntoIterator<Item = S>) -> Self {
        BootSpec { init: init.into_iter().map(Into::into).collect(), ..BootSpec::default() }
    }

    pub fn from_value(v: &Value) -> Result<Self, PluginError> {
        let init = list_field(v, "init")
            .iter()
            .map(|a| {
                a.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| PluginError::invalid_argument("boot: `init` must be a list of strings"))
            })
            .collect::<Result<_, _>>()?;
        Ok(BootSpec {
            init,
            kernel: opt_str_field(v, "boot", "kernel")?.map(str::to_string),
            initrd: opt_str_field(v, "boot", "initrd")?.map(str::to_string),
            cmdline: opt_str_field(v, "boot", "cmdline")?.map(str::to_string),
        })
    }

    pub fn to_value(&self) -> Value {
        let mut v = Value::record_empty();
        if !self.init.is_empty() {
            v.set("init", Value::list(self.init.iter().cloned().map(Value::from)));
        }
        for (name, field) in [("kernel", &self.kernel), ("initrd", &self.initrd), ("cmdline", &self.cmdline)] {
            if let Some(text) = field {
                v.set(name, text.clone());
            }
        }
        v
    }
}

/// How a network interface is connected (registry type `InterfaceKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InterfaceKind {
    User,
    Bridge,
}

impl InterfaceKind {
    pub const ALL: [InterfaceKind; 2] = [InterfaceKind::User, InterfaceKind::Bridge];
    pub fn as_str(self) -> &'static str {
        match self {
            InterfaceKind::User => "user",
            InterfaceKind::Bridge => "bridge",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Network adapter model (registry type `InterfaceModel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum InterfaceModel {
    #[default]
    Virtio,
}

impl InterfaceModel {
    pub const ALL: [InterfaceModel; 1] = [InterfaceModel::Virtio];
    pub fn as_str(self) -> &'static str {
        match self {
            InterfaceModel::Virtio => "virtio",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Transport protocol of a port forward (registry type `PortProtocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PortProtocol {
    #[default]
    Tcp,
    Udp,
}

impl PortProtocol {
    pub const ALL: [PortProtocol; 2] = [PortProtocol::Tcp, PortProtocol::Udp];
    pub fn as_str(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// A host port forwarded to a guest port (registry type `PortForward`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PortForward {
    pub protocol: PortProtocol,
    pub host_port: u64,
    pub guest_port: u64,
}

impl PortForward {
    pub fn new(protocol: PortProtocol, host_port: u64, guest_port: u64) -> Self {
        PortForward { protocol, host_port, guest_port }
    }

    pub fn from_value(v: &Value) -> Result<Self, PluginError> {
        Ok(PortForward {
            protocol: match opt_str_field(v, "forward", "protocol")? {
                None => PortProtocol::Tcp,
                Some(s) => PortProtocol::parse(s)
                    .ok_or_else(|| PluginError::invalid_argument(format!("forward: unknown `protocol` {s:?}")))?,
            },
            host_port: u64_field(v, "forward", "host_port")?,
            guest_port: u64_field(v, "forward", "guest_port")?,
        })
    }

    pub fn to_value(&self) -> Value {
        Value::record([
            ("protocol", Value::from(self.protocol.as_str())),
            ("host_port", Value::UInt(self.host_port)),
            ("guest_port", Value::UInt(self.guest_port)),
        ])
    }
}

/// A network interface (registry type `InterfaceSpec`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InterfaceSpec {
    pub kind: InterfaceKind,
    pub model: InterfaceModel,
    /// Absent: the driver generates one at define ([`random_mac`]) and keeps it.
    pub mac: Option<String>,
    pub bridge: Option<String>,
    pub forwards: Vec<PortForward>,
}

impl InterfaceSpec {
    pub fn new(kind: InterfaceKind) -> Self {
        InterfaceSpec { kind, model: InterfaceModel::Virtio, mac: None, bridge: None, forwards: Vec::new() }
    }

    pub fn from_value(v: &Value) -> Result<Self, PluginError> {
        Ok(InterfaceSpec {
            kind: enum_field(v, "interface", "kind", InterfaceKind::parse)?,
            model: match opt_str_field(v, "interface", "model")? {
                None => InterfaceModel::Virtio,
                Some(s) => InterfaceModel::parse(s)
                    .ok_or_else(|| PluginError::invalid_argument(format!("interface: unknown `model` {s:?}")))?,
            },
            mac: opt_str_field(v, "interface", "mac")?.map(str::to_string),
            bridge: opt_str_field(v, "interface", "bridge")?.map(str::to_string),
            forwards: list_field(v, "forwards").iter().map(PortForward::from_value).collect::<Result<_, _>>()?,
        })
    }

    pub fn to_value(&self) -> Value {
        let mut v =
            Value::record([("kind", Value::from(self.kind.as_str())), ("model", Value::from(self.model.as_str()))]);
        if let Some(mac) = &self.mac {
            v.set("mac", mac.clone());
        }
        if let Some(bridge) = &self.bridge {
            v.set("bridge", bridge.clone());
        }
        v.set("forwards", Value::list(self.forwards.iter().map(PortForward::to_value)));
        v
    }
}

/// Parses a unicast Ethernet address (`52:54:00:12:34:56`, either case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut out {
        let part = parts.next().filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))?;
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    // Six pairs exactly, and not a multicast (group) address.
    (parts.next().is_none() && out[0] & 1 == 0).then_some(out)
}

/// Formats an Ethernet address in the registry's `MacAddress` form (lowercase).
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A fresh address in the `52:54:00` range virtual machines conventionally use, random in
/// its last three bytes (std's randomly keyed SipHash over the time, the process and `seed`).
pub fn random_mac(seed: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write(seed.as_bytes());
    hasher.write_u32(std::process::id());
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    let [a, b, c, ..] = hasher.finish().to_le_bytes();
    format_mac([0x52, 0x54, 0x00, a, b, c])
}

/// A host directory shared into a domain (registry type `FilesystemSpec`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FilesystemSpec {
    pub source: String,
    pub target: String,
    pub readonly: bool,
}

impl FilesystemSpec {
    /// A read-only share (the registry's default).
    pub fn new(source: impl Into<String>, target: impl Into<String>) -> Self {
        FilesystemSpec { source: source.into(), target: target.into(), readonly: true }
    }

    pub fn from_value(v: &Value) -> Result<Self, PluginError> {
        Ok(FilesystemSpec {
            source: str_field(v, "filesystem", "source")?.to_string(),
            target: str_field(v, "filesystem", "target")?.to_string(),
            readonly: v.get("readonly").and_then(Value::as_bool).unwrap_or(true),
        })
    }

    pub fn to_value(&self) -> Value {
        Value::record([
            ("source", Value::from(self.source.clone())),
            ("target", Value::from(self.target.clone())),
            ("readonly", Value::Bool(self.readonly)),
        ])
    }
}

/// The hypervisor-agnostic domain definition (registry type `DomainSpec`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DomainSpec {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u64,
    pub disks: Vec<DiskSpec>,
    pub devices: Vec<DeviceSpec>,
    pub graphics: Option<GraphicsSpec>,
    pub boot: Option<BootSpec>,
    pub filesystems: Vec<FilesystemSpec>,
    pub interfaces: Vec<InterfaceSpec>,
}

impl DomainSpec {
    pub fn new(name: impl Into<String>, memory_mib: u64, vcpus: u64) -> Self {
        DomainSpec {
            name: name.into(),
            memory_mib,
            vcpus,
            disks: Vec::new(),
            devices: Vec::new(),
            graphics: None,
            boot: None,
            filesystems: Vec::new(),
            interfaces: Vec::new(),
        }
    }

    /// Disk target names, explicit or assigned in order per bus prefix (`vda`, `vdb`, `sda`…).
    pub fn disk_targets(&self) -> Vec<String> {
        let mut taken: Vec<String> = self.disks.iter().filter_map(|d| d.target.clone()).collect();
        let mut out = Vec::with_capacity(self.disks.len());
        for disk in &self.disks {
            let target = match &disk.target {
                Some(t) => t.clone(),
                None => {
                    let prefix = disk.bus.target_prefix();
                    let name = (b'a'..=b'z')
                        .map(|c| format!("{prefix}{}", c as char))
                        .find(|candidate| !taken.contains(candidate))
                        .unwrap_or_else(|| format!("{prefix}{}", out.len()));
                    taken.push(name.clone());
                    name
                }
            };
            out.push(target);
        }
        out
    }
}

fn field<'a>(v: &'a Value, what: &str, name: &str) -> Result<&'a Value, PluginError> {
    v.get(name)
        .filter(|v| !v.is_unit())
        .ok_or_else(|| PluginError::invalid_argument(format!("{what}: missing `{name}`")))
}

fn str_field<'a>(v: &'a Value, what: &str, name: &str) -> Result<&'a str, PluginError> {
    field(v, what, name)?
        .as_str()
        .ok_or_else(|| PluginError::invalid_argument(format!("{what}: `{name}` must be a string")))
}

fn opt_str_field<'a>(v: &'a Value, what: &str, name: &str) -> Result<Option<&'a str>, PluginError> {
    match v.get(name).filter(|v| !v.is_unit()) {
        None => Ok(None),
        Some(x) => x
            .as_str()
            .map(Some)
            .ok_or_else(|| PluginError::invalid_argument(format!("{what}: `{name}` must be a string"))),
    }
}

fn u64_field(v: &Value, what: &str, name: &str) -> Result<u64, PluginError> {
    field(v, what, name)?
        .as_u64()
        .ok_or_else(|| PluginError::invalid_argument(format!("{what}: `{name}` must be an unsigned integer")))
}

fn enum_field<T>(v: &Value, what: &str, name: &str, parse: fn(&str) -> Option<T>) -> Result<T, PluginError> {
    let s = str_field(v, what, name)?;
    parse(s).ok_or_else(|| PluginError::invalid_argument(format!("{what}: unknown `{name}` {s:?}")))
}

fn list_field<'a>(v: &'a Value, name: &str) -> &'a [Value] {
    v.get(name).and_then(Value::as_list).unwrap_or(&[])
}

impl DiskSpec {
    pub fn from_value(v: &Value) -> Result<Self, PluginError> {
        Ok(DiskSpec {
            path: str_field(v, "disk", "path")?.to_string(),
            format: enum_field(v, "disk", "format", DiskFormat::parse)?,
            bus: enum_field(v, "disk", "bus", DiskBus::parse)?,
            target: opt_str_field(v, "disk", "target")?.map(str::to_string),
            readonly: v.get("readonly").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    pub fn to_value(&self) -> Value {
        let mut v = Value::record([
            ("path", Value::from(self.path.clone())),
            ("format", Value::from(self.format.as_str())),
            ("bus", Value::from(self.bus.as_str())),
        ]);
        if let Some(target) = &self.target {
            v.set("target", target.clone());
        }
        v.set("readonly", self.readonly);
        v
    }
}

/// A device of a domain spec's `devices`: network interfaces have their own list.
fn boot_device(v: &Value) -> Result<DeviceSpec, PluginError> {
    if opt_str_field(v, "device", "kind")? == Some(NicDevice::KIND) {
        return Err(PluginError::invalid_argument(format!(
            "devices: `{}` is a nic; a domain spec lists its network interfaces under [[interfaces]]",
            opt_str_field(v, "device", "id")?.unwrap_or_default()
        )));
    }
    DeviceSpec::from_value(v)
}

impl DeviceSpec {
    /// A USB device; a `nic` is refused as unsupported (drivers that hot-plug network
    /// interfaces read [`AnyDevice::from_value`]).
    pub fn from_value(v: &Value) -> Result<Self, PluginError> {
        if str_field(v, "device", "kind")? == NicDevice::KIND {
            return Err(PluginError::unsupported(format!(
                "device `{}`: kind \"nic\" (network interface hot-plug) is not supported by this driver",
                opt_str_field(v, "device", "id")?.unwrap_or_default()
            )));
        }
        if v.get("interface").is_some() {
            return Err(PluginError::invalid_argument(format!(
                "device `{}`: `interface` applies to kind \"nic\" only",
                opt_str_field(v, "device", "id")?.unwrap_or_default()
            )));
        }
        Ok(DeviceSpec {
            kind: enum_field(v, "device", "kind", DeviceKind::parse)?,
            id: str_field(v, "device", "id")?.to_string(),
            path: opt_str_field(v, "device", "path")?.map(str::to_string),
            format: match opt_str_field(v, "device", "format")? {
                None => None,
                Some(s) => Some(
                    DiskFormat::parse(s)
                        .ok_or_else(|| PluginError::invalid_argument(format!("device: unknown `format` {s:?}")))?,
                ),
            },
        })
    }

    pub fn to_value(&self) -> Value {
        let mut v = Value::record([("kind", Value::from(self.kind.as_str())), ("id", Value::from(self.id.clone()))]);
        if let Some(path) = &self.path {
            v.set("path", path.clone());
        }
        if let Some(format) = self.format {
            v.set("format", format.as_str());
        }
        v
    }

    /// The backing image of a `usb-disk`, required for that kind.
    pub fn disk_backing(&self) -> Result<Option<(&str, DiskFormat)>, PluginError> {
        match (self.kind, self.path.as_deref(), self.format) {
            (DeviceKind::UsbDisk, Some(path), Some(format)) => Ok(Some((path, format))),
            (DeviceKind::UsbDisk, _, _) => {
                Err(PluginError::invalid_argument(format!("device `{}`: usb-disk needs `path` and `format`", self.id)))
            }
            (_, None, None) => Ok(None),
            (kind, _, _) => Err(PluginError::invalid_argument(format!(
                "device `{}`: {} takes no `path` or `format`",
                self.id,
                kind.as_str()
            ))),
        }
    }
}

impl DomainSpec {
    pub fn from_value(v: &Value) -> Result<Self, PluginError> {
        let graphics = match v.get("graphics").filter(|g| !g.is_unit()) {
            None => None,
            Some(g) => Some(GraphicsSpec {
                adapter: match opt_str_field(g, "graphics", "adapter")? {
                    None => GraphicsAdapter::Vga,
                    Some(s) => GraphicsAdapter::parse(s)
                        .ok_or_else(|| PluginError::invalid_argument(format!("graphics: unknown adapter {s:?}")))?,
                },
            }),
        };
        Ok(DomainSpec {
            name: str_field(v, "domain spec", "name")?.to_string(),
            memory_mib: u64_field(v, "domain spec", "memory_mib")?,
            vcpus: u64_field(v, "domain spec", "vcpus")?,
            disks: list_field(v, "disks").iter().map(DiskSpec::from_value).collect::<Result<_, _>>()?,
            devices: list_field(v, "devices").iter().map(boot_device).collect::<Result<_, _>>()?,
            graphics,
            boot: v.get("boot").filter(|b| !b.is_unit()).map(BootSpec::from_value).transpose()?,
            filesystems: list_field(v, "filesystems")
                .iter()
                .map(FilesystemSpec::from_value)
                .collect::<Result<_, _>>()?,
            interfaces: list_field(v, "interfaces").iter().map(InterfaceSpec::from_value).collect::<Result<_, _>>()?,
        })
    }

    pub fn to_value(&self) -> Value {
        let mut v = Value::record([
            ("name", Value::from(self.name.clone())),
            ("memory_mib", Value::from(self.memory_mib)),
            ("vcpus", Value::from(self.vcpus)),
            ("disks", Value::list(self.disks.iter().map(DiskSpec::to_value))),
            ("devices", Value::list(self.devices.iter().map(DeviceSpec::to_value))),
        ]);
        if let Some(g) = &self.graphics {
            v.set("graphics", Value::record([("adapter", g.adapter.as_str())]));
        }
        if let Some(boot) = &self.boot {
            v.set("boot", boot.to_value());
        }
        v.set("filesystems", Value::list(self.filesystems.iter().map(FilesystemSpec::to_value)));
        v.set("interfaces", Value::list(self.interfaces.iter().map(InterfaceSpec::to_value)));
        v
    }
}

/// The longest domain name (registry type `DomainName`).
pub const MAX_DOMAIN_NAME_LEN: usize = 64;

/// Checks a domain name before a driver turns it into a file, directory or cgroup name. The
/// registry's `name` format checked it already; a driver does not rely on that for anything
/// that touches the file system. Plain identifiers only: ASCII letters, digits, `.`, `_`, `-`,
/// a letter or digit first, no `..`, at most [`MAX_DOMAIN_NAME_LEN`] bytes.
pub fn check_domain_name(name: &str) -> Result<(), PluginError> {
    let ok = name.len() <= MAX_DOMAIN_NAME_LEN
        && name.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(PluginError::invalid_argument(format!(
            "domain name {name:?} is not a plain identifier (letters, digits, '.', '_', '-'; at most {MAX_DOMAIN_NAME_LEN})"
        )))
    }
}

/// Result of `domain.info` (registry type `DomainInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DomainInfo {
    pub name: String,
    pub state: DomainState,
    pub vcpus: u64,
    pub memory_kib: u64,
    pub max_memory_kib: u64,
    pub cpu_time_ns: u64,
    pub persistent: bool,
    /// The version of the hypervisor running the domain, when it runs and the driver knows
    /// (`Text`: a `&'static str` version is borrowed, not copied).
    pub hypervisor_version: Option<Text>,
    /// Network interfaces (registry `InterfaceInfo`), in guest order; empty: left out.
    pub interfaces: Vec<InterfaceInfo>,
}

/// A network interface as a domain has it (registry type `InterfaceInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InterfaceInfo {
    pub id: String,
    pub kind: InterfaceKind,
    pub mac: String,
    pub bridge: Option<String>,
    /// The host-side device (a tap) while the domain runs.
    pub host_device: Option<String>,
}

impl InterfaceInfo {
    pub fn new(id: impl Into<String>, kind: InterfaceKind, mac: impl Into<String>) -> Self {
        InterfaceInfo { id: id.into(), kind, mac: mac.into(), bridge: None, host_device: None }
    }

    pub fn to_value(&self) -> Value {
        let mut v = Value::record([
            ("id", Value::from(self.id.clone())),
            ("kind", Value::from(self.kind.as_str())),
            ("mac", Value::from(self.mac.clone())),
        ]);
        if let Some(bridge) = &self.bridge {
            v.set("bridge", bridge.clone());
        }
        if let Some(device) = &self.host_device {
            v.set("host_device", device.clone());
        }
        v
    }
}

impl DomainInfo {
    pub fn new(name: impl Into<String>, state: DomainState) -> Self {
        DomainInfo {
            name: name.into(),
            state,
            vcpus: 0,
            memory_kib: 0,
            max_memory_kib: 0,
            cpu_time_ns: 0,
            persistent: true,
            hypervisor_version: None,
            interfaces: Vec::new(),
        }
    }

    pub fn into_value(mut self) -> Value {
        let name = Text::from(std::mem::take(&mut self.name));
        self.into_value_named(name)
    }

    /// [`DomainInfo::into_value`] with `name` as the record's name instead of `self.name`: a
    /// driver answering `domain.info` passes the argument's text ([`crate::Args::text`]), which
    /// is the domain's name, so a borrowed name is not copied.
    pub fn into_value_named(self, name: Text) -> Value {
        // Sized once: `domain.info` is the hottest call there is.
        let mut fields = RVec::with_capacity(9);
        fields.push(Field::new("name", Value::Str(name)));
        fields.push(Field::new("state", self.state.as_str()));
        fields.push(Field::new("vcpus", Value::UInt(self.vcpus)));
        fields.push(Field::new("memory_kib", Value::UInt(self.memory_kib)));
        fields.push(Field::new("max_memory_kib", Value::UInt(self.max_memory_kib)));
        fields.push(Field::new("cpu_time_ns", Value::UInt(self.cpu_time_ns)));
        fields.push(Field::new("persistent", Value::Bool(self.persistent)));
        if let Some(version) = self.hypervisor_version {
            fields.push(Field::new("hypervisor_version", Value::Str(version)));
        }
        if !self.interfaces.is_empty() {
            fields.push(Field::new("interfaces", Value::list(self.interfaces.iter().map(InterfaceInfo::to_value))));
        }
        Value::Record(fields)
    }
}

/// One entry of `domain.list` (registry type `DomainSummary`).
pub fn domain_summary(name: impl Into<String>, state: DomainState) -> Value {
    Value::record([("name", Value::from(name.into())), ("state", Value::from(state.as_str()))])
}

/// Result of `domain.block-stats` (registry type `BlockStats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlockStats {
    pub rd_req: u64,
    pub rd_bytes: u64,
    pub wr_req: u64,
    pub wr_bytes: u64,
    pub errs: u64,
}

impl BlockStats {
    pub fn new(rd_req: u64, rd_bytes: u64, wr_req: u64, wr_bytes: u64, errs: u64) -> Self {
        BlockStats { rd_req, rd_bytes, wr_req, wr_bytes, errs }
    }

    /// Field-wise sum (for "all disks").
    pub fn plus(self, other: BlockStats) -> BlockStats {
        BlockStats {
            rd_req: self.rd_req.saturating_add(other.rd_req),
            rd_bytes: self.rd_bytes.saturating_add(other.rd_bytes),
            wr_req: self.wr_req.saturating_add(other.wr_req),
            wr_bytes: self.wr_bytes.saturating_add(other.wr_bytes),
            errs: self.errs.saturating_add(other.errs),
        }
    }

    pub fn into_value(self) -> Value {
        Value::record([
            ("rd_req", Value::UInt(self.rd_req)),
            ("rd_bytes", Value::UInt(self.rd_bytes)),
            ("wr_req", Value::UInt(self.wr_req)),
            ("wr_bytes", Value::UInt(self.wr_bytes)),
            ("errs", Value::UInt(self.errs)),
        ])
    }
}

/// Result of `host.info` (registry type `HostInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostInfo {
    pub uri: String,
    pub hostname: String,
    pub hypervisor: String,
    pub hypervisor_version: String,
    pub cpus: u64,
    pub memory_kib: u64,
}

impl HostInfo {
    pub fn new(uri: impl Into<String>, hypervisor: impl Into<String>, hypervisor_version: impl Into<String>) -> Self {
        HostInfo {
            uri: uri.into(),
            hostname: String::new(),
            hypervisor: hypervisor.into(),
            hypervisor_version: hypervisor_version.into(),
            cpus: 0,
            memory_kib: 0,
        }
    }

    pub fn into_value(self) -> Value {
        Value::record([
            ("uri", Value::from(self.uri)),
            ("hostname", Value::from(self.hostname)),
            ("hypervisor", Value::from(self.hypervisor)),
            ("hypervisor_version", Value::from(self.hypervisor_version)),
            ("cpus", Value::UInt(self.cpus)),
            ("memory_kib", Value::UInt(self.memory_kib)),
        ])
    }
}

/// Result of `domain.screenshot` (registry type `Image`), PNG-encoded.
pub fn png_image(width: u64, height: u64, png: Vec<u8>) -> Value {
    Value::record([
        ("format", Value::from("png")),
        ("width", Value::UInt(width)),
        ("height", Value::UInt(height)),
        ("data", Value::from(png)),
    ])
}

/// Result of `domain.console-read` (registry type `ConsoleOutput`): `data` read from the
/// console stream position `offset`; the next read continues at `offset + data.len()`.
pub fn console_output(offset: u64, data: Vec<u8>) -> Value {
    let next_offset = offset.saturating_add(data.len() as u64);
    Value::record([
        ("data", Value::from(data)),
        ("offset", Value::UInt(offset)),
        ("next_offset", Value::UInt(next_offset)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_value() {
        let mut spec = DomainSpec::new("vm1", 512, 2);
        spec.disks.push(DiskSpec::new("/img/a.qcow2", DiskFormat::Qcow2, DiskBus::Virtio));
        spec.disks.push(DiskSpec::new("/img/b.raw", DiskFormat::Raw, DiskBus::Sata));
        spec.devices.push(DeviceSpec::new(DeviceKind::UsbTablet, "tablet0"));
        spec.graphics = Some(GraphicsSpec::new(GraphicsAdapter::Vga));
        let mut nic = InterfaceSpec::new(InterfaceKind::User);
        nic.forwards.push(PortForward::new(PortProtocol::Tcp, 8080, 80));
        spec.interfaces.push(nic);
        let back = DomainSpec::from_value(&spec.to_value()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, spec);
        assert_eq!(spec.disk_targets(), vec!["vda".to_string(), "sda".to_string()]);
    }

    #[test]
    fn domain_names_never_become_paths() {
        for bad in ["", "../x", "a/b", ".x", "-x", "a..b", "a b", "a\0b", &"a".repeat(65)] {
            assert!(check_domain_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["vm1", "web-1.prod_a", &"a".repeat(64)] {
            assert!(check_domain_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn mac_addresses_parse_format_and_generate_unicast() {
        assert_eq!(parse_mac("52:54:00:AB:cd:01"), Some([0x52, 0x54, 0x00, 0xab, 0xcd, 0x01]));
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "01:00:5e:00:00:01",
            "52-54-00-ab-cd-01",
            "5:54:00:ab:cd:011",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?} accepted");
        }
        let mac = random_mac("vm1");
        assert!(mac.starts_with("52:54:00:"), "{mac}");
        assert_eq!(parse_mac(&mac).map(format_mac), Some(mac));
    }

    #[test]
    fn usb_disk_needs_backing() {
        let dev = DeviceSpec::new(DeviceKind::UsbDisk, "stick");
        assert!(dev.disk_backing().is_err());
        let tablet = DeviceSpec { path: Some("/x".into()), ..DeviceSpec::new(DeviceKind::UsbTablet, "t") };
        assert!(tablet.disk_backing().is_err());
    }
    #[test]
    fn nics_come_through_any_device_and_old_readers_answer_unsupported() {
        let mut interface = InterfaceSpec::new(InterfaceKind::User);
        interface.forwards.push(PortForward::new(PortProtocol::Tcp, 8080, 80));
        let nic = NicDevice::new("hot0", Some(interface));
        let value = nic.to_value();
        assert_eq!(AnyDevice::from_value(&value).ok(), Some(AnyDevice::Nic(nic.clone())));
        assert_eq!(DeviceSpec::from_value(&value).err().map(|e| e.kind), Some(crate::ErrorKind::Unsupported));
        let tablet = DeviceSpec::new(DeviceKind::UsbTablet, "t");
        assert_eq!(AnyDevice::from_value(&tablet.to_value()).ok(), Some(AnyDevice::Usb(tablet.clone())));
        let mut odd = tablet.to_value();
        odd.set("interface", InterfaceSpec::new(InterfaceKind::User).to_value());
        assert!(AnyDevice::from_value(&odd).is_err());
        assert!(NicDevice::new("bare", None).require_interface().is_err());
        let mut spec = DomainSpec::new("vm", 64, 1).to_value();
        spec.set("devices", Value::list([value]));
        let refused = DomainSpec::from_value(&spec).err().map(|e| e.message.to_string()).unwrap_or_default();
        assert!(refused.contains("[[interfaces]]"), "{refused}");
    }
}
