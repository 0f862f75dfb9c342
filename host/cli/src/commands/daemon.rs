//! `capvirt daemon --listen unix:PATH --listen tcp:ADDR:PORT`: serves every URI this host's
//! plugins serve to remote clients (`DRIVER+unix:///PATH?socket=…`, `DRIVER+ssh://…` through
//! `capvirt proxy`, `DRIVER+tls://HOST:PORT/…`). Registry, policy, validation and audit run
//! here, for every call, in this process's host.

use std::{
    fs::{self, File},
    io,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};
use rustix::fs::{flock, FlockOperation};

use crate::{context::Context, CliError};
use capvirt_host::{
    remote::{self, HostExecutor},
    ErrorCategory,
};

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
                .value_parser(value_parser!(u64).range(1024..=(1 << 30)))
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
    // First, while the process has one thread: taking the socket unsets LISTEN_FDS/LISTEN_PID.
    let activated = activated_listener(m)?;
    let listens = match (&activated, m.get_many::<String>("listen")) {
        (Some(_), _) => Vec::new(),
        (None, Some(values)) => values.map(|v| parse_listen(v)).collect::<Result<Vec<_>, _>>()?,
        (None, None) => vec![Listen::Unix(
            remote::default_socket().map_err(|why| CliError::usage(format!("{why} (or give --listen unix:PATH)")))?,
        )],
    };
    let tls = tls_material(m, &listens)?;
    let max_message_bytes = m
        .get_one::<u64>("max-message-size")
        .map_or(capvirt_rpc::DEFAULT_MAX_MESSAGE_BYTES, |&n| usize::try_from(n).unwrap_or(usize::MAX));
    let access = SocketAccess::from_options(m, ctx)?;
    let host = ctx.take_host()?;
    let schemes: Vec<String> = host.plugins().loaded.iter().flat_map(|p| p.info.schemes.clone()).collect();
    let executor = Arc::new(HostExecutor::new(host));
    // One thread for the protocol; calls run on blocking threads (drivers block). Measured
    // against worker threads on each core: no wake-ups between workers stealing each other's
    // tasks, fewer context switches per call and a lower p50 (README "Remote calls").
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("capvirt-daemon")
        .build()
        .map_err(|e| CliError::other(format!("cannot start the daemon's runtime: {e}")))?;
    runtime.block_on(async {
        // Every listener is bound before any serves: a bad one fails the start, not later.
        let mut sockets = Vec::new();
        if let Some(listener) = activated {
            sockets.push(ListeningSocket::activated(listener, &access)?);
        }
        let mut tcp = Vec::new();
        for listen in &listens {
            match listen {
                Listen::Unix(path) => {
                    access.create_parent(path)?;
                    let socket = ListeningSocket::bind(path)?;
                    access.apply(&socket.path)?;
                    sockets.push(socket);
                }
                Listen::Tcp(addr) => tcp.push(bind_tcp(*addr).await?),
            }
        }
        let serving =
            if schemes.is_empty() { "no schemes (no plugins loaded)".to_string() } else { schemes.join(", ") };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut servers = tokio::task::JoinSet::new();
        for socket in &sockets {
            eprintln!(
                "capvirt daemon: serving {serving} on unix:{}{}",
                socket.path.display(),
                if socket.lock.is_none() { " (socket passed by systemd)" } else { "" }
            );
            let (listener, executor, mut stopped) = (socket.take_listener()?, Arc::clone(&executor), stopped.clone());
            servers.spawn(async move {
                capvirt_rpc::serve_unix(listener, executor, max_message_bytes, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
                .map_err(|e| CliError::other(format!("the daemon stopped: {e}")))
            });
        }
        for (listener, addr) in tcp {
            let tls = tls.clone().ok_or_else(|| CliError::other("TLS settings missing for a tcp: listener"))?;
            eprintln!(
                "capvirt daemon: serving {serving} on tcp:{addr} with TLS (certificate {}, clients signed by {})",
                tls.files().cert.display(),
                tls.files().ca.display()
            );
            let (executor, mut stopped) = (Arc::clone(&executor), stopped.clone());
            servers.spawn(async move {
                capvirt_rpc::serve_tls(listener, &tls, executor, max_message_bytes, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
                .map_err(|e| CliError::other(format!("the daemon stopped serving tcp:{addr}: {e}")))
            });
        }
        drop(stopped);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop.send(true);
        });
        notify_ready();
        // The first listener to fail ends the daemon (the others are stopped with the runtime).
        let mut outcome = Ok(());
        while let Some(joined) = servers.join_next().await {
            let result = joined.map_err(|e| CliError::other(format!("a listener stopped: {e}"))).and_then(|r| r);
            if result.is_err() {
                outcome = result;
                break;
            }
        }
        drop(sockets);
        outcome
    })
}

/// Who besides root may connect to the socket (libvirt's `unix_sock_group` and
/// `unix_sock_rw_perms`): `--socket-group`/`--socket-mode`, else `[daemon]` in `capvirt.toml`,
/// else root only (0600). Every peer still gets only what the access policy grants its uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SocketAccess {
    group: Option<u32>,
    mode: u32,
}

