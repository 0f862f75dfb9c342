//! Moving a domain's state: migrate (to another state root on this machine), save (to a file)
//! and restore (from one).
//!
//! QEMU only ever receives the migration stream as a file descriptor passed over QMP with
//! SCM_RIGHTS (`getfd`, then the `fd:NAME` transport): a socketpair between the two QEMUs for
//! migrate, the save file for save/restore. No caller text becomes a migration URI, so no
//! `exec:` or path-based transport can be reached.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    os::{
        fd::AsFd,
        unix::{fs::OpenOptionsExt, net::UnixStream},
    },
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use capvirt_plugin_api::{events::EventKind, prelude::*, types::DomainState};
use qapi::qmp;
use serde::{Deserialize, Serialize};

use crate::{
    driver::{check_images_exist, Op, QemuDriver},
    emulator::{self, Emulator},
    events,
    monitor::{self, Monitor},
    privilege::{self, Runner},
    qemu::{self, StartMode},
    qmp::{Qmp, QmpError},
    spec::{self, Live, Machine},
    store::{self, DomainPaths, Liveness, Store},
    uri,
};

/// First line of a save file.
const SAVE_MAGIC: &str = "CAPVIRT-QEMU-SAVE 1";
/// Largest header a save file may declare.
const MAX_HEADER: usize = 1 << 20;
/// Migration bandwidth cap for local transfers (QEMU's default, 128 MiB/s, would make a save
/// of a few GiB take minutes).
const LOCAL_BANDWIDTH: u64 = 1 << 40;
/// How often migration progress is polled.
const POLL: Duration = Duration::from_millis(10);
/// Bound on the destination QEMU leaving its incoming state after the stream ended.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The header of a save file, followed by QEMU's migration stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SaveHeader {
    /// Whether the guest ran when saved (restore resumes it then).
    running: bool,
    /// The domain's stored definition.
    definition: Machine,
    /// What its QEMU ran with (hot-plugged devices included): the device model the stream needs.
    live: Live,
}

/// Bound on transferring `memory_mib` of guest memory.
pub(crate) fn transfer_timeout(memory_mib: u64) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(memory_mib.saturating_mul(50))
}

impl QemuDriver {
    pub(crate) fn migrate(&self, name: &str, dest_uri: &str, ctx: &Context<'_>) -> Result<Value, PluginError> {
        let mut dest = uri::parse(dest_uri)?;
        // The destination is on this host: root's account setting holds there too.
        dest.qemu_user = self.config.qemu_user.clone();
        let dest_runner = privilege::runner(&dest)?;
        if dest.root == self.config.root {
            return Err(PluginError::invalid_argument(format!(
                "{dest_uri} uses this connection's own state root {}",
                self.config.root.display()
            )));
        }
        let lock = self.store.lock(name, false)?;
        let definition = self.store.definition(&lock.paths)?.ok_or_else(|| store::not_defined(name))?;
        let (_, pid) = self.active_pid(&lock.paths)?;
        let live = self.live(&lock.paths)?;
        let dest_accel = qemu::resolve_accel(dest.accel, &dest_runner)?;
        if dest_accel != live.accel {
            return Err(PluginError::invalid_argument(format!(
                "domain '{name}' runs on {} but {dest_uri} would run it on {dest_accel}",
                live.accel
            )));
        }
        spec::validate(&definition.to_spec(), self.limits())?;
        check_images_exist(&live.machine, &self.config.images)?;
        let dest_release = dest.emulator.probe()?;
        emulator::check_machine_type(live.machine_type.as_deref(), &dest_release, &dest.emulator)?;

        let dest_store = Store::new(dest.root.clone());
        let dest_lock = dest_store.lock(name, true)?;
        if let Liveness::Alive(_) = dest_store.liveness(&dest_lock.paths)? {
            return Err(PluginError::invalid_state(format!("domain '{name}' already runs on {dest_uri}")));
        }
        let previous = dest_store.definition(&dest_lock.paths)?;
        store::write_toml(&dest_lock.paths.definition, &definition)?;
        events::mark_outgoing(&lock.paths, pid, Some(EventKind::Migrated));
        let outcome = self.migrate_to(name, &dest_store, &dest_lock.paths, &live, (&dest.emulator, &dest_runner), ctx);
        if outcome.is_err() {
            events::mark_outgoing(&lock.paths, pid, None);
        }
        match outcome {
            Ok(()) => {
                // The source ends shut off; its definition stays.
                let monitor = self.take_monitor(name);
                qemu::stop(&self.store, &lock.paths, pid, monitor)?;
                Ok(Value::Unit)
            }
            Err(e) => {
                if let Liveness::Alive(dest_pid) = dest_store.liveness(&dest_lock.paths)? {
                    let _ = qemu::stop(&dest_store, &dest_lock.paths, dest_pid, None);
                }
                let _ = store::remove_runtime(&dest_lock.paths);
                let _ = match previous {
                    Some(previous) => store::write_toml(&dest_lock.paths.definition, &previous),
                    None => store::remove_domain(&dest_lock.paths),
                };
                Err(e)
            }
        }
    }

