//! `capvirt plugin verify`: conformance of one plugin file to the registry.
//!
//! The plugin is copied into a private directory and loaded **in a child process** (the
//! `capvirt` binary re-executed with a hidden subcommand that calls [`suite::run`]), so a
//! plugin that crashes or aborts is reported with its signal and the check it was running,
//! never taking the verifier down. The child reports as it goes, one JSON [`Event`] per line
//! on its stdout; the parent ([`verify`]) turns the events into a [`Report`].
//!
//! The child runs the loader's checks (ELF image, ABI, manifest), classifies every declared
//! capability, then calls every declared capability at least once through the host's
//! dispatch path ([`crate::Connection::call`], results checked against their declared
//! types), running the `[contract]` cases of each proposal against scratch domains.

pub mod suite;

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// What the child reports, one JSON object per line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// The plugin loaded; its manifest.
    Plugin { name: String, vendor: String, version: String, registry_version: String, schemes: Vec<String> },
    /// The loader or the manifest checks refused the plugin.
    Refused { reason: String },
    /// One declared capability and what the registry makes of it.
    Capability { id: String, version: u32, status: CapabilityStatus, detail: String },
    /// The connection the suite runs against.
    Uri { uri: String },
    /// A check is about to call into the plugin (names the check a crash interrupts).
    Start { capability: String, clause: String },
    /// A finished check (`skipped`: the plugin lacks what the check needs to set it up).
    Check {
        capability: String,
        clause: String,
        passed: bool,
        #[serde(default)]
        skipped: bool,
        detail: String,
    },
    /// The suite finished.
    Done,
}

/// How the registry treats one declared capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CapabilityStatus {
    /// Callable through this host; verified.
    Accepted,
    /// Not in the registry (with a did-you-mean when one is close).
    Unknown,
    /// Rejected or removed: the plugin is refused for it.
    Rejected,
    /// Declares a newer contract version than the registry's: not callable here.
    NewerContract,
    /// Declared but never callable here (a draft, or unknown to this registry while the plugin
    /// targets a newer one).
    NotCallable,
}

impl CapabilityStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CapabilityStatus::Accepted => "accepted",
            CapabilityStatus::Unknown => "unknown",
            CapabilityStatus::Rejected => "rejected",
            CapabilityStatus::NewerContract => "newer contract version",
            CapabilityStatus::NotCallable => "not callable",
        }
    }
}

/// One declared capability in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeclaredCapability {
    pub id: String,
    pub version: u32,
    pub status: CapabilityStatus,
    pub detail: String,
}

/// One check of the suite.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckResult {
    pub capability: String,
    pub clause: String,
    pub passed: bool,
    pub skipped: bool,
    pub detail: String,
}

impl CheckResult {
    /// `capability: clause: what happened`, the one line of a failure.
    pub fn line(&self) -> String {
        format!("{}: {}: {}", self.capability, self.clause, self.detail)
    }
}

/// The manifest as the report shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManifestSummary {
    pub name: String,
    pub vendor: String,
    pub version: String,
    pub registry_version: String,
    pub schemes: Vec<String>,
}

/// The verdict on one plugin file.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub plugin: String,
    pub manifest: Option<ManifestSummary>,
    /// Why the plugin was not loaded at all.
    pub refused: Option<String>,
    pub uri: Option<String>,
    pub capabilities: Vec<DeclaredCapability>,
    pub checks: Vec<CheckResult>,
    /// How the child ended when it did not finish: a signal, a timeout, a bad exit.
    pub crashed: Option<String>,
}

impl Report {
    /// Every failure, one line each.
    pub fn failures(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(reason) = &self.refused {
            lines.push(format!("(plugin): load: refused: {reason}"));
        }
        for capability in &self.capabilities {
            if capability.status == CapabilityStatus::Unknown {
                lines.push(format!("{}: manifest: {}", capability.id, capability.detail));
            }
        }
        lines.extend(self.checks.iter().filter(|c| !c.passed).map(CheckResult::line));
        if let Some(crash) = &self.crashed {
            lines.push(crash.clone());
        }
        lines
    }

