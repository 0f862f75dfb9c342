//! capvirt's one RPC protocol: the capability call (id, argument record, result or typed
//! error), progress and events, cancellation and version negotiation, over gRPC (tonic +
//! prost) on a Unix socket, on TCP with mutual TLS ([`tls`]), or on any byte stream (an ssh
//! child's standard input and output).
//!
//! The wire format is defined once, in `proto/capvirt.proto`; [`value`] converts
//! [`capvirt_plugin_api::Value`] to and from it losslessly. [`server`] serves any [`Executor`]
//! (the daemon's host today, an isolated driver child later); [`client`] calls one.

mod channel;
pub mod client;
pub mod codec;
pub mod server;
pub mod tls;
pub mod value;

/// The generated protocol types and gRPC stubs.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("capvirt.rpc.v1");
}

pub use client::{Client, ClientError};
pub use server::{
    serve_connection, serve_tls, serve_unix, CapvirtService, Executor, IncomingCall, PeerIdentity, Reporter,
    TlsServeError,
};
pub use tls::{ClientCertificate, TlsError, TlsFiles, TlsMaterial};
pub use value::ValueError;

/// The protocol major both sides must share; bumped only by an incompatible wire change.
pub const PROTOCOL_MAJOR: u32 = 1;
/// Additions within the major (informational). 1: `Open` replies with the driver's support.
pub const PROTOCOL_MINOR: u32 = 1;

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

/// The driver serving a connection, as the far side describes it (`Open`'s reply).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverSupport {
    pub name: String,
    pub version: String,
    /// Callable capability ids with the contract version the driver implements.
    pub callable: Vec<(String, u32)>,
    /// Declared but not callable there, with why.
    pub ignored: Vec<(String, String)>,
}

impl From<DriverSupport> for proto::DriverSupport {
    fn from(d: DriverSupport) -> Self {
        proto::DriverSupport {
            name: d.name,
            version: d.version,
            callable: d
                .callable
                .into_iter()
                .map(|(id, version)| proto::ImplementedCapability { id, version })
                .collect(),
            ignored: d.ignored.into_iter().map(|(id, reason)| proto::IgnoredCapability { id, reason }).collect(),
        }
    }
}

impl From<proto::DriverSupport> for DriverSupport {
    fn from(d: proto::DriverSupport) -> Self {
        DriverSupport {
            name: d.name,
            version: d.version,
            callable: d.callable.into_iter().map(|c| (c.id, c.version)).collect(),
            ignored: d.ignored.into_iter().map(|i| (i.id, i.reason)).collect(),
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
    /// The driver's own error kind, when the failure is a driver error passed through unchanged
    /// (an isolated driver's child reports these, so the host handles them as in process).
    pub driver_kind: Option<capvirt_plugin_api::ErrorKind>,
}

impl CallFailure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        CallFailure { kind, message: message.into(), driver_kind: None }
    }

    /// A driver's error, kept exact.
    pub fn from_driver(error: &capvirt_plugin_api::PluginError) -> Self {
        use capvirt_plugin_api::ErrorKind as Driver;
        let kind = match error.kind {
            Driver::NotFound => ErrorKind::NotFound,
            Driver::InvalidArgument => ErrorKind::InvalidArgument,
            Driver::InvalidState => ErrorKind::InvalidState,
            Driver::Unsupported => ErrorKind::Unsupported,
            // DriverFailure, Timeout, Internal and codes added after this release.
            _ => ErrorKind::Other,
        };
        CallFailure { kind, message: error.message.to_string(), driver_kind: Some(error.kind) }
    }

    /// The driver error this failure carries, if it is one.
    pub fn driver_error(&self) -> Option<capvirt_plugin_api::PluginError> {
        self.driver_kind.map(|kind| capvirt_plugin_api::PluginError::new(kind, self.message.clone()))
    }

    pub(crate) fn to_wire(&self) -> proto::CallFailure {
        proto::CallFailure {
            kind: proto::ErrorKind::from(self.kind).into(),
            message: self.message.clone(),
            driver_kind: self.driver_kind.map_or(proto::DriverErrorKind::Unspecified as i32, driver_kind_to_wire),
        }
    }

    pub(crate) fn from_wire(failure: proto::CallFailure) -> Self {
        let driver_kind = driver_kind_from_wire(failure.driver_kind);
        CallFailure { kind: failure.kind().into(), message: failure.message, driver_kind }
    }
}

/// A driver's error kind on the wire is its code + 1 (0 is "not a driver error"). Codes this
/// release does not know travel as their number (proto3 enums are open), so an isolated
/// driver built against a later plugin-api keeps its exact kind. A code too large for the
/// wire's `int32` travels as a driver failure.
fn driver_kind_to_wire(kind: capvirt_plugin_api::ErrorKind) -> i32 {
    i32::try_from(kind.code())
        .ok()
        .and_then(|code| code.checked_add(1))
        .unwrap_or(proto::DriverErrorKind::DriverFailure as i32)
}

fn driver_kind_from_wire(wire: i32) -> Option<capvirt_plugin_api::ErrorKind> {
    match u32::try_from(wire) {
        Ok(0) => None,
        Ok(code_plus_one) => Some(capvirt_plugin_api::ErrorKind::from_code(code_plus_one - 1)),
        // Not something this protocol sends; still a driver's error, of no known kind.
        Err(_) => Some(capvirt_plugin_api::ErrorKind::DriverFailure),
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
