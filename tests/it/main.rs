//! capvirt's integration tests: one binary, one module per area. Every test loads real
//! plugin cdylibs through the real host.

mod qemu;
mod support_smoke;
