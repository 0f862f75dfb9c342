//! Monitor channels: each QEMU gets [`CHANNELS`] QMP sockets, because a QEMU socket chardev
//! serves one client at a time and every `capvirt` process (or long-lived host connection)
//! keeps its channel for as long as it runs. A channel is claimed with an `flock` on its lock
//! file, so that capvirt processes never queue behind each other on one socket.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::{
    qmp::{Qmp, QmpError},
    store::DomainPaths,
};

/// QMP sockets per QEMU: as many connections (CLI calls, long-lived library connections)
/// can talk to one domain at once; more wait for a free one, up to a bound.
pub const CHANNELS: usize = 8;
/// Bound on connecting and negotiating one channel.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A claimed, negotiated monitor channel of one QEMU process.
pub struct Monitor {
    pub qmp: Qmp,
    _claim: File,
}

/// Why no channel could be had.
#[derive(Debug)]
pub enum OpenError {
    /// Every channel stayed claimed by other connections for the whole wait.
    AllBusy,
    /// The sockets are gone or refuse connections: QEMU is not running any more.
    Gone,
    Qmp(QmpError),
    Io(io::Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::AllBusy => write!(f, "all {CHANNELS} monitor channels are in use"),
            OpenError::Gone => f.write_str("QEMU is not running any more"),
            OpenError::Qmp(e) => e.fmt(f),
            OpenError::Io(e) => e.fmt(f),
        }
    }
}

/// Bound on the first greeting wait of a channel: a channel that a client outside capvirt
/// holds accepts the connection into its backlog and never greets, so a short first wait lets
/// the next channel serve the call; waits grow when every channel is slow.
const FIRST_GREETING_WAIT: Duration = Duration::from_millis(300);

/// Claims and connects a free channel of the domain's QEMU, waiting up to `wait` for one.
/// A channel whose socket is gone, refused, held by a foreign client or silent is skipped;
/// only when every socket is gone is QEMU taken for gone.
pub fn open(paths: &DomainPaths, wait: Duration) -> Result<Monitor, OpenError> {
    open_in(paths, wait, false)
}

/// [`open`] trying the channels from the last one down: for a call that keeps its channel a
/// long time (`domain.events`), so that ordinary calls, which try from the first one up, keep
/// finding theirs at once.
pub fn open_spare(paths: &DomainPaths, wait: Duration) -> Result<Monitor, OpenError> {
    open_in(paths, wait, true)
}

