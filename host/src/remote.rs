//! Remote connections (`DRIVER+unix:///PATH[?socket=S]`, libvirt's convention) and the
//! daemon side that serves them. The client forwards each call to the daemon, whose host runs
//! the whole dispatch path (registry → policy → validation → driver → audit); the wire format
//! is `capvirt-rpc`'s.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use capvirt_plugin_api::{PluginError, Value};
use capvirt_rpc::{CallFailure, Executor, Hello, IncomingCall, Reporter, Update};

use crate::{
    caller::Caller,
    driver::CallObserver,
    error::{CallError, ErrorCategory, HostError},
    host::{Connection, Host},
    registry::Registry,
};

/// The daemon's socket for root.
pub const SYSTEM_SOCKET: &str = "/run/capvirt/capvirt-sock";
/// Under `$XDG_RUNTIME_DIR` for other users.
pub const USER_SOCKET: &str = "capvirt/capvirt-sock";

/// A URI naming a transport: where to reach the daemon and what to ask it for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTarget {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// The URI the daemon's plugins serve: the transport and `socket` removed.
    pub uri: String,
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
        if transport != "unix" {
            return Err(HostError::Connect {
                uri: uri.to_string(),
                error: PluginError::unsupported(format!(
                    "the `{transport}` transport is not supported; use {driver}+unix:///PATH[?socket=SOCKET]"
                )),
            });
        }
        let (location, query) = rest.split_once('?').map_or((rest, None), |(l, q)| (l, Some(q)));
        if !location.starts_with('/') {
            return Err(bad("a `unix` transport names no host: use DRIVER+unix:///PATH?socket=SOCKET".into()));
        }
        let mut socket = None;
        let mut kept = Vec::new();
        for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("socket", raw)) => {
                    let path = percent_encoding::percent_decode_str(raw)
                        .decode_utf8()
                        .map_err(|_| bad("parameter `socket` is not valid UTF-8".into()))?;
                    if socket.is_some() {
                        return Err(bad("parameter `socket` given twice".into()));
                    }
                    if path.is_empty() {
                        return Err(bad("parameter `socket` is empty".into()));
                    }
                    socket = Some(PathBuf::from(path.into_owned()));
                }
                _ => kept.push(pair),
            }
        }
        let socket = match socket {
            Some(socket) => socket,
            None => default_socket().map_err(|why| bad(why.to_string()))?,
        };
        let mut remote = format!("{driver}://{location}");
        if !kept.is_empty() {
            remote.push('?');
            remote.push_str(&kept.join("&"));
        }
        Ok(Some(RemoteTarget { socket, uri: remote }))
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
        let client = runtime
            .block_on(capvirt_rpc::Client::connect_unix(
                &target.socket,
                hello(&registry),
                capvirt_rpc::DEFAULT_MAX_MESSAGE_BYTES,
            ))
            .map_err(|e| match e {
                capvirt_rpc::ClientError::ProtocolMismatch { .. } => failed(PluginError::unsupported, e.to_string()),
                _ => failed(PluginError::driver_failure, e.to_string()),
            })?;
        Ok(RemoteConnection { uri: uri.to_string(), target, readonly, registry, client, runtime })
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
                        self.target.socket.display(),
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
                Err(CallError::Remote {
                    id: id.to_string(),
                    category,
                    message: format!("`{id}` on {}: {error}", self.uri),
                })
            }
        }
    }
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
}

impl HostExecutor {
    pub fn new(host: Host) -> HostExecutor {
        let hello = hello(host.registry());
        HostExecutor { host, hello, connections: Mutex::new(HashMap::new()), callers: Mutex::new(HashMap::new()) }
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

    fn call(&self, call: IncomingCall, reporter: &Reporter) -> Result<Value, CallFailure> {
        // The caller is the peer the kernel names (`SO_PEERCRED`), never anything it says: the
        // access policy decides on, and the audit records, that identity.
        let Some(peer) = call.peer else {
            return Err(CallFailure::new(
                capvirt_rpc::ErrorKind::Denied,
                format!("`{}` refused: the caller's identity is unknown on this transport", call.capability),
            ));
        };
        let caller = self.caller(peer.uid, peer.gid);
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
            Some(RemoteTarget { socket: PathBuf::from("/tmp/a b/sock"), uri: "test:///default".into() })
        );
        let target = parse("qemu+unix:///session?root=/r&socket=/s&emulator=/q").ok().flatten();
        assert_eq!(target.map(|t| t.uri), Some("qemu:///session?root=/r&emulator=/q".into()));
    }

    #[test]
    fn other_transports_and_hosts_are_refused_clearly() {
        let error = parse("qemu+ssh://host/system").err().map(|e| (e.category(), e.to_string()));
        assert!(matches!(&error, Some((ErrorCategory::Unsupported, m)) if m.contains("`ssh` transport")), "{error:?}");
        let error = parse("test+unix://host/default?socket=/s").err().map(|e| (e.category(), e.to_string()));
        assert!(matches!(&error, Some((ErrorCategory::Usage, m)) if m.contains("names no host")), "{error:?}");
        let error = parse("test+unix:///default?socket=/a&socket=/b").err().map(|e| e.to_string());
        assert!(error.is_some_and(|m| m.contains("given twice")));
    }
}
