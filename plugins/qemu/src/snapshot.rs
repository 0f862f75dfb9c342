//! Domain snapshots: internal qcow2 snapshots taken, loaded and deleted by QEMU's snapshot
//! jobs (QMP `snapshot-save`/`snapshot-load`/`snapshot-delete`, QEMU 6.0 and later) while a
//! domain is active, and by `qemu-img snapshot` while it is shut off.
//!
//! The driver's records live in `snapshots.toml` beside the definition (written atomically,
//! under the domain's lock): name, time, the domain's state then, description, and the images
//! the snapshot is in (by path, with the one holding the memory state). A snapshot covers every
//! writable image of the domain (its definition's disks and hot-plugged USB disks); a raw one
//! cannot hold it, so such a domain is refused (`unsupported`) naming the disk.
//!
//! Rules (the test driver has the same): a snapshot of an active domain holds its memory and
//! reverts an active domain, back to running or paused as it was; one of a shut off domain holds
//! the disks only and reverts a shut off domain. A domain with snapshots cannot be undefined.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use capvirt_plugin_api::{prelude::*, types::DomainState};
use qapi::qmp;
use serde::{Deserialize, Serialize};

use crate::{
    driver::{Op, QemuDriver},
    qemu,
    spec::{check_name, Format, Live, Machine},
    store::{self, DomainPaths},
};

/// Bound on one snapshot job (the memory of a large guest is written to or read from disk).
const JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a running job is polled.
const JOB_POLL: Duration = Duration::from_millis(20);
/// Bound on one `qemu-img snapshot` run.
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(120);
/// At most this much of `qemu-img`'s error output goes into an error message.
const STDERR_LIMIT: u64 = 4096;

/// `snapshots.toml`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotFile {
    #[serde(default)]
    snapshots: Vec<Record>,
}

/// One snapshot as the driver keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    name: String,
    created: u64,
    /// The registry's `DomainState` word (`running`, `paused`, `shut off`).
    state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    /// The images it is in, in the domain's disk order.
    images: Vec<PathBuf>,
    /// The image holding the memory and device state (active snapshots only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vmstate: Option<PathBuf>,
}

impl Record {
    fn taken_state(&self) -> DomainState {
        DomainState::parse(&self.state).unwrap_or(DomainState::ShutOff)
    }

    fn info(&self) -> Value {
        let mut info = Value::record([
            ("name", Value::string(&self.name)),
            ("created", Value::UInt(self.created)),
            ("state", Value::from(self.taken_state().as_str())),
        ]);
        if let Some(description) = &self.description {
            info.set("description", Value::string(description));
        }
        info
    }
}

/// A writable image of the domain: its guest name, its path and, while QEMU runs, its node.
#[derive(Debug, Clone)]
struct Image {
    target: String,
    path: PathBuf,
    format: Format,
    node: String,
}

/// The writable images of `machine` (the live configuration's while QEMU runs: hot-plugged USB
/// disks included, with their nodes).
fn writable_images(machine: &Machine, live: Option<&Live>) -> Vec<Image> {
    let disks = machine.disks.iter().enumerate().filter(|(_, d)| !d.readonly).map(|(index, d)| Image {
        target: d.target.clone(),
        path: d.path.clone(),
        format: d.format,
        node: qemu::disk_node(index),
    });
    let usb = machine.devices.iter().filter_map(|d| {
        let (path, format) = (d.path.clone()?, d.format?);
        let node = live.and_then(|l| l.port(&d.id)).map(qemu::usb_node).unwrap_or_default();
        Some(Image { target: d.id.clone(), path, format, node })
    });
    disks.chain(usb).collect()
}

/// The images a new snapshot goes into: every writable one, all qcow2, at least one.
fn snapshot_images(name: &str, images: Vec<Image>) -> Result<Vec<Image>, PluginError> {
    if let Some(raw) = images.iter().find(|i| i.format != Format::Qcow2) {
        return Err(PluginError::unsupported(format!(
            "disk '{}' of domain '{name}' ({}) is raw: snapshots are kept inside qcow2 images, so every writable \
             disk must be qcow2 (convert it with qemu-img convert -O qcow2, or make it read-only)",
            raw.target,
            raw.path.display()
        )));
    }
    if images.is_empty() {
        return Err(PluginError::unsupported(format!(
            "domain '{name}' has no writable disk: snapshots are kept inside its qcow2 disk images"
        )));
    }
    Ok(images)
}

