//! capvirt's integration tests: one binary, one module per area. Every test loads real
//! plugin cdylibs through the real host.

mod cli;
mod dispatch;
mod maint;
mod plugins;
mod qemu;
mod verify;
