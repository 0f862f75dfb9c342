//! `domain.events`: lifecycle events of a state root's domains, from two sources.
//!
//! - The state root, polled every `capvirt_plugin_api::events::CHECK_INTERVAL`: a definition that appears,
//!   changes (another inode or mtime: definitions are replaced atomically) or vanishes; a QEMU
//!   that appears (its pidfile locked), exits cleanly (pidfile gone) or dies (pidfile left
//!   unlocked). Polling keeps this working for QEMUs started by any `capvirt` process, which
//!   is the only way they are started (detached: the process that started one may be gone).
//! - One monitor channel per running domain, held for the call (claimed from the last channel
//!   down, see [`monitor::open_spare`]), whose QMP events say what the process view cannot:
//!   pause and resume, who shut the guest down, resets, panics.
//!
//! Outgoing and incoming state streams (save, migration, restore) leave a one-word marker in
//! the domain's runtime directory ([`mark_outgoing`], [`mark_incoming`]) so that a watcher in
//! another process can tell a save from a migration and a restore from an arrival.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt,
    thread,
    time::{Duration, Instant, SystemTime},
};

use capvirt_plugin_api::{
    events::{DomainEvent, EventKind, Origin, Stream},
    prelude::*,
    types::DomainState,
};
use qapi::qmp;

use crate::{
    driver::{run_state, QemuDriver},
    monitor::{self, Monitor, OpenError},
    qmp::Event,
    store::{self, DomainPaths, Liveness},
};

/// How long the call waits for a monitor channel of a domain in one attempt: short, because
/// the other domains wait meanwhile. A QEMU still initialising (its pidfile is written before
/// its monitors answer) is tried again at the next scan.
const MONITOR_WAIT: Duration = Duration::from_millis(300);
/// When every channel is taken by other connections: the next attempt, meanwhile the domain
/// is watched through its process only.
const MONITOR_RETRY: Duration = Duration::from_secs(2);
/// How long a start waits to be reported with its run state (from the monitor) before it is
/// reported without.
const START_REPORT_WAIT: Duration = Duration::from_secs(5);

/// File in a domain's directory naming the outgoing stream of one QEMU (`saved PID` or
/// `migrated PID`): beside the definition, not in the runtime directory, because the driver
/// removes that as soon as the QEMU quits, possibly before a watcher read its last events.
const OUTGOING: &str = "outgoing";
/// File in a domain's runtime directory naming how its QEMU got its state (`restored` or
/// `migrated`).
const INCOMING: &str = "incoming";

/// Marks (`Some`) or clears (`None`) the outgoing stream of the domain's QEMU `pid`, before it
/// starts (best effort: without it, watchers report the stop as `destroyed`).
pub(crate) fn mark_outgoing(paths: &DomainPaths, pid: i32, what: Option<EventKind>) {
    let path = paths.dir.join(OUTGOING);
    match what {
        Some(kind) => {
            let _ = store::write_atomic(&path, format!("{} {pid}", kind.as_str()).as_bytes());
        }
        None => {
            let _ = fs::remove_file(path);
        }
    }
}

/// The outgoing stream of the QEMU `pid`, if one was marked before `time_ms` (an event read
/// late must not be explained by a stream that began after it).
fn outgoing(paths: &DomainPaths, pid: Option<i32>, time_ms: Option<u64>) -> Option<String> {
    let path = paths.dir.join(OUTGOING);
    let written = fs::metadata(&path).ok()?.modified().ok()?;
    let written_ms = written.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    if time_ms.is_some_and(|t| written_ms > u128::from(t)) {
        return None;
    }
    let text = fs::read_to_string(&path).ok()?;
    let (kind, marked_pid) = text.trim().split_once(' ')?;
    (pid.is_some() && marked_pid.parse::<i32>().ok() == pid).then(|| kind.to_string())
}