fn unknown(domain: &str, name: &str) -> PluginError {
    PluginError::not_found(format!("domain '{domain}' has no snapshot named '{name}'"))
}

fn snapshots_path(paths: &DomainPaths) -> PathBuf {
    paths.dir.join(store::SNAPSHOTS_FILE)
}

fn load(paths: &DomainPaths) -> Result<SnapshotFile, PluginError> {
    Ok(store::read_toml(&snapshots_path(paths))?.unwrap_or_default())
}

fn save(paths: &DomainPaths, file: &SnapshotFile) -> Result<(), PluginError> {
    store::write_toml(&snapshots_path(paths), file)
}

/// Undefine refuses a domain that has snapshots (libvirt does too): its images would keep
/// snapshots nobody lists any more.
pub(crate) fn check_undefine(paths: &DomainPaths) -> Result<(), PluginError> {
    let file = load(paths)?;
    if file.snapshots.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = file.snapshots.iter().map(|s| s.name.as_str()).collect();
    Err(PluginError::invalid_state(format!(
        "domain '{}' has {} snapshot(s) ({}); delete them first (snapshot-delete)",
        paths.name,
        names.len(),
        names.join(", ")
    )))
}

/// A job id no other caller of this QEMU uses.
fn job_id(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("capvirt-{what}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

impl QemuDriver {
    pub(crate) fn snapshot_create(
        &self,
        domain: &str,
        name: &str,
        description: Option<&str>,
        ctx: &Context<'_>,
    ) -> Result<Value, PluginError> {
        check_name(name)?;
        let lock = self.store.lock(domain, false)?;
        let paths = &lock.paths;
        let machine = self.store.definition(paths)?.ok_or_else(|| store::not_defined(domain))?;
        let mut file = load(paths)?;
        if file.snapshots.iter().any(|s| s.name == name) {
            return Err(PluginError::invalid_argument(format!(
                "domain '{domain}' already has a snapshot named '{name}'"
            )));
        }
        let (state, _) = self.observe(paths)?;
        let (images, vmstate) = match state {
            DomainState::Running | DomainState::Paused => {
                let live = self.live(paths)?;
                let images = snapshot_images(domain, writable_images(&live.machine, Some(&live)))?;
                let vmstate = images[0].clone();
                let id = job_id("snapshot-save");
                let save = qmp::snapshot_save {
                    job_id: id.clone(),
                    tag: name.to_string(),
                    vmstate: vmstate.node.clone(),
                    devices: images.iter().map(|i| i.node.clone()).collect(),
                };
                self.run_job(domain, "snapshot-save", &id, &save, ctx)?;
                (images, Some(vmstate.path))
            }
            DomainState::ShutOff => {
                let images = snapshot_images(domain, writable_images(&machine, None))?;
                for image in &images {
                    self.qemu_img(&["snapshot", "-f", "qcow2", "-c", name], &image.path)?;
                }
                (images, None)
            }
            other => {
                return Err(PluginError::invalid_state(format!(
                    "domain '{domain}' is {}; only a running, paused or shut off domain can be snapshotted",
                    other.as_str()
                )))
            }
        };
        let record = Record {
            name: name.to_string(),
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            state: state.as_str().to_string(),
            description: description.map(str::to_string),
            images: images.into_iter().map(|i| i.path).collect(),
            vmstate,
        };
        let info = record.info();
        file.snapshots.push(record);
        save(paths, &file)?;
        Ok(info)
    }

    pub(crate) fn snapshot_list(&self, domain: &str) -> Result<Value, PluginError> {
        let (paths, _) = self.store.require(domain)?;
        Ok(Value::list(load(&paths)?.snapshots.iter().map(Record::info)))
    }

    pub(crate) fn snapshot_revert(&self, domain: &str, name: &str, ctx: &Context<'_>) -> Result<Value, PluginError> {
        check_name(name)?;
        let lock = self.store.lock(domain, false)?;
        let paths = &lock.paths;
        let machine = self.store.definition(paths)?.ok_or_else(|| store::not_defined(domain))?;
        let file = load(paths)?;
        let record = file.snapshots.iter().find(|s| s.name == name).ok_or_else(|| unknown(domain, name))?;
        let (state, _) = self.observe(paths)?;
        let taken = record.taken_state();
        check_revert(domain, name, taken, state)?;
        if state.is_active() {
            let live = self.live(paths)?;
            let images = same_images(domain, record, writable_images(&live.machine, Some(&live)))?;
            let vmstate = record.vmstate.as_ref().and_then(|v| images.iter().find(|i| &i.path == v));
            let Some(vmstate) = vmstate else {
                return Err(PluginError::driver_failure(format!(
                    "the record of snapshot '{name}' of domain '{domain}' names no image holding its memory state"
                )));
            };
            // QEMU resumes a guest after loading only if it ran before: pause it first when the
            // snapshot was paused, so that it never runs in between.
            if taken == DomainState::Paused && state == DomainState::Running {
                self.with_monitor(Op::new(domain, "stop"), |q| q.execute(&qmp::stop {}))?;
            }
            let id = job_id("snapshot-load");
            let load = qmp::snapshot_load {
                job_id: id.clone(),
                tag: name.to_string(),
                vmstate: vmstate.node.clone(),
                devices: images.iter().map(|i| i.node.clone()).collect(),
            };
            self.run_job(domain, "snapshot-load", &id, &load, ctx)?;
            if taken == DomainState::Running {
                let (now, _) = self.observe(paths)?;
                if now != DomainState::Running {
                    self.with_monitor(Op::new(domain, "cont"), |q| q.execute(&qmp::cont {}))?;
                }
            }
        } else {
            let images = same_images(domain, record, writable_images(&machine, None))?;
            for image in &images {
                self.qemu_img(&["snapshot", "-f", "qcow2", "-a", name], &image.path)?;
            }
        }
        Ok(Value::Unit)
    }

    pub(crate) fn snapshot_delete(&self, domain: &str, name: &str, ctx: &Context<'_>) -> Result<Value, PluginError> {
        check_name(name)?;
        let lock = self.store.lock(domain, false)?;
        let paths = &lock.paths;
        let machine = self.store.definition(paths)?.ok_or_else(|| store::not_defined(domain))?;
        let mut file = load(paths)?;
        let index = file.snapshots.iter().position(|s| s.name == name).ok_or_else(|| unknown(domain, name))?;
        let record = &file.snapshots[index];
        let (state, _) = self.observe(paths)?;
        match state {
            DomainState::Running | DomainState::Paused => {
                let live = self.live(paths)?;
                // Images the domain no longer has keep their copy; the record goes anyway.
                let nodes: Vec<String> = writable_images(&live.machine, Some(&live))
                    .into_iter()
                    .filter(|i| record.images.contains(&i.path) && !i.node.is_empty())
                    .map(|i| i.node)
                    .collect();
                if !nodes.is_empty() {
                    let id = job_id("snapshot-delete");
                    let delete = qmp::snapshot_delete { job_id: id.clone(), tag: name.to_string(), devices: nodes };
                    self.run_job(domain, "snapshot-delete", &id, &delete, ctx)?;
                }
            }
            DomainState::ShutOff => {
                for image in writable_images(&machine, None).iter().filter(|i| record.images.contains(&i.path)) {
                    self.qemu_img(&["snapshot", "-f", "qcow2", "-d", name], &image.path)?;
                }
            }
            other => {
                return Err(PluginError::invalid_state(format!(
                    "domain '{domain}' is {}; snapshots are deleted while it runs, is paused or is shut off",
                    other.as_str()
                )))
            }
        }
        file.snapshots.remove(index);
        save(paths, &file)?;
        Ok(Value::Unit)
    }

    /// Starts a snapshot job with `start` and polls `query-jobs` until it concludes,
    /// reporting progress and cancelling it (`job-cancel`) when the caller cancels; then
    /// dismisses it. A job's error becomes the call's.
    fn run_job<C: qapi::Command>(
        &self,
        domain: &str,
        what: &str,
        id: &str,
        start: &C,
        ctx: &Context<'_>,
    ) -> Result<(), PluginError> {
        self.with_monitor(Op::new(domain, what), |q| q.execute(start).map(drop))?;
        let deadline = Instant::now() + JOB_TIMEOUT;
        let mut cancelled = false;
        let error = loop {
            let jobs: Vec<serde_json::Value> =
                self.with_monitor(Op::new(domain, "query-jobs"), |q| q.execute_loose(&qmp::query_jobs {}))?;
            let Some(job) = jobs.iter().find(|j| j.get("id").and_then(|v| v.as_str()) == Some(id)) else {
                return Err(PluginError::driver_failure(format!(
                    "QEMU's {what} job of domain '{domain}' disappeared before it concluded"
                )));
            };
            let done = job.get("current-progress").and_then(serde_json::Value::as_u64).unwrap_or(0);
            let total = job.get("total-progress").and_then(serde_json::Value::as_u64).unwrap_or(0);
            if total > 0 {
                ctx.progress(done.min(total), total);
            }
            if job.get("status").and_then(|v| v.as_str()) == Some("concluded") {
                break job.get("error").and_then(|v| v.as_str()).map(str::to_string);
            }
            let timed_out = Instant::now() >= deadline;
            if (ctx.is_cancelled() || timed_out) && !cancelled {
                cancelled = true;
                // A job past the point of no return ignores this and concludes normally.
                let _ = self.with_monitor(Op::new(domain, "job-cancel"), |q| {
                    q.execute(&qmp::job_cancel { id: id.to_string() }).map(drop)
                });
            }
            if timed_out && Instant::now() >= deadline + Duration::from_secs(10) {
                return Err(PluginError::timeout(format!(
                    "QEMU's {what} job of domain '{domain}' did not conclude within {} s",
                    JOB_TIMEOUT.as_secs()
                )));
            }
            thread::sleep(JOB_POLL);
        };
        self.with_monitor(Op::new(domain, "job-dismiss"), |q| {
            q.execute(&qmp::job_dismiss { id: id.to_string() }).map(drop)
        })?;
        match error {
            None => Ok(()),
            Some(_) if cancelled && ctx.is_cancelled() => {
                Err(PluginError::invalid_state(format!("{what} of domain '{domain}' was cancelled")))
            }
            Some(_) if cancelled => Err(PluginError::timeout(format!(
                "QEMU's {what} job of domain '{domain}' did not conclude within {} s and was cancelled",
                JOB_TIMEOUT.as_secs()
            ))),
            Some(error) => {
                Err(PluginError::driver_failure(format!("QEMU's {what} job of domain '{domain}' failed: {error}")))
            }
        }
    }

    /// Runs `qemu-img ARGS… IMAGE` (the one beside the emulator, else `PATH`'s), bounded.
    fn qemu_img(&self, args: &[&str], image: &Path) -> Result<(), PluginError> {
        let beside = PathBuf::from(self.config.emulator.to_string()).with_file_name("qemu-img");
        let program = if beside.is_absolute() && beside.is_file() { beside } else { PathBuf::from("qemu-img") };
        let shown = format!("{} {} {}", program.display(), args.join(" "), image.display());
        let mut child = Command::new(&program)
            .args(args)
            .arg(image)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => PluginError::unsupported(format!(
                    "qemu-img is not installed (snapshots of shut off domains need it; Debian: qemu-utils): {e}"
                )),
                _ => PluginError::driver_failure(format!("cannot run {shown}: {e}")),
            })?;
        let stderr = child.stderr.take();
        let reader = thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(stderr) = stderr {
                let _ = stderr.take(STDERR_LIMIT).read_to_end(&mut text);
            }
            text
        });
        let deadline = Instant::now() + QEMU_IMG_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                _ => break None,
            }
        };
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(PluginError::timeout(format!(
                "{shown} did not finish within {} s",
                QEMU_IMG_TIMEOUT.as_secs()
            )));
        };
        let text = reader.join().unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        let why = String::from_utf8_lossy(&text);
        Err(PluginError::driver_failure(format!("{shown} failed ({status}): {}", why.trim())))
    }
}

