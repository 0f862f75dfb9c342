//! cgroup v1 limits and control: one cgroup per container in each mounted controller,
//! `/sys/fs/cgroup/CONTROLLER/capvirt/ROOTID/NAME`, where ROOTID is derived from the state
//! root (two state roots never share a cgroup; every connection to one root finds the same).
//!
//! - `memory`: `memory.limit_in_bytes` = `memory_mib`; usage for `domain.info`.
//! - `cpu`: `cpu.cfs_quota_us` = `vcpus` × `cpu.cfs_period_us` (at most `vcpus` CPUs' time).
//! - `cpuacct`: the tree's CPU time (`cpuacct.usage`, which counts exited processes too).
//! - `freezer`: suspend/resume; `cgroup.procs` lists the tree.
//! - `pids`: no limit, but its `cgroup.procs` lists the tree when the freezer is missing.
//!
//! A controller that is not mounted or not writable (not root) is skipped; the container
//! records which ones apply and `domain.info`/the mapping notes say what that means.

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use capvirt_plugin_api::PluginError;
use serde::{Deserialize, Serialize};

/// Where cgroup v1 hierarchies are mounted.
const MOUNT: &str = "/sys/fs/cgroup";
/// Bound on the freezer reaching FROZEN and on a cgroup emptying before removal.
pub const SETTLE: Duration = Duration::from_secs(10);

/// The controllers a container uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Controller {
    Memory,
    Cpu,
    Cpuacct,
    Freezer,
    Pids,
}

impl Controller {
    pub const ALL: [Controller; 5] =
        [Controller::Memory, Controller::Cpu, Controller::Cpuacct, Controller::Freezer, Controller::Pids];

    pub fn as_str(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Freezer => "freezer",
            Controller::Pids => "pids",
        }
    }
}

/// One container's cgroups.
#[derive(Debug, Clone)]
pub struct Cgroups {
    /// `capvirt/ROOTID/NAME`, relative to each hierarchy.
    relative: PathBuf,
}

/// FNV-1a: a stable, dependency-free name for a state root (the std hasher may change
/// between Rust releases, and the name must stay the same across capvirt builds).
fn root_id(root: &Path) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in root.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

impl Cgroups {
    pub fn new(root: &Path, name: &str) -> Cgroups {
        Cgroups { relative: Path::new("capvirt").join(root_id(root)).join(name) }
    }

    pub fn dir(&self, controller: Controller) -> PathBuf {
        Path::new(MOUNT).join(controller.as_str()).join(&self.relative)
    }

    fn file(&self, controller: Controller, name: &str) -> PathBuf {
        self.dir(controller).join(name)
    }

    /// Creates the cgroups and sets the limits; returns the controllers that apply.
    pub fn create(&self, memory_mib: u64, vcpus: u64) -> Vec<Controller> {
        let mut applied = Vec::new();
        for controller in Controller::ALL {
            let hierarchy = Path::new(MOUNT).join(controller.as_str());
            if !hierarchy.join("cgroup.procs").is_file() || fs::create_dir_all(self.dir(controller)).is_err() {
                continue;
            }
            let ok = match controller {
                Controller::Memory => write(&self.file(controller, "memory.limit_in_bytes"), memory_mib << 20).is_ok(),
                Controller::Cpu => {
                    let period = read_u64(&self.file(controller, "cpu.cfs_period_us")).unwrap_or(100_000);
                    write(&self.file(controller, "cpu.cfs_quota_us"), vcpus.saturating_mul(period)).is_ok()
                }
                Controller::Freezer => self.file(controller, "freezer.state").is_file(),
                Controller::Cpuacct | Controller::Pids => true,
            };
            if ok {
                applied.push(controller);
            }
        }
        applied
    }

    /// Moves process `pid` (all its threads) into the cgroups of `controllers`.
    pub fn attach(&self, controllers: &[Controller], pid: i32) -> Result<(), PluginError> {
        for controller in controllers {
            let path = self.file(*controller, "cgroup.procs");
            write(&path, pid).map_err(|e| {
                PluginError::driver_failure(format!("cannot move process {pid} into {}: {e}", path.display()))
            })?;
        }
        Ok(())
    }

