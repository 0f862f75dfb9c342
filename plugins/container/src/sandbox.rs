//! bubblewrap: finding it, the command line a container runs with, launching the tree inside
//! its cgroups, and ending it.
//!
//! Launch order, so that no process of the workload ever runs outside the cgroups:
//! 1. spawn bwrap with `--info-fd` (it reports the PID of the namespace's PID 1),
//!    `--block-fd` (that PID 1 waits for a byte before it runs anything) and
//!    `--json-status-fd` (a file in the runtime directory; bwrap appends the exit code);
//! 2. record both PIDs, move the namespace's PID 1 into the cgroups;
//! 3. write the byte: bwrap sets up the mounts and executes init, which inherits the cgroups.
//!
//! `--die-with-parent` is deliberately absent: a container outlives the `capvirt` process
//! that starts it. bwrap runs in its own process group, detached from the caller's terminal.

use std::{
    ffi::OsString,
    fs::{self, OpenOptions},
    io::{Read, Write},
    os::{fd::OwnedFd, unix::fs::OpenOptionsExt, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use capvirt_plugin_api::PluginError;
use command_fds::{CommandFdExt, FdMapping};
use rustix::process::Signal;

use crate::{
    cgroup::{Cgroups, Controller},
    procfs::{self, Proc},
    spec::Container,
    store::{self, DomainPaths, Runtime},
};

/// Bound on bwrap reporting its namespace's PID 1, and on init being executed.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a killed tree disappearing.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Host directories every container without `[[filesystems]]` sees read-only (`/lib*` is
/// expanded from the host's root directory).
const DEFAULT_VIEW: [&str; 4] = ["/usr", "/bin", "/sbin", "/etc"];
const INFO_FD: i32 = 3;
const BLOCK_FD: i32 = 4;
const STATUS_FD: i32 = 5;

/// The bubblewrap a connection uses: `bwrap` found on `PATH`.
#[derive(Debug, Clone)]
pub struct Bwrap {
    pub path: PathBuf,
}

impl Bwrap {
    /// Finds `bwrap` on `PATH`, or says how to get it.
    pub fn find() -> Result<Bwrap, PluginError> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join("bwrap"))
            .find(|candidate| is_executable(candidate))
            .map(|path| Bwrap { path })
            .ok_or_else(|| {
                PluginError::unsupported(
                    "the container driver needs bubblewrap: no `bwrap` on PATH (install the `bubblewrap` package)"
                        .to_string(),
                )
            })
    }

    /// `bwrap --version`'s number (`0.8.0`).
    pub fn version(&self) -> Result<String, PluginError> {
        let out = Command::new(&self.path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| PluginError::driver_failure(format!("cannot run {}: {e}", self.path.display())))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().next().unwrap_or_default().trim();
        match line.strip_prefix("bubblewrap ") {
            Some(version) if out.status.success() => Ok(version.to_string()),
            _ => Err(PluginError::driver_failure(format!(
                "{} --version printed {line:?}, not a bubblewrap version",
                self.path.display()
            ))),
        }
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// bwrap's arguments for a container (before `--`), and init after it.
pub fn command_line(container: &Container, as_root: bool) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    add(&mut args, &["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net"]);
    // As root a user namespace would map root to root and protect nothing; without root it
    // is what lets bwrap create the others.
    if !as_root {
        add(&mut args, &["--unshare-user"]);
    }
    add(&mut args, &["--hostname", &container.name, "--new-session", "--chdir", "/"]);
    let mut mounts: Vec<(String, Vec<OsString>)> = Vec::new();
    if container.filesystems.is_empty() {
        let libs = fs::read_dir("/")
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with("lib"))
                    .map(|n| format!("/{n}"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for dir in DEFAULT_VIEW.iter().map(|d| d.to_string()).chain(libs) {
            let host = Path::new(&dir);
            // Merged-/usr hosts have /bin → usr/bin: the same link inside keeps paths alike.
            if let Ok(link) = fs::read_link(host) {
                mounts.push((dir.clone(), vec!["--symlink".into(), link.into_os_string(), dir.clone().into()]));
            } else if host.is_dir() {
                mounts.push((dir.clone(), vec!["--ro-bind".into(), dir.clone().into(), dir.clone().into()]));
            }
        }
    }
    for share in &container.filesystems {
        let op = if share.readonly { "--ro-bind" } else { "--bind" };
        mounts.push((
            share.target.clone(),
            vec![op.into(), share.source.clone().into_os_string(), share.target.clone().into()],
        ));
    }
    if !container.filesystems.iter().any(|s| s.target == "/tmp") {
        mounts.push(("/tmp".into(), vec!["--tmpfs".into(), "/tmp".into()]));
    }
    // Parents before children, whatever order the spec lists them in.
    mounts.sort_by_key(|(target, _)| if target == "/" { 0 } else { target.matches('/').count() });
    for (_, mount) in mounts {
        args.extend(mount);
    }
    add(&mut args, &["--proc", "/proc", "--dev", "/dev"]);
    add(&mut args, &["--info-fd", &INFO_FD.to_string(), "--block-fd", &BLOCK_FD.to_string()]);
    add(&mut args, &["--json-status-fd", &STATUS_FD.to_string(), "--"]);
    args.extend(container.init.iter().map(OsString::from));
    args
}

fn add(args: &mut Vec<OsString>, items: &[&str]) {
    args.extend(items.iter().map(OsString::from));
}

/// The environment init starts with (nothing of the caller's leaks in).
fn environment(container: &Container) -> Vec<(&'static str, String)> {
    vec![
        ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()),
        ("HOME", "/".to_string()),
        ("HOSTNAME", container.name.clone()),
        // The convention systemd and LXC use to tell a process it runs in a container.
        ("container", "capvirt".to_string()),
    ]
}

/// Starts the container's tree inside `cgroups` (already created, `controllers` applying).
/// Returns once init has been executed, with the runtime record written.
pub fn launch(
    bwrap: &Bwrap,
    bwrap_version: &str,
    paths: &DomainPaths,
    container: &Container,
    cgroups: &Cgroups,
    controllers: &[Controller],
) -> Result<(Runtime, Child), PluginError> {
    for share in &container.filesystems {
        if !share.source.is_dir() {
            return Err(PluginError::not_found(format!(
                "filesystem source {} of domain '{}' no longer exists",
                share.source.display(),
                paths.name
            )));
        }
    }
    store::make_private_dir(&paths.run)?;
    let (info_read, info_write) = pipe()?;
    let (block_read, block_write) = pipe()?;
    let status = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&paths.status)
        .map_err(|e| store::io_failure(&paths.status, "create", &e))?;
    let console = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&paths.console)
        .map_err(|e| store::io_failure(&paths.console, "create", &e))?;
    let console_err = console.try_clone().map_err(|e| store::io_failure(&paths.console, "open", &e))?;
    let mut command = Command::new(&bwrap.path);
    command
        .args(command_line(container, rustix::process::geteuid().is_root()))
        .env_clear()
        .envs(environment(container))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(console))
        .stderr(Stdio::from(console_err))
        // Its own process group: a Ctrl-C aimed at capvirt never reaches the container.
        .process_group(0);
    command
        .fd_mappings(vec![
            FdMapping { parent_fd: info_write, child_fd: INFO_FD },
            FdMapping { parent_fd: block_read, child_fd: BLOCK_FD },
            FdMapping { parent_fd: OwnedFd::from(status), child_fd: STATUS_FD },
        ])
        .map_err(|e| PluginError::internal(format!("cannot pass descriptors to bwrap: {e}")))?;
    let mut child = command
        .spawn()
        .map_err(|e| PluginError::driver_failure(format!("cannot run {}: {e}", bwrap.path.display())))?;
    // Our copies of bwrap's ends must close, or reading the info pipe never sees its end.
    drop(command);
    let started = (|| {
        let monitor = Proc::of(child.id() as i32).ok_or_else(|| exited_early(paths))?;
        let info = read_info(info_read, paths)?;
        let ns_pid = info
            .get("child-pid")
            .and_then(serde_json::Value::as_i64)
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| PluginError::driver_failure(format!("bwrap reported no child-pid: {info}")))?;
        let ns_init = Proc::of(ns_pid).ok_or_else(|| exited_early(paths))?;
        let mut runtime = Runtime {
            monitor,
            ns_init,
            init: None,
            controllers: controllers.to_vec(),
            bwrap_version: bwrap_version.to_string(),
            container: container.clone(),
        };
        // Recorded before anything runs: a capvirt killed from here on leaves a tree that
        // the next call still finds (and can destroy).
        store::write_runtime(&paths.runtime, &runtime)?;
        // Only the namespace's PID 1 moves: everything of the container descends from it.
        // bwrap's outer process merely waits for it and reports its exit, and each move costs
        // the kernel an RCU grace period per controller (milliseconds on a busy host).
        // A bwrap that fails its set-up (a mount point it cannot create) ends here: its own
        // message says more than the failed move.
        if let Err(e) = cgroups.attach(controllers, ns_init.pid) {
            return Err(if ns_init.alive() { e } else { exited_early(paths) });
        }
        let mut block = fs::File::from(block_write);
        block.write_all(b"x").map_err(|e| PluginError::driver_failure(format!("cannot release bwrap: {e}")))?;
        drop(block);
        runtime.init = wait_for_init(&bwrap.path, &runtime, paths)?;
        store::write_runtime(&paths.runtime, &runtime)?;
        Ok(runtime)
    })();
    match started {
        Ok(runtime) => Ok((runtime, child)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), PluginError> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| PluginError::driver_failure(format!("cannot create a pipe for bwrap: {e}")))
}

