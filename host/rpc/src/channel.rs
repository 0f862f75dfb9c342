//! The client's HTTP/2 connection: tonic's gRPC codec (`tonic::client::Grpc`, through the
//! generated `CapvirtClient`) over one `h2` connection, with nothing in between.
//!
//! tonic's own `Channel` puts a tower `Buffer` task in front of hyper's client, which hands
//! each request to its connection task and spawns a task per request to await the response:
//! three task hops and their allocations per call, most of the client's cost per call once the
//! encoding is done (README "Remote calls"). Here the caller's future sends the request on the
//! `h2` stream, drives the connection (reads and writes the socket) and polls the response
//! itself, on the calling thread: no task, no hand-off. The framing stays gRPC's (tonic) over
//! HTTP/2 (`h2`).
//!
//! Whoever waits drives: every pending call polls the shared connection, and a call that ends
//! wakes the others so one of them takes over (the socket wakes only its last poller).

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{ready, Context, Poll, Waker},
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
pub struct H2Channel {
    send: h2::client::SendRequest<Bytes>,
    driver: Arc<Driver>,
    /// While this handle waits for the connection to take another stream (the far side's
    /// limit on concurrent streams), it drives the connection under this number.
    waiting_ready: Option<u64>,
}

impl Clone for H2Channel {
    fn clone(&self) -> Self {
        H2Channel { send: self.send.clone(), driver: Arc::clone(&self.driver), waiting_ready: None }
    }
}

impl Drop for H2Channel {
    fn drop(&mut self) {
        if let Some(id) = self.waiting_ready.take() {
            self.driver.leave(id);
        }
    }
}

/// The connection's reading and writing, done by the calls waiting on it.
struct Driver {
    state: Mutex<DriverState>,
}

/// `h2`'s connection over whichever byte stream the channel was made on.
type ConnectionFuture = Pin<Box<dyn Future<Output = Result<(), h2::Error>> + Send>>;

struct DriverState {
    /// `None` once it ended (the far side closed it, or it failed): the calls' streams then
    /// fail with its error.
    connection: Option<ConnectionFuture>,
    /// The calls waiting on the connection, by call number.
    waiting: HashMap<u64, Waker>,
    next_call: u64,
}

impl Driver {
    fn state(&self) -> MutexGuard<'_, DriverState> {
        // Nothing panics while holding it with the state half-changed.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn register(&self) -> u64 {
        let mut state = self.state();
        state.next_call += 1;
        state.next_call
    }

    /// Reads and writes what the connection can now, on behalf of call `call`.
    fn drive(&self, call: u64, cx: &mut Context<'_>) {
        let mut state = self.state();
        match state.waiting.get_mut(&call) {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            Some(waker) => waker.clone_from(cx.waker()),
            None => {
                state.waiting.insert(call, cx.waker().clone());
            }
        }
        if let Some(connection) = state.connection.as_mut() {
            if connection.as_mut().poll(cx).is_ready() {
                state.connection = None;
            }
        }
    }

    /// Call `call` no longer waits: another waiting call takes over driving, and what it left
    /// to send (a reset when it was dropped early) is written now.
    fn leave(&self, call: u64) {
        let mut state = self.state();
        if state.waiting.remove(&call).is_none() {
            return;
        }
        if let Some(connection) = state.connection.as_mut() {
            let mut cx = Context::from_waker(Waker::noop());
            if connection.as_mut().poll(&mut cx).is_ready() {
                state.connection = None;
            }
        }
        for waker in state.waiting.values() {
            waker.wake_by_ref();
        }
    }
}

impl H2Channel {
    /// Performs the HTTP/2 handshake on `io`. The connection is driven by the calls made on
    /// the channel; it closes when every clone of the channel and every call is dropped.
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
        let state = DriverState { connection: Some(Box::pin(connection)), waiting: HashMap::new(), next_call: 0 };
        Ok(H2Channel { send, driver: Arc::new(Driver { state: Mutex::new(state) }), waiting_ready: None })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for H2Channel {
    type Response = http::Response<ResponseBody>;
    /// An `h2::Error` or tonic's own `Status`, boxed: tonic maps either to a status.
    type Error = StdError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let mut ready = self.send.poll_ready(cx);
        if ready.is_pending() {
            let id = *self.waiting_ready.get_or_insert_with(|| self.driver.register());
            self.driver.drive(id, cx);
            ready = self.send.poll_ready(cx);
        }
        if ready.is_ready() {
            if let Some(id) = self.waiting_ready.take() {
                self.driver.leave(id);
            }
        }
        ready.map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let end_of_stream = body.is_end_stream();
        let call = Some(Call { driver: Arc::clone(&self.driver), id: self.driver.register() });
        match self.send.send_request(http::Request::from_parts(parts, ()), end_of_stream) {
            Ok((response, stream)) => {
                ResponseFuture { sending: (!end_of_stream).then_some((body, stream)), response: Ok(response), call }
            }
            Err(error) => ResponseFuture { sending: None, response: Err(Some(error)), call },
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
    /// Handed to the response's body once the head arrived.
    call: Option<Call>,
}

/// One call's share in driving the connection; leaving when dropped.
struct Call {
    driver: Arc<Driver>,
    id: u64,
}

impl Drop for Call {
    fn drop(&mut self) {
        self.driver.leave(self.id);
    }
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
        if let Poll::Ready(outcome) = Pin::new(&mut *response).poll(cx) {
            return Poll::Ready(this.head(outcome));
        }
        if let Some(call) = &this.call {
            call.driver.drive(call.id, cx);
        }
        let outcome = ready!(Pin::new(response).poll(cx));
        Poll::Ready(this.head(outcome))
    }
}

impl ResponseFuture {
    fn head(
        &mut self,
        outcome: Result<http::Response<h2::RecvStream>, h2::Error>,
    ) -> Result<http::Response<ResponseBody>, StdError> {
        let response = outcome.map_err(StdError::from)?;
        let call = self.call.take();
        Ok(response.map(|recv| ResponseBody { recv, call, data_done: false, done: false }))
    }
}

/// A response's body: its data frames, then its trailers (gRPC's status).
pub struct ResponseBody {
    recv: h2::RecvStream,
    /// Dropped (the call leaves the connection) once the trailers are in.
    call: Option<Call>,
    data_done: bool,
    done: bool,
}

impl ResponseBody {
    /// Polls `poll` on the stream; when the stream has nothing yet, drives the connection
    /// and polls once more (the frames read may be this stream's).
    fn poll_driven<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl Fn(&mut h2::RecvStream, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        if let Poll::Ready(ready) = poll(&mut self.recv, cx) {
            return Poll::Ready(ready);
        }
        match &self.call {
            Some(call) => call.driver.drive(call.id, cx),
            None => return Poll::Pending,
        }
        poll(&mut self.recv, cx)
    }
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
            match ready!(this.poll_driven(cx, |recv, cx| recv.poll_data(cx))) {
                Some(Ok(data)) => {
                    // Read: the far side may send as much again.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.poll_driven(cx, |recv, cx| recv.poll_trailers(cx)));
        this.done = true;
        this.call = None;
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
