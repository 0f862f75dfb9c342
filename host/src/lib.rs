//! The capvirt management host as a library: the registry, the plugin loader, the one
//! dispatch path, and what the CLI (`capvirt-cli`), the daemon and isolated drivers build on.
//!
//! ```no_run
//! use capvirt_host::{Host, HostConfig, Value};
//! let host = Host::new(HostConfig { plugin_dirs: vec!["target/debug".into()], ..Default::default() })?;
//! let conn = host.connect("test:///default", false)?;
//! let info = conn.call("domain.info", Value::record([("domain", "test")]))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(unsafe_code)]

mod abi_report;
pub mod access;
pub mod audit;
pub mod caller;
pub mod config;
pub mod connection;
pub mod convert;
pub mod daemon;
pub mod driver;
pub mod error;
pub mod host;
pub mod isolate;
mod loader;
pub mod migration;
pub mod plugin_cache;
pub mod plugins;
pub mod policy;
pub mod registry;
pub mod remote;
pub mod setup;
pub mod validate;
pub mod verify;

pub use caller::Caller;
pub use capvirt_plugin_api::{ErrorKind, PluginError, Value};
pub use driver::CallObserver;
pub use error::{CallError, ErrorCategory, HostError};
pub use host::{Connection, Host, HostConfig, RegistrySource, DEFAULT_URI};
pub use registry::Registry;
