//! Errors that cross the plugin boundary.

use std::fmt;

use abi_stable::{std_types::RString, StableAbi};

/// What kind of failure a driver reports: a stable numeric code.
///
/// It is an open set. The constants below are the kinds this release knows; a later 2.y may
/// add codes without changing the layout, so a plugin built against it still loads in this
/// host, and a code the host does not know is treated as a driver failure that names the code.
/// The constants keep the names of 1.x's enum variants, so `ErrorKind::NotFound` works in
/// expressions and in `match` patterns; a `match` needs a `_` arm for codes added later.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorKind(u32);

#[allow(non_upper_case_globals)] // source-compatible with 1.x's enum variants
impl ErrorKind {
    /// The object named by the call (domain, device, file) does not exist.
    pub const NotFound: ErrorKind = ErrorKind(0);
    /// An argument is well-typed but unacceptable to this driver (bad path, absurd size…).
    pub const InvalidArgument: ErrorKind = ErrorKind(1);
    /// The object is not in a state that allows the operation (resume a running domain…).
    pub const InvalidState: ErrorKind = ErrorKind(2);
    /// The driver does not implement this capability or this variant of it.
    pub const Unsupported: ErrorKind = ErrorKind(3);
    /// The hypervisor or the operating system failed; the message says how.
    pub const DriverFailure: ErrorKind = ErrorKind(4);
    /// A bounded wait ran out (a guest ignoring a shutdown request…).
    pub const Timeout: ErrorKind = ErrorKind(5);
    /// A bug in the driver, including a panic caught by the SDK.
    pub const Internal: ErrorKind = ErrorKind(6);

    /// Every kind this release knows, in code order.
    pub const KNOWN: [ErrorKind; 7] = [
        ErrorKind::NotFound,
        ErrorKind::InvalidArgument,
        ErrorKind::InvalidState,
        ErrorKind::Unsupported,
        ErrorKind::DriverFailure,
        ErrorKind::Timeout,
        ErrorKind::Internal,
    ];

    /// The kind with this code, known to this release or not.
    pub const fn from_code(code: u32) -> ErrorKind {
        ErrorKind(code)
    }

    /// The stable code that crosses the boundary (and the RPC wire).
    pub const fn code(self) -> u32 {
        self.0
    }

    /// Whether this release of capvirt-plugin-api knows the code.
    pub const fn is_known(self) -> bool {
        self.0 <= ErrorKind::Internal.0
    }

    /// The kind's words, as messages show them; "unknown error kind" for a code added after
    /// this release (`Display` adds the code).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::InvalidState => "invalid state",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::DriverFailure => "driver failure",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Internal => "internal error",
            _ => "unknown error kind",
        }
    }

    /// The constant's name (`NotFound`); `None` for a code this release does not know (`Debug`
    /// then shows `ErrorKind(CODE)`).
    fn name(self) -> Option<&'static str> {
        Some(match self {
            ErrorKind::NotFound => "NotFound",
            ErrorKind::InvalidArgument => "InvalidArgument",
            ErrorKind::InvalidState => "InvalidState",
            ErrorKind::Unsupported => "Unsupported",
            ErrorKind::DriverFailure => "DriverFailure",
            ErrorKind::Timeout => "Timeout",
            ErrorKind::Internal => "Internal",
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_known() {
            f.write_str(self.as_str())
        } else {
            write!(f, "unknown error kind (code {})", self.0)
        }
    }
}

impl fmt::Debug for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "ErrorKind({})", self.0),
        }
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

#[cfg(test)]
mod tests {
    use super::ErrorKind;

    #[test]
    fn known_kinds_keep_their_codes_and_words() {
        let codes: Vec<u32> = ErrorKind::KNOWN.iter().map(|kind| kind.code()).collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 5, 6]);
        assert!(ErrorKind::KNOWN.iter().all(|kind| kind.is_known()));
        assert_eq!(ErrorKind::NotFound.to_string(), "not found");
        assert_eq!(format!("{:?}", ErrorKind::Timeout), "Timeout");
    }

    #[test]
    fn a_code_from_a_later_release_is_carried_and_named() {
        let later = ErrorKind::from_code(42);
        assert!(!later.is_known());
        assert_eq!(later.code(), 42);
        assert_eq!(later.to_string(), "unknown error kind (code 42)");
        assert_eq!(format!("{later:?}"), "ErrorKind(42)");
        assert_ne!(later, ErrorKind::DriverFailure);
    }
}
