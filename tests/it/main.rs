//! capvirt's integration tests: one binary, one module per area. Every test loads real
//! plugin cdylibs through the real host.

mod maint;
mod support_smoke;