fn open_in(paths: &DomainPaths, wait: Duration, from_last: bool) -> Result<Monitor, OpenError> {
    let deadline = Instant::now() + wait;
    let mut greeting_wait = FIRST_GREETING_WAIT;
    loop {
        let (mut gone, mut silent) = (0, 0);
        for index in 0..CHANNELS {
            let channel = if from_last { CHANNELS - 1 - index } else { index };
            let claim = match OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(paths.monitor_lock(channel))
            {
                Ok(file) => file,
                // The run directory itself is gone.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(OpenError::Gone),
                Err(e) => return Err(OpenError::Io(e)),
            };
            match claim.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => continue,
                Err(std::fs::TryLockError::Error(e)) => return Err(OpenError::Io(e)),
            }
            let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(50));
            let timeout = greeting_wait.min(remaining);
            let connected = with_socket_path(&paths.monitor_socket(channel), |path| Qmp::connect(path, timeout));
            match connected {
                Ok(qmp) => return Ok(Monitor { qmp, _claim: claim }),
                // Held by a client outside capvirt: try the next channel.
                Err(QmpError::Busy) => continue,
                Err(QmpError::Io(e))
                    if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) =>
                {
                    gone += 1
                }
                Err(QmpError::Closed) => gone += 1,
                Err(QmpError::Timeout) => silent += 1,
                Err(e) => return Err(OpenError::Qmp(e)),
            }
        }
        if gone == CHANNELS {
            return Err(OpenError::Gone);
        }
        if Instant::now() >= deadline {
            return Err(if silent > 0 { OpenError::Qmp(QmpError::Timeout) } else { OpenError::AllBusy });
        }
        if silent > 0 {
            greeting_wait = (greeting_wait * 4).min(HANDSHAKE_TIMEOUT);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Unix socket addresses hold at most 107 bytes: a longer path is reached through the
/// `/proc/self/fd` link of its opened directory (the directory stays open meanwhile).
pub fn with_socket_path<T, E: From<io::Error>>(path: &Path, f: impl FnOnce(&Path) -> Result<T, E>) -> Result<T, E> {
    const MAX_SUN_PATH: usize = 100;
    if path.as_os_str().len() <= MAX_SUN_PATH {
        return f(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return f(path);
    };
    let dir = File::open(dir)?;
    use std::os::fd::AsRawFd;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    let result = f(&short);
    drop(dir);
    result
}

impl From<io::Error> for QmpError {
    fn from(e: io::Error) -> Self {
        QmpError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader, Write},
        os::unix::net::{UnixListener, UnixStream},
        sync::{mpsc, Arc},
    };

    use super::*;
    use crate::{cache::MonitorCache, store::Store};

    const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\n";

    /// A domain's run directory with QMP servers on the given channels; each server answers
    /// every command with an empty return (`cont` with a line that is not QMP) and reports the channel of each client it greets.
    struct Sockets {
        _root: tempfile::TempDir,
        paths: DomainPaths,
        greeted: mpsc::Receiver<usize>,
    }

    fn sockets(channels: &[usize]) -> Sockets {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let paths = Store::new(root.path().to_path_buf()).paths("vm").unwrap_or_else(|e| panic!("{}", e.message));
        fs_err(std::fs::create_dir_all(&paths.run));
        let (report, greeted) = mpsc::channel();
        for &channel in channels {
            let listener = UnixListener::bind(paths.monitor_socket(channel)).unwrap_or_else(|e| panic!("bind: {e}"));
            let report = report.clone();
            // Blocked in accept until the test process ends: no state outlives the test.
            thread::spawn(move || {
                for client in listener.incoming().map_while(Result::ok) {
                    let report = report.clone();
                    thread::spawn(move || serve(client, channel, &report));
                }
            });
        }
        Sockets { _root: root, paths, greeted }
    }

    fn serve(client: UnixStream, channel: usize, report: &mpsc::Sender<usize>) {
        let Ok(mut writer) = client.try_clone() else { return };
        if writer.write_all(GREETING).is_err() {
            return;
        }
        let _ = report.send(channel);
        for line in BufReader::new(client).lines() {
            let Ok(line) = line else { return };
            let reply: &[u8] = if line.contains("\"cont\"") { b"not json\n" } else { b"{\"return\": {}}\n" };
            if writer.write_all(reply).is_err() {
                return;
            }
        }
    }

    fn fs_err<T>(result: io::Result<T>) -> T {
        result.unwrap_or_else(|e| panic!("{e}"))
    }

    fn claim(paths: &DomainPaths, channel: usize) -> File {
        let file = fs_err(
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(paths.monitor_lock(channel)),
        );
        file.try_lock().unwrap_or_else(|e| panic!("claiming channel {channel}: {e}"));
        file
    }

    fn opened(paths: &DomainPaths) -> Monitor {
        open(paths, Duration::from_secs(5)).unwrap_or_else(|e| panic!("open: {e}"))
    }

    fn greeted_on(sockets: &Sockets) -> usize {
        sockets.greeted.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|e| panic!("no greeting: {e}"))
    }

    #[test]
    fn a_claimed_channel_makes_the_next_one_serve() {
        let sockets = sockets(&[0, 1, 2]);
        let held = claim(&sockets.paths, 0);
        let mut monitor = opened(&sockets.paths);
        assert_eq!(greeted_on(&sockets), 1);
        monitor.qmp.execute(&qapi::qmp::stop {}).unwrap_or_else(|e| panic!("stop: {e}"));
        // A second connection of the same process takes the next free channel.
        let _second = opened(&sockets.paths);
        assert_eq!(greeted_on(&sockets), 2);
        drop(held);
    }

    #[test]
    fn a_socket_held_by_a_foreign_client_is_skipped_quickly() {
        // Channel 0's socket queues connections but never greets: QEMU serving another client.
        let sockets = sockets(&[1]);
        let _silent = fs_err(UnixListener::bind(sockets.paths.monitor_socket(0)));
        let started = Instant::now();
        let _monitor = opened(&sockets.paths);
        assert_eq!(greeted_on(&sockets), 1);
        assert!(started.elapsed() < FIRST_GREETING_WAIT + Duration::from_secs(1), "took {:?}", started.elapsed());
    }

    #[test]
    fn missing_sockets_are_skipped_and_all_missing_means_gone() {
        let sockets = sockets(&[5]);
        let _monitor = opened(&sockets.paths);
        assert_eq!(greeted_on(&sockets), 5);

        let none = self::sockets(&[]);
        assert!(matches!(open(&none.paths, Duration::from_secs(1)), Err(OpenError::Gone)));
        fs_err(std::fs::remove_dir_all(&none.paths.run));
        assert!(matches!(open(&none.paths, Duration::from_secs(1)), Err(OpenError::Gone)));
    }

    #[test]
    fn every_channel_claimed_is_all_busy_within_the_wait() {
        let sockets = sockets(&[0]);
        let _held: Vec<File> = (0..CHANNELS).map(|channel| claim(&sockets.paths, channel)).collect();
        let started = Instant::now();
        assert!(matches!(open(&sockets.paths, Duration::from_millis(200)), Err(OpenError::AllBusy)));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_dropped_broken_channel_frees_its_claim() {
        let sockets = sockets(&[0, 1]);
        let mut monitor = opened(&sockets.paths);
        assert_eq!(greeted_on(&sockets), 0);
        // The servers answer `cont` with a line that is not QMP: the channel is broken.
        assert!(monitor.qmp.execute(&qapi::qmp::cont {}).is_err());
        assert!(monitor.qmp.is_broken());
        assert!(claim_is_taken(&sockets.paths, 0));
        drop(monitor);
        assert!(!claim_is_taken(&sockets.paths, 0), "a dropped channel kept its claim");
        let _again = opened(&sockets.paths);
        assert_eq!(greeted_on(&sockets), 0);
    }

    #[test]
    fn a_poisoned_cached_channel_is_dropped_and_its_channel_reused() {
        let sockets = sockets(&[0, 1]);
        let cache = MonitorCache::default();
        let shared = cache.insert("vm", opened(&sockets.paths));
        assert_eq!(greeted_on(&sockets), 0);
        let holder = Arc::clone(&shared);
        let _ = thread::spawn(move || {
            let _guard = holder.lock();
            panic!("a holder panics mid-exchange");
        })
        .join();
        assert!(shared.lock().is_err(), "the channel's lock is poisoned");
        // What the driver does with a poisoned channel (driver.rs, with_monitor).
        cache.remove_if("vm", &shared);
        assert!(cache.get("vm").is_none());
        drop(shared);
        assert!(!claim_is_taken(&sockets.paths, 0), "the poisoned channel kept its claim");
        let _fresh = opened(&sockets.paths);
        assert_eq!(greeted_on(&sockets), 0);
    }

    fn claim_is_taken(paths: &DomainPaths, channel: usize) -> bool {
        let file = fs_err(OpenOptions::new().read(true).write(true).open(paths.monitor_lock(channel)));
        matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
    }
}
