//! Remote connections and the daemon side that serves them. Transports, with libvirt's URI
//! conventions: `DRIVER+unix:///PATH[?socket=S]` (the local daemon's socket),
//! `DRIVER+tls://HOST[:PORT]/PATH[?pkipath=DIR]` (mutual TLS to `capvirt daemon --listen tcp:…`)
//! and `DRIVER+ssh://[USER@]HOST[:PORT]/PATH[?socket=S&keyfile=K&no_verify=1&proxy=P]` (the
//! system's `ssh` running `capvirt proxy` on the far side, which splices to the daemon's
//! socket there). The client forwards each call to the daemon, whose host runs the whole
//! dispatch path (registry → policy → validation → driver → audit); the wire format is
//! `capvirt-rpc`'s.

use std::{
    collections::HashMap,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use capvirt_plugin_api::{PluginError, Value};
use capvirt_rpc::{
    CallFailure, ClientCertificate, DriverSupport, Executor, Hello, IncomingCall, Reporter, TlsFiles, Update,
};

use crate::{
    caller::Caller,
    config,
    driver::CallObserver,
    error::{CallError, ErrorCategory, HostError},
    host::{Connection, Host},
    registry::Registry,
};

/// The daemon's socket for root.
pub const SYSTEM_SOCKET: &str = "/run/capvirt/capvirt-sock";
/// Under `$XDG_RUNTIME_DIR` for other users.
pub const USER_SOCKET: &str = "capvirt/capvirt-sock";
/// The daemon's TLS port unless the URI or `--listen` says (libvirt's is 16514).
pub const DEFAULT_TLS_PORT: u16 = 16514;
/// The PKI directory under the system config directory (`/etc/capvirt/pki`).
pub const PKI_DIR: &str = "pki";

/// A URI naming a transport: where to reach the daemon and what to ask it for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTarget {
    pub transport: Transport,
    /// The URI the daemon's plugins serve: the transport and its parameters removed.
    pub uri: String,
}

/// How the daemon is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// The daemon's Unix socket on this machine.
    Unix { socket: PathBuf },
    /// TCP with mutual TLS.
    Tls { host: String, port: u16, files: TlsFiles },
    /// The system's `ssh`, running `capvirt proxy` on the far side.
    Ssh(SshTarget),
}

/// Where and how `ssh` logs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    pub host: String,
    pub port: Option<u16>,
    pub user: Option<String>,
    /// The daemon's socket on the far side (`None`: the far user's default).
    pub socket: Option<PathBuf>,
    /// `ssh -i`.
    pub keyfile: Option<PathBuf>,
    /// Skip the host key check (libvirt's `no_verify=1`): for throw-away hosts only.
    pub no_verify: bool,
    /// The `capvirt` binary on the far side (default: `capvirt` on its `PATH`).
    pub proxy: Option<String>,
}