/// The images of `record` as the domain has them now; refused when they differ (a disk was
/// replaced, added or removed since), since loading would mix states.
fn same_images(domain: &str, record: &Record, now: Vec<Image>) -> Result<Vec<Image>, PluginError> {
    let mut current: Vec<&Path> = now.iter().map(|i| i.path.as_path()).collect();
    let mut taken: Vec<&Path> = record.images.iter().map(PathBuf::as_path).collect();
    current.sort();
    taken.sort();
    if current != taken {
        return Err(PluginError::invalid_state(format!(
            "the writable disks of domain '{domain}' are not the ones snapshot '{}' was taken of ({}); \
             restore that disk configuration first",
            record.name,
            record.images.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(now)
}

/// A snapshot of an active domain reverts an active domain; one of a shut off domain, a shut
/// off one: loading memory needs a running QEMU, and changing the disks under a running
/// guest would corrupt its file systems.
fn check_revert(domain: &str, name: &str, taken: DomainState, now: DomainState) -> Result<(), PluginError> {
    match (taken.is_active(), now) {
        (true, DomainState::Running | DomainState::Paused) | (false, DomainState::ShutOff) => Ok(()),
        (true, now) => Err(PluginError::invalid_state(format!(
            "snapshot '{name}' was taken while domain '{domain}' was {}: it holds the memory state and reverts only an \
             active domain, and '{domain}' is {}; start it first",
            taken.as_str(),
            now.as_str()
        ))),
        (false, now) => Err(PluginError::invalid_state(format!(
            "snapshot '{name}' was taken while domain '{domain}' was shut off: it holds the disks only and reverts \
             only a shut off domain, and '{domain}' is {}; destroy it first",
            now.as_str()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Bus, Disk};

    fn disk(path: &str, format: Format, readonly: bool) -> Disk {
        Disk { path: PathBuf::from(path), format, bus: Bus::Virtio, target: "vda".into(), readonly }
    }

    fn machine(disks: Vec<Disk>) -> Machine {
        Machine {
            name: "vm".into(),
            memory_mib: 64,
            vcpus: 1,
            disks,
            devices: Vec::new(),
            graphics: None,
            boot: None,
            interfaces: Vec::new(),
        }
    }

    #[test]
    fn raw_or_missing_disks_are_refused_naming_the_disk() {
        let raw = machine(vec![disk("/img/a.qcow2", Format::Qcow2, false), disk("/img/b.raw", Format::Raw, false)]);
        let error = snapshot_images("vm", writable_images(&raw, None)).err().map(|e| e.message.to_string());
        assert!(error.as_deref().is_some_and(|m| m.contains("/img/b.raw") && m.contains("raw")), "{error:?}");
        let none = snapshot_images("vm", writable_images(&machine(Vec::new()), None)).err().map(|e| e.kind);
        assert_eq!(none, Some(ErrorKind::Unsupported));
        // A read-only raw disk never changes: it needs no snapshot.
        let ro = machine(vec![disk("/img/a.qcow2", Format::Qcow2, false), disk("/img/b.raw", Format::Raw, true)]);
        let images = snapshot_images("vm", writable_images(&ro, None)).map(|i| i.len());
        assert_eq!(images.ok(), Some(1));
    }

    #[test]
    fn reverting_matches_the_state_the_snapshot_was_taken_in() {
        use DomainState::*;
        assert!(check_revert("vm", "s", Running, Paused).is_ok());
        assert!(check_revert("vm", "s", Paused, Running).is_ok());
        assert!(check_revert("vm", "s", ShutOff, ShutOff).is_ok());
        assert_eq!(check_revert("vm", "s", Running, ShutOff).err().map(|e| e.kind), Some(ErrorKind::InvalidState));
        assert_eq!(check_revert("vm", "s", ShutOff, Running).err().map(|e| e.kind), Some(ErrorKind::InvalidState));
    }

    #[test]
    fn records_round_trip_through_toml() {
        let file = SnapshotFile {
            snapshots: vec![Record {
                name: "before-upgrade".into(),
                created: 1_700_000_000,
                state: "running".into(),
                description: Some("quote \" and newline\n".into()),
                images: vec![PathBuf::from("/img/a.qcow2")],
                vmstate: Some(PathBuf::from("/img/a.qcow2")),
            }],
        };
        let text = toml::to_string(&file).unwrap_or_else(|e| panic!("{e}"));
        let back: SnapshotFile = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.snapshots[0].description, file.snapshots[0].description);
        assert_eq!(back.snapshots[0].taken_state(), DomainState::Running);
    }
}
