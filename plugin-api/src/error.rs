//! Errors that cross the plugin boundary.

use std::fmt;

use abi_stable::{std_types::RString, StableAbi};

/// What kind of failure a driver reports. Frozen for the 1.x ABI.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The object named by the call (domain, device, file) does not exist.
    NotFound,
    /// An argument is well-typed but unacceptable to this driver (bad path, absurd size…).
    InvalidArgument,
    /// The object is not in a state that allows the operation (resume a running domain…).
    InvalidState,
    /// The driver does not implement this capability or this variant of it.
    Unsupported,
    /// The hypervisor or the operating system failed; the message says how.
    DriverFailure,
    /// A bounded wait ran out (a guest ignoring a shutdown request…).
    Timeout,
    /// A bug in the driver, including a panic caught by the SDK.
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::InvalidState => "invalid state",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::DriverFailure => "driver failure",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Internal => "internal error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed error with a human-readable message, returned by drivers.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct PluginError {
    pub kind: ErrorKind,
    pub message: RString,
}

impl PluginError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        PluginError { kind, message: RString::from(message.into()) }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidState, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    pub fn driver_failure(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::DriverFailure, message)
    }
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for PluginError {}
