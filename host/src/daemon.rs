//! The daemon (`capvirtd`, or `capvirt daemon`): serves every URI this host's plugins serve
//! to remote clients (`DRIVER+unix:///PATH?socket=…`, `DRIVER+ssh://…` through `capvirt
//! proxy`, `DRIVER+tls://HOST:PORT/…`). Registry, policy, validation and audit run here, for
//! every call, in this process's host. The front ends only parse options into
//! [`DaemonOptions`].

use std::{
    fs::{self, File},
    io,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use rustix::fs::{flock, FlockOperation};

use crate::{
    config::SystemConfig,
    host::Host,
    remote::{self, HostExecutor},
    setup::{SetupError, SystemFiles},
};

/// The smallest and largest `--max-message-size`.
pub const MIN_MESSAGE_BYTES: u64 = 1024;
pub const MAX_MESSAGE_BYTES: u64 = 1 << 30;

/// What the daemon's options say; unset fields take their defaults (documented on each).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonOptions {
    /// `--listen unix:PATH | tcp:ADDR:PORT`, repeatable (default: [`remote::default_socket`]).
    pub listen: Vec<String>,
    /// TLS files for `tcp:` listeners (default: libvirt's layout under `/etc/capvirt/pki/`).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    /// Largest request or reply (default: `capvirt_rpc::DEFAULT_MAX_MESSAGE_BYTES`).
    pub max_message_bytes: Option<u64>,
    /// The socket's group (name or gid; default: `[daemon] socket_group`, else root's).
    pub socket_group: Option<String>,
    /// The socket's permission bits, octal (default: `[daemon] socket_mode`, else 0600).
    pub socket_mode: Option<String>,
}

