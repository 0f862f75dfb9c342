//! Capability implementations of the test driver.

use std::{
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
};

use capvirt_plugin_api::{
    prelude::*,
    types::{
        console_output, domain_summary, format_mac, parse_mac, random_mac, AnyDevice, BlockStats, DeviceSpec,
        DomainInfo, DomainSpec, DomainState, HostInfo, InterfaceInfo, InterfaceKind, NicDevice,
    },
    Text,
};

use crate::{
    events, screenshot, snapshot,
    state::{self, one_line, Domain, DomainEntry, State, StateFile},
};

/// The registry version this driver was written against.
const REGISTRY_VERSION: &str = "1.1.0";

/// Every capability the test driver implements (all accepted ones, contract version 1).
const CAPABILITIES: &[&str] = &[
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
    "domain.attach-device",
    "domain.detach-device",
    "domain.migrate",
    "domain.save",
    "domain.restore",
    "domain.screenshot",
    "domain.console-read",
    "domain.snapshot-create",
    "domain.snapshot-list",
    "domain.snapshot-revert",
    "domain.snapshot-delete",
    "domain.events",
    "domain.console-write",
];

/// CPU time the test guest "consumes" between two observations while running.
const CPU_TIME_STEP_NS: u64 = 10_000_000;

/// A connection to one test host.
pub struct TestDriver {
    uri: String,
    state: Arc<Mutex<State>>,
}

impl TestDriver {
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, State>, PluginError> {
        self.state.lock().map_err(|_| PluginError::internal("test driver state poisoned by an earlier panic"))
    }
}

impl Plugin for TestDriver {
    fn manifest() -> Manifest {
        Manifest::new("test", "capvirt", env!("CARGO_PKG_VERSION"), REGISTRY_VERSION)
            .scheme("test")
            .description("In-memory test hypervisor with deterministic state (test:///default).")
            .capabilities(CAPABILITIES.iter().copied())
    }

    fn connect(uri: &str, _options: &Value) -> Result<Self, PluginError> {
        Ok(TestDriver { uri: uri.to_string(), state: state::state_for(uri)? })
    }

    fn invoke(&self, capability: &str, args: &Args<'_>, ctx: &Context<'_>) -> Result<Value, PluginError> {
        // The hottest call first, before the lifecycle bookkeeping it never needs.
        if is_domain_info(capability) {
            return self.info(args.text("domain")?);
        }
        // Lifecycle changes publish their events in the order they are applied.
        let publishing = events::mutates_lifecycle(capability).then(events::order);
        let before = match &publishing {
            Some(_) => self.lock().ok().and_then(|state| events::before(&state, capability, args)),
            None => None,
        };
        let result = match capability {
            "domain.list" => self.list(args.bool_or("all", false)?),
            "domain.suspend" => self.transition(args.str("domain")?, &[DomainState::Running], "not running", |d| {
                d.state = DomainState::Paused
            }),
            "domain.resume" => self.transition(args.str("domain")?, &[DomainState::Paused], "not paused", |d| {
                d.state = DomainState::Running
            }),
            "domain.start" => self.transition(
                args.str("domain")?,
                &[DomainState::ShutOff, DomainState::Crashed],
                "already active",
                Domain::start,
            ),
            "domain.destroy" => self.transition(
                args.str("domain")?,
                &[DomainState::Running, DomainState::Paused, DomainState::Blocked],
                "not running",
                Domain::stop,
            ),
            // The test guest always obeys a shutdown request at once.
            "domain.shutdown" => {
                self.transition(args.str("domain")?, &[DomainState::Running], "not running", Domain::stop)
            }
            "domain.reboot" => {
                self.transition(args.str("domain")?, &[DomainState::Running], "not running", |d| d.cpu_time_ns = 0)
            }
            "domain.define" => self.define(args.get("spec")?),
            "domain.undefine" => self.undefine(args.str("domain")?),
            "domain.block-stats" => self.block_stats(args.str("domain")?, args.opt_str("device")?),
            "domain.attach-device" => match AnyDevice::from_value(args.get("device")?)? {
                AnyDevice::Nic(nic) => self.attach_nic(args.str("domain")?, nic),
                AnyDevice::Usb(device) => self.attach(args.str("domain")?, device),
                other => Err(unknown_device(&other)),
            },
            "domain.detach-device" => match AnyDevice::from_value(args.get("device")?)? {
                AnyDevice::Nic(nic) => self.detach_nic(args.str("domain")?, &nic.id),
                AnyDevice::Usb(device) => self.detach(args.str("domain")?, device),
                other => Err(unknown_device(&other)),
            },
            "domain.migrate" => self.migrate(args.str("domain")?, args.str("dest_uri")?, ctx),
            "domain.save" => self.save(args.str("domain")?, Path::new(args.str("path")?)),
            "domain.restore" => self.restore(Path::new(args.str("path")?)),
            "domain.screenshot" => self.screenshot(args.str("domain")?),
            "domain.console-read" => {
                self.console_read(args.str("domain")?, args.u64("offset")?, args.u64("max_bytes")?)
            }
            "domain.snapshot-create" => snapshot::create(
                &mut *self.lock()?,
                args.str("domain")?,
                args.str("name")?,
                args.opt_str("description")?,
            ),
            "domain.snapshot-list" => snapshot::list(&*self.lock()?, args.str("domain")?),
            "domain.snapshot-revert" => snapshot::revert(&mut *self.lock()?, args.str("domain")?, args.str("name")?),
            "domain.snapshot-delete" => snapshot::delete(&mut *self.lock()?, args.str("domain")?, args.str("name")?),
            "host.info" => Ok(self.host_info()),
            "domain.events" => self.events(args, ctx),
            "domain.console-write" => self.console_write(args.str("domain")?, args.str("text")?),
            other => Err(PluginError::unsupported(format!("the test driver does not implement `{other}`"))),
        };
        if let (Some(_order), Ok(value)) = (&publishing, &result) {
            self.publish(capability, args, value, before);
        }
        result
    }
}

