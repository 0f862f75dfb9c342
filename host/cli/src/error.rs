//! CLI errors: one clear line on stderr and an exit code per category.
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | anything else (driver failure, timeout, IO; a mutating call refused because the audit log cannot be written) |
//! | 2 | usage or invalid arguments |
//! | 3 | denied by policy (not in registry, rejected/removed, not enabled, read-only) |
//! | 4 | unsupported by the driver |
//! | 5 | not found |
//! | 6 | invalid state |

use std::fmt;

use capvirt_host::error::{CallError, ErrorCategory, HostError};

/// The exit code for a category.
pub fn exit_code(category: ErrorCategory) -> u8 {
    category.exit_code()
}

/// An error as the CLI reports it.
#[derive(Debug)]
pub enum CliError {
    /// Clap's own report (usage errors, and `--help`/`--version`, which exit 0).
    Clap(clap::Error),
    /// A categorized one-line message.
    Message { category: ErrorCategory, message: String },
}

impl CliError {
    pub fn clap(e: clap::Error) -> Self {
        CliError::Clap(e)
    }

    pub fn usage(message: impl Into<String>) -> Self {
        CliError::Message { category: ErrorCategory::Usage, message: message.into() }
    }

    pub fn other(message: impl Into<String>) -> Self {
        CliError::Message { category: ErrorCategory::Other, message: message.into() }
    }

    pub fn new(category: ErrorCategory, message: impl Into<String>) -> Self {
        CliError::Message { category, message: message.into() }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Clap(e) => match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 2,
            },
            CliError::Message { category, .. } => exit_code(*category),
        }
    }

    /// Prints the error (or clap's help) to the right stream.
    pub fn print(&self) {
        match self {
            CliError::Clap(e) => {
                let _ = e.print();
            }
            CliError::Message { message, .. } => eprintln!("error: {message}"),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Clap(e) => write!(f, "{}", e.render()),
            CliError::Message { message, .. } => f.write_str(message),
        }
    }
}

impl From<CallError> for CliError {
    fn from(e: CallError) -> Self {
        CliError::Message { category: e.category(), message: e.to_string() }
    }
}

impl From<capvirt_host::setup::SetupError> for CliError {
    fn from(e: capvirt_host::setup::SetupError) -> Self {
        CliError::Message { category: e.category, message: e.message }
    }
}

impl From<HostError> for CliError {
    fn from(e: HostError) -> Self {
        CliError::Message { category: e.category(), message: e.to_string().replace('\n', "; ") }
    }
}
