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
