//! The capabilities of the container driver.

use std::{
    process::Child,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use capvirt_plugin_api::{
    prelude::*,
    types::{domain_summary, DomainInfo, DomainSpec, DomainState, HostInfo},
};
use rustix::process::Signal;

use crate::{
    cgroup::{Cgroups, Controller},
    procfs,
    sandbox::{self, Bwrap},
    spec,
    store::{self, DomainPaths, Liveness, Runtime, Store},
    uri::{self, Config},
};

/// The registry version this driver was written against.
const REGISTRY_VERSION: &str = "1.1.0";

/// Every capability the driver implements. Not declared (the host answers "unsupported"):
/// attach/detach-device (containers have no USB bus), migrate, save/restore (no checkpoint
/// support), screenshot (no display).
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
];

/// A connection to one state root.
pub struct ContainerDriver {
    config: Config,
    store: Store,
    bwrap: Bwrap,
    /// `bwrap --version`, asked once when first needed.
    version: OnceLock<String>,
    /// bwrap processes this connection started: reaped once they end, so a long-lived
    /// library connection does not collect zombies.
    children: Mutex<Vec<Child>>,
}

impl Plugin for ContainerDriver {
    fn manifest() -> Manifest {
        Manifest::new("container", "capvirt", env!("CARGO_PKG_VERSION"), REGISTRY_VERSION)
            .scheme("container")
            .description("Containers sandboxed by bubblewrap (container:///session, container:///system).")
            .capabilities(CAPABILITIES.iter().copied())
    }

    fn connect(uri: &str, _options: &Value) -> Result<Self, PluginError> {
        let config = uri::parse(uri)?;
        let bwrap = Bwrap::find()?;
        Ok(ContainerDriver {
            store: Store::new(config.root.clone()),
            config,
            bwrap,
            version: OnceLock::new(),
            children: Mutex::new(Vec::new()),
        })
    }

    fn invoke(&self, capability: &str, args: &Args<'_>, _ctx: &Context<'_>) -> Result<Value, PluginError> {
        self.reap();
        match capability {
            "host.info" => self.host_info(),
            "domain.list" => self.list(args.bool_or("all", false)?),
            "domain.info" => self.info(args.str("domain")?),
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
            "domain.suspend" => self.suspend(args.str("domain")?),
            "domain.resume" => self.resume(args.str("domain")?),
            "domain.block-stats" => self.block_stats(args.str("domain")?, args.opt_str("device")?),
            other => Err(PluginError::unsupported(format!("the container driver does not implement `{other}`"))),
        }
    }
}

/// What `observe` finds.
struct Observed {
    state: DomainState,
    runtime: Option<Runtime>,
}

impl ContainerDriver {
    fn reap(&self) {
        let mut children = self.children.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        children.retain_mut(|child| matches!(child.try_wait(), Ok(None)));
    }

    fn version(&self) -> Result<String, PluginError> {
        if let Some(version) = self.version.get() {
            return Ok(version.clone());
        }
        let version = self.bwrap.version()?;
        Ok(self.version.get_or_init(|| version).clone())
    }

    fn cgroups(&self, name: &str) -> Cgroups {
        Cgroups::new(self.store.root(), name)
    }

    /// The state of a defined container and, while its tree exists, its runtime record.
    fn observe(&self, paths: &DomainPaths) -> Result<Observed, PluginError> {
        match self.store.liveness(paths)? {
            Liveness::Stopped => Ok(Observed { state: DomainState::ShutOff, runtime: None }),
            Liveness::Ended { clean, .. } => {
                self.release_cgroups(paths);
                Ok(Observed { state: if clean { DomainState::ShutOff } else { DomainState::Crashed }, runtime: None })
            }
            Liveness::Alive(runtime) => {
                let paused = if runtime.controllers.contains(&Controller::Freezer) {
                    self.cgroups(&paths.name).frozen()
                } else {
                    paths.stopped.exists()
                };
                let state = if paused { DomainState::Paused } else { DomainState::Running };
                Ok(Observed { state, runtime: Some(runtime) })
            }
        }
    }

