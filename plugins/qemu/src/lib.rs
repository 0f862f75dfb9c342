//! capvirt's QEMU driver: `qemu:///session` (per-user state) and `qemu:///system` (root),
//! running real `qemu-system-x86_64` processes and driving them over QMP with the `qapi`
//! crate's command types.
//!
//! URI parameters: `root=DIR` selects another state root (isolated instances, tests);
//! `accel=auto|kvm|tcg` (default `auto`: KVM when `/dev/kvm` is usable, TCG otherwise);
//! `emulator=PATH` drives another QEMU build than `qemu-system-x86_64` on `PATH` (QEMU 7.2
//! through 10.x are supported; see [`emulator`]).
//!
//! Each `capvirt` invocation is a fresh process: QEMU runs detached and is found again
//! through its pidfile and QMP sockets in the state root (see [`store`]). Only the registry's
//! capabilities are reachable; no caller text is ever sent to QEMU as a command.

#![forbid(unsafe_code)]

mod cache;
mod console;
mod driver;
mod emulator;
mod events;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod migration;
mod migration_phases;
mod monitor;
mod privilege;
mod qemu;
mod qmp;
mod screenshot;
mod snapshot;
mod spec;
pub mod store;
mod tap;
mod uri;

pub use driver::{QemuDriver, CAPABILITIES};

capvirt_plugin_api::export_plugin!(QemuDriver);
