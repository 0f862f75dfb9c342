//! The maintainer workflow's IO: finding the registry source tree, reading a registry from a
//! directory or a git revision, and writing files atomically.

use std::{
    fs,
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use capvirt_host::registry::{source, SourceFile};

/// The registry directory for maintainer commands started in `start`: `start` itself when it
/// holds `registry.toml`, else the nearest `proposals/` with one in `start` or above.
pub fn find_registry_dir(start: &Path) -> Option<PathBuf> {
    if start.join("registry.toml").is_file() {
        return Some(start.to_path_buf());
    }
    start.ancestors().map(|dir| dir.join("proposals")).find(|dir| dir.join("registry.toml").is_file())
}

/// Reads a registry directory (see [`source::read_dir`]).
pub fn read_dir(root: &Path) -> io::Result<Vec<SourceFile>> {
    if !root.join("registry.toml").is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is not a registry directory (no registry.toml)", root.display()),
        ));
    }
    source::read_dir(root)
}

/// Where a registry for `registry diff` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryRef {
    Dir(PathBuf),
    /// A git revision and the registry's directory inside the repository.
    Git {
        rev: String,
        dir: String,
    },
}

impl RegistryRef {
    /// `DIR` when such a directory exists (a checkout's root stands for its `proposals/`),
    /// else `REV` or `REV:DIR` naming a git revision (DIR defaults to `proposals`).
    pub fn parse(arg: &str) -> RegistryRef {
        let path = Path::new(arg);
        if path.is_dir() {
            if !path.join("registry.toml").is_file() && path.join("proposals").join("registry.toml").is_file() {
                return RegistryRef::Dir(path.join("proposals"));
            }
            return RegistryRef::Dir(path.to_path_buf());
        }
        match arg.split_once(':') {
            Some((rev, dir)) if !dir.is_empty() => {
                RegistryRef::Git { rev: rev.to_string(), dir: dir.trim_matches('/').to_string() }
            }
            _ => RegistryRef::Git { rev: arg.trim_end_matches(':').to_string(), dir: "proposals".into() },
        }
    }

    /// How to name it in reports.
    pub fn label(&self) -> String {
        match self {
            RegistryRef::Dir(dir) => dir.display().to_string(),
            RegistryRef::Git { rev, dir } => format!("{rev}:{dir}"),
        }
    }

    /// Reads the registry's files; git revisions are read from the repository around `cwd`.
    pub fn read(&self, cwd: &Path) -> io::Result<Vec<SourceFile>> {
        match self {
            RegistryRef::Dir(dir) => read_dir(dir),
            RegistryRef::Git { rev, dir } => read_git(cwd, rev, dir),
        }
    }
}

fn git(cwd: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(cwd).stdin(Stdio::null());
    cmd
}

/// Bound on one git command: a registry is a few dozen small files, so anything slower is a
/// hung git (a lock, a credential prompt, a network filesystem) and is killed.
const GIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Kills the child `pid` unless the returned guard is dropped within [`GIT_TIMEOUT`]: git
/// cannot hang a maintainer command (or CI) forever.
fn watchdog(pid: u32) -> Watchdog {
    use std::sync::atomic::Ordering;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watching = std::sync::Arc::clone(&done);
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + GIT_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if watching.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        if !watching.load(Ordering::Acquire) {
            if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    });
    Watchdog(done)
}

/// Stops its [`watchdog`] when dropped (on every path out of a git exchange).
struct Watchdog(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

fn git_output(cmd: &mut Command, what: &str) -> io::Result<Vec<u8>> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run git: {e}")))?;
    let watch = watchdog(child.id());
    let output = child.wait_with_output();
    drop(watch);
    let output = output.map_err(|e| io::Error::new(e.kind(), format!("git: {e}")))?;
    if output.status.signal() == Some(9) {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what}: git did not finish within {} s", GIT_TIMEOUT.as_secs()),
        ));
    }
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(io::Error::other(format!("{what}: {}", super::one_line(&stderr))));
    }
    Ok(output.stdout)
}

/// The registry files under `dir` at git revision `rev`, read with one `git cat-file --batch`.
pub fn read_git(cwd: &Path, rev: &str, dir: &str) -> io::Result<Vec<SourceFile>> {
    if rev.is_empty() || rev.starts_with('-') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{rev:?} is not a directory or git revision")));
    }
    let commit = git_output(
        git(cwd).args(["rev-parse", "--verify", "--quiet", "--end-of-options"]).arg(format!("{rev}^{{commit}}")),
        &format!("{rev:?} is neither a directory nor a git revision"),
    )?;
    let commit = String::from_utf8_lossy(&commit).trim().to_string();
    let listing = git_output(
        git(cwd).args(["ls-tree", "-r", "-z", "--full-tree", &commit, "--"]).arg(format!("{dir}/")),
        &format!("cannot list {dir}/ at {rev}"),
    )?;
    // `<mode> blob <sha>\t<path>\0`
    let mut blobs = Vec::new();
    for entry in listing.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        let entry = String::from_utf8_lossy(entry);
        let Some((meta, path)) = entry.split_once('\t') else { continue };
        let mut meta = meta.split(' ');
        let (Some(_mode), Some("blob"), Some(sha)) = (meta.next(), meta.next(), meta.next()) else { continue };
        let Some(relative) = path.strip_prefix(dir).map(|p| p.trim_start_matches('/')) else { continue };
        let wanted = relative == "registry.toml"
            || relative == "types.toml"
            || relative
                .strip_prefix("capabilities/")
                .is_some_and(|name| name.ends_with(".toml") && !name.contains('/'));
        if wanted {
            blobs.push((relative.to_string(), sha.to_string()));
        }
    }
    if !blobs.iter().any(|(path, _)| path == "registry.toml") {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no {dir}/registry.toml at {rev}")));
    }
    let mut child = git(cwd)
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run git: {e}")))?;
    let _watch = watchdog(child.id());
    let mut stdin = child.stdin.take().ok_or_else(|| io::Error::other("git cat-file: no stdin"))?;
    let shas: String = blobs.iter().map(|(_, sha)| format!("{sha}\n")).collect();
    // Written from a thread: git's output fills its pipe while we are still writing.
    let writer = std::thread::spawn(move || stdin.write_all(shas.as_bytes()));
    let stdout = child.stdout.take().ok_or_else(|| io::Error::other("git cat-file: no stdout"))?;
    let mut reader = BufReader::new(stdout);
    let mut files = Vec::with_capacity(blobs.len());
    for (path, sha) in &blobs {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let size: usize =
            header.split(' ').nth(2).and_then(|s| s.trim().parse().ok()).ok_or_else(|| {
                io::Error::other(format!("git cat-file: unexpected reply for {sha}: {}", header.trim()))
            })?;
        let mut content = vec![0; size + 1]; // the blob and a newline
        reader.read_exact(&mut content)?;
        content.truncate(size);
        let text = String::from_utf8(content)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{dir}/{path} at {rev} is not UTF-8")))?;
        files.push(SourceFile { path: path.clone(), text });
    }
    let _ = writer.join();
    let _ = child.wait();
    Ok(files)
}

/// Writes `text` to `path` through a temporary file in the same directory, synced and then
/// renamed over the target: readers see the old file or the new one, never a partial one.
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    capvirt_plugin_api::fs::write_atomic(path, text.as_bytes())
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Writes several files; each is atomic on its own. Parent directories are created.
pub fn write_all(root: &Path, files: &[(String, String)]) -> io::Result<()> {
    for (relative, text) in files {
        let path = root.join(relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", parent.display())))?;
        }
        write_atomic(&path, text)?;
    }
    Ok(())
}
