//! `capvirt proxy [--socket PATH]` (hidden): the far side of a `DRIVER+ssh://` connection,
//! like libvirt's `virt-ssh-helper`. The client's `ssh` runs it on the daemon's host; it
//! splices its standard input and output to the daemon's Unix socket, so the daemon sees the
//! proxy's credentials (`SO_PEERCRED`): the ssh login user, which is who is calling.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::Shutdown,
    os::{fd::AsFd, unix::net::UnixStream},
    path::PathBuf,
};

use clap::{value_parser, Arg, ArgMatches, Command};

use crate::{context::Context, CliError};
use capvirt_host::remote;

pub fn cli() -> Command {
    Command::new("proxy")
        .hide(true)
        .about("Splice standard input and output to the local daemon's socket (run by `DRIVER+ssh://` clients)")
        .arg(
            Arg::new("socket")
                .long("socket")
                .value_name("PATH")
                .value_parser(value_parser!(PathBuf))
                .help("The daemon's socket [default: this user's]"),
        )
}

pub fn exec(m: &ArgMatches, _ctx: &mut Context) -> Result<(), CliError> {
    run(m)
}

/// The proxy's work, without the CLI's context (see `cli::try_run`): it starts once per
/// connection.
pub fn run(m: &ArgMatches) -> Result<(), CliError> {
    let socket = match m.get_one::<PathBuf>("socket") {
        Some(socket) => socket.clone(),
        None => remote::default_socket().map_err(|why| CliError::usage(format!("{why} (or give --socket PATH)")))?,
    };
    let daemon = UnixStream::connect(&socket)
        .map_err(|e| CliError::other(format!("cannot reach the capvirt daemon at {}: {e}", socket.display())))?;
    let io_error = |what: &str, e: io::Error| CliError::other(format!("capvirt proxy: {what}: {e}"));
    let mut to_daemon = daemon.try_clone().map_err(|e| io_error("socket", e))?;
    // Unbuffered standard streams: every chunk goes on at once (Rust's stdout buffers by line).
    let mut input = File::from(io::stdin().as_fd().try_clone_to_owned().map_err(|e| io_error("stdin", e))?);
    let mut output = File::from(io::stdout().as_fd().try_clone_to_owned().map_err(|e| io_error("stdout", e))?);
    std::thread::spawn(move || {
        let _ = splice(&mut input, &mut to_daemon);
        // The client is done sending: the daemon sees the end and closes its side.
        let _ = to_daemon.shutdown(Shutdown::Write);
    });
    let mut from_daemon = daemon;
    // The daemon's end (or the client's going away) ends the proxy.
    match splice(&mut from_daemon, &mut output) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(io_error("relaying", e)),
    }
}

fn splice(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}
