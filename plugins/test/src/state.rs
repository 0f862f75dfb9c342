//! The in-memory hypervisor state behind each test URI.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::Path,
    sync::{Arc, Mutex, OnceLock},
};

use capvirt_plugin_api::{
    types::{
        BlockStats, DeviceSpec, DiskBus, DiskFormat, DiskSpec, DomainSpec, DomainState, GraphicsAdapter, GraphicsSpec,
        NicDevice,
    },
    PluginError, Value,
};
use serde::{Deserialize, Serialize};

/// One domain of the test hypervisor.
#[derive(Debug, Clone)]
pub struct Domain {
    pub spec: DomainSpec,
    pub state: DomainState,
    pub cpu_time_ns: u64,
    /// Devices present while active: the spec's, plus hot-plugged ones.
    pub live_devices: Vec<DeviceSpec>,
    /// Network interfaces hot-plugged while active (MAC filled in); the spec's stay in `spec`.
    pub live_nics: Vec<NicDevice>,
    /// What the guest printed on its serial console since it last started (kept once it stops).
    pub console: Vec<u8>,
}

impl Domain {
    pub fn new(spec: DomainSpec, state: DomainState) -> Domain {
        let live_devices = if state.is_active() { spec.devices.clone() } else { Vec::new() };
        let console = if state.is_active() { boot_console(&spec.name) } else { Vec::new() };
        Domain { spec, state, cpu_time_ns: 0, live_devices, live_nics: Vec::new(), console }
    }

    /// Deterministic counters per disk while the domain runs.
    pub fn disk_stats(&self, index: usize) -> BlockStats {
        let n = index as u64;
        BlockStats::new(120 + n, (120 + n) * 4096, 16 + n, (16 + n) * 4096, 0)
    }

    pub fn start(&mut self) {
        self.state = DomainState::Running;
        self.cpu_time_ns = 0;
        self.live_devices = self.spec.devices.clone();
        self.live_nics.clear();
        self.console = boot_console(&self.spec.name);
    }

    pub fn stop(&mut self) {
        self.state = DomainState::ShutOff;
        self.cpu_time_ns = 0;
        self.live_devices.clear();
        self.live_nics.clear();
    }
}

/// What the test guest prints on its console when it starts: a boot line and the marker the
/// QEMU test guest prints too.
pub fn boot_console(name: &str) -> Vec<u8> {
    format!("capvirt test guest '{name}' booting\r\nCAPVIRT-GUEST-READY\r\n").into_bytes()
}

/// All domains of one test URI.
#[derive(Debug, Default)]
pub struct State {
    pub domains: BTreeMap<String, Domain>,
    /// Snapshots by domain name, oldest first (`snapshot.rs`).
    pub snapshots: BTreeMap<String, Vec<crate::snapshot::Snapshot>>,
    /// The event streams (`domain.events` calls) currently watching this host.
    pub watchers: Vec<std::sync::mpsc::Sender<capvirt_plugin_api::events::DomainEvent>>,
}

impl State {
    /// libvirt-like default: one running domain `test`.
    pub fn default_host() -> State {
        let mut spec = DomainSpec::new("test", 2048, 2);
        let mut disk = DiskSpec::new("/var/lib/capvirt-test/test.img", DiskFormat::Raw, DiskBus::Virtio);
        disk.target = Some("vda".into());
        spec.disks.push(disk);
        spec.graphics = Some(GraphicsSpec::new(GraphicsAdapter::Vga));
        let mut state = State::default();
        state.domains.insert(spec.name.clone(), Domain::new(spec, DomainState::Running));
        state
    }

    pub fn domain(&self, name: &str) -> Result<&Domain, PluginError> {
        self.domains.get(name).ok_or_else(|| no_domain(name))
    }

    pub fn domain_mut(&mut self, name: &str) -> Result<&mut Domain, PluginError> {
        self.domains.get_mut(name).ok_or_else(|| no_domain(name))
    }
}

pub fn no_domain(name: &str) -> PluginError {
    PluginError::not_found(format!("no domain named '{name}'"))
}