impl Transport {
    /// The daemon's address in messages.
    pub fn describe(&self) -> String {
        match self {
            Transport::Unix { socket } => socket.display().to_string(),
            Transport::Tls { host, port, .. } => format!("tls://{}", authority(host, *port)),
            Transport::Ssh(ssh) => {
                let user = ssh.user.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
                let port = ssh.port.map(|p| format!(":{p}")).unwrap_or_default();
                format!("ssh://{user}{}{port}", ssh.host)
            }
        }
    }
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl RemoteTarget {
    /// `Some` for a `DRIVER+TRANSPORT://…` URI, `None` for a local one.
    pub fn parse(uri: &str) -> Result<Option<RemoteTarget>, HostError> {
        let bad = |why: String| HostError::BadUri { uri: uri.to_string(), why };
        let Some((scheme, rest)) = uri.split_once("://") else { return Ok(None) };
        let Some((driver, transport)) = scheme.split_once('+') else { return Ok(None) };
        if driver.is_empty() {
            return Err(bad("no driver before `+`".into()));
        }
        if !matches!(transport, "unix" | "tls" | "ssh") {
            return Err(HostError::Connect {
                uri: uri.to_string(),
                error: PluginError::unsupported(format!(
                    "the `{transport}` transport is not supported; use {driver}+unix:///PATH[?socket=SOCKET], \
                     {driver}+tls://HOST[:PORT]/PATH or {driver}+ssh://[USER@]HOST[:PORT]/PATH"
                )),
            });
        }
        let (rest, query) = rest.split_once('?').map_or((rest, None), |(l, q)| (l, Some(q)));
        let (authority_text, location) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if location.is_empty() {
            return Err(bad(format!("no path after the host: use {driver}+{transport}://…/PATH (e.g. /default)")));
        }
        // The transport's own parameters are taken out; the rest goes to the far side's driver.
        let mut params: HashMap<&'static str, String> = HashMap::new();
        let mut kept = Vec::new();
        let ours: &[&'static str] = match transport {
            "unix" => &["socket"],
            "tls" => &["pkipath"],
            _ => &["socket", "keyfile", "no_verify", "proxy"],
        };
        for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
            let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let Some(&name) = ours.iter().find(|&&n| n == key) else {
                kept.push(pair);
                continue;
            };
            let value = percent_encoding::percent_decode_str(raw)
                .decode_utf8()
                .map_err(|_| bad(format!("parameter `{name}` is not valid UTF-8")))?;
            if value.is_empty() {
                return Err(bad(format!("parameter `{name}` is empty")));
            }
            if params.insert(name, value.into_owned()).is_some() {
                return Err(bad(format!("parameter `{name}` given twice")));
            }
        }
        let transport = match transport {
            "unix" => {
                if !authority_text.is_empty() {
                    return Err(bad("a `unix` transport names no host: use DRIVER+unix:///PATH?socket=SOCKET".into()));
                }
                let socket = match params.remove("socket") {
                    Some(socket) => PathBuf::from(socket),
                    None => default_socket().map_err(|why| bad(why.to_string()))?,
                };
                Transport::Unix { socket }
            }
            "tls" => {
                let (user, host, port) = parse_authority(authority_text).map_err(bad)?;
                if user.is_some() {
                    return Err(bad("a `tls` transport takes no user: the client certificate names the caller".into()));
                }
                let dir = match params.remove("pkipath") {
                    Some(dir) => PathBuf::from(dir),
                    None => default_pki_dir().map_err(|why| bad(why.to_string()))?,
                };
                Transport::Tls { host, port: port.unwrap_or(DEFAULT_TLS_PORT), files: TlsFiles::in_dir(&dir, "client") }
            }
            _ => {
                let (user, host, port) = parse_authority(authority_text).map_err(bad)?;
                let no_verify = match params.remove("no_verify").as_deref() {
                    None | Some("0") => false,
                    Some("1") => true,
                    Some(other) => return Err(bad(format!("parameter `no_verify` is {other:?}, not 0 or 1"))),
                };
                Transport::Ssh(SshTarget {
                    host,
                    port,
                    user,
                    socket: params.remove("socket").map(PathBuf::from),
                    keyfile: params.remove("keyfile").map(PathBuf::from),
                    no_verify,
                    proxy: params.remove("proxy"),
                })
            }
        };
        let mut remote = format!("{driver}://{location}");
        if !kept.is_empty() {
            remote.push('?');
            remote.push_str(&kept.join("&"));
        }
        Ok(Some(RemoteTarget { transport, uri: remote }))
    }
}

/// `[user@]host[:port]`, host possibly a bracketed IPv6 address. Nothing in it may look like
/// an option to `ssh` or hold whitespace.
fn parse_authority(text: &str) -> Result<(Option<String>, String, Option<u16>), String> {
    let (user, hostport) = match text.rsplit_once('@') {
        Some((user, rest)) => (Some(user), rest),
        None => (None, text),
    };
    let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
        let (host, after) = inner.split_once(']').ok_or("an IPv6 address lacks its closing `]`")?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or("expected `:PORT` after `]`")?)),
        }
    } else {
        match hostport.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|&p| p != 0).ok_or(format!("port {p:?} is not 1-65535"))?),
    };
    let plain =
        |s: &str| !s.is_empty() && !s.starts_with('-') && !s.chars().any(|c| c.is_whitespace() || c.is_control());
    if !plain(host) {
        return Err(format!("host {host:?} is empty or not a host name"));
    }
    if let Some(user) = user {
        if !plain(user) {
            return Err(format!("user {user:?} is empty or not a user name"));
        }
    }
    Ok((user.map(str::to_owned), host.to_owned(), port))
}

