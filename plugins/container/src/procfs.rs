//! What the driver reads from `/proc`: a process's identity (PID + start time, so a reused
//! PID is never mistaken for a container's process), the tree below a process, CPU time and
//! I/O counters.

use std::{collections::HashMap, fs};

use capvirt_plugin_api::types::BlockStats;
use serde::{Deserialize, Serialize};

/// A process as the driver records it: the PID alone could be reused after the process dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat` (clock ticks after boot).
    pub start: u64,
}

/// The fields of `/proc/PID/stat` the driver uses.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub state: char,
    pub ppid: i32,
    /// utime + stime + cutime + cstime, in clock ticks (reaped children count: their time
    /// was the container's).
    pub cpu_ticks: u64,
    pub start: u64,
}

pub fn stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        cpu_ticks: num(11)? + num(12)? + num(13)? + num(14)?,
        start: num(19)?,
    })
}

impl Proc {
    /// The running process `pid` (not a zombie).
    pub fn of(pid: i32) -> Option<Proc> {
        stat(pid).filter(|s| !matches!(s.state, 'Z' | 'X' | 'x')).map(|s| Proc { pid, start: s.start })
    }

    /// Whether this very process still runs (same PID and start time, not a zombie).
    pub fn alive(&self) -> bool {
        Proc::of(self.pid) == Some(*self)
    }
}

/// PIDs of the live processes below `root` (not `root` itself), from one scan of `/proc`.
pub fn descendants(root: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for pid in entries.filter_map(Result::ok).filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok())) {
        if let Some(s) = stat(pid).filter(|s| !matches!(s.state, 'Z' | 'X' | 'x')) {
            children.entry(s.ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for &child in children.get(&pid).map(Vec::as_slice).unwrap_or(&[]) {
            if !out.contains(&child) && child != root {
                out.push(child);
                queue.push(child);
            }
        }
    }
    out
}

/// The PIDs of a process's direct children.
pub fn children(pid: i32) -> Vec<i32> {
    match fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        Ok(text) => text.split_whitespace().filter_map(|p| p.parse().ok()).collect(),
        // Kernels without CONFIG_PROC_CHILDREN: scan /proc.
        Err(_) => descendants(pid).into_iter().filter(|c| stat(*c).is_some_and(|s| s.ppid == pid)).collect(),
    }
}

/// CPU time of `pids` in nanoseconds, from their `/proc/PID/stat`.
pub fn cpu_time_ns(pids: &[i32]) -> u64 {
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    let ticks: u64 = pids.iter().filter_map(|p| stat(*p)).map(|s| s.cpu_ticks).sum();
    ticks.saturating_mul(1_000_000_000 / per_second)
}

/// `/proc/PID/io` summed over `pids`: syscr/syscw as requests, read_bytes/write_bytes (what
/// reached the storage layer) as bytes. A process's counters include those of the children
/// it reaped, so work done by short-lived processes stays counted.
pub fn io(pids: &[i32]) -> BlockStats {
    let mut total = BlockStats::default();
    for pid in pids {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/io")) else { continue };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        total =
            total.plus(BlockStats::new(field("syscr"), field("read_bytes"), field("syscw"), field("write_bytes"), 0));
    }
    total
}

/// The symlink target of `/proc/PID/exe` (what the process executes).
pub fn exe(pid: i32) -> Option<std::path::PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_itself_and_not_a_reused_pid() {
        let me = Proc::of(std::process::id() as i32).unwrap_or_else(|| panic!("no /proc/self/stat"));
        assert!(me.alive());
        assert!(!Proc { start: me.start + 1, ..me }.alive());
    }
}
