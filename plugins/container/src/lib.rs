//! capvirt's container driver: `container:///session` (per-user state) and
//! `container:///system` (root), where a domain is a process tree sandboxed by bubblewrap
//! (`bwrap`): its own PID, mount, IPC, UTS and network namespaces (and a user namespace when
//! not root), a read-only view of the host's system directories or the declared
//! `[[filesystems]]`, and cgroup v1 limits (memory, CPU quota, freezer for suspend).
//!
//! URI parameter: `root=DIR` selects another state root (isolated instances, tests).
//!
//! Each `capvirt` invocation is a fresh process: a container outlives it and is found again
//! through the PIDs and start times recorded in the state root (see [`store`]). Only the
//! registry's capabilities are reachable; the container's command line is an argument list
//! handed to bwrap, never a shell command.

#![forbid(unsafe_code)]

mod cgroup;
mod driver;
mod procfs;
mod sandbox;
mod spec;
pub mod store;
mod uri;

pub use driver::{ContainerDriver, CAPABILITIES};

capvirt_plugin_api::export_plugin!(ContainerDriver);