/// The client's certificate directory: `/etc/capvirt/pki` for root (the system config
/// directory's), else `$XDG_CONFIG_HOME/capvirt/pki`, else `~/.pki/capvirt`.
pub fn default_pki_dir() -> Result<PathBuf, &'static str> {
    if rustix::process::geteuid().is_root() {
        return Ok(config::system_dir().join(PKI_DIR));
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(Path::new(&dir).join("capvirt").join(PKI_DIR));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(Path::new(&home).join(".pki/capvirt")),
        None => Err("neither XDG_CONFIG_HOME nor HOME is set, so there is no certificate directory; add ?pkipath=DIR"),
    }
}

/// The local daemon's socket: [`SYSTEM_SOCKET`] for root, else under `$XDG_RUNTIME_DIR`.
pub fn default_socket() -> Result<PathBuf, &'static str> {
    if rustix::process::geteuid().is_root() {
        return Ok(PathBuf::from(SYSTEM_SOCKET));
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => Ok(Path::new(&dir).join(USER_SOCKET)),
        None => Err("XDG_RUNTIME_DIR is not set, so there is no default daemon socket; add ?socket=PATH"),
    }
}

/// This side's hello: the protocol and the registry it enforces.
pub fn hello(registry: &Registry) -> Hello {
    Hello::new(
        registry.version().to_string(),
        registry.capabilities().iter().map(|c| c.id().to_string()).collect(),
        concat!("capvirt ", env!("CARGO_PKG_VERSION")).to_string(),
    )
}

/// A connection whose calls go to a daemon. Calls may come from several threads.
pub struct RemoteConnection {
    /// The URI as the user gave it.
    uri: String,
    target: RemoteTarget,
    readonly: bool,
    registry: Arc<Registry>,
    client: capvirt_rpc::Client,
    /// Single-threaded: the calling thread drives its own call (no hand-off to a worker).
    runtime: tokio::runtime::Runtime,
    /// The `ssh` child of an `+ssh` connection: killed when the connection is dropped.
    ssh: Option<SshChild>,
}