    /// Starts the destination QEMU and streams the source's state into it.
    fn migrate_to(
        &self,
        name: &str,
        dest_store: &Store,
        dest_paths: &DomainPaths,
        live: &Live,
        (emulator, runner): (&Emulator, &Runner),
        ctx: &Context<'_>,
    ) -> Result<(), PluginError> {
        qemu::launch(dest_store, dest_paths, live, StartMode::Incoming, emulator, runner)?;
        events::mark_incoming(dest_paths, EventKind::Migrated);
        let mut dest = open_fresh(dest_paths)?;
        let (source_end, dest_end) =
            UnixStream::pair().map_err(|e| PluginError::driver_failure(format!("cannot create a socketpair: {e}")))?;
        let dest_op = || Op::new(name, "incoming migration");
        dest.qmp
            .execute_with_fd(&qmp::getfd { fdname: "capvirt-migrate".into() }, dest_end.as_fd())
            .and_then(|_| dest.qmp.execute(&qmp::migrate_incoming { uri: "fd:capvirt-migrate".into() }))
            .map_err(|e| self.qmp_failure(&dest_op(), e))?;
        drop(dest_end);
        self.with_monitor(Op::new(name, "migrate"), |q| {
            set_local_bandwidth(q)?;
            q.execute_with_fd(&qmp::getfd { fdname: "capvirt-migrate".into() }, source_end.as_fd())?;
            q.execute(&migrate_command("fd:capvirt-migrate"))
        })?;
        drop(source_end);
        let watched = self.watch_migration(name, live.machine.memory_mib, ctx);
        if let Err(e) = watched {
            let _ = self.with_monitor(Op::new(name, "migrate_cancel"), |q| q.execute(&qmp::migrate_cancel {}));
            return Err(e);
        }
        settle_incoming(&mut dest.qmp).map_err(|e| self.qmp_failure(&dest_op(), e))
    }

    /// Polls the source's `query-migrate` until the transfer ends, reporting progress.
    pub(crate) fn watch_migration(&self, name: &str, memory_mib: u64, ctx: &Context<'_>) -> Result<(), PluginError> {
        let deadline = Instant::now() + transfer_timeout(memory_mib);
        loop {
            let info: serde_json::Value =
                self.with_monitor(Op::new(name, "query-migrate"), |q| q.execute_loose(&qmp::query_migrate {}))?;
            let (transferred, total) = ram_progress(&info);
            if total > 0 {
                ctx.progress(transferred.min(total), total);
            }
            match migration_status(&info) {
                Some(qmp::MigrationStatus::completed) => {
                    if total > 0 {
                        ctx.progress(total, total);
                    }
                    return Ok(());
                }
                Some(qmp::MigrationStatus::failed | qmp::MigrationStatus::cancelled) => {
                    let why = info.get("error-desc").and_then(|d| d.as_str()).unwrap_or("no reason given");
                    return Err(PluginError::driver_failure(format!("migration of domain '{name}' failed: {why}")));
                }
                _ => {}
            }
            if ctx.is_cancelled() {
                return Err(PluginError::invalid_state(format!("migration of domain '{name}' was cancelled")));
            }
            if Instant::now() >= deadline {
                return Err(PluginError::timeout(format!(
                    "migration of domain '{name}' did not complete within {} s",
                    transfer_timeout(memory_mib).as_secs()
                )));
            }
            thread::sleep(POLL);
        }
    }

