//! Library errors. The binary prints them as one line and maps [`ErrorCategory`] to exit codes.

use capvirt_plugin_api::{ErrorKind, PluginError};

use crate::{
    audit::AuditError,
    migration::MigrationPhase,
    registry::{RegistryError, Stage, ValidationError},
};

/// Coarse classes of failure, stable for scripts (the CLI maps them to exit codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCategory {
    /// Bad usage or invalid arguments.
    Usage,
    /// Refused by policy: not in the registry, rejected/removed, not enabled, read-only.
    Denied,
    /// The driver does not support it.
    Unsupported,
    NotFound,
    InvalidState,
    Other,
}

impl ErrorCategory {
    /// The process exit code every capvirt program (`capvirt`, `capvirtd`) uses for it:
    /// 1 other, 2 usage, 3 denied, 4 unsupported, 5 not found, 6 invalid state.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorCategory::Other => 1,
            ErrorCategory::Usage => 2,
            ErrorCategory::Denied => 3,
            ErrorCategory::Unsupported => 4,
            ErrorCategory::NotFound => 5,
            ErrorCategory::InvalidState => 6,
        }
    }
}

/// Why a capability call did not produce a result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The id is not declared by the registry.
    #[error("capability `{id}` is not in the registry {registry_version}")]
    Unknown { id: String, registry_version: semver::Version },
    /// The capability's stage forbids calling it.
    #[error("capability `{id}` is {stage}: {reason}")]
    Refused { id: String, stage: Stage, reason: String },
    /// Experimental and not enabled on this host.
    #[error("capability `{id}` is experimental and not enabled (use --enable {id})")]
    NotEnabled { id: String },
    /// A mutating capability on a read-only connection.
    #[error("capability `{id}` changes state, and the connection to {uri} is read-only")]
    ReadOnly { id: String, uri: String },
    /// The access policy does not let this caller (OS identity) call the capability.
    #[error("{caller} may not call `{id}`: {rule}")]
    AccessDenied { id: String, caller: String, rule: String },
    /// The argument record does not match the declared parameters.
    #[error("invalid arguments for `{id}`: {error}")]
    InvalidArguments { id: String, error: ValidationError },
    /// The connected driver does not implement the capability.
    #[error("the `{driver}` driver does not implement `{id}`")]
    NotImplemented { id: String, driver: String },
    /// The driver tried and failed.
    #[error("`{id}` failed: {error}")]
    Driver { id: String, error: PluginError },
    /// The driver's result does not have the declared type (only checked when enabled).
    #[error("the `{driver}` driver returned a malformed result for `{id}`: {error}")]
    MalformedResult { id: String, driver: String, error: ValidationError },
    /// A mutating call was not made because its intent could not be audited (fail closed).
    #[error("`{id}` was not called: {error}; mutating calls are refused while the audit log cannot be written")]
    AuditUnavailable { id: String, error: AuditError },
    /// Refused or failed on the far side of a remote connection (the daemon's words and
    /// category), or the connection to it failed.
    #[error("{message}")]
    Remote { id: String, category: ErrorCategory, message: String },
    /// A migration to another host failed at one of its phases, on the host named (`host`: the
    /// source connection's URI or the destination daemon's address). `category` is the
    /// failed phase's.
    #[error("migration of domain '{domain}' failed at {phase} on {host}: {message}")]
    Migration { domain: String, phase: MigrationPhase, host: String, category: ErrorCategory, message: String },
}

impl CallError {
    pub fn category(&self) -> ErrorCategory {
        match self {
            CallError::Unknown { .. }
            | CallError::Refused { .. }
            | CallError::NotEnabled { .. }
            | CallError::ReadOnly { .. }
            | CallError::AccessDenied { .. } => ErrorCategory::Denied,
            CallError::InvalidArguments { .. } => ErrorCategory::Usage,
            CallError::NotImplemented { .. } => ErrorCategory::Unsupported,
            CallError::Driver { error, .. } => match error.kind {
                ErrorKind::NotFound => ErrorCategory::NotFound,
                ErrorKind::InvalidArgument => ErrorCategory::Usage,
                ErrorKind::InvalidState => ErrorCategory::InvalidState,
                ErrorKind::Unsupported => ErrorCategory::Unsupported,
                // DriverFailure, Timeout, Internal, and codes from a later plugin-api (shown
                // with their number).
                _ => ErrorCategory::Other,
            },
            CallError::MalformedResult { .. } | CallError::AuditUnavailable { .. } => ErrorCategory::Other,
            CallError::Remote { category, .. } | CallError::Migration { category, .. } => *category,
        }
    }

    /// The short outcome word recorded in the audit log.
    pub fn audit_outcome(&self) -> &'static str {
        match self.category() {
            ErrorCategory::Denied => "denied",
            _ => "failed",
        }
    }
}

/// Why a host could not be set up or a connection opened.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("cannot read registry directory: {0}")]
    RegistryIo(#[from] std::io::Error),
    #[error("invalid connection URI {uri:?}: {why}")]
    BadUri { uri: String, why: String },
    #[error("no loaded plugin serves the `{scheme}` scheme of {uri} ({hint})")]
    NoDriver { uri: String, scheme: String, hint: String },
    #[error("cannot connect to {uri}: {error}")]
    Connect { uri: String, error: PluginError },
}

impl HostError {
    pub fn category(&self) -> ErrorCategory {
        match self {
            HostError::BadUri { .. } => ErrorCategory::Usage,
            HostError::NoDriver { .. } => ErrorCategory::Unsupported,
            HostError::Connect { error, .. } => {
                CallError::Driver { id: String::new(), error: error.clone() }.category()
            }
            HostError::Registry(_) | HostError::RegistryIo(_) => ErrorCategory::Other,
        }
    }
}

/// Joins a multi-line message (toml's errors quote the source) into one line.
pub fn one_line(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}
