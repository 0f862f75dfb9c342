//! Tracing setup for the CLI: warnings go to stderr as `warning: …` lines. (Audit records are
//! not tracing events: the host appends them itself, see [`capvirt_host::audit`].)

use std::{fmt, io};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    filter::LevelFilter,
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    layer::SubscriberExt,
    registry::LookupSpan,
    Layer,
};

use super::GlobalOptions;

pub fn init(_globals: &GlobalOptions) {
    let warnings = tracing_subscriber::fmt::layer()
        .with_writer(io::stderr)
        .event_format(WarningFormat)
        .with_filter(LevelFilter::WARN);
    let subscriber = tracing_subscriber::registry().with(warnings);
    // A subscriber may already be set when the CLI runs inside tests; keep that one.
    let _ = tracing::subscriber::set_global_default(subscriber);
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
