//! The client side: a connection to a daemon's Unix socket (or any byte stream, or TLS),
//! version negotiation at connect, and calls whose updates are handed to a callback as they
//! arrive. Dropping a call's future cancels the call on the far side.

use std::path::{Path, PathBuf};

use capvirt_plugin_api::Value;
use prost::Message;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::UnixStream,
};
use tonic::{
    codec::Streaming,
    transport::{Channel, Endpoint, Uri},
    Code, Status,
};

use crate::{
    channel::H2Channel,
    proto::{self, call_update::Kind, capvirt_client::CapvirtClient},
    tls::TlsMaterial,
    value, CallFailure, DriverSupport, Hello, Update, ValueError, PROTOCOL_MAJOR,
};

/// Why a call did not reach the far side or came back unreadable (a refusal *by* the far
/// side is a [`CallFailure`] instead).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing accepted a connection on the socket.
    #[error("cannot reach the capvirt daemon at {}: {reason}", socket.display())]
    Unreachable { socket: PathBuf, reason: String },
    /// The far side speaks another protocol major.
    #[error("the capvirt daemon at {} refused this client: {reason}", socket.display())]
    ProtocolMismatch { socket: PathBuf, reason: String },
    /// A message exceeded the bound one side sets on message sizes.
    #[error("message too large: {0}")]
    TooLarge(String),
    /// The far side refused the request at the protocol level, or the connection broke.
    #[error("{0}")]
    Rpc(String),
    /// The far side sent a value that is not one.
    #[error("malformed message from the far side: {0}")]
    Malformed(#[from] ValueError),
    /// The call's stream ended with no final message.
    #[error("the far side ended the call without a result")]
    NoResult,
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        match status.code() {
            Code::OutOfRange | Code::ResourceExhausted => ClientError::TooLarge(format!(
                "the far side refused it ({})",
                status.message().trim_start_matches("Error, ")
            )),
            code => ClientError::Rpc(format!("{} ({code:?})", status.message())),
        }
    }
}

/// A connection to a daemon (cheap to clone; clones share the connection).
#[derive(Clone)]
pub struct Client {
    inner: Stub,
    /// Shared by clones: a clone per call (isolated drivers) must not copy every capability id.
    far: std::sync::Arc<Hello>,
    max_message_bytes: usize,
}

/// The generated client over the connection's transport: `h2` directly on local byte streams
/// (Unix sockets, socket pairs, ssh pipes), tonic's `Channel` for TLS (its rustls setup).
#[derive(Clone)]
enum Stub {
    Local(CapvirtClient<H2Channel>),
    Tls(CapvirtClient<Channel>),
}

/// The same method on either stub.
macro_rules! on_stub {
    ($stub:expr, $client:ident => $call:expr) => {
        match $stub {
            Stub::Local(mut $client) => $call,
            Stub::Tls(mut $client) => $call,
        }
    };
}

/// The authority local connections name (`h2` requires one; nothing reads it).
const LOCAL_ORIGIN: &str = "http://capvirt.local";