/// `capability == "domain.info"` as two fixed-size compares, without a call to `memcmp`.
#[inline(always)]
fn is_domain_info(capability: &str) -> bool {
    matches!(capability.as_bytes(), [a @ .., b, c, d] if a == b"domain.i" && [*b, *c, *d] == *b"nfo")
}

impl TestDriver {
    /// Publishes a successful lifecycle change to the watchers of this host (and, for a
    /// migration, of the destination host).
    /// The change has happened: a failure here loses events, never the call's result.
    fn publish(&self, capability: &str, args: &Args<'_>, result: &Value, before: Option<events::Before>) {
        if let Ok(mut state) = self.lock() {
            events::publish(&mut state, capability, args, result, before);
        }
        if let (Ok(dest_uri), Ok(name)) = (args.str("dest_uri"), args.str("domain")) {
            if let Ok(dest) = state::state_for(dest_uri) {
                if let Ok(mut dest) = dest.lock() {
                    events::publish_arrival(&mut dest, name);
                }
            }
        }
    }

    /// The in-memory console echoes a typed line like a terminal does.
    fn console_write(&self, name: &str, text: &str) -> Result<Value, PluginError> {
        if let Some(bad) = text.chars().find(|c| c.is_control() && *c != '\t') {
            return Err(PluginError::invalid_argument(format!(
                "console line contains control character U+{:04X}; only printable text and tabs can be typed",
                u32::from(bad)
            )));
        }
        let mut state = self.lock()?;
        let domain = state.domain_mut(name)?;
        if domain.state != DomainState::Running {
            return Err(PluginError::invalid_state(format!(
                "domain '{name}' is not running (state: {})",
                domain.state.as_str()
            )));
        }
        domain.console.extend_from_slice(text.as_bytes());
        domain.console.extend_from_slice(b"\r\n");
        Ok(Value::Unit)
    }

    fn console_read(&self, name: &str, offset: u64, max_bytes: u64) -> Result<Value, PluginError> {
        let state = self.lock()?;
        let console = &state.domain(name)?.console;
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(console.len());
        let end = start.saturating_add(usize::try_from(max_bytes).unwrap_or(usize::MAX)).min(console.len());
        Ok(console_output(start as u64, console[start..end].to_vec()))
    }