    /// A tree that ended on its own (init exited, killed from outside) leaves empty cgroups:
    /// the first call to notice removes them, when no other operation holds the container
    /// (the runtime directory stays: it tells "crashed" from "shut off" until the next start).
    fn release_cgroups(&self, paths: &DomainPaths) {
        let cgroups = self.cgroups(&paths.name);
        if !Controller::ALL.iter().any(|c| cgroups.dir(*c).exists()) {
            return;
        }
        if let Ok(Some(_lock)) = self.store.lock_within(&paths.name, false, Duration::ZERO) {
            if let Ok(Liveness::Ended { .. }) = self.store.liveness(paths) {
                let _ = cgroups.remove(Duration::ZERO);
            }
        }
    }

    /// The runtime of a container in one of `states`; any other state is refused.
    fn require_state(&self, paths: &DomainPaths, states: &[DomainState]) -> Result<Runtime, PluginError> {
        let observed = self.observe(paths)?;
        match observed.runtime {
            Some(runtime) if states.contains(&observed.state) => Ok(runtime),
            _ => {
                let why = match states {
                    [DomainState::Paused] => "is not paused",
                    _ => "is not running",
                };
                Err(PluginError::invalid_state(format!(
                    "domain '{}' {why} (state: {})",
                    paths.name,
                    observed.state.as_str()
                )))
            }
        }
    }

    /// Removes what an ended tree left (cgroups, runtime directory); the caller holds the lock.
    fn clean_up(&self, paths: &DomainPaths) -> Result<(), PluginError> {
        self.cgroups(&paths.name).remove(crate::cgroup::SETTLE)?;
        store::remove_runtime(paths)
    }

    fn host_info(&self) -> Result<Value, PluginError> {
        let mut info = HostInfo::new(self.config.uri.clone(), "bubblewrap", self.version()?);
        info.hostname = rustix::system::uname().nodename().to_string_lossy().into_owned();
        info.cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
        info.memory_kib = capvirt_plugin_api::state::host_memory_kib();
        Ok(info.into_value())
    }

    fn list(&self, all: bool) -> Result<Value, PluginError> {
        let mut domains = Vec::new();
        for name in self.store.names()? {
            let paths = self.store.paths(&name)?;
            let state = self.observe(&paths)?.state;
            if all || state.is_active() {
                domains.push(domain_summary(name, state));
            }
        }
        Ok(Value::list(domains))
    }

    fn info(&self, name: &str) -> Result<Value, PluginError> {
        let (paths, definition) = self.store.require(name)?;
        let observed = self.observe(&paths)?;
        let mut info = DomainInfo::new(name, observed.state);
        match observed.runtime {
            None => {
                info.vcpus = definition.vcpus;
                info.memory_kib = definition.memory_mib * 1024;
                info.max_memory_kib = definition.memory_mib * 1024;
            }
            Some(runtime) => {
                let cgroups = self.cgroups(name);
                let has = |c| runtime.controllers.contains(&c);
                let tree = sandbox::tree(&runtime, &cgroups);
                info.vcpus = runtime.container.vcpus;
                // The limit the memory cgroup enforces; 0 when none could be applied.
                info.max_memory_kib = if has(Controller::Memory) { runtime.container.memory_mib * 1024 } else { 0 };
                info.memory_kib = match cgroups.memory_bytes().filter(|_| has(Controller::Memory)) {
                    Some(bytes) => bytes / 1024,
                    None => rss_kib(&tree),
                };
                info.cpu_time_ns = match cgroups.cpu_time_ns().filter(|_| has(Controller::Cpuacct)) {
                    Some(ns) => ns,
                    None => procfs::cpu_time_ns(&tree),
                };
                info.hypervisor_version = Some(runtime.bwrap_version.clone().into());
            }
        }
        Ok(info.into_value())
    }

