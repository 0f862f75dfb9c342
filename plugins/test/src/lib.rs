//! capvirt's test driver: an in-memory hypervisor serving `test:///…` URIs, deterministic like
//! libvirt's test driver, implementing every accepted capability. It is the reference for the
//! capability contracts and what the host's own tests and benchmarks run against.
//!
//! URIs:
//! - `test:///default`: one running domain `test` (2 vCPUs, 2 GiB, disk `vda`, a display);
//! - `test:///NAME` (a plain name): an empty host, e.g. a migration destination;
//! - `test:///PATH.toml`: initial state loaded from a TOML file (see [`state::StateFile`]).
//!
//! Connections to the same URI in one process share state, as in libvirt.

#![forbid(unsafe_code)]

mod driver;
mod events;
mod screenshot;
mod snapshot;
mod state;

pub use driver::TestDriver;

capvirt_plugin_api::export_plugin!(TestDriver);