/// Serves `host()`'s drivers as `options` and root's `system` files say, until SIGTERM or
/// SIGINT. The host is built only after the options have been checked and the sockets are
/// known, so a usage error costs no plugin loading.
pub fn run(
    options: &DaemonOptions,
    system: &SystemFiles,
    host: impl FnOnce() -> Result<Host, SetupError>,
) -> Result<(), SetupError> {
    // First, while the process has one thread: taking the socket unsets LISTEN_FDS/LISTEN_PID.
    let activated = activated_listener(options)?;
    let listens = match &activated {
        Some(_) => Vec::new(),
        None if !options.listen.is_empty() => {
            options.listen.iter().map(|v| parse_listen(v)).collect::<Result<Vec<_>, _>>()?
        }
        None => vec![Listen::Unix(
            remote::default_socket().map_err(|why| SetupError::usage(format!("{why} (or give --listen unix:PATH)")))?,
        )],
    };
    let tls = tls_material(options, &listens)?;
    let max_message_bytes = match options.max_message_bytes {
        None => capvirt_rpc::DEFAULT_MAX_MESSAGE_BYTES,
        Some(n) if (MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&n) => usize::try_from(n).unwrap_or(usize::MAX),
        Some(n) => {
            return Err(SetupError::usage(format!(
                "--max-message-size {n}: expected {MIN_MESSAGE_BYTES} to {MAX_MESSAGE_BYTES} bytes"
            )))
        }
    };
    let access = SocketAccess::from_options(options, &system.config)?;
    let host = host()?;
    let schemes: Vec<String> = host.plugins().loaded.iter().flat_map(|p| p.info.schemes.clone()).collect();
    let executor = Arc::new(HostExecutor::new(host));
    // One thread for the protocol; calls run on blocking threads (drivers block). Measured
    // against worker threads on each core: no wake-ups between workers stealing each other's
    // tasks, fewer context switches per call and a lower p50 (README "Remote calls").
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("capvirt-daemon")
        .build()
        .map_err(|e| SetupError::other(format!("cannot start the daemon's runtime: {e}")))?;
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
                .map_err(|e| SetupError::other(format!("the daemon stopped: {e}")))
            });
        }
        for (listener, addr) in tcp {
            let tls = tls.clone().ok_or_else(|| SetupError::other("TLS settings missing for a tcp: listener"))?;
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
                .map_err(|e| SetupError::other(format!("the daemon stopped serving tcp:{addr}: {e}")))
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
            let result = joined.map_err(|e| SetupError::other(format!("a listener stopped: {e}"))).and_then(|r| r);
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
    fn from_options(options: &DaemonOptions, config: &SystemConfig) -> Result<SocketAccess, SetupError> {
        let daemon = config.daemon.clone();
        let source = config.source.as_ref().map_or_else(|| "capvirt.toml".to_string(), |p| p.display().to_string());
        let mode = match &options.socket_mode {
            Some(text) => crate::config::parse_socket_mode(text)
                .map_err(|why| SetupError::usage(format!("--socket-mode: {why}")))?,
            None => daemon
                .socket_mode()
                .map_err(|why| SetupError::usage(format!("{source}: [daemon] {why}")))?
                .unwrap_or(0o600),
        };
        let group = match &options.socket_group {
            Some(name) => Some(resolve_group(name).map_err(|why| SetupError::usage(format!("--socket-group: {why}")))?),
            None => match &daemon.socket_group {
                Some(name) => Some(
                    resolve_group(name)
                        .map_err(|why| SetupError::usage(format!("{source}: [daemon] socket_group: {why}")))?,
                ),
                None => None,
            },
        };
        Ok(SocketAccess { group, mode })
    }

    /// Creates the socket's directory when absent: 0700, or 0755 (like `/run/libvirt`) when
    /// the socket's mode lets group or others connect, which needs the directory searchable.
    /// An existing directory is the operator's and is left as it is.
    fn create_parent(&self, socket: &Path) -> Result<(), SetupError> {
        let Some(parent) = socket.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) else {
            return Ok(());
        };
        let mode = if self.mode & 0o077 == 0 { 0o700 } else { 0o755 };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(parent)
            .map_err(|e| SetupError::other(format!("cannot create the directory of {}: {e}", socket.display())))
    }

    /// Applies the group, then the mode, to the socket bound 0600: it never admits anyone
    /// the final group and mode do not.
    fn apply(&self, socket: &Path) -> Result<(), SetupError> {
        use std::os::unix::fs::PermissionsExt;
        let fail = |what: &str, e: io::Error| SetupError::other(format!("cannot {what} of {}: {e}", socket.display()));
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
fn activated_listener(options: &DaemonOptions) -> Result<Option<std::os::unix::net::UnixListener>, SetupError> {
    let mut passed = listenfd::ListenFd::from_env();
    match passed.len() {
        0 => return Ok(None),
        1 => {}
        n => {
            return Err(SetupError::usage(format!(
                "systemd passed {n} sockets (LISTEN_FDS); the daemon listens on one: give its socket unit a single ListenStream="
            )))
        }
    }
    let given: Vec<&str> = [
        ("--listen", !options.listen.is_empty()),
        ("--socket-group", options.socket_group.is_some()),
        ("--socket-mode", options.socket_mode.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, given)| given.then_some(name))
    .collect();
    if !given.is_empty() {
        return Err(SetupError::usage(format!(
            "{} cannot be used with a socket passed by systemd (LISTEN_FDS): the socket unit's ListenStream=, SocketMode= and SocketGroup= say where and for whom",
            given.join(", ")
        )));
    }
    match passed.take_unix_listener(0) {
        Ok(Some(listener)) => Ok(Some(listener)),
        Ok(None) => Ok(None),
        Err(e) => Err(SetupError::other(format!("the socket systemd passed (LISTEN_FDS, fd 3) cannot be served: {e}"))),
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

fn parse_listen(text: &str) -> Result<Listen, SetupError> {
    if let Some(path) = text.strip_prefix("unix:").filter(|p| !p.is_empty()) {
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    if let Some(addr) = text.strip_prefix("tcp:") {
        return addr.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
            SetupError::usage(format!(
                "--listen {text:?}: expected tcp:ADDR:PORT with a numeric address (tcp:0.0.0.0:{0}, tcp:[::]:{0})",
                remote::DEFAULT_TLS_PORT
            ))
        });
    }
    Err(SetupError::usage(format!("--listen {text:?}: expected unix:PATH or tcp:ADDR:PORT")))
}

/// The TLS files read and checked when a `tcp:` listener needs them: without them, no TCP.
fn tls_material(options: &DaemonOptions, listens: &[Listen]) -> Result<Option<capvirt_rpc::TlsMaterial>, SetupError> {
    let given = [("tls-cert", &options.tls_cert), ("tls-key", &options.tls_key), ("tls-ca", &options.tls_ca)]
        .into_iter()
        .find_map(|(name, value)| value.is_some().then_some(name));
    if !listens.iter().any(|l| matches!(l, Listen::Tcp(_))) {
        return match given {
            Some(name) => Err(SetupError::usage(format!("--{name} is for tcp: listeners, and none is given"))),
            None => Ok(None),
        };
    }
    let defaults = capvirt_rpc::TlsFiles::in_dir(&crate::config::system_dir().join(remote::PKI_DIR), "server");
    let pick = |given: &Option<PathBuf>, default: PathBuf| given.clone().unwrap_or(default);
    let files = capvirt_rpc::TlsFiles {
        cert: pick(&options.tls_cert, defaults.cert),
        key: pick(&options.tls_key, defaults.key),
        ca: pick(&options.tls_ca, defaults.ca),
    };
    files.load().map(Some).map_err(|e| {
        SetupError::usage(format!("a tcp: listener needs TLS, and {e} (see --tls-cert, --tls-key, --tls-ca)"))
    })
}

async fn bind_tcp(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), SetupError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| SetupError::other(format!("cannot listen on tcp:{addr}: {e}")))?;
    // Port 0 picks a free port: say which.
    let bound = listener.local_addr().map_err(|e| SetupError::other(format!("tcp:{addr}: {e}")))?;
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
    ) -> Result<ListeningSocket, SetupError> {
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

    fn bind(path: &Path) -> Result<ListeningSocket, SetupError> {
        let fail = |what: &str, e: io::Error| SetupError::other(format!("cannot {what} {}: {e}", path.display()));
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
            return Err(SetupError::other(format!(
                "another capvirt daemon is serving {} (its lock {} is held)",
                path.display(),
                PathBuf::from(lock_path).display()
            )));
        }
        // Under the lock, an existing socket is a dead daemon's, unless something else listens.
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(SetupError::other(format!("another process is listening on {}", path.display())));
                }
                fs::remove_file(path).map_err(|e| fail("remove the stale socket", e))?;
            }
            Ok(_) => {
                return Err(SetupError::usage(format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                )))
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

    fn take_listener(&self) -> Result<tokio::net::UnixListener, SetupError> {
        let listener = self.listener.as_ref().ok_or_else(|| SetupError::other("listener already taken"))?;
        let listener = listener.try_clone().and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)
        });
        listener.map_err(|e| SetupError::other(format!("cannot listen on {}: {e}", self.path.display())))
    }
}

impl Drop for ListeningSocket {
    fn drop(&mut self) {
        if self.lock.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}
