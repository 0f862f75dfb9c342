//! The capabilities of the QEMU driver.

use std::{
    io::Read,
    os::{fd::AsFd, unix::fs::OpenOptionsExt},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use capvirt_plugin_api::{
    prelude::*,
    types::{
        console_output, domain_summary, png_image, AnyDevice, BlockStats, DeviceSpec, DomainInfo, DomainSpec,
        DomainState, HostInfo, InterfaceInfo, InterfaceKind, NicDevice,
    },
    Text,
};
use qapi::qmp;

use crate::{
    cache::{MonitorCache, Shared},
    console,
    emulator::Release,
    monitor::{self, Monitor, OpenError},
    privilege,
    qemu::{self, StartMode},
    qmp::{Qmp, QmpError},
    screenshot, snapshot,
    spec::{self, HostLimits, Kind, Live, Machine},
    store::{self, DomainPaths, Liveness, Store},
    uri::{self, Config},
};

/// The registry version this driver was written against.
const REGISTRY_VERSION: &str = "1.1.0";

/// Every capability the driver implements (all accepted ones, contract version 1).
pub const CAPABILITIES: &[&str] = &[
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
    "domain.migrate-begin",
    "domain.migrate-prepare",
    "domain.migrate-perform",
    "domain.migrate-finish",
    "domain.migrate-confirm",
];

/// How long a call waits for a free monitor channel of a domain.
const CHANNEL_WAIT: Duration = Duration::from_secs(10);
/// Bound on QEMU reporting an unplugged device gone.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the size of a screen dump read back (16384 x 16384 pixels of 3 bytes, and more).
const MAX_SCREENDUMP: u64 = 1 << 30;
/// Bound on the guest releasing a hot-plugged PCI network interface (ACPI hot-plug: the guest
/// OS ejects it; a loaded TCG guest takes seconds).
const NIC_UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a screen dump.
const SCREENDUMP_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to one state root.
pub struct QemuDriver {
    pub(crate) config: Config,
    pub(crate) store: Store,
    /// One monitor channel per domain, kept while the connection uses it: a QMP handshake
    /// costs more than the commands that follow it.
    monitors: MonitorCache,
    /// The connection's emulator release, asked once when first needed.
    release: Mutex<Option<Release>>,
}

impl Plugin for QemuDriver {
    fn manifest() -> Manifest {
        Manifest::new("qemu", "capvirt", env!("CARGO_PKG_VERSION"), REGISTRY_VERSION)
            .scheme("qemu")
            .description("QEMU/KVM domains (qemu:///session, qemu:///system), driven over QMP.")
            .capabilities(CAPABILITIES.iter().copied())
    }

    fn connect(uri: &str, options: &Value) -> Result<Self, PluginError> {
        let mut config = uri::parse(uri)?;
        config.images = spec::ImagePolicy::from_options(options)?;
        config.qemu_user = privilege::user_option(options)?;
        Ok(QemuDriver::new(config))
    }

    fn invoke(&self, capability: &str, args: &Args<'_>, ctx: &Context<'_>) -> Result<Value, PluginError> {
        match capability {
            "domain.suspend" => self.suspend(args.str("domain")?),
            "domain.resume" => self.resume(args.str("domain")?),
            "domain.info" => self.info(args.str("domain")?),
            "domain.list" => self.list(args.bool_or("all", false)?),
            "domain.define" => self.define(args.get("spec")?),
            "domain.undefine" => self.undefine(args.str("domain")?),
            "domain.start" => self.start(args.str("domain")?),
            "domain.shutdown" => {
                let timeout = match args.opt("timeout_secs") {
                    None => 60,
                    Some(_) => args.u64("timeout_secs")?,
                };
                self.shutdown(args.str("domain")?, Duration::from_secs(timeout))
            }
            "domain.destroy" => self.destroy(args.str("domain")?),
            "domain.reboot" => self.reboot(args.str("domain")?),
            "domain.block-stats" => self.block_stats(args.str("domain")?, args.opt_str("device")?),
            "domain.attach-device" => match AnyDevice::from_value(args.get("device")?)? {
                AnyDevice::Nic(nic) => self.attach_nic(args.str("domain")?, &nic),
                AnyDevice::Usb(device) => self.attach(args.str("domain")?, &device),
                other => Err(unknown_device(&other)),
            },
            "domain.detach-device" => match AnyDevice::from_value(args.get("device")?)? {
                AnyDevice::Nic(nic) => self.detach_nic(args.str("domain")?, &nic.id),
                AnyDevice::Usb(device) => self.detach(args.str("domain")?, &device),
                other => Err(unknown_device(&other)),
            },
            "domain.migrate" => self.migrate(args.str("domain")?, args.str("dest_uri")?, ctx),
            "domain.migrate-begin" => self.migrate_begin(args.str("domain")?),
            "domain.migrate-prepare" => {
                self.migrate_prepare(args.str("domain")?, args.get("description")?, args.str("address")?)
            }
            "domain.migrate-perform" => {
                self.migrate_perform(args.str("domain")?, args.str("address")?, args.u64("port")?, ctx)
            }
            "domain.migrate-finish" => self.migrate_finish(args.str("domain")?, args.bool_or("succeeded", false)?, ctx),
            "domain.migrate-confirm" => self.migrate_confirm(args.str("domain")?, args.bool_or("succeeded", false)?),
            "domain.save" => self.save(args.str("domain")?, args.str("path")?, ctx),
            "domain.restore" => self.restore(args.str("path")?, ctx),
            "domain.screenshot" => self.screenshot(args.str("domain")?),
            "domain.console-read" => {
                self.console_read(args.str("domain")?, args.u64("offset")?, args.u64("max_bytes")?)
            }
            "domain.snapshot-create" => {
                self.snapshot_create(args.str("domain")?, args.str("name")?, args.opt_str("description")?, ctx)
            }
            "domain.snapshot-list" => self.snapshot_list(args.str("domain")?),
            "domain.snapshot-revert" => self.snapshot_revert(args.str("domain")?, args.str("name")?, ctx),
            "domain.snapshot-delete" => self.snapshot_delete(args.str("domain")?, args.str("name")?, ctx),
            "host.info" => self.host_info(),
            "domain.events" => self.events(args, ctx),
            "domain.console-write" => self.console_write(args.str("domain")?, args.str("text")?),
            other => Err(PluginError::unsupported(format!("the qemu driver does not implement `{other}`"))),
        }
    }
}

/// What a monitor exchange is for, to word its errors.
pub(crate) struct Op<'a> {
    pub domain: &'a str,
    pub what: &'a str,
    /// The error kind when QEMU refuses the command.
    pub refused: ErrorKind,
}