/// Marks how a QEMU started for an incoming stream gets its state (best effort: without it,
/// watchers report a plain `started`).
pub(crate) fn mark_incoming(paths: &DomainPaths, what: EventKind) {
    mark(paths, INCOMING, Some(what));
}

fn mark(paths: &DomainPaths, file: &str, what: Option<EventKind>) {
    if let Some(kind) = what {
        let _ = store::write_atomic(&paths.run.join(file), kind.as_str().as_bytes());
    }
}

fn read_mark(paths: &DomainPaths, file: &str) -> Option<String> {
    fs::read_to_string(paths.run.join(file)).ok().map(|s| s.trim().to_string())
}

/// A definition file's identity: atomic replacement changes the inode, an edit the mtime.
type DefinitionId = (u64, Option<SystemTime>);

/// What the watcher knows of one domain.
struct Watched {
    paths: DomainPaths,
    definition: DefinitionId,
    life: Liveness,
    /// This call's own channel to the domain's QEMU, while it runs.
    monitor: Option<Monitor>,
    /// When to try again for a channel.
    retry_at: Option<Instant>,
    /// Since when a start waits to be reported (see [`START_REPORT_WAIT`]).
    start_pending: Option<Instant>,
    paused: bool,
    /// The QEMU waits for or receives a state stream; its start is reported once it is done.
    incoming: bool,
    /// What ends the current run, once known (`shutdown`, `destroyed`, `saved`, `migrated`).
    stop_detail: Option<&'static str>,
}

impl QemuDriver {
    pub(crate) fn events(&self, args: &Args<'_>, ctx: &Context<'_>) -> Result<Value, PluginError> {
        let mut stream = Stream::new(args, ctx)?;
        if let Some(name) = &stream.domain {
            self.store.require(name)?;
        }
        let mut watcher = Watcher { driver: self, domains: BTreeMap::new() };
        // What exists when the call begins is the baseline, not news.
        watcher.scan(&mut stream, false)?;
        loop {
            if let Some(ended) = stream.ended() {
                // Dropping the watcher closes and releases its channels.
                return Ok(stream.summary(ended));
            }
            thread::sleep(stream.next_wait());
            watcher.read_monitors(&mut stream);
            watcher.scan(&mut stream, true)?;
        }
    }
}

struct Watcher<'d> {
    driver: &'d QemuDriver,
    domains: BTreeMap<String, Watched>,
}