/// `test:///PATH.toml` files, and the files written by `domain.save`.
///
/// ```toml
/// [[domains]]
/// state = "running"            # virsh word; default "shut off"
/// [domains.spec]               # the registry's DomainSpec
/// name = "web"
/// memory_mib = 1024
/// vcpus = 1
/// ```
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    #[serde(default)]
    pub domains: Vec<DomainEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainEntry {
    #[serde(default = "shut_off")]
    pub state: String,
    #[serde(default)]
    pub cpu_time_ns: u64,
    pub spec: toml::Value,
}

fn shut_off() -> String {
    DomainState::ShutOff.as_str().to_string()
}

impl DomainEntry {
    pub fn from_domain(domain: &Domain) -> DomainEntry {
        DomainEntry {
            state: domain.state.as_str().to_string(),
            cpu_time_ns: domain.cpu_time_ns,
            spec: domain.spec.to_value().to_toml(),
        }
    }

    pub fn into_domain(self, origin: &str) -> Result<Domain, PluginError> {
        let spec = DomainSpec::from_value(&Value::from_toml(&self.spec))
            .map_err(|e| PluginError::invalid_argument(format!("{origin}: {}", e.message)))?;
        let state = DomainState::parse(&self.state)
            .ok_or_else(|| PluginError::invalid_argument(format!("{origin}: unknown state {:?}", self.state)))?;
        let mut domain = Domain::new(spec, state);
        domain.cpu_time_ns = self.cpu_time_ns;
        Ok(domain)
    }
}

/// Loads a `test:///PATH.toml` state file.
pub fn load_state_file(path: &Path) -> Result<State, PluginError> {
    let text = fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            PluginError::not_found(format!("test state file {} does not exist", path.display()))
        }
        _ => PluginError::driver_failure(format!("cannot read {}: {e}", path.display())),
    })?;
    let file: StateFile = toml::from_str(&text)
        .map_err(|e| PluginError::invalid_argument(format!("{}: {}", path.display(), one_line(&e.to_string()))))?;
    let mut state = State::default();
    for entry in file.domains {
        let domain = entry.into_domain(&path.display().to_string())?;
        if state.domains.contains_key(&domain.spec.name) {
            return Err(PluginError::invalid_argument(format!(
                "{}: domain '{}' defined twice",
                path.display(),
                domain.spec.name
            )));
        }
        state.domains.insert(domain.spec.name.clone(), domain);
    }
    Ok(state)
}

pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Writes `contents` to `path` atomically: a temporary file in the same directory, fsync,
/// rename. Refuses to replace an existing file.
pub fn write_new_file_atomically(path: &Path, contents: &[u8]) -> Result<(), PluginError> {
    if path.exists() {
        return Err(PluginError::invalid_argument(format!("{} already exists", path.display())));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(PluginError::not_found(format!("directory {} does not exist", dir.display())));
    }
    capvirt_plugin_api::fs::write_atomic(path, contents)
        .map_err(|e| PluginError::driver_failure(format!("cannot write {}: {e}", path.display())))
}

type Hosts = Mutex<HashMap<String, Arc<Mutex<State>>>>;

/// The process-wide table of test hosts, by URI.
fn hosts() -> &'static Hosts {
    static HOSTS: OnceLock<Hosts> = OnceLock::new();
    HOSTS.get_or_init(Hosts::default)
}

/// The shared state for `uri`, created on first use.
pub fn state_for(uri: &str) -> Result<Arc<Mutex<State>>, PluginError> {
    let rest = uri
        .strip_prefix("test://")
        .ok_or_else(|| PluginError::invalid_argument(format!("{uri:?} is not a test:// URI")))?;
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let mut table = hosts().lock().map_err(|_| PluginError::internal("test host table poisoned"))?;
    if let Some(state) = table.get(rest) {
        return Ok(Arc::clone(state));
    }
    let state = if rest == "/default" {
        State::default_host()
    } else if rest.ends_with(".toml") && rest.starts_with('/') {
        load_state_file(Path::new(rest))?
    } else if let Some(name) = rest.strip_prefix('/').filter(|n| is_plain_name(n)) {
        let _ = name;
        State::default()
    } else {
        return Err(PluginError::invalid_argument(format!(
            "unsupported test URI {uri:?}: use test:///default, test:///NAME or test:///PATH.toml"
        )));
    };
    let state = Arc::new(Mutex::new(state));
    table.insert(rest.to_string(), Arc::clone(&state));
    Ok(state)
}

fn is_plain_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')) && s.len() <= 64
}