    pub(crate) fn save(&self, name: &str, path: &str, ctx: &Context<'_>) -> Result<Value, PluginError> {
        let target = new_file_path(path)?;
        self.config.images.check_new(path, &target, "save file")?;
        let lock = self.store.lock(name, false)?;
        let definition = self.store.definition(&lock.paths)?.ok_or_else(|| store::not_defined(name))?;
        let (state, pid) = self.active_pid(&lock.paths)?;
        let live = self.live(&lock.paths)?;
        let running = state == DomainState::Running;
        let header = SaveHeader { running, definition, live };
        let temporary = sibling_temporary(&target);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(|e| PluginError::invalid_argument(format!("cannot create {}: {e}", temporary.display())))?;
        events::mark_outgoing(&lock.paths, pid, Some(EventKind::Saved));
        let written = (|| {
            write_header(&mut file, &header)?;
            if running {
                // A stopped guest is saved in one pass, consistent with its disks.
                self.with_monitor(Op::new(name, "save (stop)"), |q| q.execute(&qmp::stop {}))?;
            }
            self.with_monitor(Op::new(name, "save (migrate)"), |q| {
                set_local_bandwidth(q)?;
                q.execute_with_fd(&qmp::getfd { fdname: "capvirt-save".into() }, file.as_fd())?;
                q.execute(&migrate_command("fd:capvirt-save"))
            })?;
            self.watch_migration(name, header.live.machine.memory_mib, ctx)?;
            file.sync_all().map_err(|e| store::io_failure(&temporary, "sync", &e))?;
            publish(&temporary, &target)
        })();
        if let Err(e) = written {
            events::mark_outgoing(&lock.paths, pid, None);
            let _ = fs::remove_file(&temporary);
            let _ = self.with_monitor(Op::new(name, "migrate_cancel"), |q| q.execute(&qmp::migrate_cancel {}));
            if running {
                let _ = self.with_monitor(Op::new(name, "cont"), |q| q.execute(&qmp::cont {}));
            }
            return Err(e);
        }
        let monitor = self.take_monitor(name);
        qemu::stop(&self.store, &lock.paths, pid, monitor)?;
        Ok(Value::Unit)
    }

