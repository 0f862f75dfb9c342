//! The appender: one shared log file, appended under an exclusive `flock` so that concurrent
//! `capvirt` processes neither interleave lines nor fork the chain.

use std::{
    fs::{DirBuilder, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use rustix::fs::{flock, FlockOperation};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{AuditError, Entry, Event, GENESIS, MAX_LINE};

/// An audit log file. Opened on the first record, so commands that record nothing never touch it.
#[derive(Debug)]
pub struct AuditLog {
    path: Option<PathBuf>,
    fail_open: bool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    file: Option<File>,
    /// The chain's end as this process last left it: the file size then, the last seq and the
    /// hash of the last line. Valid while the size is unchanged (no other process appended).
    tail: Option<Tail>,
}

#[derive(Debug, Clone)]
struct Tail {
    end: u64,
    seq: u64,
    hash: String,
}

/// One line, keys in the documented order.
#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    prev: &'a str,
    time: String,
    event: &'static str,
    intent: Option<u64>,
    uid: u32,
    gid: u32,
    user: Option<&'a str>,
    /// A TLS caller's certificate subject (absent for everyone else, so older lines are unchanged).
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate: Option<&'a str>,
    pid: u32,
    capability: &'a str,
    uri: &'a str,
    driver: &'a str,
    args: Option<&'a serde_json::Value>,
    outcome: Option<&'static str>,
    error: Option<&'a str>,
    elapsed_us: Option<u64>,
}

/// SHA-256 of a line's bytes (without its newline), as lowercase hex.
pub(crate) fn hash_line(line: &[u8]) -> String {
    // By table: `format!("{:02x}")` per byte cost as much as the hash itself.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(line);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    hex
}

impl AuditLog {
    /// A log at `path` (`None`: no location known, every append fails).
    pub fn new(path: Option<PathBuf>, fail_open: bool) -> AuditLog {
        AuditLog { path, fail_open, state: Mutex::new(State::default()) }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Whether mutating calls proceed when the log cannot be written.
    pub fn fail_open(&self) -> bool {
        self.fail_open
    }

    /// Appends one record and returns its seq. Intents are synced to disk before this returns;
    /// other records are written (they survive a crash of this process) and reach the disk with
    /// the next sync.
    pub fn append(&self, entry: &Entry<'_>) -> Result<u64, AuditError> {
        let path = self.path.as_deref().ok_or(AuditError::NoLocation)?;
        // A poisoned lock only means another thread panicked mid-append; the file and the
        // cached tail are re-checked under the file lock below, so going on is safe.
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = &mut *state;
        let file = match &mut state.file {
            Some(file) => file,
            slot => slot.insert(open_chained(path)?),
        };
        let io = |source: io::Error| AuditError::Write { path: path.to_path_buf(), source: Arc::new(source) };
        flock(&*file, FlockOperation::LockExclusive)
            .map_err(|e| AuditError::Lock { path: path.to_path_buf(), source: Arc::new(e.into()) })?;
        let result = (|| {
            let end = file.metadata().map_err(io)?.len();
            let tail = match &state.tail {
                Some(tail) if tail.end == end => tail.clone(),
                _ => read_tail(file, end, path)?,
            };
            let identity = entry.caller;
            let line = Line {
                seq: tail.seq + 1,
                prev: &tail.hash,
                time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
                event: match entry.event {
                    Event::Intent => "intent",
                    Event::Outcome { .. } => "outcome",
                    Event::Refused => "refused",
                },
                intent: match entry.event {
                    Event::Outcome { intent } => Some(intent),
                    _ => None,
                },
                uid: identity.uid,
                gid: identity.gid,
                user: identity.user.as_deref(),
                certificate: identity.certificate.as_deref(),
                pid: std::process::id(),
                capability: entry.capability,
                uri: entry.uri,
                driver: entry.driver,
                args: entry.args,
                outcome: entry.outcome,
                error: entry.error,
                elapsed_us: entry.elapsed.map(|e| u64::try_from(e.as_micros()).unwrap_or(u64::MAX)),
            };
            // Sized for a typical record, so serializing does not reallocate.
            let mut text = Vec::with_capacity(1024);
            serde_json::to_writer(&mut text, &line).map_err(|e| io(e.into()))?;
            let hash = hash_line(&text);
            text.push(b'\n');
            // One write of the whole line (O_APPEND); on failure, cut back what was written so
            // the log does not end in a partial record.
            if let Err(e) = file.write_all(&text) {
                let _ = file.set_len(end);
                return Err(io(e));
            }
            if entry.event == Event::Intent {
                file.sync_data().map_err(io)?;
            }
            let new = Tail { end: end + text.len() as u64, seq: line.seq, hash };
            Ok(new)
        })();
        // Closing would release the lock too, but the file stays open for the next record.
        let _ = flock(&*file, FlockOperation::Unlock);
        let tail = result?;
        let seq = tail.seq;
        state.tail = Some(tail);
        Ok(seq)
    }
}

/// Opens (creating 0600, and its directory 0700) a regular file for appending.
fn open(path: &Path) -> Result<File, AuditError> {
    let err = |source: io::Error| AuditError::Open { path: path.to_path_buf(), source: Arc::new(source) };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // An error here shows up, more precisely, when opening the file.
        let _ = DirBuilder::new().recursive(true).mode(0o700).create(dir);
    }
    let file = OpenOptions::new()
        .append(true)
        .read(true)
        .create(true)
        .mode(0o600)
        // A FIFO would block the open; it is refused below like any non-regular file.
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.file_type().is_file() {
        return Err(AuditError::NotRegularFile { path: path.to_path_buf() });
    }
    // A log created by an older version may be readable by others; records name users and
    // arguments, so keep it private (only possible, and only done, for the file's owner).
    if meta.permissions().mode() & 0o077 != 0 && meta.uid() == rustix::process::geteuid().as_raw() {
        let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
    }
    Ok(file)
}

/// Opens the log, first moving a log written before records were chained (every line a JSON
/// record without `seq`) aside to `PATH.pre-chain-SECONDS`, so that an upgraded host starts
/// a new chain instead of refusing every mutating call. A cut or otherwise damaged log is
/// left as it is (the append then fails closed). Done under the log's lock, and only when
/// the path still names the file that was checked, so concurrent processes move it once.
fn open_chained(path: &Path) -> Result<File, AuditError> {
    for _ in 0..3 {
        let file = open(path)?;
        let end = file.metadata().map(|m| m.len()).unwrap_or(0);
        if end == 0 || !last_line_is_legacy(&file, end) {
            return Ok(file);
        }
        flock(&file, FlockOperation::LockExclusive)
            .map_err(|e| AuditError::Lock { path: path.to_path_buf(), source: Arc::new(e.into()) })?;
        let still_legacy = capvirt_plugin_api::state::same_file(&file, path)
            && last_line_is_legacy(&file, file.metadata().map(|m| m.len()).unwrap_or(0));
        if still_legacy {
            let seconds = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let mut aside = path.as_os_str().to_owned();
            aside.push(format!(".pre-chain-{seconds}"));
            std::fs::rename(path, &aside)
                .map_err(|e| AuditError::Write { path: path.to_path_buf(), source: Arc::new(e) })?;
            tracing::warn!(
                target: "capvirt::audit",
                "audit log {} predates chained records: moved to {} and a new chain started",
                path.display(),
                Path::new(&aside).display()
            );
        }
        let _ = flock(&file, FlockOperation::Unlock);
    }
    open(path)
}

/// Whether the log's last line is a complete JSON record of a capvirt that did not chain them.
fn last_line_is_legacy(file: &File, end: u64) -> bool {
    let len = end.min(MAX_LINE as u64 + 1);
    let mut buf = vec![0u8; len as usize];
    if file.read_exact_at(&mut buf, end - len).is_err() || buf.last() != Some(&b'\n') {
        return false;
    }
    let body = &buf[..buf.len() - 1];
    let line = body.iter().rposition(|&b| b == b'\n').map_or(body, |nl| &body[nl + 1..]);
    matches!(
        serde_json::from_slice::<serde_json::Value>(line),
        Ok(serde_json::Value::Object(record)) if !record.contains_key("seq") && !record.contains_key("prev")
    )
}

/// Reads the last line of a log `end` bytes long: its seq and hash continue the chain.
fn read_tail(file: &File, end: u64, path: &Path) -> Result<Tail, AuditError> {
    if end == 0 {
        return Ok(Tail { end, seq: 0, hash: GENESIS.to_string() });
    }
    let damaged = |why: &str| AuditError::Damaged { path: path.to_path_buf(), why: why.to_string() };
    let len = end.min(MAX_LINE as u64 + 1);
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, end - len)
        .map_err(|e| AuditError::Write { path: path.to_path_buf(), source: Arc::new(e) })?;
    if buf.last() != Some(&b'\n') {
        return Err(damaged("its last line is cut (no newline at the end)"));
    }
    let body = &buf[..buf.len() - 1];
    let line = match body.iter().rposition(|&b| b == b'\n') {
        Some(nl) => &body[nl + 1..],
        None if len == end => body,
        None => return Err(damaged("its last line is longer than any record")),
    };
    #[derive(serde::Deserialize)]
    struct Chained {
        seq: u64,
        prev: String,
    }
    let record: Chained = serde_json::from_slice(line).map_err(|_| {
        damaged("its last line is not a chained audit record (a partial write, or a log of an older capvirt)")
    })?;
    if record.prev.len() != GENESIS.len() {
        return Err(damaged("its last line is not a chained audit record"));
    }
    Ok(Tail { end, seq: record.seq, hash: hash_line(line) })
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt};

    use super::*;
    use crate::audit::{verify_file, VerifyReport};

    fn entry() -> Entry<'static> {
        Entry {
            caller: crate::caller::Caller::current(),
            event: Event::Refused,
            capability: "domain.suspend",
            uri: "test:///default",
            driver: "test",
            args: None,
            outcome: Some("denied"),
            error: Some("read-only"),
            elapsed: None,
        }
    }

    #[test]
    fn threads_and_other_writers_extend_one_private_chain() {
        let dir = std::env::temp_dir().join(format!("capvirt-audit-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("state").join("audit.jsonl");
        let log = AuditLog::new(Some(path.clone()), false);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..25 {
                        if let Err(e) = log.append(&entry()) {
                            panic!("{e}");
                        }
                    }
                });
            }
        });
        assert_eq!(verify_file(&path).map_err(|e| e.to_string()), Ok(VerifyReport { records: 100 }));
        let mode = |p: &Path| fs::metadata(p).map(|m| m.permissions().mode() & 0o777).ok();
        assert_eq!(mode(&path), Some(0o600));
        assert_eq!(mode(&dir.join("state")), Some(0o700));
        // Another writer (another process's view) continues from the last line, and this one
        // notices the file grew instead of reusing its cached tail.
        let other = AuditLog::new(Some(path.clone()), false);
        assert_eq!(other.append(&entry()).map_err(|e| e.to_string()), Ok(101));
        assert_eq!(log.append(&entry()).map_err(|e| e.to_string()), Ok(102));
        assert_eq!(verify_file(&path).map_err(|e| e.to_string()), Ok(VerifyReport { records: 102 }));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn nothing_but_a_regular_file_is_a_log() {
        let null = AuditLog::new(Some("/dev/null".into()), false).append(&entry());
        assert!(matches!(null, Err(AuditError::NotRegularFile { .. })), "{null:?}");
        let nowhere = AuditLog::new(None, false).append(&entry());
        assert!(matches!(nowhere, Err(AuditError::NoLocation)), "{nowhere:?}");
    }
}
