//! Domain snapshots of the test driver: copies of the in-memory domain, kept per connection
//! URI beside the domains (`State::snapshots`). The rules (which states may be snapshotted
//! and reverted, duplicate and unknown names, undefine with snapshots) are the QEMU driver's.

use std::time::{SystemTime, UNIX_EPOCH};

use capvirt_plugin_api::{types::DomainState, PluginError, Value};

use crate::state::{Domain, State};

/// One snapshot: its record and the domain as it was.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub name: String,
    pub created: u64,
    pub state: DomainState,
    pub description: Option<String>,
    pub domain: Domain,
}

impl Snapshot {
    /// The registry's `SnapshotInfo`.
    pub fn info(&self) -> Value {
        let mut info = Value::record([
            ("name", Value::string(&self.name)),
            ("created", Value::UInt(self.created)),
            ("state", Value::from(self.state.as_str())),
        ]);
        if let Some(description) = &self.description {
            info.set("description", Value::string(description));
        }
        info
    }
}

pub fn unknown(domain: &str, name: &str) -> PluginError {
    PluginError::not_found(format!("domain '{domain}' has no snapshot named '{name}'"))
}

pub fn create(state: &mut State, domain: &str, name: &str, description: Option<&str>) -> Result<Value, PluginError> {
    let current = state.domain(domain)?.clone();
    if !matches!(current.state, DomainState::Running | DomainState::Paused | DomainState::ShutOff) {
        return Err(PluginError::invalid_state(format!(
            "domain '{domain}' is {}; only a running, paused or shut off domain can be snapshotted",
            current.state.as_str()
        )));
    }
    let list = state.snapshots.entry(domain.to_string()).or_default();
    if list.iter().any(|s| s.name == name) {
        return Err(PluginError::invalid_argument(format!("domain '{domain}' already has a snapshot named '{name}'")));
    }
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let snapshot = Snapshot {
        name: name.to_string(),
        created,
        state: current.state,
        description: description.map(str::to_string),
        domain: current,
    };
    let info = snapshot.info();
    list.push(snapshot);
    Ok(info)
}

pub fn list(state: &State, domain: &str) -> Result<Value, PluginError> {
    state.domain(domain)?;
    let list = state.snapshots.get(domain).map(Vec::as_slice).unwrap_or_default();
    Ok(Value::list(list.iter().map(Snapshot::info)))
}

pub fn revert(state: &mut State, domain: &str, name: &str) -> Result<Value, PluginError> {
    let current_state = state.domain(domain)?.state;
    let snapshot = state
        .snapshots
        .get(domain)
        .and_then(|list| list.iter().find(|s| s.name == name))
        .ok_or_else(|| unknown(domain, name))?
        .clone();
    check_revert(domain, name, snapshot.state, current_state)?;
    let target = state.domain_mut(domain)?;
    // The definition is not part of a snapshot; what ran (or not) is.
    target.state = snapshot.domain.state;
    target.cpu_time_ns = snapshot.domain.cpu_time_ns;
    target.live_devices = snapshot.domain.live_devices;
    target.live_nics = snapshot.domain.live_nics;
    target.console = snapshot.domain.console;
    Ok(Value::Unit)
}

/// A snapshot of an active domain reverts an active domain; one of a shut off domain, a shut
/// off one (the QEMU driver's rule: memory state needs a running hypervisor, and reverting
/// only the disks under a running guest would corrupt them).
pub fn check_revert(domain: &str, name: &str, taken: DomainState, now: DomainState) -> Result<(), PluginError> {
    match (taken.is_active(), now) {
        (true, DomainState::Running | DomainState::Paused) | (false, DomainState::ShutOff) => Ok(()),
        (true, now) => Err(PluginError::invalid_state(format!(
            "snapshot '{name}' was taken while domain '{domain}' was {}: it holds the memory state and reverts only an \
             active domain, and '{domain}' is {}; start it first",
            taken.as_str(),
            now.as_str()
        ))),
        (false, now) => Err(PluginError::invalid_state(format!(
            "snapshot '{name}' was taken while domain '{domain}' was shut off: it holds the disks only and reverts \
             only a shut off domain, and '{domain}' is {}; destroy it first",
            now.as_str()
        ))),
    }
}

pub fn delete(state: &mut State, domain: &str, name: &str) -> Result<Value, PluginError> {
    state.domain(domain)?;
    let list = state.snapshots.get_mut(domain).ok_or_else(|| unknown(domain, name))?;
    let index = list.iter().position(|s| s.name == name).ok_or_else(|| unknown(domain, name))?;
    list.remove(index);
    if list.is_empty() {
        state.snapshots.remove(domain);
    }
    Ok(Value::Unit)
}

/// Undefine refuses a domain that still has snapshots (libvirt does too): they would be lost.
pub fn check_undefine(state: &State, domain: &str) -> Result<(), PluginError> {
    match state.snapshots.get(domain) {
        Some(list) if !list.is_empty() => {
            let names: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
            Err(PluginError::invalid_state(format!(
                "domain '{domain}' has {} snapshot(s) ({}); delete them first (snapshot-delete)",
                names.len(),
                names.join(", ")
            )))
        }
        _ => Ok(()),
    }
}