    pub(crate) fn restore(&self, path: &str, ctx: &Context<'_>) -> Result<Value, PluginError> {
        self.config.images.check_existing(path, "save file")?;
        let (header, file) = read_save(Path::new(path))?;
        // The file is caller data: its definition is validated like a define.
        let limits = self.limits();
        let definition = spec::validate(&header.definition.to_spec(), limits)?;
        let mut live_machine = spec::validate(&header.live.machine.to_spec(), limits)?;
        spec::keep_nic_ids(&mut live_machine, &header.live.machine);
        if definition.name != live_machine.name {
            return Err(PluginError::invalid_argument(format!("{path}: inconsistent domain names")));
        }
        // The version is the restoring QEMU's, recorded once it runs.
        let live = check_live(Live { machine: live_machine, qemu_version: None, ..header.live }, path)?;
        let name = live.machine.name.clone();
        let runner = privilege::runner(&self.config)?;
        let accel = qemu::resolve_accel(self.config.accel, &runner)?;
        if accel != live.accel {
            return Err(PluginError::invalid_argument(format!(
                "{path} was saved on {} but this connection runs domains on {accel}",
                live.accel
            )));
        }
        let lock = self.store.lock(&name, true)?;
        if let Liveness::Alive(_) = self.store.liveness(&lock.paths)? {
            return Err(PluginError::invalid_state(format!("domain '{name}' is already running")));
        }
        emulator::check_machine_type(live.machine_type.as_deref(), &self.release()?, &self.config.emulator)?;
        let newly_defined = self.store.definition(&lock.paths)?.is_none();
        if newly_defined {
            store::write_toml(&lock.paths.definition, &definition)?;
        }
        self.forget(&name);
        let restored = (|| {
            let pid =
                qemu::launch(&self.store, &lock.paths, &live, StartMode::Incoming, &self.config.emulator, &runner)?;
            events::mark_incoming(&lock.paths, EventKind::Restored);
            let mut monitor = open_fresh(&lock.paths)?;
            let op = || Op::new(&name, "restore (migrate-incoming)");
            let q = &mut monitor.qmp;
            q.execute_with_fd(&qmp::getfd { fdname: "capvirt-restore".into() }, file.as_fd())
                .and_then(|_| q.execute(&qmp::migrate_incoming { uri: "fd:capvirt-restore".into() }))
                .map_err(|e| self.qmp_failure(&op(), e))?;
            wait_incoming(q, live.machine.memory_mib, ctx).map_err(|e| match e {
                Incoming::Qmp(e) => self.qmp_failure(&op(), e),
                Incoming::Failed(why) => {
                    PluginError::invalid_argument(format!("{path}: QEMU could not restore from it: {why}"))
                }
                Incoming::Timeout => PluginError::timeout(format!("restoring domain '{name}' did not complete")),
            })?;
            settle_incoming(q).map_err(|e| self.qmp_failure(&op(), e))?;
            if header.running {
                q.execute(&qmp::cont {}).map_err(|e| self.qmp_failure(&Op::new(&name, "restore (cont)"), e))?;
            }
            Ok(pid)
        })();
        match restored {
            Ok(_) => Ok(Value::from(name)),
            Err(e) => {
                if let Ok(Liveness::Alive(pid)) = self.store.liveness(&lock.paths) {
                    let _ = qemu::stop(&self.store, &lock.paths, pid, None);
                }
                let _ = store::remove_runtime(&lock.paths);
                if newly_defined {
                    let _ = store::remove_domain(&lock.paths);
                }
                Err(e)
            }
        }
    }
}

/// A channel of a QEMU this call just started (not cached: the call ends with it).
pub(crate) fn open_fresh(paths: &DomainPaths) -> Result<Monitor, PluginError> {
    monitor::open(paths, Duration::from_secs(5)).map_err(|e| {
        PluginError::driver_failure(format!(
            "cannot reach the monitor of the QEMU just started for '{}': {e}",
            paths.name
        ))
    })
}

pub(crate) fn migrate_command(uri: &str) -> qmp::migrate {
    qmp::migrate { uri: uri.to_string(), blk: None, inc: None, detach: None, resume: None }
}

pub(crate) fn set_local_bandwidth(q: &mut Qmp) -> Result<(), QmpError> {
    let parameters = qmp::MigrateSetParameters { max_bandwidth: Some(LOCAL_BANDWIDTH), ..Default::default() };
    q.execute(&qmp::migrate_set_parameters(parameters)).map(drop)
}

fn migration_status(info: &serde_json::Value) -> Option<qmp::MigrationStatus> {
    info.get("status").cloned().and_then(|s| serde_json::from_value(s).ok())
}

fn ram_progress(info: &serde_json::Value) -> (u64, u64) {
    let ram = info.get("ram");
    let field = |name: &str| ram.and_then(|r| r.get(name)).and_then(serde_json::Value::as_u64).unwrap_or(0);
    (field("transferred"), field("total"))
}

pub(crate) enum Incoming {
    Qmp(QmpError),
    Failed(String),
    Timeout,
}

