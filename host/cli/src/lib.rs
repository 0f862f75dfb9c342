//! The `capvirt` command line. **Only this crate knows clap.**
//!
//! Commands are of two kinds: fixed ones (`call`, `capabilities`, `plugins`, `registry`…), one
//! file each under [`commands`], and the virsh-style commands (`list`, `dominfo`, `suspend`…)
//! derived at run time from the registry's `[cli]` hints, so an accepted proposal is usable
//! with no CLI code.

#[doc(hidden)] // public for the fuzz targets (tests/fuzz), which read spec files as the CLI does
pub mod args;
pub mod commands;
mod context;
mod error;
mod logging;
mod output;

use std::{ffi::OsString, process::ExitCode};

use clap::{Arg, ArgAction, ArgMatches, Command};

pub use context::GlobalOptions;
pub use error::{exit_code, CliError};
pub use output::OutputFormat;

use capvirt_host::registry::Registry;

/// Runs the CLI on `argv` and returns the process exit code.
pub fn run(argv: Vec<OsString>) -> ExitCode {
    match try_run(argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error.print();
            ExitCode::from(error.exit_code())
        }
    }
}

fn try_run(argv: Vec<OsString>) -> Result<(), CliError> {
    // An isolated driver's child (started by the host, always as `capvirt driver-child …`)
    // needs neither the registry nor the command tree: it starts once per connection.
    if argv.get(1).is_some_and(|arg| arg == "driver-child") {
        let matches = commands::driver_child::cli().try_get_matches_from(&argv[1..]).map_err(CliError::clap)?;
        return commands::driver_child::run(&matches);
    }
    // The far side of an `+ssh` connection (`capvirt proxy`, run by the client's ssh) only
    // relays bytes: no registry, no command tree.
    if argv.get(1).is_some_and(|arg| arg == "proxy") {
        let matches = commands::proxy::cli().try_get_matches_from(&argv[1..]).map_err(CliError::clap)?;
        return commands::proxy::run(&matches);
    }
    // The registry shapes the command tree, so `--registry DIR` is read before clap runs.
    let registry_dir = context::prescan_registry_dir(&argv);
    let registry = match context::load_registry(registry_dir.as_deref()) {
        Ok(registry) => registry,
        // Maintainer commands read the files themselves; the embedded registry shapes the CLI.
        Err(_) if commands::reads_registry_sources(&argv) => context::load_registry(None)?,
        Err(e) => return Err(e),
    };
    // The registry lives until the process exits: freeing its thousands of strings just
    // before exiting was ~5% of a `capvirt list` start. (It holds no resources but memory.)
    std::mem::forget(std::sync::Arc::clone(&registry));
    let matches = match command_for(&registry, &argv).try_get_matches_from(argv) {
        Ok(m) => m,
        Err(e) => return Err(CliError::clap(e)),
    };
    let globals = GlobalOptions::from_matches(&matches, registry_dir);
    logging::init(&globals);
    if globals.registry_dir.is_some() {
        tracing::warn!(target: "capvirt::registry", "using registry from {} instead of the reviewed, embedded one", globals.registry_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
    }
    let Some((name, sub)) = matches.subcommand() else {
        return Err(CliError::usage("no command given; see `capvirt --help`"));
    };
    let mut ctx = context::Context::new(globals, registry);
    if let Some(result) = commands::exec_fixed(name, sub, &mut ctx) {
        return result;
    }
    commands::capability::exec(name, sub, &mut ctx)
}

/// The whole command tree for `registry`.
pub fn command(registry: &Registry) -> Command {
    let mut cmd = root();
    // Registry-derived (virsh-style) commands first, by name; then the fixed tools.
    let mut derived = commands::capability::commands(registry);
    derived.sort_by(|a, b| a.get_name().cmp(b.get_name()));
    for sub in derived.into_iter().chain(commands::fixed_commands()) {
        cmd = cmd.subcommand(sub);
    }
    cmd
}

/// The command tree to parse `argv` with: the root and only the subcommand `argv` plainly
/// names. Building and checking the whole tree (every command, each given the global
/// arguments) was a third of a `capvirt list` start. Anything the scan is unsure of (help, a
/// misspelt command, an option it does not know) gets the whole tree, so clap's answers and
/// messages stay the same.
fn command_for(registry: &Registry, argv: &[OsString]) -> Command {
    let Some(name) = args::prescan_subcommand(argv) else {
        return command(registry);
    };
    let sub = commands::capability::commands_named(registry, Some(name))
        .into_iter()
        .next()
        .or_else(|| commands::fixed_commands().into_iter().find(|sub| sub.get_name() == name));
    match sub {
        Some(sub) => root().subcommand(sub),
        None => command(registry),
    }
}

/// The top-level command with its global arguments, without subcommands.
fn root() -> Command {
    Command::new("capvirt")
        .about("Manage virtual machines and containers through reviewed, hypervisor-agnostic capabilities")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(true)
        .arg_required_else_help(true)
        .max_term_width(100)
        .arg(
            Arg::new("connect")
                .short('c')
                .long("connect")
                .value_name("URI")
                .global(true)
                .help("Connection URI [default: $CAPVIRT_DEFAULT_URI, else test:///default]"),
        )
        .arg(Arg::new("readonly").short('r').long("readonly").action(ArgAction::SetTrue).global(true).help("Open a read-only connection"))
        .arg(
            Arg::new("plugin-dir")
                .long("plugin-dir")
                .value_name("DIR")
                .value_parser(commands::plugins::existing_plugin_dir)
                .action(ArgAction::Append)
                .global(true)
                .help("Load plugins from DIR (repeatable) [default: $CAPVIRT_PLUGIN_DIR, else the executable's directory, then /usr/lib/capvirt/plugins]"),
        )
        .arg(
            Arg::new("output")
                .long("output")
                .short('o')
                .value_name("FORMAT")
                .value_parser(["table", "json"])
                .default_value("table")
                .global(true)
                .help("Output format"),
        )
        .arg(
            Arg::new("registry")
                .long("registry")
                .value_name("DIR")
                .global(true)
                .help("Enforce the registry in DIR instead of the embedded, reviewed one (maintainers)"),
        )
        .arg(
            Arg::new("enable")
                .long("enable")
                .value_name("CAPABILITY")
                .action(ArgAction::Append)
                .global(true)
                .help("Allow calling an experimental capability (repeatable)"),
        )
        .arg(
            Arg::new("isolate")
                .long("isolate")
                .action(ArgAction::SetTrue)
                .global(true)
                .help("Run the driver in a child process: a driver that crashes or hangs fails the call, not capvirt [default: $CAPVIRT_ISOLATE=1]"),
        )
        .arg(
            Arg::new("isolate-timeout")
                .long("isolate-timeout")
                .value_name("SECS")
                .value_parser(clap::value_parser!(u64).range(1..))
                .global(true)
                .help("With --isolate: stop a driver that reports nothing during a call for SECS seconds [default: 300]"),
        )
        .arg(
            Arg::new("audit-log")
                .long("audit-log")
                .value_name("FILE")
                .global(true)
                .help("Append audit records to FILE, a regular file; mutating calls are refused when it cannot be written [default: $CAPVIRT_AUDIT_LOG, else root's log (/etc/capvirt/capvirt.toml) for root, else the user's state directory; *:///system connections always use root's log]"),
        )
}

/// Shared helper: the string value of an optional argument.
pub(crate) fn opt_string(m: &ArgMatches, id: &str) -> Option<String> {
    m.try_get_one::<String>(id).ok().flatten().cloned()
}
