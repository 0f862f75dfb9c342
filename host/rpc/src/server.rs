//! The server side: the gRPC service over any [`Executor`]. Each call runs on a blocking
//! thread (drivers block), reports progress and events as they happen, and sees itself
//! cancelled as soon as the client drops the response stream.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use capvirt_plugin_api::Value;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{
    transport::server::{Connected, UdsConnectInfo},
    Code, Request, Response, Status,
};

use crate::{
    proto::{self, call_update::Kind, capvirt_server::CapvirtServer},
    tls::{ClientCertificate, TlsError, TlsMaterial},
    value, CallFailure, Hello, Update, PROTOCOL_MAJOR,
};

/// The OS identity of the peer process, from `SO_PEERCRED` (Unix sockets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerIdentity {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// One call as it arrived.
#[derive(Debug, Clone)]
pub struct IncomingCall {
    pub uri: String,
    pub readonly: bool,
    pub capability: String,
    pub args: Value,
    /// Who is calling, on a Unix socket (`SO_PEERCRED`).
    pub peer: Option<PeerIdentity>,
    /// Who is calling, on TLS: the client certificate the handshake verified.
    pub certificate: Option<ClientCertificate>,
}

/// What performs calls for the service: the daemon's host, or an isolated driver child.
pub trait Executor: Send + Sync + 'static {
    /// This side's hello (protocol, registry version and capabilities).
    fn hello(&self) -> Hello;
    /// Performs one call on a blocking thread, reporting through `reporter`.
    fn call(&self, call: IncomingCall, reporter: &Reporter) -> Result<Value, CallFailure>;
    /// Opens (or checks) the connection to `uri` before any call, on a blocking thread, so
    /// a refused URI is reported at connect time. By default every URI is accepted here and
    /// judged at its first call.
    fn connect(
        &self,
        _uri: &str,
        _readonly: bool,
        _options: Option<Value>,
        _peer: Option<PeerIdentity>,
    ) -> Result<(), CallFailure> {
        Ok(())
    }
}

/// How a running call reports progress and events, and learns it was cancelled.
pub struct Reporter {
    tx: mpsc::Sender<Result<proto::CallUpdate, Status>>,
}

impl Reporter {
    /// Progress is a gauge: when the client reads slower than the driver reports, updates
    /// are dropped rather than stalling the driver.
    pub fn progress(&self, done: u64, total: u64) {
        let _ = self.tx.try_send(Ok(update(Kind::Progress(proto::Progress { done, total }))));
    }

    /// Events are delivered in order, waiting for a slow client (bounded queue).
    pub fn event(&self, name: &str, data: &Value) {
        let event = proto::Event { name: name.to_owned(), data: Some(value::to_wire(data)) };
        let _ = self.tx.blocking_send(Ok(update(Kind::Event(event))));
    }

    /// True once the client has gone away (dropped its stream or its connection).
    pub fn is_cancelled(&self) -> bool {
        self.tx.is_closed()
    }
}

fn update(kind: Kind) -> proto::CallUpdate {
    proto::CallUpdate { kind: Some(kind) }
}

/// The updates queued per call before a slow client makes a driver's events wait.
const UPDATE_QUEUE: usize = 16;

/// The gRPC service over an executor.
pub struct CapvirtService<E> {
    executor: Arc<E>,
}

impl<E: Executor> CapvirtService<E> {
    pub fn new(executor: Arc<E>) -> Self {
        CapvirtService { executor }
    }

    /// The service with both message-size bounds set to `max_message_bytes`.
    pub fn into_server(self, max_message_bytes: usize) -> CapvirtServer<Self> {
        CapvirtServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }
}

#[tonic::async_trait]
impl<E: Executor> proto::capvirt_server::Capvirt for CapvirtService<E> {
    async fn hello(&self, request: Request<proto::HelloMessage>) -> Result<Response<proto::HelloMessage>, Status> {
        let theirs = request.into_inner();
        if theirs.protocol_major != PROTOCOL_MAJOR {
            return Err(Status::failed_precondition(format!(
                "protocol major {} is not supported: this side speaks capvirt protocol {PROTOCOL_MAJOR}",
                theirs.protocol_major
            )));
        }
        Ok(Response::new(self.executor.hello().into()))
    }

    async fn open(&self, request: Request<proto::OpenRequest>) -> Result<Response<proto::OpenReply>, Status> {
        let peer = peer_identity(&request);
        let request = request.into_inner();
        let executor = Arc::clone(&self.executor);
        let options = match request.options {
            None => None,
            Some(options) => Some(
                value::from_wire(options)
                    .map_err(|e| Status::invalid_argument(format!("connect options for `{}`: {e}", request.uri)))?,
            ),
        };
        let outcome =
            tokio::task::spawn_blocking(move || executor.connect(&request.uri, request.readonly, options, peer))
                .await
                .map_err(|e| Status::internal(format!("connect did not finish: {e}")))?;
        match outcome {
            Ok(()) => Ok(Response::new(proto::OpenReply {})),
            // The failure travels in the status details, exact (see `Client::connect`).
            Err(failure) => Err(Status::with_details(
                Code::Aborted,
                failure.message.clone(),
                prost::Message::encode_to_vec(&failure.to_wire()).into(),
            )),
        }
    }

