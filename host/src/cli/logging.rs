//! Tracing setup for the CLI: warnings go to stderr as `warning: …` lines; audit events
//! (target `capvirt::audit`) are appended as JSON lines to the audit log, opened only when the
//! first audit event arrives.

use std::{
    fmt,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    filter::{filter_fn, LevelFilter},
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields, MakeWriter},
    layer::SubscriberExt,
    registry::LookupSpan,
    Layer,
};

use super::GlobalOptions;
use crate::audit::AUDIT_TARGET;

pub fn init(globals: &GlobalOptions) {
    let warnings = tracing_subscriber::fmt::layer()
        .with_writer(io::stderr)
        .event_format(WarningFormat)
        .with_filter(filter_fn(|meta| meta.target() != AUDIT_TARGET && *meta.level() <= Level::WARN));
    let audit = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(LazyAppend::new(audit_log_path(globals)))
        .with_filter(filter_fn(|meta| meta.target() == AUDIT_TARGET))
        .with_filter(LevelFilter::INFO);
    let subscriber = tracing_subscriber::registry().with(warnings).with(audit);
    // A subscriber may already be set when the CLI runs inside tests; keep that one.
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// `--audit-log`, else `CAPVIRT_AUDIT_LOG`, else `$XDG_STATE_HOME/capvirt/audit.jsonl`
/// (`~/.local/state/…`).
fn audit_log_path(globals: &GlobalOptions) -> Option<PathBuf> {
    if let Some(path) = &globals.audit_log {
        return Some(path.clone());
    }
    if let Some(path) = std::env::var_os("CAPVIRT_AUDIT_LOG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let state_home = std::env::var_os("XDG_STATE_HOME").filter(|p| !p.is_empty()).map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").filter(|p| !p.is_empty()).map(|h| PathBuf::from(h).join(".local").join("state"))
    })?;
    Some(state_home.join("capvirt").join("audit.jsonl"))
}

struct WarningFormat;

impl<S, N> FormatEvent<S, N> for WarningFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warning",
            _ => "note",
        };
        write!(writer, "{level}: ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Appends to a file opened on first write; a failure to open is reported once on stderr
/// (the call itself has already happened and is not undone).
#[derive(Clone)]
struct LazyAppend {
    path: Option<PathBuf>,
    file: Arc<Mutex<Option<Result<File, ()>>>>,
}

impl LazyAppend {
    fn new(path: Option<PathBuf>) -> Self {
        LazyAppend { path, file: Arc::new(Mutex::new(None)) }
    }
}

struct AppendHandle(LazyAppend);

impl Write for AppendHandle {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Ok(mut slot) = self.0.file.lock() else {
            return Ok(buf.len());
        };
        if slot.is_none() {
            *slot = Some(match &self.0.path {
                Some(path) => {
                    if let Some(dir) = path.parent() {
                        let _ = fs::create_dir_all(dir);
                    }
                    OpenOptions::new().create(true).append(true).open(path).map_err(|e| {
                        eprintln!("warning: cannot open audit log {}: {e}", path.display());
                    })
                }
                None => {
                    eprintln!("warning: no audit log location (set CAPVIRT_AUDIT_LOG or --audit-log)");
                    Err(())
                }
            });
        }
        match slot.as_mut() {
            // One event is one `write` of a whole line with O_APPEND, so concurrent
            // processes do not interleave records.
            Some(Ok(file)) => file.write_all(buf).map(|()| buf.len()),
            _ => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LazyAppend {
    type Writer = AppendHandle;
    fn make_writer(&'a self) -> Self::Writer {
        AppendHandle(self.clone())
    }
}