impl Watcher<'_> {
    /// Compares the state root with what is known; reports the differences when `report`.
    fn scan(&mut self, stream: &mut Stream<'_, '_>, report: bool) -> Result<(), PluginError> {
        let store = &self.driver.store;
        let names = match &stream.domain {
            Some(name) => vec![name.clone()],
            None => store.names()?,
        };
        let mut emit = |stream: &mut Stream<'_, '_>, event: DomainEvent| {
            if report {
                stream.deliver(event);
            }
        };
        // Undefined meanwhile.
        let gone: Vec<String> = self.domains.keys().filter(|n| !names.contains(n)).cloned().collect();
        for name in gone {
            if let Some(mut watched) = self.domains.remove(&name) {
                if let Some(id) = definition_id(&watched.paths) {
                    // Listed a moment ago, still there: the listing raced a define.
                    watched.definition = id;
                    self.domains.insert(name, watched);
                    continue;
                }
                watched.monitor = None;
                emit(stream, DomainEvent::new(name, EventKind::Undefined, None));
            }
        }
        for name in names {
            let paths = store.paths(&name)?;
            let Some(definition) = definition_id(&paths) else { continue };
            let life = store.liveness(&paths)?;
            let watched = match self.domains.get_mut(&name) {
                Some(watched) => watched,
                None => {
                    let state = if matches!(life, Liveness::Alive(_)) { DomainState::Running } else { off(life) };
                    emit(stream, DomainEvent::new(&name, EventKind::Defined, Some(state)).detail("added"));
                    let watched = Watched {
                        paths,
                        definition,
                        life: Liveness::Stopped,
                        monitor: None,
                        retry_at: None,
                        start_pending: None,
                        paused: false,
                        incoming: false,
                        stop_detail: None,
                    };
                    self.domains.entry(name.clone()).or_insert(watched)
                }
            };
            if watched.definition != definition {
                watched.definition = definition;
                let state = current_state(watched);
                emit(stream, DomainEvent::new(&name, EventKind::Defined, Some(state)).detail("updated"));
            }
            match (watched.life, life) {
                (Liveness::Alive(before), Liveness::Alive(now)) if before == now => {
                    if watched.monitor.is_none() && watched.retry_at.is_some_and(|at| Instant::now() >= at) {
                        attach(watched, &mut emit, stream);
                    }
                    if watched.incoming {
                        poll_incoming(watched, &mut emit, stream);
                    }
                }
                (Liveness::Alive(_), now) => {
                    // The run ended: its last monitor events first (QEMU closed the socket,
                    // so they are all there), then how it ended.
                    drain(watched, &mut emit, stream);
                    if now == Liveness::Crashed && operation_in_progress(&watched.paths) {
                        // A capvirt operation holding the domain's lock is stopping it (a
                        // killed QEMU leaves its pidfile until the driver removes it).
                        continue;
                    }
                    ended(watched, now, &mut emit, stream);
                    watched.life = now;
                    // Another QEMU already runs it (restarted between two scans).
                    if let Liveness::Alive(_) = now {
                        started(watched, &mut emit, stream, report);
                    }
                }
                (_, Liveness::Alive(_)) => {
                    watched.life = life;
                    started(watched, &mut emit, stream, report);
                }
                (_, now) => watched.life = now,
            }
        }
        Ok(())
    }

    /// Reads the events every channel received so far.
    fn read_monitors(&mut self, stream: &mut Stream<'_, '_>) {
        let mut emit = |stream: &mut Stream<'_, '_>, event: DomainEvent| stream.deliver(event);
        for watched in self.domains.values_mut() {
            drain(watched, &mut emit, stream);
        }
    }
}

type Emit<'e> = dyn FnMut(&mut Stream<'_, '_>, DomainEvent) + 'e;

fn definition_id(paths: &DomainPaths) -> Option<DefinitionId> {
    let meta = fs::metadata(&paths.definition).ok()?;
    Some((meta.ino(), meta.modified().ok()))
}

fn off(life: Liveness) -> DomainState {
    match life {
        Liveness::Crashed => DomainState::Crashed,
        _ => DomainState::ShutOff,
    }
}

fn current_state(watched: &Watched) -> DomainState {
    match watched.life {
        Liveness::Alive(_) if watched.paused => DomainState::Paused,
        Liveness::Alive(_) => DomainState::Running,
        other => off(other),
    }
}

/// Whether another capvirt operation holds the domain's lock right now.
fn operation_in_progress(paths: &DomainPaths) -> bool {
    match fs::File::open(&paths.lock) {
        Ok(file) => matches!(file.try_lock_shared(), Err(fs::TryLockError::WouldBlock)),
        Err(_) => false,
    }
}

/// A QEMU appeared: take a channel, learn its run state and report the start (deferred for a
/// QEMU that waits for a state stream).
fn started(watched: &mut Watched, emit: &mut Emit<'_>, stream: &mut Stream<'_, '_>, report: bool) {
    watched.paused = false;
    watched.incoming = false;
    watched.stop_detail = None;
    watched.start_pending = report.then(Instant::now);
    attach(watched, emit, stream);
}