    type CallStream = CallUpdates;

    async fn call(&self, request: Request<proto::CallRequest>) -> Result<Response<Self::CallStream>, Status> {
        let peer = peer_identity(&request);
        let certificate = client_certificate(&request);
        let request = request.into_inner();
        let args = value::from_wire_opt(request.args)
            .map_err(|e| Status::invalid_argument(format!("arguments of `{}`: {e}", request.capability)))?;
        let call = IncomingCall {
            uri: request.uri,
            readonly: request.readonly,
            capability: request.capability,
            args,
            peer,
            certificate,
        };
        let (tx, rx) = mpsc::channel(UPDATE_QUEUE);
        let executor = Arc::clone(&self.executor);
        tokio::task::spawn_blocking(move || {
            let reporter = Reporter { tx };
            let last = match executor.call(call, &reporter) {
                Ok(result) => Kind::Result(value::to_wire(&result)),
                Err(failure) => Kind::Error(failure.to_wire()),
            };
            // A cancelled call's client is gone: nobody to tell.
            let _ = reporter.tx.blocking_send(Ok(update(last)));
        });
        Ok(Response::new(CallUpdates { rx, done: false }))
    }
}

/// A call's updates as the response stream. It ends right after the final message (result
/// or error) instead of when the call's thread drops its sender, so the reply's last data
/// frame and its trailers leave in one write (measured: fewer wake-ups per call on both sides).
pub struct CallUpdates {
    rx: mpsc::Receiver<Result<proto::CallUpdate, Status>>,
    done: bool,
}

impl tokio_stream::Stream for CallUpdates {
    type Item = Result<proto::CallUpdate, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let next = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(Ok(proto::CallUpdate { kind: Some(Kind::Result(_) | Kind::Error(_)) }))) = &next {
            self.done = true;
        }
        next
    }
}

/// The caller's OS identity, when the transport is a Unix socket.
fn peer_identity<T>(request: &Request<T>) -> Option<PeerIdentity> {
    request.extensions().get::<UdsConnectInfo>().and_then(|info| info.peer_cred).map(|cred| PeerIdentity {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    })
}

/// The verified client certificate's subject, when the transport is TLS (the handshake
/// refused any certificate the CA did not sign, and any client without one).
fn client_certificate<T>(request: &Request<T>) -> Option<ClientCertificate> {
    let certs = request.peer_certs()?;
    ClientCertificate::from_der(certs.first()?)
}

/// Serves `executor` with mutual TLS on `listener` until `shutdown` completes. Clients must
/// present a certificate signed by the configured CA; calls carry its subject.
pub async fn serve_tls<E: Executor>(
    listener: TcpListener,
    tls: &TlsMaterial,
    executor: Arc<E>,
    max_message_bytes: usize,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TlsServeError> {
    let files = tls.files();
    let mut builder = tonic::transport::Server::builder().tls_config(tls.server_config()).map_err(|e| {
        TlsServeError::Tls(TlsError::Config {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: crate::client::error_chain(&e),
        })
    })?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    builder
        .add_service(CapvirtService::new(executor).into_server(max_message_bytes))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(TlsServeError::Serve)
}

/// Why a TLS listener stopped or did not start.
#[derive(Debug, thiserror::Error)]
pub enum TlsServeError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Serve(tonic::transport::Error),
}

/// Serves `executor` on one already connected socket (an isolated driver's end of its
/// socket pair) until the far side closes it or goes away.
pub async fn serve_connection<E: Executor>(
    stream: UnixStream,
    executor: Arc<E>,
    max_message_bytes: usize,
) -> Result<(), tonic::transport::Error> {
    let (closed_tx, closed_rx) = oneshot::channel();
    let stream = WatchedStream { inner: stream, _closed: closed_tx };
    // With one connection and no shutdown signal, tonic returns once it has handed the
    // connection to its own task; the connection's end is seen when hyper drops the stream.
    tonic::transport::Server::builder()
        .add_service(CapvirtService::new(executor).into_server(max_message_bytes))
        .serve_with_incoming(tokio_stream::once(Ok::<_, std::io::Error>(stream)))
        .await?;
    let _ = closed_rx.await;
    Ok(())
}

/// A socket that says when it is dropped (its connection ended).
struct WatchedStream {
    inner: UnixStream,
    _closed: oneshot::Sender<()>,
}

impl Connected for WatchedStream {
    type ConnectInfo = UdsConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Serves `executor` on `listener` until `shutdown` completes; in-flight calls finish first.
pub async fn serve_unix<E: Executor>(
    listener: UnixListener,
    executor: Arc<E>,
    max_message_bytes: usize,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(CapvirtService::new(executor).into_server(max_message_bytes))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

impl Update {
    /// The update a wire message carries, if it is one (not the final message).
    pub(crate) fn from_wire(kind: &mut Kind) -> Option<Result<Update, crate::ValueError>> {
        match kind {
            Kind::Progress(p) => Some(Ok(Update::Progress { done: p.done, total: p.total })),
            Kind::Event(e) => Some(
                value::from_wire_opt(e.data.take())
                    .map(|data| Update::Event { name: std::mem::take(&mut e.name), data }),
            ),
            Kind::Result(_) | Kind::Error(_) => None,
        }
    }
}
