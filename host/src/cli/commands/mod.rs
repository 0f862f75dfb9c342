//! One file per fixed subcommand, each with `cli()` and `exec()`; `capability` holds the
//! commands derived from the registry.

pub mod call;
pub mod capabilities;
pub mod capability;
pub mod plugins;
pub mod registry;

use clap::{ArgMatches, Command};

use super::{context::Context, CliError};

/// The fixed (not registry-derived) subcommands.
pub fn fixed_commands() -> Vec<Command> {
    vec![call::cli(), capabilities::cli(), plugins::cli(), registry::cli()]
}

/// Runs `name` if it is a fixed subcommand.
pub fn exec_fixed(name: &str, m: &ArgMatches, ctx: &mut Context) -> Option<Result<(), CliError>> {
    Some(match name {
        "call" => call::exec(m, ctx),
        "capabilities" => capabilities::exec(m, ctx),
        "plugins" => plugins::exec(m, ctx),
        "registry" => registry::exec(m, ctx),
        _ => return None,
    })
}