/// Opens this call's channel to the domain's QEMU and reads its run state; reports a pending
/// start (unless the QEMU waits for a state stream: reported when it is in).
fn attach(watched: &mut Watched, emit: &mut Emit<'_>, stream: &mut Stream<'_, '_>) {
    let name = watched.paths.name.clone();
    match monitor::open_spare(&watched.paths, MONITOR_WAIT) {
        Ok(mut monitor) => {
            watched.retry_at = None;
            let status = monitor.qmp.execute_watching::<_, serde_json::Value>(&qmp::query_status {});
            let status = status.ok();
            let word = status.as_ref().and_then(|s| s.get("status")).and_then(|s| s.as_str()).unwrap_or("");
            // A QEMU seen only after its state stream was in (a fast restore or arrival) is
            // still an incoming one: its runtime directory, new for each QEMU, holds the mark.
            let marked = watched.start_pending.is_some() && read_mark(&watched.paths, INCOMING).is_some();
            watched.incoming = marked || matches!(word, "inmigrate" | "prelaunch");
            watched.paused = status.as_ref().is_some_and(|s| run_state(s) == DomainState::Paused) && !watched.incoming;
            watched.monitor = Some(monitor);
            if watched.start_pending.take().is_some() && !watched.incoming {
                let state = current_state(watched);
                emit(stream, DomainEvent::new(name, EventKind::Started, Some(state)).detail("booted"));
            }
        }
        Err(error) => {
            let wait = match error {
                OpenError::AllBusy => MONITOR_RETRY,
                _ => Duration::ZERO,
            };
            watched.retry_at = Some(Instant::now() + wait);
            if watched.start_pending.is_some_and(|since| since.elapsed() >= START_REPORT_WAIT) {
                watched.start_pending = None;
                emit(stream, DomainEvent::new(name, EventKind::Started, Some(DomainState::Running)));
            }
        }
    }
}

/// A QEMU waiting for a state stream: reports its start once the stream is in.
fn poll_incoming(watched: &mut Watched, emit: &mut Emit<'_>, stream: &mut Stream<'_, '_>) {
    // The restore or migration holds the domain's lock until it resumed the guest (or left
    // it paused, as saved): only then is the state the one to report.
    if operation_in_progress(&watched.paths) {
        return;
    }
    let Some(monitor) = watched.monitor.as_mut() else { return };
    let Ok(status) = monitor.qmp.execute_watching::<_, serde_json::Value>(&qmp::query_status {}) else { return };
    let word = status.get("status").and_then(|s| s.as_str()).unwrap_or("");
    if matches!(word, "inmigrate" | "prelaunch") {
        return;
    }
    // Events that came with the answer (e.g. RESUME) are older than the state it reports.
    drain(watched, emit, stream);
    if watched.incoming {
        watched.paused = run_state(&status) == DomainState::Paused;
        arrived(watched, emit, stream, None);
    }
}

/// Reports the start of a QEMU that received a state stream.
fn arrived(watched: &mut Watched, emit: &mut Emit<'_>, stream: &mut Stream<'_, '_>, time_ms: Option<u64>) {
    watched.incoming = false;
    let state = current_state(watched);
    let name = watched.paths.name.clone();
    let event = match read_mark(&watched.paths, INCOMING).as_deref() {
        Some("restored") => DomainEvent::new(name, EventKind::Restored, Some(state)),
        Some("migrated") => DomainEvent::new(name, EventKind::Started, Some(state)).detail("migrated"),
        _ => DomainEvent::new(name, EventKind::Started, Some(state)),
    };
    emit(
        stream,
        match time_ms {
            Some(t) => event.at(t),
            None => event,
        },
    );
}

/// Turns what the domain's channel received into events; drops a channel QEMU closed.
fn drain(watched: &mut Watched, emit: &mut Emit<'_>, stream: &mut Stream<'_, '_>) {
    let Some(monitor) = watched.monitor.as_mut() else { return };
    let received = monitor.qmp.read_events();
    let broken = monitor.qmp.is_broken();
    for event in received.unwrap_or_default() {
        translate(watched, &event, emit, stream);
    }
    if broken {
        // Closed with its QEMU (the next scan reports the end) or failed: tried again later.
        watched.monitor = None;
        watched.retry_at = Some(Instant::now() + MONITOR_RETRY);
    }
}