impl RemoteConnection {
    /// Connects to the daemon and negotiates versions.
    pub fn connect(
        uri: &str,
        target: RemoteTarget,
        readonly: bool,
        registry: Arc<Registry>,
    ) -> Result<RemoteConnection, HostError> {
        let failed = |kind: fn(String) -> PluginError, message: String| HostError::Connect {
            uri: uri.to_string(),
            error: kind(message),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| failed(PluginError::driver_failure, format!("cannot start the RPC runtime: {e}")))?;
        let ours = hello(&registry);
        let limit = capvirt_rpc::DEFAULT_MAX_MESSAGE_BYTES;
        let mut ssh = None;
        let connected = match &target.transport {
            Transport::Unix { socket } => runtime.block_on(capvirt_rpc::Client::connect_unix(socket, ours, limit)),
            Transport::Tls { host, port, files } => {
                // Missing or unusable client files are the caller's to fix (`?pkipath=`): a usage error.
                let material = files.load().map_err(|e| failed(PluginError::invalid_argument, e.to_string()))?;
                runtime.block_on(capvirt_rpc::Client::connect_tls(host, *port, &material, ours, limit))
            }
            Transport::Ssh(target_ssh) => {
                let (child, stream) = {
                    // The child's pipes become the runtime's (they need its reactor).
                    let _entered = runtime.enter();
                    SshChild::spawn(target_ssh).map_err(|e| failed(PluginError::driver_failure, e))?
                };
                let name = PathBuf::from(target.transport.describe());
                let outcome = runtime.block_on(capvirt_rpc::Client::over_io(stream, &name, ours, limit));
                if outcome.is_err() {
                    // ssh's own words say why (host key, authentication, no `capvirt` there…).
                    let said = child.stderr_after_exit(SSH_EXIT_WAIT);
                    if !said.is_empty() {
                        return Err(failed(
                            PluginError::driver_failure,
                            format!("cannot reach the capvirt daemon at {} through ssh: {said}", name.display()),
                        ));
                    }
                }
                ssh = Some(child);
                outcome
            }
        };
        let client = connected.map_err(|e| match e {
            capvirt_rpc::ClientError::ProtocolMismatch { .. } => failed(PluginError::unsupported, e.to_string()),
            _ => failed(PluginError::driver_failure, e.to_string()),
        })?;
        Ok(RemoteConnection { uri: uri.to_string(), target, readonly, registry, client, runtime, ssh })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    /// This client's registry (for rendering results; the daemon enforces its own).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The daemon's hello.
    pub fn daemon(&self) -> &Hello {
        self.client.far_side()
    }

    /// The driver serving this URI in the daemon, as the daemon describes it (one `Open`
    /// round trip, made only when asked: `capvirt capabilities`).
    pub fn driver_support(&self) -> Result<DriverSupport, HostError> {
        let failed = |error: PluginError| HostError::Connect { uri: self.uri.clone(), error };
        match self.runtime.block_on(self.client.connect(&self.target.uri, self.readonly, None)) {
            Ok(Ok(Some(driver))) => Ok(driver),
            Ok(Ok(None)) => Err(failed(PluginError::unsupported(format!(
                "the daemon at {} ({}) does not describe its drivers",
                self.target.transport.describe(),
                self.daemon().software
            )))),
            Ok(Err(refusal)) => {
                Err(failed(refusal.driver_error().unwrap_or_else(|| PluginError::driver_failure(refusal.message))))
            }
            Err(error) => Err(failed(PluginError::driver_failure(error.to_string()))),
        }
    }

    /// Sends the call to the daemon; its refusal comes back with the daemon's category.
    pub fn call(&self, id: &str, args: Value, observer: &dyn CallObserver) -> Result<Value, CallError> {
        let outcome =
            self.runtime.block_on(self.client.call(
                &self.target.uri,
                self.readonly,
                id,
                &args,
                |update| match update {
                    Update::Progress { done, total } => observer.progress(done, total),
                    Update::Event { name, data } => observer.event(&name, &data),
                },
            ));
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(failure)) => {
                let mut message = failure.message;
                let daemon = self.daemon();
                if failure.kind == capvirt_rpc::ErrorKind::Denied
                    && !daemon.knows(id)
                    && self.registry.lookup(id).is_some()
                {
                    message.push_str(&format!(
                        " (the daemon at {} enforces registry {}; this client's is {})",
                        self.target.transport.describe(),
                        daemon.registry_version,
                        self.registry.version()
                    ));
                }
                Err(CallError::Remote { id: id.to_string(), category: category(failure.kind), message })
            }
            Err(error) => {
                let category = match error {
                    capvirt_rpc::ClientError::TooLarge(_) => ErrorCategory::Usage,
                    _ => ErrorCategory::Other,
                };
                let mut message = format!("`{id}` on {}: {error}", self.uri);
                if let Some(said) =
                    self.ssh.as_ref().map(|c| c.stderr_after_exit(SSH_EXIT_WAIT)).filter(|s| !s.is_empty())
                {
                    message.push_str(&format!("; ssh said: {said}"));
                }
                Err(CallError::Remote { id: id.to_string(), category, message })
            }
        }
    }
}

/// How long a failed connection waits for `ssh` to exit and say why.
const SSH_EXIT_WAIT: Duration = Duration::from_secs(5);
/// The most of ssh's stderr kept (its last lines say why it failed).
const SSH_STDERR_MAX: usize = 16 << 10;

/// The `ssh` child carrying one connection; killed and reaped on drop.
struct SshChild {
    child: Mutex<Child>,
    stderr: Arc<Mutex<Vec<u8>>>,
    reader: Mutex<Option<std::thread::JoinHandle<()>>>,
}

type SshStream = tokio::io::Join<tokio::process::ChildStdout, tokio::process::ChildStdin>;

