//! The audit step of the dispatch path: a hash-chained, append-only JSON-lines log.
//!
//! Every attempt that the host refuses (unknown id, policy denial, invalid arguments, not
//! implemented) is one `refused` record; a mutating call that passes every check writes an
//! `intent` record, synced to disk *before* the driver is called, and an `outcome` record after.
//! When the intent cannot be written the call is refused (fail closed), unless the host config
//! says `[audit] fail_open = true`.
//!
//! Each line is one JSON object, keys in this order:
//!
//! ```json
//! {"seq":1,"prev":"000…0","time":"2026-11-26T09:42:16.123456Z","event":"intent","intent":null,
//!  "uid":1000,"gid":1000,"user":"alice","pid":4242,"capability":"domain.suspend",
//!  "uri":"test:///default","driver":"test","args":{"domain":"test"},"outcome":null,
//!  "error":null,"elapsed_us":null}
//! ```
//!
//! `seq` is the record's 1-based position in the file and `prev` the SHA-256 (hex) of the
//! previous line's exact bytes without its newline ([`GENESIS`] for the first line), so an edited,
//! inserted, reordered or deleted record and a cut tail break the chain ([`verify`]). `event` is
//! `intent`, `outcome` (with `intent`: the seq of its intent) or `refused`; `outcome` is `ok`,
//! `failed` or `denied`. `uid`/`gid` are the caller's ([`crate::caller::Caller`]: the process's
//! real ids, or a daemon's socket peer's) and `user` the uid's name from the OS user database
//! (`null` when it has none), never an environment variable; `pid` is the recording process. Arguments are
//! bounded ([`redact`]) and secrets (fields named like `password`, `secret`, `token`, `key`)
//! recorded as `"[redacted]"`.

mod log;
pub mod redact;
mod verify;

use std::{io, path::PathBuf, sync::Arc, time::Duration};

pub use log::AuditLog;
pub use verify::{verify, verify_file, BadRecord, Failure, VerifyError, VerifyReport};

/// `prev` of the first record of a file: 64 zero hex digits.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest line the appender and [`verify`] accept; records are far smaller (see [`redact`]).
pub const MAX_LINE: usize = 64 * 1024;

/// How a host audits (part of [`crate::HostConfig`]).
#[derive(Debug, Clone, Default)]
pub enum AuditSetting {
    /// No audit log: for library users that audit themselves (benchmarks, tests). The CLI
    /// always uses [`AuditSetting::Log`].
    #[default]
    Off,
    /// Append to a file.
    Log {
        /// `None` when no location could be derived: mutating calls are then refused.
        path: Option<PathBuf>,
        /// Let mutating calls proceed, with a warning, when the log cannot be written.
        fail_open: bool,
    },
}

/// Why the audit log could not take a record.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("no audit log location (use --audit-log, CAPVIRT_AUDIT_LOG, XDG_STATE_HOME or HOME)")]
    NoLocation,
    #[error("cannot open audit log {path}: {source}")]
    Open { path: PathBuf, source: Arc<io::Error> },
    /// `/dev/null`, a device or a FIFO: records would be discarded or block.
    #[error("audit log {path} is not a regular file")]
    NotRegularFile { path: PathBuf },
    #[error("cannot lock audit log {path}: {source}")]
    Lock { path: PathBuf, source: Arc<io::Error> },
    #[error("cannot write audit log {path}: {source}")]
    Write { path: PathBuf, source: Arc<io::Error> },
    /// The last line is not a complete chained record, so the chain cannot be continued.
    #[error("audit log {path} cannot be continued: {why} (see `capvirt audit verify`; move the file aside to start a new log)")]
    Damaged { path: PathBuf, why: String },
}

/// Which record an append writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A mutating call is about to reach the driver (synced before it does).
    Intent,
    /// What the driver call after the intent with this seq returned.
    Outcome { intent: u64 },
    /// The host refused the attempt before any driver call.
    Refused,
}

/// The fields of one record that the call path provides.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// On whose behalf the call was made.
    pub caller: &'a crate::caller::Caller,
    pub event: Event,
    pub capability: &'a str,
    pub uri: &'a str,
    pub driver: &'a str,
    /// Already bounded and redacted ([`redact::args`]); `None` for outcome records.
    pub args: Option<&'a serde_json::Value>,
    /// `ok`, `failed` or `denied`; `None` for intents.
    pub outcome: Option<&'static str>,
    pub error: Option<&'a str>,
    pub elapsed: Option<Duration>,
}