    pub fn passed(&self) -> bool {
        self.failures().is_empty() && self.manifest.is_some()
    }

    /// Applies one event from the child.
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Plugin { name, vendor, version, registry_version, schemes } => {
                self.manifest = Some(ManifestSummary { name, vendor, version, registry_version, schemes })
            }
            Event::Refused { reason } => self.refused = Some(reason),
            Event::Capability { id, version, status, detail } => {
                self.capabilities.push(DeclaredCapability { id, version, status, detail })
            }
            Event::Uri { uri } => self.uri = Some(uri),
            Event::Start { .. } | Event::Done => {}
            Event::Check { capability, clause, passed, skipped, detail } => {
                self.checks.push(CheckResult { capability, clause, passed, skipped, detail })
            }
        }
    }
}

/// How to run a verification.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The plugin file.
    pub plugin: PathBuf,
    /// The `capvirt` executable to re-run as the child.
    pub exe: PathBuf,
    /// Arguments placed before the hidden subcommand (`--registry DIR`).
    pub global_args: Vec<String>,
    pub uri: Option<String>,
    /// A domain spec file for the scratch domains.
    pub spec: Option<PathBuf>,
    /// The whole run's bound; the child is killed after it.
    pub timeout: Duration,
}

/// The hidden subcommand the child runs (`capvirt plugin verify-child …`).
pub const CHILD_SUBCOMMAND: &str = "verify-child";

/// Why a verification could not run at all (a failing plugin is a [`Report`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The plugin file cannot be read or copied.
    #[error("cannot copy plugin {path} for verification: {source}")]
    Copy { path: PathBuf, source: std::io::Error },
    /// The private directory for the copy cannot be made.
    #[error("cannot create a private directory for verification: {0}")]
    Scratch(std::io::Error),
    /// The child process cannot be started.
    #[error("cannot start the verifier's child process {exe}: {source}")]
    Spawn { exe: PathBuf, source: std::io::Error },
}

/// A private directory, removed on drop unless kept.
pub struct ScratchDir(PathBuf, bool);

impl ScratchDir {
    /// Creates `$TMPDIR/capvirt-verify-<pid>-<n>` with mode 0700.
    pub fn new(tag: &str) -> std::io::Result<ScratchDir> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        for attempt in 0..100u32 {
            let path = base.join(format!("capvirt-{tag}-{}-{nanos}-{attempt}", std::process::id()));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(ScratchDir(path, false)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "no free scratch directory name"))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Leaves the directory in place (the caller reports where).
    pub fn keep(&mut self) {
        self.1 = true;
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.1 {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// The child's scratch directory, inside the private directory.
pub const RUN_DIR: &str = "run";

/// The name the copy gets, so discovery in the private directory loads exactly it.
pub const COPY_NAME: &str = "libcapvirt_driver_verify.so";

/// Verifies `options.plugin` in a child process and returns the report.
pub fn verify(options: &VerifyOptions) -> Result<Report, VerifyError> {
    let mut scratch = ScratchDir::new("verify").map_err(VerifyError::Scratch)?;
    let copy = scratch.path().join(COPY_NAME);
    let copied = fs::copy(&options.plugin, &copy).and_then(|_| {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))
    });
    copied.map_err(|source| VerifyError::Copy { path: options.plugin.clone(), source })?;
    // The child's scratch files (a QEMU state root, sample paths) live here too, so they go
    // with the directory even when the child is killed or crashes.
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new().mode(0o700).create(scratch.path().join(RUN_DIR)).map_err(VerifyError::Scratch)?;
    }

