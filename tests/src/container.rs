//! Support for tests and benchmarks that run real bubblewrap containers through the container
//! driver.
//!
//! A [`Sandbox`] owns a temporary directory holding state roots, specs and directories shared
//! into containers. When dropped (also when a test panics) it SIGKILLs every process recorded
//! in the runtime files of its state roots (the namespace's PID 1 takes the whole tree with
//! it), waits for them to go, removes the cgroups those processes were in, then deletes the
//! directory. It relies on nothing but `/proc` and the files, not on the driver under test.
//! Every wait here is bounded.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use tempfile::TempDir;

pub use crate::output_within;
use crate::{artifacts, capvirt, plugin_dir};

/// A directory with only the container driver, shared by the tests of one process.
pub fn container_plugin_dir() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| plugin_dir(&[("libcapvirt_driver_container.so", &artifacts().container_plugin)])).path()
}

/// Bound on one `capvirt` invocation in tests (the driver bounds its own waits well below it).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A private directory for one test's containers, cleaned up on drop.
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
        Sandbox { dir: TempDir::new().unwrap_or_else(|e| panic!("tempdir: {e}")) }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A state root inside the sandbox (created by the driver on first write).
    pub fn root(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    pub fn uri(&self, root: &str) -> String {
        format!("container:///session?root={}", self.root(root).display())
    }

    /// A directory inside the sandbox (for sharing into containers).
    pub fn dir(&self, name: &str) -> PathBuf {
        let path = self.path().join(name);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }

    /// Writes a file into the sandbox and returns its path as a string.
    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.path().join(name);
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path.display().to_string()
    }

    /// A `capvirt -c URI` command, checking results against the registry.
    pub fn capvirt_uri(&self, uri: &str) -> Command {
        let mut cmd = capvirt(container_plugin_dir(), self.path());
        cmd.env("CAPVIRT_CHECK_RESULTS", "1").arg("-c").arg(uri);
        cmd
    }

    /// Runs `capvirt -c ROOT ARGS…` within [`COMMAND_TIMEOUT`].
    pub fn run(&self, root: &str, args: &[&str]) -> Output {
        let mut cmd = self.capvirt_uri(&self.uri(root));
        cmd.args(args);
        output_within(cmd, COMMAND_TIMEOUT)
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, root: &str, args: &[&str]) -> String {
        let out = self.run(root, args);
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
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let text = self.ok(root, &all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("capvirt {args:?}: not JSON ({e}): {text}"))
    }

    /// The state of `domain` as `dominfo` reports it.
    pub fn state(&self, root: &str, domain: &str) -> String {
        self.json(root, &["dominfo", domain])["state"].as_str().unwrap_or_default().to_string()
    }

    /// The PIDs a container's runtime file records, by role (`monitor`, `ns_init`, `init`).
    pub fn recorded_pid(&self, root: &str, domain: &str, role: &str) -> Option<i32> {
        let file = self.root(root).join("domains").join(domain).join("run/runtime.toml");
        recorded_pids(&file).into_iter().find(|(r, _)| r == role).map(|(_, pid)| pid)
    }

    /// Every live process of a container's tree: bwrap's outer process and all below it.
    pub fn tree(&self, root: &str, domain: &str) -> Vec<i32> {
        match self.recorded_pid(root, domain, "monitor") {
            Some(pid) if alive(pid) => {
                let mut pids = descendants(pid);
                pids.push(pid);
                pids
            }
            _ => Vec::new(),
        }
    }

    /// Runtime files of every container of every state root anywhere in the sandbox (a state
    /// root may sit a few directories down).
    fn runtime_files(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut dirs = vec![(self.path().to_path_buf(), 0)];
        while let Some((dir, depth)) = dirs.pop() {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.filter_map(Result::ok) {
                let path = entry.path();
                if path.ends_with("run/runtime.toml") {
                    found.push(path);
                } else if depth < 6 && entry.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push((path, depth + 1));
                }
            }
        }
        found
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let mut pids: Vec<i32> = Vec::new();
        for file in self.runtime_files() {
            for (_, pid) in recorded_pids(&file) {
                if alive(pid) {
                    pids.push(pid);
                    pids.extend(descendants(pid));
                }
            }
        }
        let cgroups: Vec<PathBuf> = pids.iter().flat_map(|pid| capvirt_cgroups(*pid)).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
            for pid in &pids {
                signal(*pid, rustix::process::Signal::KILL);
            }
            // Frozen tasks act on SIGKILL once thawed.
            for cgroup in &cgroups {
                let _ = fs::write(cgroup.join("freezer.state"), "THAWED");
            }
            thread::sleep(Duration::from_millis(10));
        }
        for cgroup in &cgroups {
            // The container's cgroup, then its per-root and `capvirt` parents if now empty.
            for dir in cgroup.ancestors().take(3) {
                let _ = fs::remove_dir(dir);
            }
        }
    }
}

/// `(role, pid)` of every `pid = N` a runtime file records under `[role]`.
fn recorded_pids(file: &Path) -> Vec<(String, i32)> {
    let text = fs::read_to_string(file).unwrap_or_default();
    let mut role = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            role = name.to_string();
        } else if let Some(pid) = line.strip_prefix("pid = ").and_then(|p| p.trim().parse().ok()) {
            out.push((role.clone(), pid));
        }
    }
    out
}

/// The `capvirt/…` cgroup directories (cgroup v1) process `pid` is in.
pub fn capvirt_cgroups(pid: i32) -> Vec<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let controller = controllers.split(',').next().filter(|c| !c.is_empty())?;
            path.starts_with("/capvirt/").then(|| Path::new("/sys/fs/cgroup").join(controller).join(&path[1..]))
        })
        .collect()
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: i32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Whether `pid` is a live (non-zombie) process.
pub fn alive(pid: i32) -> bool {
    stat_fields(pid).is_some_and(|f| !matches!(f.first().map(String::as_str), Some("Z" | "X") | None))
}

/// Live processes below `root`.
pub fn descendants(root: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    let parents: Vec<(i32, i32)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| alive(*pid))
        .filter_map(|pid| Some((pid, stat_fields(pid)?.get(1)?.parse().ok()?)))
        .collect();
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(parent) = queue.pop() {
        for (pid, _) in parents.iter().filter(|(_, ppid)| *ppid == parent) {
            if !out.contains(pid) {
                out.push(*pid);
                queue.push(*pid);
            }
        }
    }
    out
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
        thread::sleep(Duration::from_millis(20));
    }
}

/// A container spec in TOML: `init` as an argument list, optional extra TOML (filesystems).
pub fn spec_toml(name: &str, init: &[&str], extra: &str) -> String {
    let init: Vec<String> = init.iter().map(|a| toml_string(a)).collect();
    format!("name = \"{name}\"\nmemory_mib = 64\nvcpus = 1\n\n[boot]\ninit = [{}]\n{extra}", init.join(", "))
}

/// `[[filesystems]]` entries: the host's root read-only, and `out` writable at `/mnt` (a
/// target under a read-only root must exist there: bwrap cannot create it).
pub fn root_and_out(out: &Path) -> String {
    format!(
        "\n[[filesystems]]\nsource = \"/\"\ntarget = \"/\"\n\n[[filesystems]]\nsource = {}\ntarget = \"/mnt\"\nreadonly = false\n",
        toml_string(&out.display().to_string())
    )
}

/// A TOML basic string.
pub fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
