//! `capvirt daemon --listen unix:PATH --listen tcp:ADDR:PORT`: the daemon
//! ([`capvirt_host::daemon`]) started from the CLI, with the CLI's global options for the host.
//! `capvirtd` (host/daemon) is the same daemon without clap, for service managers.

use std::{path::PathBuf, sync::Arc};

use capvirt_host::{
    daemon::{self, DaemonOptions, MAX_MESSAGE_BYTES, MIN_MESSAGE_BYTES},
    Host,
};
use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};

use crate::{context::Context, CliError};

pub fn cli() -> Command {
    Command::new("daemon")
        .about("Serve this host's drivers to remote clients (DRIVER+unix://, +ssh://, +tls:// URIs)")
        .long_about(
            "Serve every URI this host's plugins serve on a Unix socket. Clients connect with \
             DRIVER+unix:///PATH[?socket=SOCKET] (e.g. `capvirt -c test+unix:///default list`); every \
             call goes through this daemon's registry, policy, validation and audit log. The socket is \
             created mode 0600 unless --socket-mode or capvirt.toml [daemon] say otherwise; a second daemon \
             on the same socket is refused. DRIVER+ssh://HOST/PATH clients reach the socket through ssh and \
             `capvirt proxy`. --listen tcp:ADDR:PORT serves DRIVER+tls://HOST:PORT/PATH with mutual TLS only \
             (client certificates signed by --tls-ca; their CN maps to a local user through access.toml's \
             [certificates]).",
        )
        .arg(Arg::new("listen").long("listen").value_name("unix:PATH|tcp:ADDR:PORT").action(ArgAction::Append).help(
            "Where to listen, repeatable; tcp: always with mutual TLS [default: unix:/run/capvirt/capvirt-sock for root, \
             else unix:$XDG_RUNTIME_DIR/capvirt/capvirt-sock]",
        ))
        .args(tls_args())
        .arg(
            Arg::new("max-message-size")
                .long("max-message-size")
                .value_name("BYTES")
                .value_parser(value_parser!(u64).range(MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES))
                .help(format!(
                    "Largest request or reply message [default: {}]",
                    capvirt_rpc::DEFAULT_MAX_MESSAGE_BYTES
                )),
        )
        .arg(Arg::new("socket-group").long("socket-group").value_name("GROUP").help(
            "Give the socket this group (name or gid), so its members can connect with --socket-mode 0660 \
             [default: [daemon] socket_group in capvirt.toml, else root's]",
        ))
        .arg(Arg::new("socket-mode").long("socket-mode").value_name("OCTAL").help(
            "The socket's permission bits, e.g. 0660 [default: [daemon] socket_mode in capvirt.toml, else 0600]",
        ))
}

pub fn exec(m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    let options = DaemonOptions {
        listen: m.get_many::<String>("listen").map(|v| v.cloned().collect()).unwrap_or_default(),
        tls_cert: m.get_one::<PathBuf>("tls-cert").cloned(),
        tls_key: m.get_one::<PathBuf>("tls-key").cloned(),
        tls_ca: m.get_one::<PathBuf>("tls-ca").cloned(),
        max_message_bytes: m.get_one::<u64>("max-message-size").copied(),
        socket_group: m.get_one::<String>("socket-group").cloned(),
        socket_mode: m.get_one::<String>("socket-mode").cloned(),
    };
    let (uri, host_options, registry) = (ctx.globals.uri(), ctx.host_options(), Arc::clone(&ctx.registry));
    let system = ctx.system()?.clone();
    let host = || Ok(Host::with_registry(host_options.host_config(&system, &uri)?, registry));
    Ok(daemon::run(&options, &system, host)?)
}

/// The TLS options; their defaults are libvirt's layout under the system config directory.
fn tls_args() -> [Arg; 3] {
    let arg = |name: &'static str, file: &str, what: &str| {
        Arg::new(name)
            .long(name)
            .value_name("FILE")
            .value_parser(value_parser!(PathBuf))
            .help(format!("{what} (PEM), for tcp: listeners [default: /etc/capvirt/pki/{file}]"))
    };
    [
        arg("tls-cert", "servercert.pem", "The daemon's certificate"),
        arg("tls-key", "serverkey.pem", "Its private key"),
        arg("tls-ca", "cacert.pem", "The CA that signs the clients' certificates"),
    ]
}
