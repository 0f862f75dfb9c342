//! The audit step: every attempt at a mutating capability becomes one structured event on the
//! `capvirt::audit` tracing target. The CLI routes that target to a JSON-lines file.

use std::time::Duration;

use capvirt_plugin_api::Value;

use crate::convert::value_to_json;

/// The tracing target audit events are emitted on.
pub const AUDIT_TARGET: &str = "capvirt::audit";

/// One audited call.
pub struct AuditRecord<'a> {
    pub capability: &'a str,
    pub uri: &'a str,
    pub driver: &'a str,
    pub args: &'a Value,
    /// `ok`, `denied` or `failed`.
    pub outcome: &'static str,
    pub error: Option<String>,
    pub elapsed: Duration,
}

/// Emits the audit event. Cheap when no subscriber listens to [`AUDIT_TARGET`].
pub fn record(entry: &AuditRecord<'_>) {
    if !tracing::enabled!(target: AUDIT_TARGET, tracing::Level::INFO) {
        return;
    }
    let user = std::env::var("USER").unwrap_or_default();
    let args = value_to_json(entry.args).to_string();
    tracing::info!(
        target: AUDIT_TARGET,
        capability = entry.capability,
        uri = entry.uri,
        driver = entry.driver,
        user = user.as_str(),
        outcome = entry.outcome,
        error = entry.error.as_deref().unwrap_or(""),
        elapsed_us = u64::try_from(entry.elapsed.as_micros()).unwrap_or(u64::MAX),
        args = args.as_str(),
        "audit"
    );
}