    /// PIDs in the container's cgroup (the freezer's, else the pids', else memory's).
    pub fn procs(&self, controllers: &[Controller]) -> Vec<i32> {
        let pick = [Controller::Freezer, Controller::Pids, Controller::Memory, Controller::Cpuacct, Controller::Cpu];
        let Some(controller) = pick.into_iter().find(|c| controllers.contains(c)) else { return Vec::new() };
        fs::read_to_string(self.file(controller, "cgroup.procs"))
            .map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Whether the freezer holds the tree (FROZEN, or FREEZING on its way there).
    pub fn frozen(&self) -> bool {
        fs::read_to_string(self.file(Controller::Freezer, "freezer.state"))
            .is_ok_and(|s| matches!(s.trim(), "FROZEN" | "FREEZING"))
    }

    /// Freezes the tree and waits until every task is frozen.
    pub fn freeze(&self) -> Result<(), PluginError> {
        let state = self.file(Controller::Freezer, "freezer.state");
        write(&state, "FROZEN")
            .map_err(|e| PluginError::driver_failure(format!("cannot freeze {}: {e}", state.display())))?;
        let deadline = Instant::now() + SETTLE;
        loop {
            match fs::read_to_string(&state) {
                Ok(s) if s.trim() == "FROZEN" => return Ok(()),
                _ if Instant::now() >= deadline => {
                    return Err(PluginError::timeout(format!(
                        "the freezer of {} did not reach FROZEN within {} s",
                        self.relative.display(),
                        SETTLE.as_secs()
                    )))
                }
                _ => thread::sleep(Duration::from_micros(500)),
            }
        }
    }

    pub fn thaw(&self) -> Result<(), PluginError> {
        let state = self.file(Controller::Freezer, "freezer.state");
        write(&state, "THAWED")
            .map_err(|e| PluginError::driver_failure(format!("cannot thaw {}: {e}", state.display())))
    }

    /// The tree's CPU time in nanoseconds (`cpuacct.usage`).
    pub fn cpu_time_ns(&self) -> Option<u64> {
        read_u64(&self.file(Controller::Cpuacct, "cpuacct.usage"))
    }

    /// The tree's memory use in bytes (`memory.usage_in_bytes`, page cache included).
    pub fn memory_bytes(&self) -> Option<u64> {
        read_u64(&self.file(Controller::Memory, "memory.usage_in_bytes"))
    }

    /// Removes the container's cgroups (they must be empty; a leaving task is waited for up
    /// to `wait`), then the per-root and `capvirt` parents when nothing else uses them.
    pub fn remove(&self, wait: Duration) -> Result<(), PluginError> {
        for controller in Controller::ALL {
            let dir = self.dir(controller);
            let deadline = Instant::now() + wait;
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(PluginError::driver_failure(format!("cannot remove cgroup {}: {e}", dir.display())))
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
            // Busy or absent parents are another container's or another root's: leave them.
            let mut parent = dir.parent();
            for _ in 0..2 {
                if let Some(p) = parent {
                    let _ = fs::remove_dir(p);
                    parent = p.parent();
                }
            }
        }
        Ok(())
    }
}

fn write(path: &Path, value: impl std::fmt::Display) -> io::Result<()> {
    fs::write(path, value.to_string())
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_per_root_and_distinct_between_roots() {
        let a = Cgroups::new(Path::new("/var/lib/capvirt/container"), "web");
        let b = Cgroups::new(Path::new("/tmp/other"), "web");
        assert_eq!(
            a.dir(Controller::Memory),
            Cgroups::new(Path::new("/var/lib/capvirt/container"), "web").dir(Controller::Memory)
        );
        assert_ne!(a.dir(Controller::Memory), b.dir(Controller::Memory));
        assert!(a.dir(Controller::Freezer).starts_with("/sys/fs/cgroup/freezer/capvirt/"));
        assert!(a.dir(Controller::Freezer).ends_with("web"));
    }
}