impl SshChild {
    /// Starts `ssh … HOST capvirt proxy [--socket S]` with its standard input and output
    /// as the connection. Must run inside the connection's runtime.
    fn spawn(target: &SshTarget) -> Result<(SshChild, SshStream), String> {
        let mut cmd = Command::new("ssh");
        cmd.args(ssh_args(target)).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("cannot run `ssh`: {e}"))?;
        let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(stdin), Some(stdout), Some(mut stderr)) = pipes else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("ssh's pipes were not set up".into());
        };
        let said = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&said);
        let reader = std::thread::Builder::new().name("ssh-stderr".into()).spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                let mut kept = sink.lock().unwrap_or_else(|p| p.into_inner());
                kept.extend_from_slice(&buf[..n]);
                let excess = kept.len().saturating_sub(SSH_STDERR_MAX);
                kept.drain(..excess);
            }
        });
        let guard = SshChild { child: Mutex::new(child), stderr: said, reader: Mutex::new(reader.ok()) };
        let stdin = tokio::process::ChildStdin::from_std(stdin).map_err(|e| format!("ssh's input: {e}"))?;
        let stdout = tokio::process::ChildStdout::from_std(stdout).map_err(|e| format!("ssh's output: {e}"))?;
        Ok((guard, tokio::io::join(stdout, stdin)))
    }

    /// What ssh wrote on stderr, once it has exited (waiting up to `bound`), on one line.
    fn stderr_after_exit(&self, bound: Duration) -> String {
        let started = Instant::now();
        let mut status = None;
        while started.elapsed() < bound {
            let exited = self.child.lock().ok().and_then(|mut c| c.try_wait().ok().flatten());
            if let Some(exited) = exited {
                status = Some(exited);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if status.is_some() {
            // The pipe closes with the process: all it said is in.
            if let Some(reader) = self.reader.lock().ok().and_then(|mut r| r.take()) {
                let _ = reader.join();
            }
        }
        let text = self.stderr.lock().map(|s| String::from_utf8_lossy(&s).into_owned()).unwrap_or_default();
        let mut said: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if let Some(code) = status.and_then(|s| s.code()).filter(|&c| c != 0) {
            if said.is_empty() {
                return format!("ssh exited with status {code}");
            }
        }
        said.dedup();
        said.join("; ")
    }
}

impl Drop for SshChild {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `ssh`'s arguments: batch mode (never a password prompt on a terminal the CLI owns), no
/// terminal, no escape character, and the far side's `capvirt proxy` as the command.
fn ssh_args(target: &SshTarget) -> Vec<String> {
    let mut args: Vec<String> = ["-T", "-e", "none", "-o", "BatchMode=yes"].map(String::from).into();
    if let Some(port) = target.port {
        args.extend(["-p".into(), port.to_string()]);
    }
    if let Some(user) = &target.user {
        args.extend(["-l".into(), user.clone()]);
    }
    if let Some(keyfile) = &target.keyfile {
        args.extend(["-i".into(), keyfile.display().to_string()]);
    }
    if target.no_verify {
        args.extend(
            ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
                .map(String::from),
        );
    }
    args.extend(["--".into(), target.host.clone()]);
    // The far side's shell parses the command: every word is quoted.
    let mut command = vec![shell_quote(target.proxy.as_deref().unwrap_or("capvirt")), "proxy".to_string()];
    if let Some(socket) = &target.socket {
        command.extend(["--socket".to_string(), shell_quote(&socket.display().to_string())]);
    }
    args.push(command.join(" "));
    args
}

/// `'…'` with each `'` as `'\''`: one word to a POSIX shell, whatever it holds.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn category(kind: capvirt_rpc::ErrorKind) -> ErrorCategory {
    use capvirt_rpc::ErrorKind as K;
    match kind {
        K::Other => ErrorCategory::Other,
        K::InvalidArgument => ErrorCategory::Usage,
        K::Denied => ErrorCategory::Denied,
        K::Unsupported => ErrorCategory::Unsupported,
        K::NotFound => ErrorCategory::NotFound,
        K::InvalidState => ErrorCategory::InvalidState,
    }
}

fn kind(category: ErrorCategory) -> capvirt_rpc::ErrorKind {
    use capvirt_rpc::ErrorKind as K;
    match category {
        ErrorCategory::Other => K::Other,
        ErrorCategory::Usage => K::InvalidArgument,
        ErrorCategory::Denied => K::Denied,
        ErrorCategory::Unsupported => K::Unsupported,
        ErrorCategory::NotFound => K::NotFound,
        ErrorCategory::InvalidState => K::InvalidState,
    }
}

/// Open connections the daemon keeps per `(uri, readonly)`; beyond this many, a call to a
/// new URI gets a connection of its own (a client cannot grow the daemon without bound).
const MAX_CACHED_CONNECTIONS: usize = 256;

/// The daemon's side: every remote call through one host's dispatch path.
pub struct HostExecutor {
    host: Host,
    hello: Hello,
    connections: Mutex<HashMap<(String, bool), Arc<Connection>>>,
    /// Callers by (uid, gid): their groups come from the user database once.
    callers: Mutex<HashMap<(u32, u32), Arc<Caller>>>,
    /// TLS callers by certificate subject (the CN is read from it).
    certificate_callers: Mutex<HashMap<String, Arc<Caller>>>,
}

impl HostExecutor {
    pub fn new(host: Host) -> HostExecutor {
        let hello = hello(host.registry());
        HostExecutor {
            host,
            hello,
            connections: Mutex::new(HashMap::new()),
            callers: Mutex::new(HashMap::new()),
            certificate_callers: Mutex::new(HashMap::new()),
        }
    }

    /// The caller a verified client certificate stands for: the local user the access
    /// policy's `[certificates]` maps its CN to, else an unmapped caller (the policy's
    /// `default` only). Cached like peers.
    fn certificate_caller(&self, certificate: ClientCertificate) -> Arc<Caller> {
        let mut callers = self.certificate_callers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(caller) = callers.get(&certificate.subject) {
            return Arc::clone(caller);
        }
        let mapped = self.host.policy().access.certificate_user(certificate.common_name.as_deref());
        let caller = Arc::new(Caller::from_certificate(&certificate.subject, mapped));
        if callers.len() < MAX_CACHED_CONNECTIONS {
            callers.insert(certificate.subject, Arc::clone(&caller));
        }
        caller
    }

    /// The caller with these ids, its groups looked up once per daemon (bounded like the
    /// connections: beyond the bound, looked up per call).
    fn caller(&self, uid: u32, gid: u32) -> Arc<Caller> {
        let mut callers = self.callers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(caller) = callers.get(&(uid, gid)) {
            return Arc::clone(caller);
        }
        let caller = Arc::new(Caller::from_peer(uid, gid));
        if callers.len() < MAX_CACHED_CONNECTIONS {
            callers.insert((uid, gid), Arc::clone(&caller));
        }
        caller
    }

    /// The cached connection to `(uri, readonly)`, opened on first use.
    fn connection(&self, uri: &str, readonly: bool) -> Result<Arc<Connection>, HostError> {
        let key = (uri.to_string(), readonly);
        if let Some(conn) = self.connections.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(conn);
        }
        // A daemon serves its own plugins' URIs; forwarding would let a caller loop it into itself.
        if RemoteTarget::parse(uri)?.is_some() {
            return Err(HostError::BadUri {
                uri: uri.to_string(),
                why: "the daemon serves local URIs only (no `+transport`)".into(),
            });
        }
        let conn = Arc::new(self.host.connect(uri, readonly)?);
        if let Ok(mut cache) = self.connections.lock() {
            if cache.len() < MAX_CACHED_CONNECTIONS {
                return Ok(Arc::clone(cache.entry(key).or_insert(conn)));
            }
        }
        Ok(conn)
    }
}

