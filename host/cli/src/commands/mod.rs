//! One file per fixed subcommand, each with `cli()` and `exec()`; `capability` holds the
//! commands derived from the registry.

pub mod audit;
pub mod bench;
pub mod call;
pub mod capabilities;
pub mod capability;
pub mod console;
pub mod daemon;
pub mod driver_child;
pub mod events;
pub mod plugin;
pub mod plugins;
pub mod proposal;
pub mod proxy;
pub mod registry;

use clap::{ArgMatches, Command};

use super::{context::Context, CliError};

/// The fixed (not registry-derived) subcommands.
pub fn fixed_commands() -> Vec<Command> {
    vec![
        audit::cli(),
        bench::cli(),
        call::cli(),
        capabilities::cli(),
        console::cli(),
        events::cli(),
        driver_child::cli(),
        daemon::cli(),
        plugin::cli(),
        plugins::cli(),
        proposal::cli(),
        proxy::cli(),
        registry::cli(),
    ]
}

/// Whether the command line runs a maintainer command that reads the registry's files itself
/// and must work on a registry that does not compile (to report or repair it).
pub fn reads_registry_sources(argv: &[std::ffi::OsString]) -> bool {
    argv.iter().skip(1).any(|arg| arg == "proposal")
}

/// Runs `name` if it is a fixed subcommand.
pub fn exec_fixed(name: &str, m: &ArgMatches, ctx: &mut Context) -> Option<Result<(), CliError>> {
    Some(match name {
        "audit" => audit::exec(m, ctx),
        "bench" => bench::exec(m, ctx),
        "call" => call::exec(m, ctx),
        "capabilities" => capabilities::exec(m, ctx),
        "console" => console::exec(m, ctx),
        "events" => events::exec(m, ctx),
        "driver-child" => driver_child::exec(m, ctx),
        "daemon" => daemon::exec(m, ctx),
        "plugin" => plugin::exec(m, ctx),
        "plugins" => plugins::exec(m, ctx),
        "proposal" => proposal::exec(m, ctx),
        "proxy" => proxy::exec(m, ctx),
        "registry" => registry::exec(m, ctx),
        _ => return None,
    })
}