impl Client {
    /// Connects to the socket at `socket` and negotiates versions with `ours`.
    pub async fn connect_unix(socket: &Path, ours: Hello, max_message_bytes: usize) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| ClientError::Unreachable { socket: socket.to_path_buf(), reason: error_chain(&e) })?;
        Client::over_io(stream, socket, ours, max_message_bytes).await
    }

    /// A client over one already connected socket (the host's end of an isolated driver's
    /// socket pair). `name` stands for the far side in errors. Once that connection breaks,
    /// every call fails: the far side is gone.
    pub async fn over_stream(
        stream: UnixStream,
        name: &Path,
        ours: Hello,
        max_message_bytes: usize,
    ) -> Result<Client, ClientError> {
        Client::over_io(stream, name, ours, max_message_bytes).await
    }

    /// A client over any connected byte stream (e.g. an ssh child's standard output and input
    /// joined with [`tokio::io::join`]). `name` stands for the far side in errors.
    pub async fn over_io<S>(
        stream: S,
        name: &Path,
        ours: Hello,
        max_message_bytes: usize,
    ) -> Result<Client, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let channel = H2Channel::handshake(stream)
            .await
            .map_err(|e| ClientError::Unreachable { socket: name.to_path_buf(), reason: error_chain(&e) })?;
        let stub = CapvirtClient::with_origin(channel, Uri::from_static(LOCAL_ORIGIN));
        Client::negotiate(Stub::Local(stub), name, ours, max_message_bytes).await
    }

    /// Connects to a daemon's TLS listener at `host:port`, presenting `tls`'s client
    /// certificate and checking the daemon's against its CA and `host`.
    pub async fn connect_tls(
        host: &str,
        port: u16,
        tls: &TlsMaterial,
        ours: Hello,
        max_message_bytes: usize,
    ) -> Result<Client, ClientError> {
        // An IPv6 address is bracketed in the authority, not in the name checked.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let authority = if bare.contains(':') { format!("[{bare}]:{port}") } else { format!("{bare}:{port}") };
        let name = PathBuf::from(format!("tls://{authority}"));
        let unreachable = |reason: String| ClientError::Unreachable { socket: name.clone(), reason };
        let endpoint = Endpoint::from_shared(format!("https://{authority}"))
            .map_err(|e| unreachable(format!("not a host and port: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(crate::tls::HANDSHAKE_TIMEOUT)
            .tls_config(tls.client_config(bare))
            .map_err(|e| unreachable(format!("TLS settings refused: {}", error_chain(&e))))?;
        let cert = &tls.files().cert;
        let channel = endpoint.connect().await.map_err(|e| unreachable(tls_reason(&error_chain(&e), cert)))?;
        // With TLS 1.3 the daemon judges the client's certificate after the client's side of
        // the handshake is done: its refusal arrives on the first exchange.
        match Client::negotiate(Stub::Tls(CapvirtClient::new(channel)), &name, ours, max_message_bytes).await {
            Err(ClientError::Unreachable { socket, reason }) => {
                Err(ClientError::Unreachable { socket, reason: tls_reason(&reason, cert) })
            }
            other => other,
        }
    }

    async fn negotiate(
        stub: Stub,
        socket: &Path,
        ours: Hello,
        max_message_bytes: usize,
    ) -> Result<Client, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable { socket: socket.to_path_buf(), reason };
        let inner = match stub {
            Stub::Local(stub) => Stub::Local(
                stub.max_decoding_message_size(max_message_bytes).max_encoding_message_size(max_message_bytes),
            ),
            Stub::Tls(stub) => Stub::Tls(
                stub.max_decoding_message_size(max_message_bytes).max_encoding_message_size(max_message_bytes),
            ),
        };
        let hello = proto::HelloMessage::from(ours);
        let reply = on_stub!(inner.clone(), client => client.hello(hello).await);
        let far: Hello = match reply {
            Ok(reply) => reply.into_inner().into(),
            Err(status) if status.code() == Code::FailedPrecondition => {
                return Err(ClientError::ProtocolMismatch {
                    socket: socket.to_path_buf(),
                    reason: status.message().to_owned(),
                })
            }
            Err(status) => return Err(unreachable(status_reason(&status))),
        };
        if far.protocol_major != PROTOCOL_MAJOR {
            return Err(ClientError::ProtocolMismatch {
                socket: socket.to_path_buf(),
                reason: format!("it speaks capvirt protocol {}, this client {PROTOCOL_MAJOR}", far.protocol_major),
            });
        }
        Ok(Client { inner, far: std::sync::Arc::new(far), max_message_bytes })
    }

    /// What the far side said in `Hello`.
    pub fn far_side(&self) -> &Hello {
        &self.far
    }

    /// Opens the far side's connection to `uri` (its driver may refuse the URI) and returns
    /// the driver's description when the far side gives one. The outer error is the
    /// transport's, the inner one the far side's refusal.
    pub async fn connect(
        &self,
        uri: &str,
        readonly: bool,
        options: Option<&Value>,
    ) -> Result<Result<Option<DriverSupport>, CallFailure>, ClientError> {
        let request = proto::OpenRequest { uri: uri.to_owned(), readonly, options: options.map(value::to_wire) };
        match on_stub!(self.inner.clone(), client => client.open(request).await) {
            Ok(reply) => Ok(Ok(reply.into_inner().driver.map(Into::into))),
            Err(status) if status.code() == Code::Aborted => {
                match <proto::CallFailure as Message>::decode(status.details()) {
                    Ok(failure) => Ok(Err(CallFailure::from_wire(failure))),
                    Err(e) => Err(ClientError::Rpc(format!("unreadable connect refusal: {e}"))),
                }
            }
            Err(status) => Err(status.into()),
        }
    }

    /// Calls `capability` on the far side's `uri`; `on_update` sees progress and events.
    /// The outer error is the transport's, the inner one the far side's refusal or failure.
    pub async fn call(
        &self,
        uri: &str,
        readonly: bool,
        capability: &str,
        args: &Value,
        mut on_update: impl FnMut(Update),
    ) -> Result<Result<Value, CallFailure>, ClientError> {
        let request = proto::CallRequest {
            uri: uri.to_owned(),
            readonly,
            capability: capability.to_owned(),
            args: if args.is_unit() { None } else { Some(value::to_wire(args)) },
        };
        // Refused here with the sizes: tonic would only report an HTTP/2 error.
        let size = request.encoded_len();
        if size > self.max_message_bytes {
            return Err(ClientError::TooLarge(format!(
                "the request for `{capability}` is {size} bytes, over this client's limit of {} bytes",
                self.max_message_bytes
            )));
        }
        let mut stream: Streaming<proto::CallUpdate> =
            on_stub!(self.inner.clone(), client => client.call(request).await)?.into_inner();
        let mut outcome = None;
        while let Some(message) = stream.message().await? {
            let Some(mut kind) = message.kind else { continue };
            if let Some(update) = Update::from_wire(&mut kind) {
                on_update(update?);
                continue;
            }
            outcome = Some(match kind {
                Kind::Result(result) => Ok(value::from_wire(result)?),
                Kind::Error(failure) => Err(CallFailure::from_wire(failure)),
                Kind::Progress(_) | Kind::Event(_) => continue,
            });
        }
        outcome.ok_or(ClientError::NoResult)
    }
}

/// A status's message with its causes (a transport failure's status says little by itself).
fn status_reason(status: &Status) -> String {
    let mut reason = status.message().to_owned();
    if let Some(source) = std::error::Error::source(status) {
        let chain = error_chain(source);
        if !chain.is_empty() && !reason.contains(&chain) {
            reason = if reason.is_empty() { chain } else { format!("{reason}: {chain}") };
        }
    }
    reason
}

/// A TLS failure in words a user can act on, naming the client certificate when the daemon
/// refused it; the library's own text stays at the end.
fn tls_reason(reason: &str, client_cert: &Path) -> String {
    let lower = reason.to_lowercase();
    let refused_ours = format!(
        "the daemon refused this client's certificate {} (not signed by the daemon's CA?)",
        client_cert.display()
    );
    let hint = if reason.contains("UnknownIssuer") || reason.contains("invalid peer certificate") {
        "the daemon's certificate is not signed by this client's CA, or does not name this host".to_owned()
    } else if reason.contains("CertificateRequired") {
        "the daemon requires a client certificate and none was presented".to_owned()
    } else if reason.contains("alert") && (reason.contains("Certificate") || reason.contains("UnknownCA")) {
        refused_ours
    } else if !reason.contains("alert")
        && ["broken pipe", "reset", "end of file", "closed", "canceled"].iter().any(|w| lower.contains(w))
    {
        // The alert is often lost to the client's first write: a connection closed right after
        // the handshake is that refusal.
        format!("the daemon closed the connection right after the TLS handshake: {refused_ours}")
    } else {
        return reason.to_owned();
    };
    format!("{hint} ({reason})")
}

/// An error's causes on one line, each said once (tonic's own text is only "transport error",
/// and an IO error often appears twice in the chain).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(cause) = next {
        let text = cause.to_string();
        if text != "transport error" && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = cause.source();
    }
    parts.join(": ")
}
