//! Support for capvirt's integration tests and benchmarks.
//!
//! `cargo test` leaves cdylibs only in `target/*/deps/` and exposes no binary of another
//! package, so [`artifacts`] builds the `capvirt` and `capvirtd` binaries and the plugins once per test
//! process with `cargo build --message-format=json` and reads their paths from cargo's output.
//! Tests then copy the plugins they want into private directories, so each test controls
//! exactly what the host discovers.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

pub mod generated;

pub use tempfile::TempDir;

pub mod container;
pub mod pki;
pub mod qemu;

/// Paths of the freshly built binaries.
#[derive(Debug)]
pub struct Artifacts {
    pub capvirt: PathBuf,
    /// The daemon without the CLI (`capvirtd`), what the systemd unit runs.
    pub capvirtd: PathBuf,
    pub test_plugin: PathBuf,
    pub fixture_plugin: PathBuf,
    pub qemu_plugin: PathBuf,
    pub container_plugin: PathBuf,
}

/// Packages built for the tests, with the artifact each one contributes.
const PACKAGES: &[&str] = &[
    "capvirt-cli",
    "capvirt-daemon",
    "capvirt-driver-test",
    "capvirt-fixture-plugin",
    "capvirt-driver-qemu",
    "capvirt-driver-container",
];

/// Builds (once per process) and returns the artifacts. Panics with cargo's output when the
/// build fails: nothing can be tested then.
pub fn artifacts() -> &'static Artifacts {
    static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(build)
}

fn release_profile() -> bool {
    std::env::current_exe().map(|exe| exe.components().any(|c| c.as_os_str() == "release")).unwrap_or(false)
}

fn build() -> Artifacts {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--message-format=json-render-diagnostics"]);
    for package in PACKAGES {
        cmd.args(["-p", package]);
    }
    if release_profile() {
        cmd.arg("--release");
    }
    cmd.current_dir(workspace_root());
    let output = cmd.output().unwrap_or_else(|e| panic!("cannot run cargo build: {e}"));
    if !output.status.success() {
        panic!("cargo build for the tests failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }
    let (mut capvirt, mut capvirtd) = (None, None);
    let mut libraries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        if let Some(exe) = message["executable"].as_str() {
            match message["target"]["name"].as_str() {
                Some("capvirt") => capvirt = Some(PathBuf::from(exe)),
                Some("capvirtd") => capvirtd = Some(PathBuf::from(exe)),
                _ => {}
            }
        }
        for file in message["filenames"].as_array().into_iter().flatten().filter_map(|f| f.as_str()) {
            if file.ends_with(".so") {
                libraries.push(PathBuf::from(file));
            }
        }
    }
    let library = |name: &str| {
        libraries
            .iter()
            .find(|p| p.file_name().is_some_and(|n| n == name))
            .cloned()
            .unwrap_or_else(|| panic!("cargo built no {name}; built: {libraries:?}"))
    };
    Artifacts {
        capvirt: capvirt.unwrap_or_else(|| panic!("cargo built no capvirt binary")),
        capvirtd: capvirtd.unwrap_or_else(|| panic!("cargo built no capvirtd binary")),
        test_plugin: library("libcapvirt_driver_test.so"),
        fixture_plugin: library("libcapvirt_fixture_plugin.so"),
        qemu_plugin: library("libcapvirt_driver_qemu.so"),
        container_plugin: library("libcapvirt_driver_container.so"),
    }
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".."))
}

/// A fresh directory holding copies of `plugins`, each under its `(file name, source)`.
///
/// The host refuses plugin files and directories that group or others can write (like
/// OpenSSH's `StrictModes`), so modes are set explicitly instead of depending on the umask
/// (`fs::copy` keeps the source's mode): the directory 0700, each plugin 0755.
pub fn plugin_dir(plugins: &[(&str, &Path)]) -> TempDir {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    set_mode(dir.path(), 0o700);
    for (name, source) in plugins {
        let target = dir.path().join(name);
        fs::copy(source, &target).unwrap_or_else(|e| panic!("copy {}: {e}", source.display()));
        set_mode(&target, 0o755);
    }
    dir
}

/// Sets the permission bits of `path`.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// A directory with only the test driver, shared by the tests of one process.
pub fn test_plugin_dir() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| plugin_dir(&[("libcapvirt_driver_test.so", &artifacts().test_plugin)])).path()
}