impl SocketAccess {
    fn from_options(m: &ArgMatches, ctx: &mut Context) -> Result<SocketAccess, CliError> {
        let (config, _) = ctx.system()?;
        let daemon = config.daemon.clone();
        let source = config.source.as_ref().map_or_else(|| "capvirt.toml".to_string(), |p| p.display().to_string());
        let mode = match m.get_one::<String>("socket-mode") {
            Some(text) => capvirt_host::config::parse_socket_mode(text)
                .map_err(|why| CliError::usage(format!("--socket-mode: {why}")))?,
            None => daemon
                .socket_mode()
                .map_err(|why| CliError::usage(format!("{source}: [daemon] {why}")))?
                .unwrap_or(0o600),
        };
        let group = match m.get_one::<String>("socket-group") {
            Some(name) => Some(resolve_group(name).map_err(|why| CliError::usage(format!("--socket-group: {why}")))?),
            None => match &daemon.socket_group {
                Some(name) => Some(
                    resolve_group(name)
                        .map_err(|why| CliError::usage(format!("{source}: [daemon] socket_group: {why}")))?,
                ),
                None => None,
            },
        };
        Ok(SocketAccess { group, mode })
    }

    /// Creates the socket's directory when absent: 0700, or 0755 (like `/run/libvirt`) when
    /// the socket's mode lets group or others connect, which needs the directory searchable.
    /// An existing directory is the operator's and is left as it is.
    fn create_parent(&self, socket: &Path) -> Result<(), CliError> {
        let Some(parent) = socket.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) else {
            return Ok(());
        };
        let mode = if self.mode & 0o077 == 0 { 0o700 } else { 0o755 };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(parent)
            .map_err(|e| CliError::other(format!("cannot create the directory of {}: {e}", socket.display())))
    }

    /// Applies the group, then the mode, to the socket bound 0600: it never admits anyone
    /// the final group and mode do not.
    fn apply(&self, socket: &Path) -> Result<(), CliError> {
        use std::os::unix::fs::PermissionsExt;
        let fail = |what: &str, e: io::Error| CliError::other(format!("cannot {what} of {}: {e}", socket.display()));
        if let Some(gid) = self.group {
            std::os::unix::fs::chown(socket, None, Some(gid)).map_err(|e| fail("set the group", e))?;
        }
        if self.mode != 0o600 {
            fs::set_permissions(socket, fs::Permissions::from_mode(self.mode)).map_err(|e| fail("set the mode", e))?;
        }
        Ok(())
    }
}

/// A group name or numeric gid, as the user database knows it.
fn resolve_group(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!("no group named {name:?}")),
        Err(e) => Err(format!("cannot look up group {name:?}: {e}")),
    }
}

/// The listening socket systemd passed (socket activation: `LISTEN_FDS`/`LISTEN_PID`, fd 3),
/// if it passed one; also what `systemd-socket-activate -l PATH capvirt daemon` does. Where and
/// for whom it listens is then the socket unit's (`ListenStream=`, `SocketMode=`,
/// `SocketGroup=`), so the options saying so here are refused.
fn activated_listener(m: &ArgMatches) -> Result<Option<std::os::unix::net::UnixListener>, CliError> {
    let mut passed = listenfd::ListenFd::from_env();
    match passed.len() {
        0 => return Ok(None),
        1 => {}
        n => {
            return Err(CliError::usage(format!(
                "systemd passed {n} sockets (LISTEN_FDS); the daemon listens on one: give its socket unit a single ListenStream="
            )))
        }
    }
    let given: Vec<String> = ["listen", "socket-group", "socket-mode"]
        .iter()
        .filter(|id| m.contains_id(id))
        .map(|id| format!("--{id}"))
        .collect();
    if !given.is_empty() {
        return Err(CliError::usage(format!(
            "{} cannot be used with a socket passed by systemd (LISTEN_FDS): the socket unit's ListenStream=, SocketMode= and SocketGroup= say where and for whom",
            given.join(", ")
        )));
    }
    match passed.take_unix_listener(0) {
        Ok(Some(listener)) => Ok(Some(listener)),
        Ok(None) => Ok(None),
        Err(e) => Err(CliError::other(format!("the socket systemd passed (LISTEN_FDS, fd 3) cannot be served: {e}"))),
    }
}

/// Tells systemd the daemon is listening (`READY=1` on `$NOTIFY_SOCKET`, for `Type=notify`);
/// nothing without it. A failure is reported, not fatal: the daemon serves either way.
fn notify_ready() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        eprintln!("capvirt daemon: warning: cannot notify systemd of readiness: {e}");
    }
}

/// One `--listen` value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Listen {
    Unix(PathBuf),
    /// Always with mutual TLS: there is no plain TCP listener.
    Tcp(SocketAddr),
}

