//! capvirt's integration tests: one binary, one module per area. Every test loads real
//! plugin cdylibs through the real host.

mod audit;
mod cli;
mod container;
mod dispatch;
mod fuzz_regressions;
mod maint;
mod plugins;
mod qemu;
mod verify;