impl Executor for HostExecutor {
    fn hello(&self) -> Hello {
        self.hello.clone()
    }

    /// Opens the cached connection (a URI no plugin serves is refused here) and describes its
    /// driver. What a driver implements is no secret: nothing is called, so no caller check.
    fn connect(
        &self,
        uri: &str,
        readonly: bool,
        _options: Option<Value>,
        _peer: Option<capvirt_rpc::PeerIdentity>,
    ) -> Result<Option<DriverSupport>, CallFailure> {
        let conn = self
            .connection(uri, readonly)
            .map_err(|e| CallFailure::new(kind(e.category()), e.to_string().replace('\n', "; ")))?;
        Ok(conn.driver_support().ok())
    }

    fn call(&self, call: IncomingCall, reporter: &Reporter) -> Result<Value, CallFailure> {
        // The caller is the peer the kernel names (`SO_PEERCRED`) or the certificate the TLS
        // handshake verified, never anything it says: the access policy decides on, and the
        // audit records, that identity.
        let caller = match (call.peer, call.certificate) {
            (Some(peer), _) => self.caller(peer.uid, peer.gid),
            (None, Some(certificate)) => self.certificate_caller(certificate),
            (None, None) => {
                return Err(CallFailure::new(
                    capvirt_rpc::ErrorKind::Denied,
                    format!("`{}` refused: the caller's identity is unknown on this transport", call.capability),
                ))
            }
        };
        let conn = self
            .connection(&call.uri, call.readonly)
            .map_err(|e| CallFailure::new(kind(e.category()), e.to_string().replace('\n', "; ")))?;
        conn.call_observed_as(&caller, &call.capability, call.args, &ReporterObserver(reporter))
            .map_err(|e| CallFailure::new(kind(e.category()), e.to_string()))
    }
}