    fn define(&self, spec: &Value) -> Result<Value, PluginError> {
        let spec = DomainSpec::from_value(spec)?;
        let container = spec::validate(&spec, capvirt_plugin_api::state::host_memory_kib() / 1024)?;
        let lock = self.store.lock(&container.name, true)?;
        if let Liveness::Alive(_) = self.store.liveness(&lock.paths)? {
            return Err(PluginError::invalid_state(format!(
                "domain '{}' is running; redefine it once it is shut off",
                container.name
            )));
        }
        store::write_toml(&lock.paths.definition, &container)?;
        Ok(Value::Unit)
    }

    fn undefine(&self, name: &str) -> Result<Value, PluginError> {
        let lock = self.store.lock(name, false)?;
        if store::read_toml::<spec::Container>(&lock.paths.definition)?.is_none() {
            return Err(store::not_defined(name));
        }
        if let Liveness::Alive(_) = self.store.liveness(&lock.paths)? {
            return Err(PluginError::invalid_state(format!("domain '{name}' is running; destroy it first")));
        }
        self.clean_up(&lock.paths)?;
        store::remove_domain(&lock.paths)?;
        Ok(Value::Unit)
    }

    fn start(&self, name: &str) -> Result<Value, PluginError> {
        let lock = self.store.lock(name, false)?;
        let container =
            store::read_toml::<spec::Container>(&lock.paths.definition)?.ok_or_else(|| store::not_defined(name))?;
        if let Liveness::Alive(runtime) = self.store.liveness(&lock.paths)? {
            return Err(PluginError::invalid_state(format!(
                "domain '{name}' is already running (pid {})",
                runtime.ns_init.pid
            )));
        }
        self.launch(&lock.paths, &container)
    }

    /// Starts a container whose tree does not exist; the caller holds the lock.
    fn launch(&self, paths: &DomainPaths, container: &spec::Container) -> Result<Value, PluginError> {
        // A crash's leftovers (runtime directory, cgroups) go first.
        self.clean_up(paths)?;
        let version = self.version()?;
        let cgroups = self.cgroups(&paths.name);
        let controllers = cgroups.create(container.memory_mib, container.vcpus);
        match sandbox::launch(&self.bwrap, &version, paths, container, &cgroups, &controllers) {
            Ok((_, child)) => {
                self.children.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(child);
                Ok(Value::Unit)
            }
            Err(e) => {
                if let Ok(Some(runtime)) = store::read_toml::<Runtime>(&paths.runtime) {
                    let _ = sandbox::kill_tree(&runtime, &cgroups, &paths.name);
                }
                let _ = self.clean_up(paths);
                Err(e)
            }
        }
    }

    fn shutdown(&self, name: &str, timeout: Duration) -> Result<Value, PluginError> {
        self.store.require(name)?;
        let runtime = {
            let lock = self.store.lock(name, false)?;
            let runtime = self.require_state(&lock.paths, &[DomainState::Running])?;
            let init = runtime
                .init
                .ok_or_else(|| PluginError::driver_failure(format!("domain '{name}' has no recorded init process")))?;
            // Marks the end as asked for: the tree is "shut off" however init reacts to SIGTERM.
            store::write_runtime(&lock.paths.shutdown, &init)?;
            if init.alive() {
                sandbox::signal(init.pid, Signal::TERM);
            }
            runtime
        };
        if timeout.is_zero() {
            return Ok(Value::Unit);
        }
        // The lock is not held while init takes its time: other calls go on meanwhile.
        if sandbox::wait_ended(&runtime, timeout) {
            let lock = self.store.lock(name, false)?;
            if let Liveness::Ended { .. } = self.store.liveness(&lock.paths)? {
                sandbox::kill_tree(&runtime, &self.cgroups(name), name)?;
                self.clean_up(&lock.paths)?;
            }
            return Ok(Value::Unit);
        }
        // The shutdown marker stays: if init ends later, that is the stop that was asked for.
        Err(PluginError::timeout(format!(
            "domain '{name}' did not stop within {} s of SIGTERM to its init (pid {}); it is still running — use destroy to force it off",
            timeout.as_secs(),
            runtime.init.map_or(0, |p| p.pid)
        )))
    }