/// Waits for an incoming migration (restore) to complete.
pub(crate) fn wait_incoming(q: &mut Qmp, memory_mib: u64, ctx: &Context<'_>) -> Result<(), Incoming> {
    let deadline = Instant::now() + transfer_timeout(memory_mib);
    loop {
        let info: serde_json::Value = q.execute_loose(&qmp::query_migrate {}).map_err(Incoming::Qmp)?;
        match migration_status(&info) {
            Some(qmp::MigrationStatus::completed) => return Ok(()),
            Some(qmp::MigrationStatus::failed | qmp::MigrationStatus::cancelled) => {
                let why = info.get("error-desc").and_then(|d| d.as_str()).unwrap_or("the stream was rejected");
                return Err(Incoming::Failed(why.to_string()));
            }
            _ => {}
        }
        if ctx.is_cancelled() || Instant::now() >= deadline {
            return Err(Incoming::Timeout);
        }
        thread::sleep(POLL);
    }
}

/// Waits until a destination QEMU has left `inmigrate` (it then runs or stays paused, as the
/// source was).
pub(crate) fn settle_incoming(q: &mut Qmp) -> Result<(), QmpError> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let status: serde_json::Value = q.execute_loose(&qmp::query_status {})?;
        let incoming = status.get("status").and_then(|s| s.as_str()) == Some("inmigrate");
        if !incoming {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(QmpError::Timeout);
        }
        thread::sleep(POLL);
    }
}

/// A save file path: absolute once resolved, in an existing directory, not existing yet.
fn new_file_path(path: &str) -> Result<PathBuf, PluginError> {
    let path = Path::new(path);
    let file_name = path
        .file_name()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| PluginError::invalid_argument(format!("{} does not name a file", path.display())))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = fs::canonicalize(parent)
        .map_err(|e| PluginError::invalid_argument(format!("directory of {} is not usable: {e}", path.display())))?;
    if !parent.is_dir() {
        return Err(PluginError::invalid_argument(format!("{} is not a directory", parent.display())));
    }
    let target = parent.join(file_name);
    if fs::symlink_metadata(&target).is_ok() {
        return Err(PluginError::invalid_argument(format!(
            "{} already exists; save never overwrites",
            target.display()
        )));
    }
    Ok(target)
}

fn sibling_temporary(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    target.with_file_name(format!(".{name}.capvirt-partial-{}", std::process::id()))
}

/// Renames the finished temporary file to `target` (never replacing a file that appeared
/// meanwhile) and makes the rename durable.
fn publish(temporary: &Path, target: &Path) -> Result<(), PluginError> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, temporary, CWD, target, RenameFlags::NOREPLACE)
        .map_err(|e| PluginError::invalid_argument(format!("cannot create {}: {e}", target.display())))?;
    if let Some(dir) = target.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| store::io_failure(dir, "sync", &e))?;
    }
    Ok(())
}

fn write_header(file: &mut File, header: &SaveHeader) -> Result<(), PluginError> {
    let text = toml::to_string(header).map_err(|e| PluginError::internal(format!("cannot encode save header: {e}")))?;
    let mut bytes = format!("{SAVE_MAGIC}\n{}\n", text.len()).into_bytes();
    bytes.extend_from_slice(text.as_bytes());
    file.write_all(&bytes).map_err(|e| PluginError::driver_failure(format!("cannot write the save file: {e}")))?;
    file.flush().map_err(|e| PluginError::driver_failure(format!("cannot write the save file: {e}")))
}