impl<'a> Op<'a> {
    pub fn new(domain: &'a str, what: &'a str) -> Self {
        Op { domain, what, refused: ErrorKind::DriverFailure }
    }

    pub fn refused_as(self, refused: ErrorKind) -> Self {
        Op { refused, ..self }
    }
}

impl QemuDriver {
    pub fn new(config: Config) -> QemuDriver {
        QemuDriver {
            store: Store::new(config.root.clone()),
            config,
            monitors: MonitorCache::default(),
            release: Mutex::new(None),
        }
    }

    /// The emulator's release; refuses an emulator that is no QEMU or older than supported.
    pub(crate) fn release(&self) -> Result<Release, PluginError> {
        let mut cached = self.release.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(release) = &*cached {
            return Ok(release.clone());
        }
        let release = self.config.emulator.probe()?;
        *cached = Some(release.clone());
        Ok(release)
    }

    pub(crate) fn limits(&self) -> HostLimits<'_> {
        HostLimits {
            memory_mib: capvirt_plugin_api::state::host_memory_kib() / 1024,
            images: &self.config.images,
            bridges: self.config.system,
        }
    }

    /// Drops this connection's monitor of `name` (QEMU restarted or gone).
    pub(crate) fn forget(&self, name: &str) {
        self.monitors.remove(name);
    }

    /// Takes this connection's monitor of `name` out of the cache, for a caller that will end
    /// the QEMU (`quit` needs a channel; keeping the cached one avoids waiting for another).
    pub(crate) fn take_monitor(&self, name: &str) -> Option<Monitor> {
        let cached = self.monitors.remove(name)?;
        let mutex = Arc::try_unwrap(cached).ok()?;
        // A poisoned channel may be mid-line: not worth keeping.
        let monitor = mutex.into_inner().ok()?;
        (!monitor.qmp.is_broken()).then_some(monitor)
    }

    /// This connection's monitor of the running domain `name`, opened on first use.
    pub(crate) fn monitor(&self, name: &str) -> Result<Shared, PluginError> {
        if let Some(monitor) = self.monitors.get(name) {
            return Ok(monitor);
        }
        let paths = self.store.paths(name)?;
        let pid = match self.store.liveness(&paths)? {
            Liveness::Alive(pid) => pid,
            _ => return Err(self.not_running(&paths)),
        };
        let monitor = match monitor::open(&paths, CHANNEL_WAIT) {
            Ok(monitor) => monitor,
            Err(OpenError::Gone) => return Err(self.not_running(&paths)),
            Err(OpenError::AllBusy) => {
                return Err(PluginError::timeout(format!(
                    "all {} monitor channels of domain '{name}' stayed in use by other connections for {} s",
                    monitor::CHANNELS,
                    CHANNEL_WAIT.as_secs()
                )))
            }
            Err(OpenError::Qmp(QmpError::Timeout)) => {
                return Err(PluginError::timeout(format!(
                    "the QEMU of domain '{name}' (pid {pid}) does not answer on its monitor"
                )))
            }
            Err(OpenError::Qmp(e)) => {
                return Err(PluginError::driver_failure(format!("monitor of domain '{name}': {e}")))
            }
            Err(OpenError::Io(e)) => {
                return Err(PluginError::driver_failure(format!("monitor of domain '{name}': {e}")))
            }
        };
        Ok(self.monitors.insert(name, monitor))
    }

    /// Runs `exchange` on the domain's monitor. A cached channel whose QEMU went away before
    /// the command was sent is replaced once (another process may have restarted the domain).
    pub(crate) fn with_monitor<T>(
        &self,
        op: Op<'_>,
        mut exchange: impl FnMut(&mut Qmp) -> Result<T, QmpError>,
    ) -> Result<T, PluginError> {
        let mut retried = false;
        loop {
            let shared = self.monitor(op.domain)?;
            let mut monitor = match shared.lock() {
                Ok(monitor) => monitor,
                // A holder panicked mid-exchange: the stream may be mid-line, so the channel is
                // dropped and a fresh one opened.
                Err(_) => {
                    self.monitors.remove_if(op.domain, &shared);
                    continue;
                }
            };
            let result = exchange(&mut monitor.qmp);
            let broken = monitor.qmp.is_broken();
            drop(monitor);
            if broken {
                self.monitors.remove_if(op.domain, &shared);
            }
            match result {
                Ok(value) => return Ok(value),
                Err(QmpError::Stale) if !retried => retried = true,
                Err(e) => return Err(self.qmp_failure(&op, e)),
            }
        }
    }

    /// Words a failed monitor exchange, telling a QEMU that went away from a QEMU that failed.
    pub(crate) fn qmp_failure(&self, op: &Op<'_>, error: QmpError) -> PluginError {
        match error {
            QmpError::Stale | QmpError::Closed => match self.store.paths(op.domain) {
                Ok(paths) if !matches!(self.store.liveness(&paths), Ok(Liveness::Alive(_))) => self.not_running(&paths),
                _ => PluginError::driver_failure(format!(
                    "lost the monitor connection of domain '{}' during {}",
                    op.domain, op.what
                )),
            },
            QmpError::Timeout => {
                PluginError::timeout(format!("the QEMU of domain '{}' did not answer {} in time", op.domain, op.what))
            }
            QmpError::Command(e) => {
                PluginError::new(op.refused, format!("QEMU refused {} on domain '{}': {}", op.what, op.domain, e.desc))
            }
            other => PluginError::driver_failure(format!("{} on domain '{}': {other}", op.what, op.domain)),
        }
    }

    pub(crate) fn not_running(&self, paths: &DomainPaths) -> PluginError {
        match self.store.definition(paths) {
            Ok(None) => store::not_defined(&paths.name),
            _ => match self.store.liveness(paths) {
                Ok(Liveness::Crashed) => PluginError::invalid_state(format!(
                    "domain '{}' is not running (its QEMU crashed; start it again)",
                    paths.name
                )),
                _ => PluginError::invalid_state(format!("domain '{}' is not running", paths.name)),
            },
        }
    }

    /// The PID of a domain's QEMU that runs or is paused; any other state is refused.
    pub(crate) fn active_pid(&self, paths: &DomainPaths) -> Result<(DomainState, i32), PluginError> {
        match self.observe(paths)? {
            (state @ (DomainState::Running | DomainState::Paused), Some(pid)) => Ok((state, pid)),
            (state, _) => Err(PluginError::invalid_state(format!(
                "domain '{}' is not running (state: {})",
                paths.name,
                state.as_str()
            ))),
        }
    }

    /// The state of a defined domain, and its QEMU's PID when one runs.
    pub(crate) fn observe(&self, paths: &DomainPaths) -> Result<(DomainState, Option<i32>), PluginError> {
        let pid = match self.store.liveness(paths)? {
            Liveness::Stopped => return Ok((DomainState::ShutOff, None)),
            Liveness::Crashed => return Ok((DomainState::Crashed, None)),
            Liveness::Alive(pid) => pid,
        };
        let op = Op::new(&paths.name, "query-status");
        match self.with_monitor(op, |q| q.execute_loose::<_, serde_json::Value>(&qmp::query_status {})) {
            Ok(status) => Ok((run_state(&status), Some(pid))),
            Err(e) => match self.store.liveness(paths)? {
                Liveness::Stopped => Ok((DomainState::ShutOff, None)),
                Liveness::Crashed => Ok((DomainState::Crashed, None)),
                // Alive, but its monitor cannot tell (stopped process, channels taken).
                Liveness::Alive(pid) if e.kind == ErrorKind::Timeout => Ok((DomainState::Blocked, Some(pid))),
                Liveness::Alive(_) => Err(e),
            },
        }
    }

    /// The live configuration of the running domain `name`.
    pub(crate) fn live(&self, paths: &DomainPaths) -> Result<Live, PluginError> {
        store::read_toml(&paths.live)?.ok_or_else(|| self.not_running(paths))
    }

    fn suspend(&self, name: &str) -> Result<Value, PluginError> {
        // QEMU answers `stop` on a stopped guest with success and no STOP event; the state
        // that refused it is read in the same exchange, so the message cannot contradict it.
        let refused = self.with_monitor(Op::new(name, "suspend (stop)"), |q| {
            q.execute(&qmp::stop {})?;
            if q.saw_event("STOP") {
                return Ok(None);
            }
            q.execute_loose::<_, serde_json::Value>(&qmp::query_status {}).map(|status| Some(run_state(&status)))
        })?;
        match refused {
            None => Ok(Value::Unit),
            Some(state) => Err(wrong_state(name, "is not running", state)),
        }
    }

    fn resume(&self, name: &str) -> Result<Value, PluginError> {
        let op = Op::new(name, "resume (cont)").refused_as(ErrorKind::InvalidState);
        // QEMU answers `cont` on a running guest with success and no RESUME event.
        let refused = self.with_monitor(op, |q| {
            q.execute(&qmp::cont {})?;
            if q.saw_event("RESUME") {
                return Ok(None);
            }
            q.execute_loose::<_, serde_json::Value>(&qmp::query_status {}).map(|status| Some(run_state(&status)))
        })?;
        match refused {
            None => Ok(Value::Unit),
            Some(state) => Err(wrong_state(name, "is not paused", state)),
        }
    }

    fn info(&self, name: &str) -> Result<Value, PluginError> {
        let (paths, definition) = self.store.require(name)?;
        let (state, pid) = self.observe(&paths)?;
        let live = match pid {
            Some(_) => store::read_toml::<Live>(&paths.live)?,
            None => None,
        };
        let (machine, hypervisor_version) = match live {
            Some(live) => (live.machine, live.qemu_version),
            None => (definition, None),
        };
        let mut info = DomainInfo::new(machine.name.clone(), state);
        info.hypervisor_version = hypervisor_version.map(Text::from);
        info.vcpus = machine.vcpus;
        info.memory_kib = machine.memory_mib.saturating_mul(1024);
        info.max_memory_kib = machine.memory_mib.saturating_mul(1024);
        info.cpu_time_ns = pid.map(qemu::cpu_time_ns).unwrap_or(0);
        info.interfaces = machine
            .interfaces
            .iter()
            .enumerate()
            .map(|(index, nic)| {
                let id = nic.device_id(index);
                let kind = if nic.bridge.is_some() { InterfaceKind::Bridge } else { InterfaceKind::User };
                let mut entry = InterfaceInfo::new(id.clone(), kind, nic.mac.clone());
                entry.bridge = nic.bridge.clone();
                entry.host_device =
                    nic.bridge.as_ref().filter(|_| pid.is_some()).map(|_| crate::tap::name(&paths.dir, &id));
                entry
            })
            .collect();
        Ok(info.into_value())
    }

    fn list(&self, all: bool) -> Result<Value, PluginError> {
        let mut domains = Vec::new();
        for name in self.store.names()? {
            let paths = self.store.paths(&name)?;
            let (state, _) = match self.observe(&paths) {
                Ok(observed) => observed,
                // Undefined meanwhile.
                Err(e) if e.kind == ErrorKind::NotFound => continue,
                // One domain's trouble (its QEMU runs but its monitor fails) never fails the
                // listing of the others: it is listed as blocked, and `domain.info` says why.
                Err(_) => (DomainState::Blocked, None),
            };
            if all || state.is_active() {
                domains.push(domain_summary(name, state));
            }
        }
        Ok(Value::List(domains.into()))
    }

    fn define(&self, spec: &Value) -> Result<Value, PluginError> {
        let spec = DomainSpec::from_value(spec)?;
        let mut machine = spec::validate(&spec, self.limits())?;
        let lock = self.store.lock(&machine.name, true)?;
        if let Liveness::Alive(_) = self.store.liveness(&lock.paths)? {
            return Err(PluginError::invalid_state(format!(
                "domain '{}' is running; redefine it once it is shut off",
                machine.name
            )));
        }
        // A redefinition keeps the MAC address each interface already had unless it names one.
        if let Some(old) = self.store.definition(&lock.paths)? {
            for ((nic, asked), kept) in machine.interfaces.iter_mut().zip(&spec.interfaces).zip(&old.interfaces) {
                if asked.mac.is_none() {
                    nic.mac = kept.mac.clone();
                }
            }
        }
        store::write_toml(&lock.paths.definition, &machine)?;
        Ok(Value::Unit)
    }

    fn undefine(&self, name: &str) -> Result<Value, PluginError> {
        let lock = self.store.lock(name, false)?;
        if self.store.definition(&lock.paths)?.is_none() {
            return Err(store::not_defined(name));
        }
        if let Liveness::Alive(_) = self.store.liveness(&lock.paths)? {
            return Err(PluginError::invalid_state(format!("domain '{name}' is running; destroy it first")));
        }
        snapshot::check_undefine(&lock.paths)?;
        self.forget(name);
        store::remove_domain(&lock.paths)?;
        Ok(Value::Unit)
    }

    fn start(&self, name: &str) -> Result<Value, PluginError> {
        let lock = self.store.lock(name, false)?;
        let machine = self.store.definition(&lock.paths)?.ok_or_else(|| store::not_defined(name))?;
        if let Liveness::Alive(pid) = self.store.liveness(&lock.paths)? {
            return Err(PluginError::invalid_state(format!("domain '{name}' is already running (pid {pid})")));
        }
        check_images_exist(&machine, &self.config.images)?;
        let runner = privilege::runner(&self.config)?;
        let accel = qemu::resolve_accel(self.config.accel, &runner)?;
        self.release()?;
        self.forget(name);
        let live = Live::new(machine, accel);
        qemu::launch(&self.store, &lock.paths, &live, StartMode::Boot, &self.config.emulator, &runner)?;
        drop(lock);
        // Launching proved QEMU answers; a channel opened now serves this connection's next
        // call, unless another call already stopped the domain (its own result says so).
        let _ = self.monitor(name);
        Ok(Value::Unit)
    }

    fn shutdown(&self, name: &str, timeout: Duration) -> Result<Value, PluginError> {
        let (paths, _) = self.store.require(name)?;
        let (state, pid) = self.observe(&paths)?;
        let Some(pid) = pid.filter(|_| state == DomainState::Running) else {
            return Err(PluginError::invalid_state(format!(
                "domain '{name}' is not running (state: {})",
                state.as_str()
            )));
        };
        // What the guest prints while it powers off is lost with its QEMU; the rest is kept.
        self.keep_console(&paths);
        self.with_monitor(Op::new(name, "shutdown (system_powerdown)"), |q| q.execute(&qmp::system_powerdown {}))?;
        if timeout.is_zero() {
            return Ok(Value::Unit);
        }
        // The lock is not held while the guest takes its time: other calls go on meanwhile.
        if qemu::wait_exit(&self.store, &paths, pid, timeout) {
            self.forget(name);
            let lock = self.store.lock(name, false)?;
            if !matches!(self.store.liveness(&lock.paths)?, Liveness::Alive(_)) {
                store::remove_runtime(&lock.paths)?;
            }
            return Ok(Value::Unit);
        }
        Err(PluginError::timeout(format!(
            "domain '{name}' did not power off within {} s of the ACPI power-button request (the guest ignores \
             it or has no ACPI support); it is still running — use destroy to force it off",
            timeout.as_secs()
        )))
    }

    fn destroy(&self, name: &str) -> Result<Value, PluginError> {
        let lock = self.store.lock(name, false)?;
        if self.store.definition(&lock.paths)?.is_none() {
            return Err(store::not_defined(name));
        }
        match self.store.liveness(&lock.paths)? {
            Liveness::Stopped => Err(PluginError::invalid_state(format!("domain '{name}' is not running"))),
            // Clearing a crash's leftovers makes the domain plainly shut off.
            Liveness::Crashed => {
                self.forget(name);
                store::remove_runtime(&lock.paths)?;
                Ok(Value::Unit)
            }
            Liveness::Alive(pid) => {
                self.keep_console(&lock.paths);
                let monitor = self.take_monitor(name).or_else(|| {
                    self.forget(name);
                    monitor::open(&lock.paths, Duration::from_secs(1)).ok()
                });
                qemu::stop(&self.store, &lock.paths, pid, monitor)?;
                Ok(Value::Unit)
            }
        }
    }

    fn reboot(&self, name: &str) -> Result<Value, PluginError> {
        let (paths, _) = self.store.require(name)?;
        let (state, _) = self.observe(&paths)?;
        if state != DomainState::Running {
            return Err(PluginError::invalid_state(format!(
                "domain '{name}' is not running (state: {})",
                state.as_str()
            )));
        }
        self.with_monitor(Op::new(name, "reboot (system_reset)"), |q| q.execute(&qmp::system_reset {}))?;
        Ok(Value::Unit)
    }

    fn block_stats(&self, name: &str, device: Option<&str>) -> Result<Value, PluginError> {
        let (paths, _) = self.store.require(name)?;
        let live = self.live(&paths)?;
        // Node name → the disk target or device id the caller knows.
        let mut labels: Vec<(String, String)> =
            live.machine.disks.iter().enumerate().map(|(i, d)| (qemu::disk_node(i), d.target.clone())).collect();
        for dev in live.machine.devices.iter().filter(|d| d.kind == Kind::UsbDisk) {
            if let Some(port) = live.port(&dev.id) {
                labels.push((qemu::usb_node(port), dev.id.clone()));
            }
        }
        if let Some(device) = device {
            if !labels.iter().any(|(_, label)| label == device) {
                return Err(PluginError::not_found(format!("domain '{name}' has no disk '{device}'")));
            }
        }
        let entries = self.with_monitor(Op::new(name, "block stats (query-blockstats)"), |q| {
            q.execute(&qmp::query_blockstats { query_nodes: None })
        })?;
        let mut total = BlockStats::default();
        for entry in entries {
            let Some(label) = entry
                .node_name
                .as_deref()
                .and_then(|node| labels.iter().find(|(n, _)| n == node).map(|(_, label)| label.as_str()))
            else {
                continue;
            };
            if device.is_some_and(|d| d != label) {
                continue;
            }
            let s = &entry.stats;
            let count = |n: i64| u64::try_from(n).unwrap_or(0);
            total = total.plus(BlockStats::new(
                count(s.rd_operations),
                count(s.rd_bytes),
                count(s.wr_operations),
                count(s.wr_bytes),
                count(s.failed_rd_operations)
                    .saturating_add(count(s.failed_wr_operations))
                    .saturating_add(count(s.failed_flush_operations))
                    .saturating_add(count(s.failed_unmap_operations)),
            ));
        }
        Ok(total.into_value())
    }

    /// Hot-plugs a network interface: its tap (bridge), `netdev_add`, then `device_add` on a
    /// free hot-plug root port. Live only: the definition keeps its interfaces (as libvirt's
    /// default `--live`); save/restore and migration carry it with the live configuration.
    fn attach_nic(&self, name: &str, nic: &NicDevice) -> Result<Value, PluginError> {
        spec::check_device_id(&nic.id, "device")?;
        let what = format!("device {}", nic.id);
        let mut interface =
            spec::interface(nic.require_interface()?, &what, &format!("{name}/{}", nic.id), self.config.system)?;
        interface.id = Some(nic.id.clone());
        let lock = self.store.lock(name, false)?;
        let mut live = self.live(&lock.paths)?;
        if live.device_ids().contains(&nic.id) || nic.id.starts_with("capvirt-") {
            return Err(PluginError::invalid_argument(format!("domain '{name}' already has a device '{}'", nic.id)));
        }
        spec::check_conflicts(&live.machine.interfaces, &interface, &what)?;
        if live.machine.interfaces.len() >= spec::MAX_INTERFACES {
            return Err(PluginError::invalid_state(format!(
                "domain '{name}' already has {} network interfaces",
                spec::MAX_INTERFACES
            )));
        }
        let port = qemu::take_nic_port(&mut live, &nic.id).ok_or_else(|| match live.hotplug_ports {
            0 => PluginError::unsupported(format!(
                "domain '{name}' runs on a QEMU started by a driver without NIC hot-plug; restart it"
            )),
            ports => PluginError::invalid_state(format!(
                "domain '{name}' has no free hot-plug slot for a network interface ({ports} in use)"
            )),
        })?;
        let tap = interface.bridge.as_ref().map(|bridge| (crate::tap::name(&lock.paths.dir, &nic.id), bridge));
        if let Some((tap, bridge)) = &tap {
            // Owned by the account QEMU runs as, which opens it by name.
            let owner = privilege::runner(&self.config)?.tap_owner();
            crate::tap::create(tap, bridge, owner).map_err(|e| {
                let error = PluginError::from(e);
                PluginError::new(error.kind, format!("{what}: {}", error.message))
            })?;
        }
        let undo_tap = || {
            if let Some((tap, _)) = &tap {
                let _ = crate::tap::delete(tap);
            }
        };
        let netdev = qemu::netdev_add(&interface, &nic.id)?;
        // A bridge's tap goes over as a descriptor, on the channel that then uses it (QEMU
        // keeps `getfd` names per monitor).
        let tap_fd = match &tap {
            Some((tap, _)) => match crate::tap::open(tap) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    undo_tap();
                    return Err(PluginError::from(e));
                }
            },
            None => None,
        };
        let op = Op::new(name, "attach (netdev_add)").refused_as(ErrorKind::InvalidArgument);
        let added = self.with_monitor(op, |q| {
            if let Some(fd) = &tap_fd {
                q.execute_with_fd(&qmp::getfd { fdname: qemu::tap_fd_name(&nic.id) }, fd.as_fd())?;
            }
            q.execute(&netdev)
        });
        if let Err(e) = added {
            undo_tap();
            return Err(e);
        }
        let add = qemu::nic_device(&interface, &nic.id, Some(port));
        let op = Op::new(name, "attach (device_add)").refused_as(ErrorKind::InvalidArgument);
        if let Err(e) = self.with_monitor(op, |q| q.execute(&add)) {
            let id = qemu::netdev_id(&nic.id);
            let _ = self.with_monitor(Op::new(name, "netdev_del"), |q| q.execute(&qmp::netdev_del { id: id.clone() }));
            undo_tap();
            return Err(e);
        }
        live.machine.interfaces.push(interface);
        store::write_toml(&lock.paths.live, &live)?;
        Ok(Value::Unit)
    }

    /// Unplugs a hot-plugged network interface: `device_del`, the guest's release
    /// (DEVICE_DELETED), `netdev_del`, then its tap.
    fn detach_nic(&self, name: &str, id: &str) -> Result<Value, PluginError> {
        let lock = self.store.lock(name, false)?;
        let mut live = self.live(&lock.paths)?;
        let found = live.machine.interfaces.iter().enumerate().find(|(i, nic)| nic.device_id(*i) == id);
        let Some((index, nic)) = found else {
            return Err(PluginError::not_found(format!("domain '{name}' has no network interface '{id}'")));
        };
        if nic.id.is_none() {
            return Err(PluginError::unsupported(format!(
                "'{id}' is an interface of the domain's definition; only hot-plugged interfaces can be detached"
            )));
        }
        let bridged = nic.bridge.is_some();
        let device = id.to_string();
        self.with_monitor(Op::new(name, "detach (device_del)"), |q| {
            q.execute(&qmp::device_del { id: device.clone() })?;
            let deadline = Instant::now() + NIC_UNPLUG_TIMEOUT;
            q.wait_event(deadline, |e| {
                e.name == "DEVICE_DELETED" && e.data.get("device").and_then(|d| d.as_str()) == Some(&device)
            })
        })
        .map_err(|e| match e.kind {
            ErrorKind::Timeout => PluginError::timeout(format!(
                "the guest of domain '{name}' did not release network interface '{id}' within {} s \
                 (it needs an OS that handles ACPI PCI hot-unplug)",
                NIC_UNPLUG_TIMEOUT.as_secs()
            )),
            _ => e,
        })?;
        let netdev = qemu::netdev_id(id);
        self.with_monitor(Op::new(name, "detach (netdev_del)"), |q| {
            q.execute(&qmp::netdev_del { id: netdev.clone() })
        })?;
        if bridged {
            crate::tap::delete(&crate::tap::name(&lock.paths.dir, id)).map_err(PluginError::from)?;
        }
        live.machine.interfaces.remove(index);
        live.nic_ports.remove(id);
        store::write_toml(&lock.paths.live, &live)?;
        Ok(Value::Unit)
    }

    fn attach(&self, name: &str, device: &DeviceSpec) -> Result<Value, PluginError> {
        let device = spec::device(device, &self.config.images)?;
        let lock = self.store.lock(name, false)?;
        let mut live = self.live(&lock.paths)?;
        let taken = live.device_ids().contains(&device.id);
        if taken {
            return Err(PluginError::invalid_argument(format!("domain '{name}' already has a device '{}'", device.id)));
        }
        if let Some(path) = &device.path {
            let in_use = live.machine.disks.iter().any(|d| &d.path == path)
                || live.machine.devices.iter().any(|d| d.path.as_ref() == Some(path));
            if in_use {
                return Err(PluginError::invalid_argument(format!(
                    "image {} is already in use by domain '{name}'",
                    path.display()
                )));
            }
        }
        let port = live.free_port().ok_or_else(|| {
            PluginError::invalid_state(format!("domain '{name}' has no free USB port ({} in use)", spec::USB_PORTS))
        })?;
        let node = match (&device.path, device.format) {
            (Some(path), Some(format)) => {
                let node = qemu::usb_node(port);
                // Opened here and handed over in a fresh fd set: QEMU opens no image by path.
                let image = privilege::open_image(path, false)?;
                let op = Op::new(name, "attach (blockdev-add)").refused_as(ErrorKind::InvalidArgument);
                self.with_monitor(op, |q| {
                    let add = qmp::add_fd { fdset_id: None, opaque: Some(node.clone()) };
                    let set = q.execute_with_fd(&add, image.as_fd())?.fdset_id;
                    let options = qemu::blockdev(&node, &qemu::fdset_path(set as usize), format, false)
                        .map_err(|e| QmpError::Protocol(e.message.to_string()))?;
                    q.execute(&qmp::blockdev_add(options)).inspect_err(|_| {
                        let _ = q.execute(&qmp::remove_fd { fdset_id: set, fd: None });
                    })
                })?;
                Some(node)
            }
            _ => None,
        };
        let add = qemu::usb_device(&device, port, node.as_deref());
        let op = Op::new(name, "attach (device_add)").refused_as(ErrorKind::InvalidArgument);
        let added = self.with_monitor(op, |q| q.execute(&add));
        if let Err(e) = added {
            if let Some(node) = node {
                let _ = self.with_monitor(Op::new(name, "blockdev-del"), |q| {
                    q.execute(&qmp::blockdev_del { node_name: node.clone() })?;
                    remove_fdsets(q, &node)
                });
            }
            return Err(e);
        }
        live.usb_ports.insert(device.id.clone(), port);
        live.machine.devices.push(device);
        store::write_toml(&lock.paths.live, &live)?;
        Ok(Value::Unit)
    }

    fn detach(&self, name: &str, device: &DeviceSpec) -> Result<Value, PluginError> {
        let lock = self.store.lock(name, false)?;
        let mut live = self.live(&lock.paths)?;
        let Some(index) = live.machine.devices.iter().position(|d| d.id == device.id) else {
            if live.machine.disks.iter().any(|d| d.target == device.id) {
                return Err(PluginError::unsupported(format!(
                    "'{}' is a disk of the domain's definition; only USB devices can be detached",
                    device.id
                )));
            }
            return Err(PluginError::not_found(format!("domain '{name}' has no device '{}'", device.id)));
        };
        let present = &live.machine.devices[index];
        if present.kind != Kind::from(device.kind) {
            return Err(PluginError::invalid_argument(format!(
                "device '{}' is a {}, not a {}",
                device.id,
                present.kind.as_str(),
                device.kind.as_str()
            )));
        }
        let port = live.port(&device.id);
        let id = device.id.clone();
        self.with_monitor(Op::new(name, "detach (device_del)"), |q| {
            q.execute(&qmp::device_del { id: id.clone() })?;
            let deadline = Instant::now() + UNPLUG_TIMEOUT;
            q.wait_event(deadline, |e| {
                e.name == "DEVICE_DELETED" && e.data.get("device").and_then(|d| d.as_str()) == Some(&id)
            })
        })
        .map_err(|e| match e.kind {
            ErrorKind::Timeout => PluginError::timeout(format!(
                "QEMU did not report device '{id}' of domain '{name}' removed within {} s",
                UNPLUG_TIMEOUT.as_secs()
            )),
            _ => e,
        })?;
        if present.kind == Kind::UsbDisk {
            if let Some(port) = port {
                let node = qemu::usb_node(port);
                self.with_monitor(Op::new(name, "detach (blockdev-del)"), |q| {
                    q.execute(&qmp::blockdev_del { node_name: node.clone() })?;
                    remove_fdsets(q, &node)
                })?;
            }
        }
        live.machine.devices.remove(index);
        live.usb_ports.remove(&device.id);
        store::write_toml(&lock.paths.live, &live)?;
        Ok(Value::Unit)
    }

    fn screenshot(&self, name: &str) -> Result<Value, PluginError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let (paths, _) = self.store.require(name)?;
        let live = self.live(&paths)?;
        if live.machine.graphics.is_none() {
            return Err(PluginError::unsupported(format!("domain '{name}' has no display adapter")));
        }
        // QEMU writes the dump into a descriptor of a file in the domain's private runtime
        // directory (it may not reach that directory by path); the file is unlinked at once.
        let file = paths.run.join(format!(
            "screendump-{}-{}.ppm",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .and_then(|writer| Ok((writer, std::fs::File::open(&file)?)));
        let _ = std::fs::remove_file(&file);
        let (writer, reader) = opened.map_err(|e| store::io_failure(&file, "create", &e))?;
        let dumped = self.with_monitor(Op::new(name, "screenshot (screendump)"), |q| {
            let add = qmp::add_fd { fdset_id: None, opaque: Some("capvirt-screendump".into()) };
            let set = q.execute_with_fd(&add, writer.as_fd())?.fdset_id;
            let filename = qemu::fdset_path(set as usize).display().to_string();
            let dumped = q.execute_within(
                &qmp::screendump { filename, device: None, head: None, format: None },
                SCREENDUMP_TIMEOUT,
            );
            let _ = q.execute(&qmp::remove_fd { fdset_id: set, fd: None });
            dumped
        });
        let bytes = dumped.and_then(|_| {
            let mut bytes = Vec::new();
            // A screen is far smaller; whatever QEMU wrote is never read without bound.
            reader.take(MAX_SCREENDUMP).read_to_end(&mut bytes).map_err(|e| store::io_failure(&file, "read", &e))?;
            Ok(bytes)
        });
        let image = screenshot::parse_ppm(&bytes?)?;
        let png = screenshot::to_png(&image)?;
        Ok(png_image(u64::from(image.width), u64::from(image.height), png))
    }

    fn console_read(&self, name: &str, offset: u64, max_bytes: u64) -> Result<Value, PluginError> {
        let (paths, _) = self.store.require(name)?;
        let mut log = console::Log::open(&paths)?;
        self.drain_console(&paths, &mut log)?;
        let (start, data) = log.read(offset, max_bytes)?;
        Ok(console_output(start, data))
    }

    /// Moves what a running QEMU's console ring holds (the guest's output since the last
    /// drain) into the console log; nothing to do when QEMU does not run.
    fn drain_console(&self, paths: &DomainPaths, log: &mut console::Log) -> Result<(), PluginError> {
        if !matches!(self.store.liveness(paths)?, Liveness::Alive(_)) {
            return Ok(());
        }
        // QEMU writes the log itself (see `console`); only QEMUs of older drivers have a ring.
        if console::has_socket(paths) {
            return Ok(());
        }
        // QEMU refuses only when the ring is missing: a QEMU started by a driver without it.
        let op = Op::new(&paths.name, "console read (ringbuf-read)").refused_as(ErrorKind::Unsupported);
        let drained = self.with_monitor(op, |q| {
            q.execute(&qmp::ringbuf_read {
                device: console::CHARDEV.to_string(),
                size: console::RING_SIZE as i64,
                format: Some(qmp::DataFormat::base64),
            })
        });
        match drained {
            Ok(encoded) => log.append_base64(&encoded),
            // Stopped meanwhile: what was kept is all there is.
            Err(e) if e.kind == ErrorKind::InvalidState => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn console_write(&self, name: &str, text: &str) -> Result<Value, PluginError> {
        if let Some(bad) = text.chars().find(|c| c.is_control() && *c != '\t') {
            return Err(PluginError::invalid_argument(format!(
                "console line contains control character U+{:04X}; only printable text and tabs can be typed",
                u32::from(bad)
            )));
        }
        let (paths, _) = self.store.require(name)?;
        let (state, _) = self.active_pid(&paths)?;
        if state != DomainState::Running {
            return Err(wrong_state(name, "is not running", state));
        }
        if !console::has_socket(&paths) {
            return Err(PluginError::unsupported(format!(
                "domain '{name}' runs on a QEMU started by an older driver, whose console takes no input; restart it"
            )));
        }
        console::write_line(&paths, text)?;
        Ok(Value::Unit)
    }

    /// Keeps the console output of a QEMU about to be stopped or asked to power off (best
    /// effort: a failure here never stops the operation).
    fn keep_console(&self, paths: &DomainPaths) {
        if let Ok(mut log) = console::Log::open(paths) {
            let _ = self.drain_console(paths, &mut log);
        }
    }

    fn host_info(&self) -> Result<Value, PluginError> {
        let mut info = HostInfo::new(self.config.uri.clone(), "QEMU", self.release()?.to_string());
        info.hostname = rustix::system::uname().nodename().to_string_lossy().into_owned();
        info.cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
        info.memory_kib = capvirt_plugin_api::state::host_memory_kib();
        Ok(info.into_value())
    }
}

/// Closes the fd sets that held the image of `node` (tagged with its name when added).
fn remove_fdsets(q: &mut Qmp, node: &str) -> Result<(), QmpError> {
    for set in q.execute(&qmp::query_fdsets {})? {
        if set.fds.iter().any(|fd| fd.opaque.as_deref() == Some(node)) {
            q.execute(&qmp::remove_fd { fdset_id: set.fdset_id, fd: None })?;
        }
    }
    Ok(())
}

/// A device kind a newer SDK knows and this driver does not.
fn unknown_device(device: &AnyDevice) -> PluginError {
    PluginError::unsupported(format!(
        "device `{}`: kind {:?} is not supported by the qemu driver",
        device.id(),
        device.kind_str()
    ))
}

/// An invalid-state error naming the state that caused the refusal.
fn wrong_state(name: &str, why: &str, state: DomainState) -> PluginError {
    PluginError::invalid_state(format!("domain '{name}' {why} (state: {})", state.as_str()))
}

/// Images can vanish or change between define and start: each must still exist and pass the
/// checks of define (format, no backing or external data file, allowed place after resolving
/// symlinks again) right before QEMU opens it; so must the kernel and initrd.
pub(crate) fn check_images_exist(machine: &Machine, images: &spec::ImagePolicy) -> Result<(), PluginError> {
    if let Some(boot) = &machine.boot {
        for (what, path) in
            std::iter::once(("boot.kernel", &boot.kernel)).chain(boot.initrd.iter().map(|p| ("boot.initrd", p)))
        {
            spec::check_boot_file(&path.to_string_lossy(), what, images)?;
        }
    }
    let files = machine.disks.iter().map(|d| (d.target.as_str(), &d.path, d.format)).chain(
        machine.devices.iter().filter_map(|d| match (&d.path, d.format) {
            (Some(path), Some(format)) => Some((d.id.as_str(), path, format)),
            _ => None,
        }),
    );
    for (id, path, format) in files {
        if !path.exists() {
            return Err(PluginError::not_found(format!("{id}: image {} no longer exists", path.display())));
        }
        let text = path.to_str().ok_or_else(|| {
            PluginError::invalid_argument(format!("{id}: image path {} is not valid UTF-8", path.display()))
        })?;
        spec::check_image(text, format, id, images)?;
    }
    Ok(())
}

/// Maps QEMU's run state (tolerating states newer than the `qapi` schema) to the registry's.
pub(crate) fn run_state(status: &serde_json::Value) -> DomainState {
    use qmp::RunState as R;
    match status.get("status").cloned().map(serde_json::from_value::<R>) {
        Some(Ok(R::running | R::colo)) => DomainState::Running,
        Some(Ok(R::suspended)) => DomainState::PmSuspended,
        Some(Ok(R::shutdown)) => DomainState::InShutdown,
        Some(Ok(R::guest_panicked | R::internal_error)) => DomainState::Crashed,
        Some(Ok(
            R::paused
            | R::debug
            | R::inmigrate
            | R::postmigrate
            | R::prelaunch
            | R::finish_migrate
            | R::restore_vm
            | R::save_vm
            | R::io_error
            | R::watchdog,
        )) => DomainState::Paused,
        _ => match status.get("running").and_then(serde_json::Value::as_bool) {
            Some(true) => DomainState::Running,
            _ => DomainState::Paused,
        },
    }
}