    /// `name` is the argument as given: the domain's name, reused in the result without a copy
    /// when the caller's text is borrowed.
    fn info(&self, name: &Text) -> Result<Value, PluginError> {
        let mut state = self.lock()?;
        let domain = state.domain_mut(name.as_str())?;
        if domain.state == DomainState::Running {
            domain.cpu_time_ns += CPU_TIME_STEP_NS;
        }
        let mut info = DomainInfo::new(String::new(), domain.state);
        info.vcpus = domain.spec.vcpus;
        info.memory_kib = domain.spec.memory_mib.saturating_mul(1024);
        info.max_memory_kib = domain.spec.memory_mib.saturating_mul(1024);
        info.cpu_time_ns = domain.cpu_time_ns;
        if domain.state.is_active() {
            info.hypervisor_version = Some(Text::from(env!("CARGO_PKG_VERSION")));
        }
        if !domain.spec.interfaces.is_empty() || !domain.live_nics.is_empty() {
            let defined = domain.spec.interfaces.iter().enumerate().map(|(i, nic)| (format!("net{i}"), nic));
            let plugged = domain.live_nics.iter().filter_map(|n| n.interface.as_ref().map(|nic| (n.id.clone(), nic)));
            info.interfaces = defined
                .chain(plugged)
                .filter_map(|(id, nic)| {
                    let mut entry = InterfaceInfo::new(id, nic.kind, nic.mac.clone()?);
                    entry.bridge = nic.bridge.clone();
                    Some(entry)
                })
                .collect();
        }
        Ok(info.into_value_named(name.clone()))
    }

    fn list(&self, all: bool) -> Result<Value, PluginError> {
        let state = self.lock()?;
        Ok(Value::list(
            state
                .domains
                .values()
                .filter(|d| all || d.state.is_active())
                .map(|d| domain_summary(d.spec.name.clone(), d.state)),
        ))
    }

    /// Applies `change` when the domain is in one of `from`, else reports `why_not`.
    fn transition(
        &self,
        name: &str,
        from: &[DomainState],
        why_not: &str,
        change: impl FnOnce(&mut Domain),
    ) -> Result<Value, PluginError> {
        let mut state = self.lock()?;
        let domain = state.domain_mut(name)?;
        if !from.contains(&domain.state) {
            return Err(PluginError::invalid_state(format!(
                "domain '{name}' is {why_not} (state: {})",
                domain.state.as_str()
            )));
        }
        change(domain);
        Ok(Value::Unit)
    }

    fn define(&self, spec: &Value) -> Result<Value, PluginError> {
        let mut spec = DomainSpec::from_value(spec)?;
        for device in &spec.devices {
            device.disk_backing()?;
        }
        // MAC addresses are fixed at define, like a real driver's; bridges are not simulated.
        for (index, nic) in spec.interfaces.iter_mut().enumerate() {
            if nic.kind == InterfaceKind::Bridge && nic.bridge.is_none() {
                return Err(PluginError::invalid_argument(format!(
                    "interface {index}: kind \"bridge\" needs `bridge`"
                )));
            }
            match &nic.mac {
                Some(text) => {
                    let mac = parse_mac(text).ok_or_else(|| {
                        PluginError::invalid_argument(format!(
                            "interface {index}: mac {text:?} is not a unicast Ethernet address"
                        ))
                    })?;
                    nic.mac = Some(format_mac(mac));
                }
                None => nic.mac = Some(random_mac(&format!("{}/{index}", spec.name))),
            }
        }
        let mut state = self.lock()?;
        match state.domains.get_mut(&spec.name) {
            Some(existing) if existing.state.is_active() => Err(PluginError::invalid_state(format!(
                "domain '{}' is active; shut it down before redefining it",
                spec.name
            ))),
            Some(existing) => {
                existing.spec = spec;
                Ok(Value::Unit)
            }
            None => {
                state.domains.insert(spec.name.clone(), Domain::new(spec, DomainState::ShutOff));
                Ok(Value::Unit)
            }
        }
    }

    fn undefine(&self, name: &str) -> Result<Value, PluginError> {
        let mut state = self.lock()?;
        let domain = state.domain(name)?;
        if domain.state.is_active() {
            return Err(PluginError::invalid_state(format!("domain '{name}' is active; destroy it first")));
        }
        snapshot::check_undefine(&state, name)?;
        state.domains.remove(name);
        Ok(Value::Unit)
    }