/// bwrap's `--info-fd` document, read until bwrap closes it (bounded).
fn read_info(fd: OwnedFd, paths: &DomainPaths) -> Result<serde_json::Value, PluginError> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut file = fs::File::from(fd);
    let mut text = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout =
            rustix::event::Timespec::try_from(left).unwrap_or(rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 });
        let mut fds = [rustix::event::PollFd::new(&file, rustix::event::PollFlags::IN)];
        let ready = rustix::event::poll(&mut fds, Some(&timeout))
            .map_err(|e| PluginError::driver_failure(format!("cannot wait for bwrap: {e}")))?;
        if ready == 0 {
            return Err(PluginError::timeout(format!(
                "bwrap did not report the sandbox of domain '{}' within {} s",
                paths.name,
                START_TIMEOUT.as_secs()
            )));
        }
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PluginError::driver_failure(format!("cannot read bwrap's info: {e}"))),
        }
    }
    if text.is_empty() {
        return Err(exited_early(paths));
    }
    serde_json::from_slice(&text)
        .map_err(|e| PluginError::driver_failure(format!("bwrap's info for domain '{}' is not JSON: {e}", paths.name)))
}

/// Waits until bwrap's PID 1 has forked init and init runs its own program. `None`: init ran
/// and exited 0 before it could be seen running (a short-lived container; it is shut off).
fn wait_for_init(bwrap: &Path, runtime: &Runtime, paths: &DomainPaths) -> Result<Option<Proc>, PluginError> {
    let bwrap_exe = fs::canonicalize(bwrap).unwrap_or_else(|_| bwrap.to_path_buf());
    let deadline = Instant::now() + START_TIMEOUT;
    let mut pause = Duration::from_micros(200);
    loop {
        if !runtime.ns_init.alive() {
            return match recorded_exit(paths) {
                Some(0) => Ok(None),
                _ => Err(exited_early(paths)),
            };
        }
        // bwrap's PID 1 forks exactly once, for init; orphans it adopts come later.
        if let Some(pid) = procfs::children(runtime.ns_init.pid).into_iter().min() {
            if procfs::exe(pid).is_some_and(|exe| exe != bwrap_exe) {
                if let Some(init) = Proc::of(pid) {
                    return Ok(Some(init));
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(PluginError::timeout(format!(
                "the init of domain '{}' did not start within {} s",
                paths.name,
                START_TIMEOUT.as_secs()
            )));
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

/// The exit code bwrap records once its PID 1 ended (bwrap's outer process writes it just
/// after; waits for it briefly).
fn recorded_exit(paths: &DomainPaths) -> Option<i64> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let code = store::exit_code(&paths.status);
        if code.is_some() || Instant::now() >= deadline {
            return code;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// The error for a bwrap that ended during start, with its own message when it left one,
/// else init's exit status.
fn exited_early(paths: &DomainPaths) -> PluginError {
    let text = fs::read_to_string(&paths.console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("bwrap:")).collect();
    let mut why =
        if lines.is_empty() { text.lines().rev().take(3).collect::<Vec<_>>().join("; ") } else { lines.join("; ") };
    if let Some(code) = store::exit_code(&paths.status).filter(|_| lines.is_empty()) {
        why = format!("init exited with status {code}{}{why}", if why.is_empty() { "" } else { ": " });
    }
    let why: String = why.chars().take(600).collect();
    PluginError::driver_failure(format!(
        "the sandbox of domain '{}' ended while starting: {}",
        paths.name,
        if why.trim().is_empty() { "no message" } else { why.trim() }
    ))
}

/// Every live process of the tree: the cgroup's members and whatever descends from bwrap.
pub fn tree(runtime: &Runtime, cgroups: &Cgroups) -> Vec<i32> {
    let mut pids = cgroups.procs(&runtime.controllers);
    for proc in [runtime.monitor, runtime.ns_init] {
        if proc.alive() {
            pids.push(proc.pid);
            pids.extend(procfs::descendants(proc.pid));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|p| Proc::of(*p).is_some());
    pids
}

pub fn signal(pid: i32, sig: Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        // A process that is already gone is what the caller wants anyway.
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// SIGKILLs the whole tree (frozen first when the freezer applies, so nothing forks while
/// it is being killed) and waits until no process of it is left.
pub fn kill_tree(runtime: &Runtime, cgroups: &Cgroups, name: &str) -> Result<(), PluginError> {
    let freezer = runtime.controllers.contains(&Controller::Freezer);
    if freezer {
        let _ = cgroups.freeze();
    }
    for pid in tree(runtime, cgroups) {
        signal(pid, Signal::KILL);
    }
    if freezer {
        // Frozen tasks act on SIGKILL once thawed.
        let _ = cgroups.thaw();
    }
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        let left = tree(runtime, cgroups);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(PluginError::driver_failure(format!(
                "processes {left:?} of domain '{name}' survived SIGKILL for {} s",
                EXIT_TIMEOUT.as_secs()
            )));
        }
        for pid in left {
            signal(pid, Signal::KILL);
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until the namespace's PID 1 is gone (the kernel then ends every process in it).
pub fn wait_ended(runtime: &Runtime, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !runtime.ns_init.alive() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Share;

    fn container(filesystems: Vec<Share>) -> Container {
        Container {
            name: "c1".into(),
            memory_mib: 64,
            vcpus: 1,
            init: vec!["/bin/sh".into(), "-c".into(), "--bind / /x".into()],
            filesystems,
        }
    }

    #[test]
    fn init_follows_the_separator_and_is_never_an_option() {
        let args = command_line(&container(Vec::new()), true);
        let separator = args.iter().position(|a| a == "--").unwrap_or_else(|| panic!("no --"));
        assert_eq!(&args[separator + 1..], &["/bin/sh", "-c", "--bind / /x"].map(OsString::from));
        assert!(!args.iter().any(|a| a == "--die-with-parent"));
        assert!(args.iter().any(|a| a == "--unshare-net"));
        assert!(args.windows(2).any(|w| w[0] == "--hostname" && w[1] == "c1"));
        assert!(args.windows(2).any(|w| w[0] == "--tmpfs" && w[1] == "/tmp"));
        assert!(!args.iter().any(|a| a == "--unshare-user"));
        assert!(command_line(&container(Vec::new()), false).iter().any(|a| a == "--unshare-user"));
    }

    #[test]
    fn shares_mount_parents_first() {
        let shares = vec![
            Share { source: "/usr".into(), target: "/a/b".into(), readonly: false },
            Share { source: "/".into(), target: "/".into(), readonly: true },
            Share { source: "/etc".into(), target: "/a".into(), readonly: true },
        ];
        let args = command_line(&container(shares), true);
        let at = |needle: &str| args.iter().position(|a| a == needle).unwrap_or(usize::MAX);
        assert!(at("/") < at("/a") && at("/a") < at("/a/b"), "{args:?}");
        assert!(args.windows(3).any(|w| w[0] == "--bind" && w[1] == "/usr" && w[2] == "/a/b"));
        assert!(!args.iter().any(|a| a == "/etc/hostname"));
    }
}