    fn destroy(&self, name: &str) -> Result<Value, PluginError> {
        let lock = self.store.lock(name, false)?;
        if store::read_toml::<spec::Container>(&lock.paths.definition)?.is_none() {
            return Err(store::not_defined(name));
        }
        match self.store.liveness(&lock.paths)? {
            Liveness::Stopped => Err(PluginError::invalid_state(format!("domain '{name}' is not running"))),
            // Clearing a crash's leftovers makes the domain plainly shut off (as in the QEMU
            // driver); a tree that ended cleanly was already shut off.
            Liveness::Ended { clean, runtime } => {
                if let Some(runtime) = runtime {
                    sandbox::kill_tree(&runtime, &self.cgroups(name), name)?;
                }
                self.clean_up(&lock.paths)?;
                if clean {
                    return Err(PluginError::invalid_state(format!("domain '{name}' is not running")));
                }
                Ok(Value::Unit)
            }
            Liveness::Alive(runtime) => {
                sandbox::kill_tree(&runtime, &self.cgroups(name), name)?;
                self.clean_up(&lock.paths)?;
                Ok(Value::Unit)
            }
        }
    }

    /// Restarts init: the whole tree ends and a fresh one starts from the definition the
    /// container runs (libvirt's LXC driver reboots the same way).
    fn reboot(&self, name: &str) -> Result<Value, PluginError> {
        let lock = self.store.lock(name, false)?;
        let runtime = self.require_state(&lock.paths, &[DomainState::Running])?;
        sandbox::kill_tree(&runtime, &self.cgroups(name), name)?;
        self.launch(&lock.paths, &runtime.container)
    }

    fn suspend(&self, name: &str) -> Result<Value, PluginError> {
        let lock = self.store.lock(name, false)?;
        let runtime = self.require_state(&lock.paths, &[DomainState::Running])?;
        let cgroups = self.cgroups(name);
        if runtime.controllers.contains(&Controller::Freezer) {
            return cgroups.freeze().map(|()| Value::Unit);
        }
        // No freezer (not root): stop every process; the marker records the state.
        store::write_runtime(&lock.paths.stopped, &runtime.ns_init)?;
        for pid in sandbox::tree(&runtime, &cgroups) {
            sandbox::signal(pid, Signal::STOP);
        }
        Ok(Value::Unit)
    }

    fn resume(&self, name: &str) -> Result<Value, PluginError> {
        let lock = self.store.lock(name, false)?;
        let runtime = self.require_state(&lock.paths, &[DomainState::Paused])?;
        let cgroups = self.cgroups(name);
        if runtime.controllers.contains(&Controller::Freezer) {
            return cgroups.thaw().map(|()| Value::Unit);
        }
        for pid in sandbox::tree(&runtime, &cgroups) {
            sandbox::signal(pid, Signal::CONT);
        }
        std::fs::remove_file(&lock.paths.stopped).map_err(|e| store::io_failure(&lock.paths.stopped, "remove", &e))?;
        Ok(Value::Unit)
    }

    fn block_stats(&self, name: &str, device: Option<&str>) -> Result<Value, PluginError> {
        let (paths, _) = self.store.require(name)?;
        if let Some(device) = device {
            return Err(PluginError::not_found(format!(
                "domain '{name}' has no disk '{device}': containers have no block devices; omit the device for the I/O of the whole process tree"
            )));
        }
        let runtime = self.require_state(&paths, &[DomainState::Running, DomainState::Paused])?;
        let tree = sandbox::tree(&runtime, &self.cgroups(name));
        Ok(procfs::io(&tree).into_value())
    }
}

/// Resident memory of `pids` (`VmRSS`), the fallback when no memory cgroup accounts the tree.
fn rss_kib(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum()
}
