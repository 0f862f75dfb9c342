//! capvirt's one RPC protocol: the capability call (id, argument record, result or typed
//! error), progress and events, cancellation and version negotiation, over gRPC (tonic +
//! prost) on a Unix socket.
//!
//! The wire format is defined once, in `proto/capvirt.proto`; [`value`] converts
//! [`capvirt_plugin_api::Value`] to and from it losslessly. [`server`] serves any [`Executor`]
//! (the daemon's host today, an isolated driver child later); [`client`] calls one.

pub mod client;
pub mod server;
pub mod value;

/// The generated protocol types and gRPC stubs.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("capvirt.rpc.v1");
}

pub use client::{Client, ClientError};
pub use server::{serve_unix, CapvirtService, Executor, IncomingCall, PeerIdentity, Reporter};
pub use value::ValueError;

/// The protocol major both sides must share; bumped only by an incompatible wire change.
pub const PROTOCOL_MAJOR: u32 = 1;
/// Additions within the major (informational).
pub const PROTOCOL_MINOR: u32 = 0;

/// The largest message either side encodes or accepts unless configured otherwise: a 16 MiB
/// bytes argument (the CLI's largest `@FILE`) with room for its record.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = (16 << 20) + (64 << 10);

/// What one side tells the other in `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_major: u32,
    pub protocol_minor: u32,
    /// The registry version the side enforces (semver text).
    pub registry_version: String,
    /// Every capability id that registry declares.
    pub capabilities: Vec<String>,
    /// Diagnostics only, e.g. `capvirt 0.1.0`.
    pub software: String,
}

impl Hello {
    /// This side's hello for a registry.
    pub fn new(registry_version: String, capabilities: Vec<String>, software: String) -> Hello {
        Hello {
            protocol_major: PROTOCOL_MAJOR,
            protocol_minor: PROTOCOL_MINOR,
            registry_version,
            capabilities,
            software,
        }
    }

    /// Whether the far side's registry declares `capability`.
    pub fn knows(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
}

impl From<Hello> for proto::HelloMessage {
    fn from(h: Hello) -> Self {
        proto::HelloMessage {
            protocol_major: h.protocol_major,
            protocol_minor: h.protocol_minor,
            registry_version: h.registry_version,
            capabilities: h.capabilities,
            software: h.software,
        }
    }
}

impl From<proto::HelloMessage> for Hello {
    fn from(h: proto::HelloMessage) -> Self {
        Hello {
            protocol_major: h.protocol_major,
            protocol_minor: h.protocol_minor,
            registry_version: h.registry_version,
            capabilities: h.capabilities,
            software: h.software,
        }
    }
}

/// The class of a call failure; each is one CLI exit code, so a remote refusal exits like a
/// local one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Exit code 1: anything else (driver failure, timeout, IO).
    Other,
    /// Exit code 2: usage or invalid arguments.
    InvalidArgument,
    /// Exit code 3: refused by policy.
    Denied,
    /// Exit code 4: unsupported by the driver.
    Unsupported,
    /// Exit code 5.
    NotFound,
    /// Exit code 6.
    InvalidState,
}

impl From<ErrorKind> for proto::ErrorKind {
    fn from(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::Other => proto::ErrorKind::Other,
            ErrorKind::InvalidArgument => proto::ErrorKind::InvalidArgument,
            ErrorKind::Denied => proto::ErrorKind::Denied,
            ErrorKind::Unsupported => proto::ErrorKind::Unsupported,
            ErrorKind::NotFound => proto::ErrorKind::NotFound,
            ErrorKind::InvalidState => proto::ErrorKind::InvalidState,
        }
    }
}

impl From<proto::ErrorKind> for ErrorKind {
    fn from(kind: proto::ErrorKind) -> Self {
        match kind {
            proto::ErrorKind::Other => ErrorKind::Other,
            proto::ErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
            proto::ErrorKind::Denied => ErrorKind::Denied,
            proto::ErrorKind::Unsupported => ErrorKind::Unsupported,
            proto::ErrorKind::NotFound => ErrorKind::NotFound,
            proto::ErrorKind::InvalidState => ErrorKind::InvalidState,
        }
    }
}

/// A call that produced no result: its class and one-line message, as the far side's host
/// worded it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CallFailure {
    pub kind: ErrorKind,
    pub message: String,
}

impl CallFailure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        CallFailure { kind, message: message.into() }
    }
}

/// Something a driver reported while a call ran.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Progress { done: u64, total: u64 },
    Event { name: String, data: capvirt_plugin_api::Value },
}

#[cfg(test)]
mod tests;