/// Opens a save file and reads its header; the file is left positioned at QEMU's stream.
fn read_save(path: &Path) -> Result<(SaveHeader, File), PluginError> {
    let not_save =
        |why: &str| PluginError::invalid_argument(format!("{} is not a capvirt QEMU save file: {why}", path.display()));
    // Non-blocking open: a FIFO or device must be refused, not waited on forever.
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => PluginError::not_found(format!("{} does not exist", path.display())),
        _ => PluginError::invalid_argument(format!("cannot open {}: {e}", path.display())),
    })?;
    let metadata = file.metadata().map_err(|e| not_save(&e.to_string()))?;
    if !metadata.is_file() {
        return Err(not_save("not a regular file"));
    }
    rustix::fs::fcntl_setfl(&file, rustix::fs::OFlags::empty()).map_err(|e| not_save(&e.to_string()))?;
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut read_line = |line: &mut String| {
        line.clear();
        (&mut reader).take(64).read_line(line).map_err(|e| not_save(&e.to_string()))
    };
    let magic_len = read_line(&mut line)?;
    if line.trim_end() != SAVE_MAGIC {
        return Err(not_save("wrong magic"));
    }
    let length_len = read_line(&mut line)?;
    let length: usize = line.trim_end().parse().map_err(|_| not_save("bad header length"))?;
    if length > MAX_HEADER {
        return Err(not_save("header too large"));
    }
    let mut text = vec![0; length];
    reader.read_exact(&mut text).map_err(|_| not_save("truncated header"))?;
    let text = String::from_utf8(text).map_err(|_| not_save("header is not UTF-8"))?;
    let header: SaveHeader =
        toml::from_str(&text).map_err(|e| not_save(e.to_string().lines().next().unwrap_or("bad header")))?;
    // Position the file right after the header for QEMU (the BufReader read ahead).
    // (The lines as read: `trim_end` above accepts other line ends than the writer's.)
    let offset = (magic_len + length_len + length) as u64;
    let mut file = reader.into_inner();
    file.seek(SeekFrom::Start(offset)).map_err(|e| not_save(&e.to_string()))?;
    Ok((header, file))
}