/// One QMP event in the registry's words.
fn translate(watched: &mut Watched, event: &Event, emit: &mut Emit<'_>, stream: &mut Stream<'_, '_>) {
    let name = watched.paths.name.clone();
    let guest = event.data.get("guest").and_then(serde_json::Value::as_bool);
    let reason = event.data.get("reason").and_then(|r| r.as_str()).map(str::to_string);
    let origin = if guest == Some(true) { Origin::Guest } else { Origin::Host };
    let pid = match watched.life {
        Liveness::Alive(pid) => Some(pid),
        _ => None,
    };
    let at = |e: DomainEvent| match event.time_ms {
        Some(t) => e.at(t),
        None => e,
    };
    match event.name.as_str() {
        "STOP" if !watched.paused && !watched.incoming => {
            watched.paused = true;
            let mut e = DomainEvent::new(name, EventKind::Suspended, Some(DomainState::Paused));
            match outgoing(&watched.paths, pid, event.time_ms).as_deref() {
                Some("saved") => e = e.detail("save"),
                Some("migrated") => e = e.detail("migration"),
                _ => {}
            }
            emit(stream, at(e));
        }
        "RESUME" if watched.incoming => {
            watched.paused = false;
            arrived(watched, emit, stream, event.time_ms);
        }
        "RESUME" if watched.paused => {
            watched.paused = false;
            emit(stream, at(DomainEvent::new(name, EventKind::Resumed, Some(DomainState::Running))));
        }
        "SHUTDOWN" => match reason.as_deref() {
            // `quit` from the driver: destroy, or the end of an outgoing stream.
            Some("host-qmp-quit") => match outgoing(&watched.paths, pid, None).as_deref() {
                Some("saved") => {
                    watched.stop_detail = Some("saved");
                    emit(stream, at(DomainEvent::new(name, EventKind::Saved, Some(DomainState::Paused))));
                }
                Some("migrated") => {
                    watched.stop_detail = Some("migrated");
                    emit(stream, at(DomainEvent::new(name, EventKind::Migrated, Some(DomainState::Paused))));
                }
                _ => watched.stop_detail = Some("destroyed"),
            },
            reason => {
                watched.stop_detail = Some("shutdown");
                let mut e = DomainEvent::new(name, EventKind::Shutdown, Some(DomainState::InShutdown)).origin(origin);
                if let Some(reason) = reason {
                    e = e.detail(reason);
                }
                emit(stream, at(e));
            }
        },
        "RESET" => {
            let mut e = DomainEvent::new(name, EventKind::Reset, Some(current_state(watched))).origin(origin);
            if let Some(reason) = reason {
                e = e.detail(reason);
            }
            emit(stream, at(e));
        }
        "GUEST_PANICKED" => {
            emit(
                stream,
                at(DomainEvent::new(name, EventKind::Crashed, Some(DomainState::Crashed)).detail("guest panicked")),
            );
        }
        _ => {}
    }
}

/// The run of a QEMU ended (`now` is not the same QEMU alive).
fn ended(watched: &mut Watched, now: Liveness, emit: &mut Emit<'_>, stream: &mut Stream<'_, '_>) {
    watched.monitor = None;
    watched.paused = false;
    let name = watched.paths.name.clone();
    // A run too short to reach its monitor still started.
    if watched.start_pending.take().is_some() {
        emit(stream, DomainEvent::new(&name, EventKind::Started, Some(DomainState::Running)));
    }
    let event = match (now, watched.stop_detail.take()) {
        (Liveness::Crashed, _) => DomainEvent::new(name, EventKind::Crashed, Some(DomainState::Crashed))
            .detail("QEMU exited without cleaning up (killed or failed)"),
        (_, Some(detail)) => DomainEvent::new(name, EventKind::Stopped, Some(DomainState::ShutOff)).detail(detail),
        // Killed by a signal QEMU handles (it reports SHUTDOWN host-signal) or ended otherwise.
        (_, None) => DomainEvent::new(name, EventKind::Stopped, Some(DomainState::ShutOff)).detail("ended"),
    };
    emit(stream, event);
}
