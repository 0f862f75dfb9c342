//! capvirt's integration tests: one binary, one module per area. Every test loads real
//! plugin cdylibs through the real host.

mod access;
mod architecture;
mod audit;
mod cli;
mod console;
mod container;
mod dispatch;
mod events;
mod fuzz_regressions;
mod guest_chain;
mod isolate;
mod maint;
mod migration_hosts;
mod network;
mod plugins;
mod qemu;
mod qemu_privilege;
mod remote;
mod remote_qemu;
mod remote_transports;
mod snapshot;
mod verify;
