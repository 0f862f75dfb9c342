//! The serial console: every domain's first serial port is a QEMU socket chardev listening on
//! `run/console.sock` (bound by the driver, passed as a file descriptor) whose `logfile` is
//! `console.log` in the domain's directory (passed as a file descriptor too, through an fd
//! set): QEMU itself appends everything the guest prints, connected client or not, so every
//! reader sees the same stream since the domain started and the last run's output outlives
//! its QEMU; and `domain.console-write` connects to the socket to type a line, which the
//! guest's serial port receives (QEMU's ring buffer chardev, used before, never passes
//! `ringbuf-write` data to the guest). QEMUs started by an older driver still have the ring:
//! reads drain it with QMP `ringbuf-read` into the same log.
//!
//! `console.log` is appended and read under its own `flock` (never the domain lock: a long
//! operation such as a shutdown wait must not block console reads), bounded in time.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt,
    thread,
    time::{Duration, Instant},
};

use base64::Engine;
use capvirt_plugin_api::PluginError;

use crate::store::{io_failure, DomainPaths};

/// The chardev id of the console ring (fixed text, never caller data).
pub const CHARDEV: &str = "capvirt-console";
/// Size of QEMU's ring (a power of two, as QEMU requires): output beyond it between two
/// drains overwrites the oldest bytes.
pub const RING_SIZE: u64 = 1 << 20;
/// How much of one run's output is kept; later output is dropped.
pub const KEEP_MAX: u64 = 8 << 20;
/// Bound on waiting for another reader of the same console.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// QEMU's fd set holding the console log's descriptor.
const LOG_FDSET: u32 = 1;
/// Bound on QEMU taking a typed line (it closes the connection once it read it all).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// QEMU's options for the console: the log (descriptor `log_fd`) in an fd set, a socket
/// chardev on the listening socket `socket_fd` logging to it, the first serial port on it.
/// Fixed text: no path reaches QEMU's option parser.
pub fn options(socket_fd: i32, log_fd: i32) -> [String; 6] {
    [
        "-add-fd".into(),
        format!("fd={log_fd},set={LOG_FDSET},opaque=capvirt-console-log"),
        "-chardev".into(),
        format!("socket,id={CHARDEV},fd={socket_fd},server=on,wait=off,logfile=/dev/fdset/{LOG_FDSET},logappend=on"),
        "-serial".into(),
        format!("chardev:{CHARDEV}"),
    ]
}

/// Whether the domain's running QEMU has the console socket (else: a ring, older driver).
pub fn has_socket(paths: &DomainPaths) -> bool {
    paths.console_socket().exists()
}

/// Types `text` and a newline on the running domain's serial console: connects to QEMU's
/// console socket, sends the line, half-closes, and waits (bounded) for QEMU to close its end,
/// which it does once it read everything (what the guest echoes meanwhile is in the log).
pub fn write_line(paths: &DomainPaths, text: &str) -> Result<(), PluginError> {
    use std::os::unix::net::UnixStream;
    let socket = paths.console_socket();
    let mut stream = crate::monitor::with_socket_path(&socket, |path| UnixStream::connect(path))
        .map_err(|e| io_failure(&socket, "connect to", &e))?;
    let failed = |e: io::Error| PluginError::driver_failure(format!("console of domain '{}': {e}", paths.name));
    stream.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(failed)?;
    stream.set_read_timeout(Some(WRITE_TIMEOUT)).map_err(failed)?;
    let mut line = Vec::with_capacity(text.len() + 1);
    line.extend_from_slice(text.as_bytes());
    line.push(b'\n');
    stream.write_all(&line).map_err(failed)?;
    stream.shutdown(std::net::Shutdown::Write).map_err(failed)?;
    let deadline = Instant::now() + WRITE_TIMEOUT;
    let mut echo = [0u8; 4096];
    loop {
        match stream.read(&mut echo) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            // QEMU closed with data unread by us: the line was taken.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(failed(e)),
        }
        if Instant::now() >= deadline {
            return Err(PluginError::timeout(format!(
                "the serial port of domain '{}' did not take the line within {} s (the guest does not read its console, or another client is attached to it)",
                paths.name,
                WRITE_TIMEOUT.as_secs()
            )));
        }
    }
}

/// The console log, locked for this process until dropped.
pub struct Log {
    file: File,
}

impl Log {
    /// Opens (creating) and locks the domain's console log.
    pub fn open(paths: &DomainPaths) -> Result<Log, PluginError> {
        let path = &paths.console;
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io_failure(path, "open", &e))?;
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Log { file }),
                Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(5))
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(PluginError::timeout(format!(
                        "the console of domain '{}' stayed locked by another reader for {} s",
                        paths.name,
                        LOCK_WAIT.as_secs()
                    )))
                }
                Err(fs::TryLockError::Error(e)) => return Err(io_failure(path, "lock", &e)),
            }
        }
    }

    /// Empties the log (a new run starts).
    pub fn reset(&self) -> Result<(), PluginError> {
        self.file.set_len(0).map_err(|e| PluginError::driver_failure(format!("cannot reset the console log: {e}")))
    }

    /// Appends what a `ringbuf-read` returned (base64), up to [`KEEP_MAX`] in all.
    pub fn append_base64(&mut self, encoded: &str) -> Result<(), PluginError> {
        if encoded.is_empty() {
            return Ok(());
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| PluginError::driver_failure(format!("QEMU returned console data that is not base64: {e}")))?;
        let len = self.len()?;
        let room = usize::try_from(KEEP_MAX.saturating_sub(len)).unwrap_or(usize::MAX);
        let kept = &bytes[..bytes.len().min(room)];
        self.file
            .write_all(kept)
            .map_err(|e| PluginError::driver_failure(format!("cannot append to the console log: {e}")))
    }

    fn len(&self) -> Result<u64, PluginError> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| PluginError::driver_failure(format!("cannot inspect the console log: {e}")))
    }

    /// At most `max` bytes from `offset` (clamped to the end); returns the offset read from.
    pub fn read(&mut self, offset: u64, max: u64) -> Result<(u64, Vec<u8>), PluginError> {
        let start = offset.min(self.len()?);
        let failed = |e: io::Error| PluginError::driver_failure(format!("cannot read the console log: {e}"));
        self.file.seek(SeekFrom::Start(start)).map_err(failed)?;
        let mut data = Vec::new();
        (&mut self.file).take(max).read_to_end(&mut data).map_err(failed)?;
        Ok((start, data))
    }
}