/// A `capvirt` command isolated from the user's environment: plugins from `plugin_dir`, the
/// audit log and host config in `state_dir`, no default URI or enabled capabilities from outside.
pub fn capvirt(plugin_dir: &Path, state_dir: &Path) -> Command {
    let mut cmd = Command::new(&artifacts().capvirt);
    cmd.env("CAPVIRT_PLUGIN_DIR", plugin_dir)
        .env("CAPVIRT_AUDIT_LOG", state_dir.join("audit.jsonl"))
        .env("XDG_STATE_HOME", state_dir)
        .env("XDG_CONFIG_HOME", state_dir)
        .env("XDG_CACHE_HOME", state_dir)
        .env_remove("CAPVIRT_CONFIG")
        .env_remove("CAPVIRT_DEFAULT_URI")
        .env_remove("CAPVIRT_ENABLE")
        .env_remove("CAPVIRT_CHECK_RESULTS")
        .env_remove("CAPVIRT_FIXTURE_MODE");
    cmd
}

/// What a finished `capvirt` run printed and returned.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Asserts `run` exited 0 and returns its stdout.
pub fn ok(run: &Run) -> &str {
    assert_eq!(run.code, 0, "stderr: {}\nstdout: {}", run.stderr, run.stdout);
    &run.stdout
}

/// Asserts `run` exited `code` with exactly one `error: ` line, and returns that line.
pub fn failed(run: &Run, code: i32) -> &str {
    assert_eq!(run.code, code, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    assert!(run.stderr.starts_with("error: "), "one error line expected: {:?}", run.stderr);
    assert_eq!(run.stderr.trim_end().lines().count(), 1, "one error line expected: {:?}", run.stderr);
    run.stderr.trim_end()
}

/// Asserts `run` exited 0 and parses its stdout as JSON.
pub fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(ok(run)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.stdout))
}

/// Upper bound for one CLI run in tests; a hang fails the test instead of blocking CI.
pub const RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `cmd` to completion, killing it if it outlives `timeout` (a killed run fails the
/// caller's status assertions instead of blocking CI).
pub fn output_within(cmd: Command, timeout: std::time::Duration) -> std::process::Output {
    assert_cmd::Command::from_std(cmd).timeout(timeout).output().unwrap_or_else(|e| panic!("cannot run command: {e}"))
}

/// Runs `cmd` to completion (killing it after [`RUN_TIMEOUT`]).
pub fn run(cmd: Command) -> Run {
    let output = output_within(cmd, RUN_TIMEOUT);
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A scratch area for one test: a state directory (audit log, files) and the plugins to load.
pub struct Sandbox {
    pub state: TempDir,
    pub plugins: PathBuf,
    /// A private plugin directory removed with the sandbox.
    _owned_plugins: Option<TempDir>,
}

impl Sandbox {
    /// Only the test driver is installed.
    pub fn new() -> Sandbox {
        Sandbox::with_plugins(test_plugin_dir().to_path_buf())
    }

    pub fn with_plugins(plugins: PathBuf) -> Sandbox {
        Sandbox { state: tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")), plugins, _owned_plugins: None }
    }

    /// Uses (and owns) a plugin directory made by [`plugin_dir`].
    pub fn with_plugin_dir(dir: TempDir) -> Sandbox {
        let mut sandbox = Sandbox::with_plugins(dir.path().to_path_buf());
        sandbox._owned_plugins = Some(dir);
        sandbox
    }

    /// Runs `capvirt ARGS…`.
    pub fn capvirt(&self, args: &[&str]) -> Run {
        let mut cmd = capvirt(&self.plugins, self.state.path());
        cmd.args(args);
        run(cmd)
    }

    /// Runs `capvirt ARGS…` with extra environment variables.
    pub fn capvirt_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = capvirt(&self.plugins, self.state.path());
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(cmd)
    }

    /// A path inside the state directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.state.path().join(name)
    }

    /// Writes a file in the state directory and returns its path as a string.
    pub fn write(&self, name: &str, contents: &str) -> String {
        let path = self.path(name);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path.display().to_string()
    }

    /// The audit records written so far.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        let text = fs::read_to_string(self.path("audit.jsonl")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}"))).collect()
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox::new()
    }
}
