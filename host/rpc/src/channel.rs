//! The client's HTTP/2 connection: tonic's gRPC codec (`tonic::client::Grpc`, through the
//! generated `CapvirtClient`) over one `h2` connection, with nothing in between.
//!
//! tonic's own `Channel` puts a tower `Buffer` task in front of hyper's client, which hands
//! each request to its connection task and spawns a task per request to await the response:
//! three task hops and their allocations per call, most of the client's cost per call once the
//! encoding is done (README "Remote calls"). Here the caller's future sends the request on the
//! `h2` stream and polls the response itself; the only other task is the connection's, which
//! reads and writes the socket. The framing stays gRPC's (tonic) over HTTP/2 (`h2`).

use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::codegen::StdError;

/// Flow-control windows: large enough that a maximal message (16 MiB) crosses in a few
/// round trips, not hundreds of 64 KiB ones.
pub(crate) const STREAM_WINDOW: u32 = 2 << 20;
pub(crate) const CONNECTION_WINDOW: u32 = 4 << 20;

/// One HTTP/2 connection as a tower service of gRPC requests (cheap to clone: clones share
/// the connection).
#[derive(Clone)]
pub struct H2Channel {
    send: h2::client::SendRequest<Bytes>,
}

impl H2Channel {
    /// Performs the HTTP/2 handshake on `io` and starts the connection's task on the current
    /// runtime. The task ends when the far side closes the connection or every clone of the
    /// channel is dropped.
    pub(crate) async fn handshake<S>(io: S) -> Result<H2Channel, h2::Error>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        tokio::spawn(async move {
            // Its end is seen by the calls: they fail with the connection's error.
            let _ = connection.await;
        });
        Ok(H2Channel { send })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for H2Channel {
    type Response = http::Response<ResponseBody>;
    /// An `h2::Error` or tonic's own `Status`, boxed: tonic maps either to a status.
    type Error = StdError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let end_of_stream = body.is_end_stream();
        match self.send.send_request(http::Request::from_parts(parts, ()), end_of_stream) {
            Ok((response, stream)) => {
                ResponseFuture { sending: (!end_of_stream).then_some((body, stream)), response: Ok(response) }
            }
            Err(error) => ResponseFuture { sending: None, response: Err(Some(error)) },
        }
    }
}

/// Sends the request's body (tonic's encoded message) as `h2` takes it, then waits for the
/// response's head. Dropping it resets the stream (`RST_STREAM CANCEL`): the far side sees the
/// call cancelled.
pub struct ResponseFuture {
    sending: Option<(tonic::body::Body, h2::SendStream<Bytes>)>,
    /// The refusal of a request `h2` did not take (returned at the first poll).
    response: Result<h2::client::ResponseFuture, Option<h2::Error>>,
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<ResponseBody>, StdError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let response = match &mut this.response {
            Ok(response) => response,
            Err(refused) => {
                let error = refused.take().unwrap_or_else(|| h2::Error::from(h2::Reason::INTERNAL_ERROR));
                return Poll::Ready(Err(error.into()));
            }
        };
        if let Some((body, stream)) = this.sending.as_mut() {
            // tonic has the message encoded already: its frames are ready at once. h2 queues
            // them and sends as the far side's window allows.
            loop {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        let last = body.is_end_stream();
                        match frame.into_data() {
                            Ok(data) => stream.send_data(data, last).map_err(StdError::from)?,
                            Err(frame) => {
                                if let Ok(trailers) = frame.into_trailers() {
                                    stream.send_trailers(trailers).map_err(StdError::from)?;
                                }
                                this.sending = None;
                                break;
                            }
                        }
                        if last {
                            this.sending = None;
                            break;
                        }
                    }
                    Poll::Ready(None) => {
                        stream.send_data(Bytes::new(), true).map_err(StdError::from)?;
                        this.sending = None;
                        break;
                    }
                    Poll::Ready(Some(Err(status))) => {
                        // tonic's encoder refused the message (e.g. over the size bound).
                        stream.send_reset(h2::Reason::CANCEL);
                        this.sending = None;
                        return Poll::Ready(Err(status.into()));
                    }
                    Poll::Pending => break,
                }
            }
        }
        let response = ready!(Pin::new(response).poll(cx)).map_err(StdError::from)?;
        Poll::Ready(Ok(response.map(|recv| ResponseBody { recv, data_done: false, done: false })))
    }
}

/// A response's body: its data frames, then its trailers (gRPC's status).
pub struct ResponseBody {
    recv: h2::RecvStream,
    data_done: bool,
    done: bool,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Read: the far side may send as much again.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.done = true;
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(error) => Some(Err(error)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
