//! `domain.events` on the in-memory hypervisor: every successful mutating call on any
//! connection to the same test host publishes its lifecycle events to the watchers of that
//! host, in the order the calls were applied.

use std::sync::{
    mpsc::{self, RecvTimeoutError},
    Mutex, MutexGuard,
};

use capvirt_plugin_api::{
    events::{DomainEvent, EventKind, Origin, Stream},
    prelude::*,
    types::DomainState,
};

use crate::{driver::TestDriver, state::State};

/// Held across a mutating call and the publication of its events, so that watchers see the
/// events of concurrent calls in the order their changes were applied.
static MUTATION_ORDER: Mutex<()> = Mutex::new(());

/// Capabilities whose success changes a domain's lifecycle.
pub fn mutates_lifecycle(capability: &str) -> bool {
    matches!(
        capability,
        "domain.define"
            | "domain.undefine"
            | "domain.start"
            | "domain.shutdown"
            | "domain.destroy"
            | "domain.reboot"
            | "domain.suspend"
            | "domain.resume"
            | "domain.migrate"
            | "domain.save"
            | "domain.restore"
            | "domain.snapshot-revert"
    )
}

/// What a lifecycle call found before it ran, for the events its success publishes.
#[derive(Debug, Clone, Copy)]
pub enum Before {
    /// `domain.define`: whether it replaces a definition (else adds one).
    Defined(bool),
    /// `domain.snapshot-revert`: the domain's state, which the revert may change.
    State(DomainState),
}

/// Serializes lifecycle mutations with their publication (a poisoned lock only means an earlier
/// call panicked; the order is still worth keeping).
pub fn order() -> MutexGuard<'static, ()> {
    MUTATION_ORDER.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a call is about to change, read before it runs.
pub fn before(state: &State, capability: &str, args: &Args<'_>) -> Option<Before> {
    match capability {
        "domain.define" => {
            let name = args.get("spec").ok()?.get("name")?.as_str()?;
            Some(Before::Defined(state.domains.contains_key(name)))
        }
        "domain.snapshot-revert" => {
            let name = args.opt_str("domain").ok().flatten()?;
            state.domains.get(name).map(|d| Before::State(d.state))
        }
        _ => None,
    }
}

/// The events of a successful call, published to `state`'s watchers.
pub fn publish(state: &mut State, capability: &str, args: &Args<'_>, result: &Value, before: Option<Before>) {
    let domain = match capability {
        "domain.define" => args.get("spec").ok().and_then(|s| s.get("name")).and_then(Value::as_str),
        "domain.restore" => result.as_str(),
        _ => args.opt_str("domain").ok().flatten(),
    };
    let Some(domain) = domain.map(str::to_string) else { return };
    let now = state.domains.get(&domain).map(|d| d.state);
    let event = |kind| DomainEvent::new(domain.clone(), kind, now);
    let events = match capability {
        "domain.define" => {
            let replaced = matches!(before, Some(Before::Defined(true)));
            vec![event(EventKind::Defined).detail(if replaced { "updated" } else { "added" })]
        }
        "domain.undefine" => vec![event(EventKind::Undefined)],
        "domain.start" => vec![event(EventKind::Started).detail("booted")],
        // The test guest powers itself off when asked, like a guest honouring the ACPI button.
        "domain.shutdown" => vec![
            event(EventKind::Shutdown).origin(Origin::Guest).detail("guest-shutdown"),
            event(EventKind::Stopped).detail("shutdown"),
        ],
        "domain.destroy" => vec![event(EventKind::Stopped).detail("destroyed")],
        "domain.reboot" => vec![event(EventKind::Reset).origin(Origin::Host)],
        "domain.suspend" => vec![event(EventKind::Suspended)],
        "domain.resume" => vec![event(EventKind::Resumed)],
        "domain.migrate" => {
            let dest = args.opt_str("dest_uri").ok().flatten().unwrap_or_default();
            vec![event(EventKind::Migrated).detail(format!("to {dest}")), event(EventKind::Stopped).detail("migrated")]
        }
        "domain.save" => vec![event(EventKind::Saved), event(EventKind::Stopped).detail("saved")],
        "domain.restore" => vec![event(EventKind::Restored)],
        // A revert between a running and a paused snapshot changes what runs.
        "domain.snapshot-revert" => match (before, now) {
            (Some(Before::State(DomainState::Paused)), Some(DomainState::Running)) => {
                vec![event(EventKind::Resumed).detail("snapshot-revert")]
            }
            (Some(Before::State(DomainState::Running)), Some(DomainState::Paused)) => {
                vec![event(EventKind::Suspended).detail("snapshot-revert")]
            }
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    state.send(events);
}

/// The destination's side of a migration: the domain started there.
pub fn publish_arrival(dest: &mut State, domain: &str) {
    let now = dest.domains.get(domain).map(|d| d.state);
    dest.send(vec![DomainEvent::new(domain, EventKind::Started, now).detail("migrated")]);
}

impl State {
    /// Sends `events` to every watcher, forgetting watchers whose call has ended.
    fn send(&mut self, events: Vec<DomainEvent>) {
        if self.watchers.is_empty() {
            return;
        }
        for event in events {
            self.watchers.retain(|watcher| watcher.send(event.clone()).is_ok());
        }
    }
}

impl TestDriver {
    /// Streams the events of this test host until cancelled or a bound is reached.
    pub fn events(&self, args: &Args<'_>, ctx: &Context<'_>) -> Result<Value, PluginError> {
        let mut stream = Stream::new(args, ctx)?;
        let (sender, receiver) = mpsc::channel();
        {
            let mut state = self.lock()?;
            if let Some(name) = &stream.domain {
                state.domain(name)?;
            }
            state.watchers.push(sender);
        }
        // The receiver's drop (on return) unsubscribes: the next publication forgets it.
        loop {
            if let Some(ended) = stream.ended() {
                return Ok(stream.summary(ended));
            }
            match receiver.recv_timeout(stream.next_wait()) {
                Ok(event) => stream.deliver(event),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(PluginError::internal("the test host dropped its event watchers"))
                }
            }
        }
    }
}
