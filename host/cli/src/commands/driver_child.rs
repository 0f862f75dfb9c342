//! `capvirt driver-child PLUGIN [--pin SHA256]` (hidden): the child process of an isolated
//! driver. Started by the host with its end of a socket pair as standard input; not for
//! people (see [`capvirt_host::isolate`]).

use clap::{Arg, ArgMatches, Command};

use crate::{context::Context, CliError};

pub fn cli() -> Command {
    Command::new("driver-child")
        .hide(true)
        .about("Serve one driver plugin on the socket given as standard input (started by `--isolate`)")
        .arg(Arg::new("plugin").value_name("PLUGIN").required(true).help("The plugin file"))
        .arg(Arg::new("pin").long("pin").value_name("SHA256").help("The plugin file's pinned SHA-256"))
}

pub fn exec(m: &ArgMatches, _ctx: &mut Context) -> Result<(), CliError> {
    run(m)
}

/// The child's work, without the CLI's context (see `cli::try_run`).
pub fn run(m: &ArgMatches) -> Result<(), CliError> {
    let plugin = crate::opt_string(m, "plugin").unwrap_or_default();
    let pin = crate::opt_string(m, "pin");
    capvirt_host::isolate::child::run(std::path::Path::new(&plugin), pin.as_deref())
        .map_err(|e| CliError::other(e.to_string()))
}