/// Checks the USB port assignment of a live configuration read from a file.
pub(crate) fn check_live(live: Live, path: &str) -> Result<Live, PluginError> {
    let bad = |why: String| PluginError::invalid_argument(format!("{path}: {why}"));
    if !matches!(live.accel.as_str(), "kvm" | "tcg") {
        return Err(bad(format!("unknown accelerator {:?}", live.accel)));
    }
    if let Some(machine_type) = live.machine_type.as_deref().filter(|m| !emulator::is_q35_machine_type(m)) {
        return Err(bad(format!("unknown machine type {machine_type:?}")));
    }
    let users: Vec<&str> = live
        .machine
        .disks
        .iter()
        .filter(|d| d.bus == spec::Bus::Usb)
        .map(|d| d.target.as_str())
        .chain(live.machine.devices.iter().map(|d| d.id.as_str()))
        .collect();
    let mut seen = Vec::new();
    for user in &users {
        let port = live.port(user).ok_or_else(|| bad(format!("no USB port for '{user}'")))?;
        if !(1..=spec::USB_PORTS).contains(&port) || seen.contains(&port) {
            return Err(bad(format!("invalid USB port {port} for '{user}'")));
        }
        seen.push(port);
    }
    if live.usb_ports.len() != users.len() {
        return Err(bad("USB ports for unknown devices".into()));
    }
    live.check_nic_ports().map_err(bad)?;
    Ok(live)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn ok<T>(result: Result<T, PluginError>) -> T {
        result.unwrap_or_else(|e| panic!("{}", e.message))
    }

    fn io<T>(result: std::io::Result<T>) -> T {
        result.unwrap_or_else(|e| panic!("{e}"))
    }

    fn refused<T>(result: Result<T, PluginError>) -> String {
        match result {
            Ok(_) => panic!("accepted"),
            Err(e) => e.message.to_string(),
        }
    }

    fn machine() -> Machine {
        let tablet = spec::Device { kind: spec::Kind::UsbTablet, id: "tablet0".into(), path: None, format: None };
        Machine { devices: vec![tablet], ..Machine::bare("vm", 64) }
    }

    fn header() -> SaveHeader {
        SaveHeader { running: true, definition: machine(), live: Live::new(machine(), "tcg") }
    }

    /// A save file: the header as `save` writes it, then `stream` standing for QEMU's.
    fn save_file(dir: &Path, stream: &[u8]) -> PathBuf {
        let path = dir.join("vm.save");
        let mut file = io(File::create(&path));
        ok(write_header(&mut file, &header()));
        io(file.write_all(stream));
        path
    }

    #[test]
    fn a_save_file_reads_back_positioned_at_the_stream() {
        let dir = io(tempfile::tempdir());
        let path = save_file(dir.path(), b"QEVM-stream");
        let (read, mut file) = ok(read_save(&path));
        assert!(read.running);
        assert_eq!(read.definition, machine());
        assert_eq!(read.live, Live::new(machine(), "tcg"));
        let mut stream = Vec::new();
        io(file.read_to_end(&mut stream));
        assert_eq!(stream, b"QEVM-stream");
    }

    #[test]
    fn the_stream_starts_after_the_header_whatever_its_line_ends() {
        let dir = io(tempfile::tempdir());
        let text = io(fs::read_to_string(save_file(dir.path(), b"")));
        let (magic, rest) = text.split_once('\n').unwrap_or_else(|| panic!("no magic line"));
        let (length, body) = rest.split_once('\n').unwrap_or_else(|| panic!("no length line"));
        let path = dir.path().join("crlf.save");
        io(fs::write(&path, format!("{magic} \r\n{length}\r\n{body}QEVM")));
        let (_, mut file) = ok(read_save(&path));
        let mut stream = String::new();
        io(file.read_to_string(&mut stream));
        assert_eq!(stream, "QEVM");
    }

    #[test]
    fn files_that_are_not_save_files_are_refused_without_blocking() {
        let dir = io(tempfile::tempdir());
        let at = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            io(fs::write(&path, bytes));
            path
        };
        let good = io(fs::read(save_file(dir.path(), b"")));
        let cases: Vec<(PathBuf, &str)> = vec![
            (at("empty", b""), "wrong magic"),
            (at("magic", b"CAPVIRT-QEMU-SAVE 2\n3\nabc"), "wrong magic"),
            (at("long-line", &[b'x'; 100_000]), "wrong magic"),
            (at("length", b"CAPVIRT-QEMU-SAVE 1\nmany\n"), "bad header length"),
            (at("huge", b"CAPVIRT-QEMU-SAVE 1\n18446744073709551615\n"), "header too large"),
            (at("cut", &good[..good.len() - 5]), "truncated header"),
            (at("utf8", b"CAPVIRT-QEMU-SAVE 1\n2\n\xff\xfe"), "not UTF-8"),
            (at("toml", b"CAPVIRT-QEMU-SAVE 1\n9\nrunning=1"), "not a capvirt QEMU save file"),
            (dir.path().to_path_buf(), "not a regular file"),
        ];
        for (path, why) in cases {
            let message = refused(read_save(&path));
            assert!(message.contains(why), "{}: {message}", path.display());
        }
        let missing = dir.path().join("missing");
        assert!(matches!(read_save(&missing), Err(e) if e.kind == ErrorKind::NotFound));
        // A FIFO would block an ordinary open until a writer comes.
        let fifo = dir.path().join("fifo");
        io(rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, rustix::fs::Mode::RUSR, 0)
            .map_err(std::io::Error::from));
        let started = Instant::now();
        assert!(refused(read_save(&fifo)).contains("not a regular file"));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn save_targets_are_new_files_in_existing_directories() {
        let dir = io(tempfile::tempdir());
        let target = ok(new_file_path(&dir.path().join("vm.save").display().to_string()));
        assert_eq!(target, io(fs::canonicalize(dir.path())).join("vm.save"));
        let existing = dir.path().join("there");
        io(fs::write(&existing, ""));
        assert!(refused(new_file_path(&existing.display().to_string())).contains("never overwrites"));
        io(std::os::unix::fs::symlink("/nonexistent", dir.path().join("dangling")));
        assert!(new_file_path(&dir.path().join("dangling").display().to_string()).is_err());
        assert!(new_file_path(&dir.path().join("no/such/dir/x").display().to_string()).is_err());
        assert!(new_file_path("/").is_err());
        assert!(new_file_path("").is_err());
    }

    #[test]
    fn publishing_never_replaces_a_file_that_appeared_meanwhile() {
        let dir = io(tempfile::tempdir());
        let target = dir.path().join("vm.save");
        let temporary = sibling_temporary(&target);
        assert_eq!(temporary.parent(), Some(dir.path()));
        assert!(temporary.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".vm.save.capvirt-partial-")));
        io(fs::write(&temporary, "saved"));
        io(fs::write(&target, "someone else's"));
        assert!(publish(&temporary, &target).is_err());
        assert_eq!(io(fs::read_to_string(&target)), "someone else's");
        io(fs::remove_file(&target));
        ok(publish(&temporary, &target));
        assert_eq!(io(fs::read_to_string(&target)), "saved");
        assert!(!temporary.exists());
    }

    #[test]
    fn live_configurations_from_files_are_checked() {
        let good = Live::new(machine(), "tcg");
        assert_eq!(ok(check_live(good.clone(), "f")), good);
        let mut bad_accel = good.clone();
        bad_accel.accel = "xen".into();
        assert!(refused(check_live(bad_accel, "f")).contains("unknown accelerator"));
        let mut bad_machine = good.clone();
        bad_machine.machine_type = Some("pc-i440fx-7.2".into());
        assert!(refused(check_live(bad_machine, "f")).contains("unknown machine type"));
        let mut no_port = good.clone();
        no_port.usb_ports.clear();
        assert!(refused(check_live(no_port, "f")).contains("no USB port"));
        for port in [0, spec::USB_PORTS + 1] {
            let mut out_of_range = good.clone();
            out_of_range.usb_ports.insert("tablet0".into(), port);
            assert!(refused(check_live(out_of_range, "f")).contains("invalid USB port"));
        }
        let mut unknown = good.clone();
        unknown.usb_ports.insert("ghost".into(), 2);
        assert!(refused(check_live(unknown, "f")).contains("unknown devices"));
        let mut twice = good;
        twice.machine.devices.push(spec::Device {
            kind: spec::Kind::UsbKeyboard,
            id: "kbd".into(),
            path: None,
            format: None,
        });
        twice.usb_ports.insert("kbd".into(), 1);
        assert!(refused(check_live(twice, "f")).contains("invalid USB port 1"));
    }

    #[test]
    fn migration_progress_is_read_from_query_migrate() {
        let info = serde_json::json!({"status": "active", "ram": {"transferred": 10, "total": 40}});
        assert!(matches!(migration_status(&info), Some(qmp::MigrationStatus::active)));
        assert_eq!(ram_progress(&info), (10, 40));
        let odd = serde_json::json!({"status": "no-such-status", "ram": {"transferred": "x"}});
        assert!(migration_status(&odd).is_none());
        assert_eq!(ram_progress(&odd), (0, 0));
        assert_eq!(ram_progress(&serde_json::json!(null)), (0, 0));
    }

    #[test]
    fn transfer_bounds_grow_with_memory_and_never_overflow() {
        assert_eq!(transfer_timeout(0), Duration::from_secs(120));
        assert!(transfer_timeout(4096) > transfer_timeout(64));
        assert!(transfer_timeout(u64::MAX) >= transfer_timeout(1 << 40));
    }

    #[test]
    fn migrations_go_through_a_passed_descriptor_only() {
        let command = migrate_command("fd:capvirt-save");
        assert_eq!(command.uri, "fd:capvirt-save");
        let json = io(serde_json::to_value(&command).map_err(std::io::Error::other));
        assert_eq!(json, serde_json::json!({"uri": "fd:capvirt-save"}));
    }
}
