//! `capvirt events [DOMAIN] [--loop] [--timeout SECS]`: prints domains' lifecycle events as they
//! happen, like `virsh event --all [--loop]`.
//!
//! Hand-written rather than derived from `domain.events`' `[cli]` hint because a derived
//! command prints one result at the end: this one prints each event as the driver reports it
//! (one line each, flushed; JSON lines with `-o json`), maps `--loop`/`--timeout` onto the
//! capability's bounds and turns Ctrl-C into the call's cancellation, so the driver ends the
//! stream itself and the command exits 0. The call still takes the one dispatch path
//! (`Connection::call_observed`).

use std::{
    io::Write,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, UNIX_EPOCH},
};

use capvirt_plugin_api::{events::EVENT_NAME, Value};
use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::{context::Context, opt_string, CliError, OutputFormat};
use capvirt_host::{convert::value_to_json, driver::CallObserver};

/// The capability behind the command.
pub const CAPABILITY: &str = "domain.events";

pub fn cli() -> Command {
    Command::new("events")
        .about("Print domains' lifecycle events as they happen [experimental: --enable domain.events]")
        .long_about(
            "Print lifecycle events (defined, started, suspended, resumed, shutdown, stopped, reset, crashed, \
             migrated, saved, restored, undefined) of every domain of the connection, or of DOMAIN, as they \
             happen. Without --loop the command ends after the first event; with it, until Ctrl-C (exit code 0) \
             or --timeout. With -o json each event is one JSON line.\n\nCapability: domain.events",
        )
        .arg(Arg::new("domain").value_name("DOMAIN").help("Only this domain's events (it must be defined)"))
        .arg(
            Arg::new("loop")
                .long("loop")
                .action(ArgAction::SetTrue)
                .help("Keep printing events until Ctrl-C (or --timeout) instead of ending after the first"),
        )
        .arg(
            Arg::new("timeout")
                .long("timeout")
                .value_name("SECS")
                .value_parser(clap::value_parser!(u64).range(1..=86400))
                .help("End after SECS seconds even if no (further) event came"),
        )
}

pub fn exec(m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    let mut args = Value::record_empty();
    if let Some(domain) = opt_string(m, "domain") {
        args.set("domain", domain);
    }
    if !m.get_flag("loop") {
        args.set("max_events", 1u64);
    }
    if let Some(secs) = m.get_one::<u64>("timeout") {
        args.set("timeout_ms", secs.saturating_mul(1000));
    }
    let cancelled = Arc::new(AtomicBool::new(false));
    // The first Ctrl-C cancels the call (the driver ends the stream, exit code 0); a second one,
    // should the driver not end, exits at once with the shell's usual 130.
    signal_hook::flag::register_conditional_shutdown(signal_hook::consts::SIGINT, 130, Arc::clone(&cancelled))
        .and_then(|_| signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&cancelled)))
        .map_err(|e| CliError::other(format!("cannot handle Ctrl-C: {e}")))?;
    let printer = EventPrinter { format: ctx.output(), cancelled };
    let conn = ctx.connect()?;
    conn.call_observed(CAPABILITY, args, &printer)?;
    Ok(())
}

/// Prints each event as it arrives; reports Ctrl-C as cancellation.
struct EventPrinter {
    format: OutputFormat,
    cancelled: Arc<AtomicBool>,
}

impl CallObserver for EventPrinter {
    fn event(&self, name: &str, data: &Value) {
        // Passed through as the driver sent it: the record's shape is the driver's promise
        // (`DomainEvent`), and one odd event must not end the stream.
        if name != EVENT_NAME {
            return;
        }
        let line = match self.format {
            OutputFormat::Json => value_to_json(data).to_string(),
            OutputFormat::Table => human(data),
        };
        let mut out = std::io::stdout().lock();
        // A closed pipe (`capvirt events --loop | head -1`) ends the stream like Ctrl-C.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            self.cancelled.store(true, Ordering::Relaxed);
        }
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
}

/// `2026-11-26T12:00:00.123Z vm1: shutdown by guest (guest-shutdown) → shut off`.
fn human(event: &Value) -> String {
    let text = |field: &str| event.get(field).and_then(Value::as_str).unwrap_or("");
    let time = event
        .get("time_ms")
        .and_then(Value::as_u64)
        .map(|ms| humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string())
        .unwrap_or_default();
    let mut line = format!("{time} {}: {}", text("domain"), text("kind"));
    if !text("origin").is_empty() {
        line.push_str(&format!(" by {}", text("origin")));
    }
    if !text("detail").is_empty() {
        line.push_str(&format!(" ({})", text("detail")));
    }
    if !text("state").is_empty() {
        line.push_str(&format!(" → {}", text("state")));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_lines_name_domain_kind_origin_detail_and_state() {
        let event = Value::record([
            ("domain", Value::from("vm1")),
            ("kind", Value::from("shutdown")),
            ("origin", Value::from("guest")),
            ("state", Value::from("in shutdown")),
            ("time_ms", Value::from(1_000u64)),
            ("detail", Value::from("guest-shutdown")),
        ]);
        assert_eq!(human(&event), "1970-01-01T00:00:01.000Z vm1: shutdown by guest (guest-shutdown) → in shutdown");
    }
}