/// A driver's progress and events go to the remote client; its cancellation is the client's.
pub(crate) struct ReporterObserver<'a>(pub &'a Reporter);

impl CallObserver for ReporterObserver<'_> {
    fn progress(&self, done: u64, total: u64) {
        self.0.progress(done, total);
    }
    fn event(&self, name: &str, data: &Value) {
        self.0.event(name, data);
    }
    fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(uri: &str) -> Result<Option<RemoteTarget>, HostError> {
        RemoteTarget::parse(uri)
    }

    #[test]
    fn local_uris_are_not_remote() {
        assert_eq!(parse("test:///default").ok(), Some(None));
        assert_eq!(parse("qemu:///session?root=/x").ok(), Some(None));
    }

    #[test]
    fn the_transport_and_socket_are_stripped() {
        let target = parse("test+unix:///default?socket=/tmp/a%20b/sock").ok().flatten();
        assert_eq!(
            target,
            Some(RemoteTarget {
                transport: Transport::Unix { socket: PathBuf::from("/tmp/a b/sock") },
                uri: "test:///default".into()
            })
        );
        let target = parse("qemu+unix:///session?root=/r&socket=/s&emulator=/q").ok().flatten();
        assert_eq!(target.map(|t| t.uri), Some("qemu:///session?root=/r&emulator=/q".into()));
    }

    #[test]
    fn tls_uris_name_host_port_and_certificate_directory() {
        let target = parse("qemu+tls://[::1]:9999/session?root=/r&pkipath=/p%20q").ok().flatten();
        let expected = Transport::Tls {
            host: "::1".into(),
            port: 9999,
            files: TlsFiles {
                cert: "/p q/clientcert.pem".into(),
                key: "/p q/clientkey.pem".into(),
                ca: "/p q/cacert.pem".into(),
            },
        };
        assert_eq!(target, Some(RemoteTarget { transport: expected, uri: "qemu:///session?root=/r".into() }));
        let target = parse("test+tls://host.example/default?pkipath=/p").ok().flatten();
        assert!(matches!(target.map(|t| t.transport), Some(Transport::Tls { port: DEFAULT_TLS_PORT, .. })));
        for bad in
            ["test+tls://u@h/default?pkipath=/p", "test+tls://h:0/default", "test+tls:///default", "test+tls://h"]
        {
            assert!(parse(bad).is_err_and(|e| e.category() == ErrorCategory::Usage), "{bad}");
        }
    }

    #[test]
    fn ssh_uris_become_ssh_arguments_with_the_proxy_quoted() {
        let target = parse("test+ssh://op@h:2222/default?socket=/r/it's&keyfile=/k&no_verify=1&x=1").ok().flatten();
        let Some(RemoteTarget { transport: Transport::Ssh(ssh), uri }) = target else { panic!("not ssh") };
        assert_eq!(uri, "test:///default?x=1");
        let args = ssh_args(&ssh);
        let expected = "-T -e none -o BatchMode=yes -p 2222 -l op -i /k -o StrictHostKeyChecking=no \
                        -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -- h";
        assert_eq!(args[..args.len() - 1].join(" "), expected);
        assert_eq!(args.last().map(String::as_str), Some(r"'capvirt' proxy --socket '/r/it'\''s'"));
        // Nothing reaches ssh as an option.
        for bad in
            ["test+ssh://-oProxyCommand=x/default", "test+ssh://-l@h/default", "test+ssh://h/default?no_verify=yes"]
        {
            assert!(parse(bad).is_err_and(|e| e.category() == ErrorCategory::Usage), "{bad}");
        }
    }

    #[test]
    fn other_transports_and_hosts_are_refused_clearly() {
        let error = parse("qemu+tcp://host/system").err().map(|e| (e.category(), e.to_string()));
        assert!(matches!(&error, Some((ErrorCategory::Unsupported, m)) if m.contains("`tcp` transport")), "{error:?}");
        let error = parse("test+unix://host/default?socket=/s").err().map(|e| (e.category(), e.to_string()));
        assert!(matches!(&error, Some((ErrorCategory::Usage, m)) if m.contains("names no host")), "{error:?}");
        let error = parse("test+unix:///default?socket=/a&socket=/b").err().map(|e| e.to_string());
        assert!(error.is_some_and(|m| m.contains("given twice")));
    }
}