    fn active_domain<'s>(state: &'s mut State, name: &str) -> Result<&'s mut Domain, PluginError> {
        let domain = state.domain_mut(name)?;
        if !domain.state.is_active() {
            return Err(PluginError::invalid_state(format!("domain '{name}' is not running")));
        }
        Ok(domain)
    }

    fn block_stats(&self, name: &str, device: Option<&str>) -> Result<Value, PluginError> {
        let mut state = self.lock()?;
        let domain = Self::active_domain(&mut state, name)?;
        let targets = domain.spec.disk_targets();
        let stats = match device {
            Some(device) => {
                let index = targets
                    .iter()
                    .position(|t| t == device)
                    .ok_or_else(|| PluginError::not_found(format!("domain '{name}' has no disk '{device}'")))?;
                domain.disk_stats(index)
            }
            None => (0..targets.len()).map(|i| domain.disk_stats(i)).fold(BlockStats::default(), BlockStats::plus),
        };
        Ok(stats.into_value())
    }

    /// Plugs a network interface into the running domain (live only, like the QEMU driver):
    /// validated like a spec's interface, with a generated MAC when it names none.
    fn attach_nic(&self, name: &str, mut nic: NicDevice) -> Result<Value, PluginError> {
        let mut interface = nic.require_interface()?.clone();
        let what = format!("device {}", nic.id);
        match interface.kind {
            InterfaceKind::Bridge if interface.bridge.is_none() => {
                return Err(PluginError::invalid_argument(format!("{what}: kind \"bridge\" needs `bridge`")))
            }
            InterfaceKind::Bridge if !interface.forwards.is_empty() => {
                return Err(PluginError::invalid_argument(format!("{what}: `forwards` apply to kind \"user\" only")))
            }
            InterfaceKind::User if interface.bridge.is_some() => {
                return Err(PluginError::invalid_argument(format!("{what}: `bridge` applies to kind \"bridge\" only")))
            }
            _ => {}
        }
        interface.mac = Some(match &interface.mac {
            Some(text) => format_mac(parse_mac(text).ok_or_else(|| {
                PluginError::invalid_argument(format!("{what}: mac {text:?} is not a unicast Ethernet address"))
            })?),
            None => random_mac(&format!("{name}/{}", nic.id)),
        });
        let mut state = self.lock()?;
        let domain = Self::active_domain(&mut state, name)?;
        if Self::device_taken(domain, &nic.id) {
            return Err(PluginError::invalid_argument(format!("domain '{name}' already has a device '{}'", nic.id)));
        }
        let macs = domain.spec.interfaces.iter().chain(domain.live_nics.iter().filter_map(|n| n.interface.as_ref()));
        if macs.clone().any(|other| other.mac == interface.mac) {
            return Err(PluginError::invalid_argument(format!(
                "{what}: mac {} is used twice",
                interface.mac.unwrap_or_default()
            )));
        }
        nic.interface = Some(interface);
        domain.live_nics.push(nic);
        Ok(Value::Unit)
    }

    fn detach_nic(&self, name: &str, id: &str) -> Result<Value, PluginError> {
        let mut state = self.lock()?;
        let domain = Self::active_domain(&mut state, name)?;
        let index = domain
            .live_nics
            .iter()
            .position(|n| n.id == id)
            .ok_or_else(|| PluginError::not_found(format!("domain '{name}' has no network interface '{id}'")))?;
        domain.live_nics.remove(index);
        Ok(Value::Unit)
    }

    fn device_taken(domain: &Domain, id: &str) -> bool {
        domain.live_devices.iter().any(|d| d.id == id)
            || domain.live_nics.iter().any(|n| n.id == id)
            || domain.spec.disk_targets().iter().any(|t| t == id)
    }

    fn attach(&self, name: &str, device: DeviceSpec) -> Result<Value, PluginError> {
        device.disk_backing()?;
        let mut state = self.lock()?;
        let domain = Self::active_domain(&mut state, name)?;
        if Self::device_taken(domain, &device.id) {
            return Err(PluginError::invalid_argument(format!("domain '{name}' already has a device '{}'", device.id)));
        }
        domain.live_devices.push(device);
        Ok(Value::Unit)
    }

    fn detach(&self, name: &str, device: DeviceSpec) -> Result<Value, PluginError> {
        let mut state = self.lock()?;
        let domain = Self::active_domain(&mut state, name)?;
        let index = domain
            .live_devices
            .iter()
            .position(|d| d.id == device.id)
            .ok_or_else(|| PluginError::not_found(format!("domain '{name}' has no device '{}'", device.id)))?;
        if domain.live_devices[index].kind != device.kind {
            return Err(PluginError::invalid_argument(format!(
                "device '{}' is a {}, not a {}",
                device.id,
                domain.live_devices[index].kind.as_str(),
                device.kind.as_str()
            )));
        }
        domain.live_devices.remove(index);
        Ok(Value::Unit)
    }

    fn migrate(&self, name: &str, dest_uri: &str, ctx: &Context<'_>) -> Result<Value, PluginError> {
        if !dest_uri.starts_with("test://") {
            return Err(PluginError::invalid_argument(format!(
                "the test driver migrates only to test:// URIs, not {dest_uri:?}"
            )));
        }
        let dest = state::state_for(dest_uri)?;
        if Arc::ptr_eq(&dest, &self.state) {
            return Err(PluginError::invalid_argument(format!("{dest_uri} is the source connection itself")));
        }
        // Lock in a global order (by address) so that concurrent opposite migrations cannot deadlock.
        let source_first = Arc::as_ptr(&self.state) < Arc::as_ptr(&dest);
        let (mut first, mut second) = if source_first {
            let a = self.lock()?;
            let b = dest.lock().map_err(|_| PluginError::internal("destination state poisoned"))?;
            (a, b)
        } else {
            let b = dest.lock().map_err(|_| PluginError::internal("destination state poisoned"))?;
            let a = self.lock()?;
            (a, b)
        };
        let (source, destination): (&mut State, &mut State) = (&mut first, &mut second);
        let domain = Self::active_domain(source, name)?;
        if destination.domains.contains_key(name) {
            return Err(PluginError::invalid_state(format!("{dest_uri} already has a domain named '{name}'")));
        }
        const STEPS: u64 = 4;
        let total = domain.spec.memory_mib.saturating_mul(1 << 20);
        for step in 1..=STEPS {
            if ctx.is_cancelled() {
                return Err(PluginError::invalid_state("migration cancelled"));
            }
            let done = u128::from(total) * u128::from(step) / u128::from(STEPS);
            ctx.progress(u64::try_from(done).unwrap_or(total), total);
        }
        let moved = domain.clone();
        domain.stop();
        destination.domains.insert(name.to_string(), moved);
        Ok(Value::Unit)
    }

    fn save(&self, name: &str, path: &Path) -> Result<Value, PluginError> {
        let mut state = self.lock()?;
        let domain = Self::active_domain(&mut state, name)?;
        let file = StateFile { domains: vec![DomainEntry::from_domain(domain)] };
        let text =
            toml::to_string(&file).map_err(|e| PluginError::internal(format!("cannot encode saved state: {e}")))?;
        state::write_new_file_atomically(path, text.as_bytes())?;
        domain.stop();
        Ok(Value::Unit)
    }

    fn restore(&self, path: &Path) -> Result<Value, PluginError> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                PluginError::not_found(format!("saved state {} does not exist", path.display()))
            }
            _ => PluginError::driver_failure(format!("cannot read {}: {e}", path.display())),
        })?;
        let file: StateFile = toml::from_str(&text).map_err(|e| {
            PluginError::invalid_argument(format!(
                "{} is not a saved test domain: {}",
                path.display(),
                one_line(&e.to_string())
            ))
        })?;
        let [entry] = <[DomainEntry; 1]>::try_from(file.domains).map_err(|_| {
            PluginError::invalid_argument(format!("{} does not hold exactly one saved domain", path.display()))
        })?;
        let mut restored = entry.into_domain(&path.display().to_string())?;
        if !restored.state.is_active() {
            return Err(PluginError::invalid_argument(format!(
                "{} holds a domain that was not running",
                path.display()
            )));
        }
        restored.live_devices = restored.spec.devices.clone();
        let name = restored.spec.name.clone();
        let mut state = self.lock()?;
        if state.domains.get(&name).is_some_and(|d| d.state.is_active()) {
            return Err(PluginError::invalid_state(format!("domain '{name}' is already active")));
        }
        state.domains.insert(name.clone(), restored);
        Ok(Value::from(name))
    }

    fn screenshot(&self, name: &str) -> Result<Value, PluginError> {
        let state = self.lock()?;
        let domain = state.domain(name)?;
        if !domain.state.is_active() {
            return Err(PluginError::invalid_state(format!("domain '{name}' is not running")));
        }
        if domain.spec.graphics.is_none() {
            return Err(PluginError::unsupported(format!("domain '{name}' has no display adapter")));
        }
        let name = domain.spec.name.clone();
        drop(state);
        screenshot::render(&name)
    }

    fn host_info(&self) -> Value {
        let mut info = HostInfo::new(self.uri.clone(), "test", env!("CARGO_PKG_VERSION"));
        info.hostname = "test-host".into();
        info.cpus = 16;
        info.memory_kib = 8 * 1024 * 1024;
        info.into_value()
    }
}

/// A device kind a newer SDK knows and this driver does not.
fn unknown_device(device: &AnyDevice) -> PluginError {
    PluginError::unsupported(format!(
        "device `{}`: kind {:?} is not supported by the test driver",
        device.id(),
        device.kind_str()
    ))
}