    let mut command = Command::new(&options.exe);
    command.args(&options.global_args).args(["plugin", CHILD_SUBCOMMAND]).arg(scratch.path());
    if let Some(uri) = &options.uri {
        command.arg("--uri").arg(uri);
    }
    if let Some(spec) = &options.spec {
        command.arg("--spec").arg(spec);
    }
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| VerifyError::Spawn { exe: options.exe.clone(), source })?;

    let mut report = Report { plugin: options.plugin.display().to_string(), ..Report::default() };
    let (sender, receiver) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        if let Some(stdout) = stdout {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        }
    });
    let stderr = child.stderr.take();
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stderr) = stderr {
            use std::io::Read;
            let _ = stderr.by_ref().take(64 * 1024).read_to_string(&mut text);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        }
        text
    });

    let deadline = Instant::now() + options.timeout;
    let mut in_flight: Option<(String, String)> = None;
    let mut done = false;
    let apply = |line: String, report: &mut Report, in_flight: &mut Option<(String, String)>, done: &mut bool| {
        match serde_json::from_str::<Event>(&line) {
            Ok(Event::Start { capability, clause }) => *in_flight = Some((capability, clause)),
            Ok(Event::Done) => *done = true,
            Ok(event) => {
                if matches!(event, Event::Check { .. }) {
                    *in_flight = None;
                }
                report.apply(event);
            }
            // The plugin's own writes to stdout share the pipe; they are not events.
            Err(_) => {}
        }
    };
    let status = loop {
        // Bounded by the deadline too: a plugin flooding stdout must not outlive it.
        while let Ok(line) = receiver.recv_timeout(Duration::from_millis(20)) {
            apply(line, &mut report, &mut in_flight, &mut done);
            if Instant::now() >= deadline {
                break;
            }
        }
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {} s", options.timeout.as_secs()));
            }
            Ok(None) => {}
            Err(e) => break Err(format!("cannot wait for the child: {e}")),
        }
    };
    let _ = reader.join();
    while let Ok(line) = receiver.try_recv() {
        apply(line, &mut report, &mut in_flight, &mut done);
    }
    let stderr = stderr_reader.join().unwrap_or_default();

    let during = |in_flight: &Option<(String, String)>| match in_flight {
        Some((capability, clause)) => format!("{capability}: {clause}"),
        None => "(plugin): load".to_string(),
    };
    match status {
        Ok(status) if done && status.success() => {}
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            let how = match (status.signal(), status.code()) {
                (Some(signal), _) => format!("plugin crashed: killed by signal {signal} ({})", signal_name(signal)),
                (None, Some(code)) => {
                    let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim();
                    format!(
                        "verifier child exited with status {code} before finishing{}",
                        if last.is_empty() { String::new() } else { format!(": {last}") }
                    )
                }
                (None, None) => "verifier child ended abnormally".to_string(),
            };
            report.crashed = Some(format!("{}: {how}", during(&in_flight)));
        }
        Err(why) => report.crashed = Some(format!("{}: {why}", during(&in_flight))),
    }
    // A child that did not finish may have left domains running (a QEMU outlives it): keep
    // their state so they can be found and destroyed, and say where.
    if let Some(crash) = &mut report.crashed {
        let run = scratch.path().join(RUN_DIR);
        if fs::read_dir(&run).is_ok_and(|mut entries| entries.next().is_some()) {
            crash.push_str(&format!("; its scratch state is kept in {}", run.display()));
            scratch.keep();
        }
    }
    Ok(report)
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "signal",
    }
}

/// The closest registry id to `id` (edit distance at most a third of its length, and 3).
pub fn did_you_mean<'a>(id: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (id.len() / 3).clamp(1, 3);
    known.into_iter().map(|k| (edit_distance(id, k), k)).filter(|(d, _)| *d <= limit).min().map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_ids_are_suggested() {
        let known = ["domain.suspend", "domain.resume", "host.info"];
        assert_eq!(did_you_mean("domain.suspnd", known), Some("domain.suspend"));
        assert_eq!(did_you_mean("host.inf", known), Some("host.info"));
        assert_eq!(did_you_mean("domain.teleport", known), None);
    }

    #[test]
    fn a_failed_check_is_one_line_naming_capability_and_clause() {
        let mut report = Report::default();
        report.apply(Event::Check {
            capability: "domain.list".into(),
            clause: "case 1".into(),
            passed: false,
            skipped: false,
            detail: "x".into(),
        });
        assert_eq!(report.failures(), vec!["domain.list: case 1: x".to_string()]);
        assert!(!report.passed());
    }
}
