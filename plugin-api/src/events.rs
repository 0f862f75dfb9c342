//! Lifecycle events as `domain.events` streams them (registry types `DomainEvent`,
//! `DomainEventKind`, `EventOrigin`, `EventsSummary`), so that every driver emits the same
//! words, and the bounds every driver's event loop honours.
//!
//! A driver reports each event with [`crate::Context::event`] under the name [`EVENT_NAME`]
//! and the record of [`DomainEvent::into_value`].

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{types::DomainState, Args, PluginError, Value};

/// The name under which `domain.events` reports each event through the call context.
pub const EVENT_NAME: &str = "domain-event";

/// What happened to a domain (registry type `DomainEventKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Defined,
    Undefined,
    Started,
    Suspended,
    Resumed,
    Shutdown,
    Stopped,
    Reset,
    Crashed,
    Migrated,
    Saved,
    Restored,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Defined => "defined",
            EventKind::Undefined => "undefined",
            EventKind::Started => "started",
            EventKind::Suspended => "suspended",
            EventKind::Resumed => "resumed",
            EventKind::Shutdown => "shutdown",
            EventKind::Stopped => "stopped",
            EventKind::Reset => "reset",
            EventKind::Crashed => "crashed",
            EventKind::Migrated => "migrated",
            EventKind::Saved => "saved",
            EventKind::Restored => "restored",
        }
    }
}

/// Who caused a shutdown or reset (registry type `EventOrigin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    Guest,
    Host,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Guest => "guest",
            Origin::Host => "host",
        }
    }
}

/// One lifecycle event (registry type `DomainEvent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainEvent {
    pub domain: String,
    pub kind: EventKind,
    pub origin: Option<Origin>,
    /// The state right after the event; `None` after `undefined`.
    pub state: Option<DomainState>,
    pub time_ms: u64,
    pub detail: Option<String>,
}

impl DomainEvent {
    /// An event observed now.
    pub fn new(domain: impl Into<String>, kind: EventKind, state: Option<DomainState>) -> DomainEvent {
        DomainEvent { domain: domain.into(), kind, origin: None, state, time_ms: now_ms(), detail: None }
    }

    pub fn origin(mut self, origin: Origin) -> Self {
        self.origin = Some(origin);
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn at(mut self, time_ms: u64) -> Self {
        self.time_ms = time_ms;
        self
    }

    pub fn into_value(self) -> Value {
        let mut record =
            Value::record([("domain", Value::from(self.domain)), ("kind", Value::from(self.kind.as_str()))]);
        if let Some(origin) = self.origin {
            record.set("origin", origin.as_str());
        }
        if let Some(state) = self.state {
            record.set("state", state.as_str());
        }
        record.set("time_ms", self.time_ms);
        if let Some(detail) = self.detail {
            record.set("detail", detail);
        }
        record
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// Why a stream ended (registry type `EventsEnd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Cancelled,
    Timeout,
    MaxEvents,
}

impl Ended {
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Cancelled => "cancelled",
            Ended::Timeout => "timeout",
            Ended::MaxEvents => "max-events",
        }
    }
}

/// How often an event loop looks at the caller's cancellation (and its bounds) at least.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// The arguments and bookkeeping of one `domain.events` call: which domain, the bounds, what
/// was delivered. Drivers feed it events and ask it whether to go on.
pub struct Stream<'c, 'a> {
    ctx: &'c crate::Context<'a>,
    /// Only this domain's events are delivered, when set.
    pub domain: Option<String>,
    deadline: Option<Instant>,
    max_events: Option<u64>,
    delivered: u64,
    last: Option<DomainEvent>,
}

impl<'c, 'a> Stream<'c, 'a> {
    /// Reads `domain`, `timeout_ms` (0 or absent: none) and `max_events` (absent: none).
    pub fn new(args: &Args<'_>, ctx: &'c crate::Context<'a>) -> Result<Self, PluginError> {
        let domain = args.opt_str("domain")?.map(str::to_string);
        let timeout_ms = match args.opt("timeout_ms") {
            Some(_) => args.u64("timeout_ms")?,
            None => 0,
        };
        let max_events = match args.opt("max_events") {
            Some(_) => Some(args.u64("max_events")?),
            None => None,
        };
        let deadline = (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms));
        Ok(Stream { ctx, domain, deadline, max_events, delivered: 0, last: None })
    }

    /// Whether `domain`'s events are wanted.
    pub fn wants(&self, domain: &str) -> bool {
        self.domain.as_deref().map_or(true, |d| d == domain)
    }

    /// Delivers `event` if its domain is wanted and the stream has not ended.
    pub fn deliver(&mut self, event: DomainEvent) {
        if !self.wants(&event.domain) || self.max_events.is_some_and(|max| self.delivered >= max) {
            return;
        }
        self.ctx.event(EVENT_NAME, &event.clone().into_value());
        self.delivered += 1;
        self.last = Some(event);
    }

    /// Why the stream must end now, if it must.
    pub fn ended(&self) -> Option<Ended> {
        if self.max_events.is_some_and(|max| self.delivered >= max) {
            return Some(Ended::MaxEvents);
        }
        if self.ctx.is_cancelled() {
            return Some(Ended::Cancelled);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some(Ended::Timeout);
        }
        None
    }

    /// How long to wait for the next event before looking at the bounds again.
    pub fn next_wait(&self) -> Duration {
        match self.deadline {
            Some(d) => d.saturating_duration_since(Instant::now()).min(CHECK_INTERVAL),
            None => CHECK_INTERVAL,
        }
    }

    /// The call's result (registry type `EventsSummary`).
    pub fn summary(self, ended: Ended) -> Value {
        let mut record =
            Value::record([("events", Value::from(self.delivered)), ("ended", Value::from(ended.as_str()))]);
        if let Some(last) = self.last {
            record.set("last", last.into_value());
        }
        record
    }
}
