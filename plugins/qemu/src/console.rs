//! The serial console: every domain's first serial port is a QEMU ring buffer (`-chardev
//! ringbuf`, fixed option text); reads drain it with QMP `ringbuf-read` into `console.log` in
//! the domain's directory, so every caller sees the same stream since the domain started
//! (reading QEMU's ring consumes it) and the last run's output outlives its QEMU.
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

/// QEMU's options for the console: a ring buffer and the first serial port on it.
pub fn options() -> [String; 4] {
    [
        "-chardev".into(),
        format!("ringbuf,id={CHARDEV},size={RING_SIZE}"),
        "-serial".into(),
        format!("chardev:{CHARDEV}"),
    ]
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