fn parse_listen(text: &str) -> Result<Listen, CliError> {
    if let Some(path) = text.strip_prefix("unix:").filter(|p| !p.is_empty()) {
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    if let Some(addr) = text.strip_prefix("tcp:") {
        return addr.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
            CliError::usage(format!(
                "--listen {text:?}: expected tcp:ADDR:PORT with a numeric address (tcp:0.0.0.0:{0}, tcp:[::]:{0})",
                remote::DEFAULT_TLS_PORT
            ))
        });
    }
    Err(CliError::usage(format!("--listen {text:?}: expected unix:PATH or tcp:ADDR:PORT")))
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

/// The TLS files read and checked when a `tcp:` listener needs them: without them, no TCP.
fn tls_material(m: &ArgMatches, listens: &[Listen]) -> Result<Option<capvirt_rpc::TlsMaterial>, CliError> {
    let given = ["tls-cert", "tls-key", "tls-ca"].into_iter().find(|name| m.contains_id(name));
    if !listens.iter().any(|l| matches!(l, Listen::Tcp(_))) {
        return match given {
            Some(name) => Err(CliError::usage(format!("--{name} is for tcp: listeners, and none is given"))),
            None => Ok(None),
        };
    }
    let defaults = capvirt_rpc::TlsFiles::in_dir(&capvirt_host::config::system_dir().join(remote::PKI_DIR), "server");
    let pick = |name: &str, default: PathBuf| m.get_one::<PathBuf>(name).cloned().unwrap_or(default);
    let files = capvirt_rpc::TlsFiles {
        cert: pick("tls-cert", defaults.cert),
        key: pick("tls-key", defaults.key),
        ca: pick("tls-ca", defaults.ca),
    };
    files.load().map(Some).map_err(|e| {
        CliError::usage(format!("a tcp: listener needs TLS, and {e} (see --tls-cert, --tls-key, --tls-ca)"))
    })
}

async fn bind_tcp(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), CliError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::other(format!("cannot listen on tcp:{addr}: {e}")))?;
    // Port 0 picks a free port: say which.
    let bound = listener.local_addr().map_err(|e| CliError::other(format!("tcp:{addr}: {e}")))?;
    Ok((listener, bound))
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the daemon runs until killed.
        _ => std::future::pending().await,
    }
}

/// The daemon's socket: bound 0600 under an exclusive lock (`PATH.lock`), removed on drop; or
/// systemd's, which is neither locked nor removed here (it outlives the daemon).
struct ListeningSocket {
    path: PathBuf,
    listener: Option<std::os::unix::net::UnixListener>,
    /// Held for the daemon's lifetime: a second daemon on the same path fails to take it.
    /// `None` for systemd's socket: a manual daemon on that path finds it listening instead.
    lock: Option<File>,
}

impl ListeningSocket {
    /// systemd's socket, as passed. `[daemon]` socket settings are the unit's business then.
    fn activated(
        listener: std::os::unix::net::UnixListener,
        access: &SocketAccess,
    ) -> Result<ListeningSocket, CliError> {
        if access.group.is_some() || access.mode != 0o600 {
            eprintln!(
                "capvirt daemon: note: [daemon] socket_group/socket_mode do not apply to a socket passed by systemd; set SocketGroup=/SocketMode= in its socket unit"
            );
        }
        let path = listener
            .local_addr()
            .ok()
            .and_then(|addr| addr.as_pathname().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("(unnamed socket)"));
        Ok(ListeningSocket { path, listener: Some(listener), lock: None })
    }

    fn bind(path: &Path) -> Result<ListeningSocket, CliError> {
        let fail = |what: &str, e: io::Error| CliError::other(format!("cannot {what} {}: {e}", path.display()));
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| fail("create the directory of", e))?;
        }
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| fail("open the lock file of", e))?;
        if flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            return Err(CliError::other(format!(
                "another capvirt daemon is serving {} (its lock {} is held)",
                path.display(),
                PathBuf::from(lock_path).display()
            )));
        }
        // Under the lock, an existing socket is a dead daemon's, unless something else listens.
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(CliError::other(format!("another process is listening on {}", path.display())));
                }
                fs::remove_file(path).map_err(|e| fail("remove the stale socket", e))?;
            }
            Ok(_) => {
                return Err(CliError::new(
                    ErrorCategory::Usage,
                    format!("{} exists and is not a socket; refusing to replace it", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail("inspect", e)),
        }
        // Owner-only from the start: no window in which others could connect.
        let old_mask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
        let bound = std::os::unix::net::UnixListener::bind(path);
        rustix::process::umask(old_mask);
        let listener = bound.map_err(|e| fail("listen on", e))?;
        Ok(ListeningSocket { path: path.to_path_buf(), listener: Some(listener), lock: Some(lock) })
    }

    fn take_listener(&self) -> Result<tokio::net::UnixListener, CliError> {
        let listener = self.listener.as_ref().ok_or_else(|| CliError::other("listener already taken"))?;
        let listener = listener.try_clone().and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)
        });
        listener.map_err(|e| CliError::other(format!("cannot listen on {}: {e}", self.path.display())))
    }
}

impl Drop for ListeningSocket {
    fn drop(&mut self) {
        if self.lock.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}
