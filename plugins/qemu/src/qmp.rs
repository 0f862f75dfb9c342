//! A QMP client over a Unix socket, speaking the `qapi` crate's generated command types.
//!
//! It replaces `qapi::Qmp`'s transport (not its types) for measured reasons:
//! - `Qmp::from_stream` writes each command in many small unbuffered writes; here a command is
//!   serialized into a reused buffer and sent with one `send`, without the empty `arguments`
//!   object `qapi::Execute` always adds (QEMU is slower to answer with it, see [`Qmp::encode`]);
//! - `Qmp` parses every line into `QmpMessage`, an untagged enum over every QEMU event, which
//!   costs more than the round trip itself; here a line is classified by a small borrowed
//!   envelope, the result is deserialized from the raw `return` value only, and events are
//!   kept only between a command and its response (when a caller may need them).
//!
//! Every blocking operation is bounded (socket timeouts); after any I/O error or timeout the
//! client is *broken* (the stream may be mid-line) and must be dropped.

use std::{
    borrow::Cow,
    collections::VecDeque,
    io::{self, IoSlice, Read},
    mem::MaybeUninit,
    os::{
        fd::{AsFd, BorrowedFd},
        unix::net::UnixStream,
    },
    path::Path,
    time::{Duration, Instant},
};

use qapi::{qmp, Command};
use rustix::net::{RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::value::RawValue;

/// Timeout of an ordinary command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Events kept between a command and its response, at most.
const MAX_EVENTS: usize = 256;
/// Tolerance between a wait's time left and the socket's read timeout.
const SLACK: Duration = Duration::from_secs(1);
/// A QMP line longer than this is refused (QEMU's replies are far smaller).
#[cfg(not(test))]
const MAX_LINE: usize = 64 << 20;
/// Smaller in unit tests, which send lines past the bound (64 MiB takes ~20 s unoptimized).
#[cfg(test)]
const MAX_LINE: usize = 1 << 20;

/// Why a QMP exchange failed.
#[derive(Debug)]
pub enum QmpError {
    /// Nobody accepts connections on the socket right now (its single client slot is taken).
    Busy,
    /// The peer had closed the connection before the command was sent: nothing happened, and
    /// a fresh connection may succeed (QEMU was restarted meanwhile).
    Stale,
    /// The peer closed the connection (QEMU exited).
    Closed,
    /// No answer within the bound.
    Timeout,
    Io(io::Error),
    /// Malformed or unexpected data.
    Protocol(String),
    /// QEMU refused the command.
    Command(qapi::Error),
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QmpError::Busy => f.write_str("the monitor socket accepts no more clients"),
            QmpError::Stale | QmpError::Closed => f.write_str("QEMU closed the monitor connection"),
            QmpError::Timeout => f.write_str("QEMU's monitor did not answer in time"),
            QmpError::Io(e) => write!(f, "monitor I/O failed: {e}"),
            QmpError::Protocol(why) => write!(f, "unexpected monitor data: {why}"),
            QmpError::Command(e) => write!(f, "QEMU refused: {}", e.desc),
        }
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub data: serde_json::Value,
    /// QEMU's own time of the event, in milliseconds since the Unix epoch.
    pub time_ms: Option<u64>,
}

/// QMP's `{"seconds": S, "microseconds": U}` event timestamp.
#[derive(Deserialize)]
struct Timestamp {
    seconds: u64,
    microseconds: u64,
}

fn event_time_ms(raw: Option<&RawValue>) -> Option<u64> {
    let t: Timestamp = serde_json::from_str(raw?.get()).ok()?;
    t.seconds.checked_mul(1000)?.checked_add(t.microseconds / 1000)
}

/// The part of a QMP line needed to classify it; everything else is skipped unparsed.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(rename = "return", borrow, default)]
    ret: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    timestamp: Option<&'a RawValue>,
}

/// A connected, negotiated QMP client.
pub struct Qmp {
    stream: UnixStream,
    buf: Vec<u8>,
    head: usize,
    tail: usize,
    out: Vec<u8>,
    events: VecDeque<Event>,
    /// The read timeout currently set on the socket.
    socket_timeout: Duration,
    broken: bool,
}

/// Lines tolerated before the greeting.
const MAX_LINES_BEFORE_GREETING: usize = 16;

impl Qmp {
    /// Connects to a QMP server socket and negotiates capabilities, within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(|e| QmpError::Io(e.into()))?;
        let address = SocketAddrUnix::new(path).map_err(|e| QmpError::Io(e.into()))?;
        // Non-blocking, so that a full listen backlog fails at once instead of blocking.
        match rustix::net::connect(&socket, &address) {
            Ok(()) => {}
            Err(rustix::io::Errno::AGAIN) => return Err(QmpError::Busy),
            Err(e) => return Err(QmpError::Io(e.into())),
        }
        rustix::io::ioctl_fionbio(&socket, false).map_err(|e| QmpError::Io(e.into()))?;
        Qmp::handshake(UnixStream::from(socket), timeout)
    }

    /// Negotiates on an already connected stream (e.g. one end of a socketpair).
    pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        stream.set_write_timeout(Some(COMMAND_TIMEOUT)).map_err(QmpError::Io)?;
        stream.set_read_timeout(Some(timeout)).map_err(QmpError::Io)?;
        let mut client = Qmp {
            stream,
            buf: vec![0; 16 << 10],
            head: 0,
            tail: 0,
            out: Vec::with_capacity(256),
            events: VecDeque::new(),
            socket_timeout: timeout,
            broken: false,
        };
        // The greeting proves the peer speaks QMP (the version is asked with query-version).
        // Lines before it are skipped: a previous client's unread output (an event, a late
        // reply) can still be in flight when a channel changes hands.
        // `qmp_capabilities` goes out before the greeting is read: QEMU reads it once it has
        // greeted, so negotiating costs no round trip of its own (a peer that is no QMP server
        // gets one line, and the greeting check below refuses it as before).
        client.encode(&qmp::qmp_capabilities { enable: None })?;
        // A peer gone before greeting is a closed channel, as when the greeting never comes.
        client.send(None).map_err(|e| if matches!(e, QmpError::Stale) { QmpError::Closed } else { e })?;
        let deadline = Instant::now() + timeout;
        let mut skipped = 0;
        loop {
            let line = client.next_line(deadline)?;
            match serde_json::from_slice::<qmp::QapiCapabilities>(client.line(line)) {
                Ok(_) => break,
                Err(_) if skipped < MAX_LINES_BEFORE_GREETING => skipped += 1,
                Err(e) => {
                    return Err(client.fail(QmpError::Protocol(format!(
                        "no QMP greeting in the first {MAX_LINES_BEFORE_GREETING} lines: {e}"
                    ))))
                }
            }
        }
        client.response::<<qmp::qmp_capabilities as Command>::Ok>(
            <qmp::qmp_capabilities as Command>::NAME,
            Instant::now() + timeout,
        )?;
        Ok(client)
    }

    /// Whether an earlier failure left the stream unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Runs a command and returns its typed result.
    pub fn execute<C: Command>(&mut self, command: &C) -> Result<C::Ok, QmpError> {
        self.execute_as::<C, C::Ok>(command, None, COMMAND_TIMEOUT, false)
    }

    /// [`Qmp::execute`] with another bound.
    pub fn execute_within<C: Command>(&mut self, command: &C, timeout: Duration) -> Result<C::Ok, QmpError> {
        self.execute_as::<C, C::Ok>(command, None, timeout, false)
    }

    /// Runs a command, reading its result as `T`: used where the `qapi` 0.13 result type has
    /// fields newer QEMUs dropped, so that only what the driver reads must be present.
    pub fn execute_loose<C: Command, T: DeserializeOwned>(&mut self, command: &C) -> Result<T, QmpError> {
        self.execute_as::<C, T>(command, None, COMMAND_TIMEOUT, false)
    }

    /// Runs a command that takes a file descriptor, passed with SCM_RIGHTS alongside it.
    pub fn execute_with_fd<C: Command>(&mut self, command: &C, fd: BorrowedFd<'_>) -> Result<C::Ok, QmpError> {
        self.execute_as::<C, C::Ok>(command, Some(fd), COMMAND_TIMEOUT, false)
    }

    /// Whether an event named `name` arrived between the last command and its response.
    pub fn saw_event(&self, name: &str) -> bool {
        self.events.iter().any(|e| e.name == name)
    }

    /// Waits until `deadline` for an event accepted by `matches` (events that arrived with the
    /// last command's response count).
    pub fn wait_event(
        &mut self,
        deadline: Instant,
        mut matches: impl FnMut(&Event) -> bool,
    ) -> Result<Event, QmpError> {
        if let Some(index) = self.events.iter().position(&mut matches) {
            if let Some(event) = self.events.remove(index) {
                return Ok(event);
            }
        }
        loop {
            let line = self.next_line(deadline)?;
            let event = self.parse_event(line)?;
            match event {
                Some(event) if matches(&event) => return Ok(event),
                Some(event) => self.keep(event),
                None => return Err(self.fail(QmpError::Protocol("a response without a command".into()))),
            }
        }
    }

    /// Runs a command on a channel that watches events (`domain.events`): events that arrived
    /// before or with its response are kept for [`Qmp::read_events`], not dropped.
    pub fn execute_watching<C: Command, T: DeserializeOwned>(&mut self, command: &C) -> Result<T, QmpError> {
        self.pump()?;
        self.execute_as::<C, T>(command, None, COMMAND_TIMEOUT, true)
    }

    /// The events that arrived so far, without waiting, oldest first. After QEMU closed the
    /// connection they are the last ones and the client is broken.
    pub fn read_events(&mut self) -> Result<Vec<Event>, QmpError> {
        if !self.broken {
            self.pump()?;
        }
        Ok(self.events.drain(..).collect())
    }

    /// Reads what QEMU already sent without waiting and keeps the events of its complete
    /// lines; a clean end of stream marks the client broken (its events are still kept).
    fn pump(&mut self) -> Result<(), QmpError> {
        loop {
            self.make_room();
            match rustix::net::recv(self.stream.as_fd(), &mut self.buf[self.tail..], RecvFlags::DONTWAIT) {
                Ok((0, _)) => {
                    self.broken = true;
                    break;
                }
                Ok((n, _)) => self.tail += n,
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(self.fail(QmpError::Io(e.into()))),
            }
        }
        while let Some(offset) = self.buf[self.head..self.tail].iter().position(|&b| b == b'\n') {
            let line = (self.head, self.head + offset);
            self.head += offset + 1;
            // A late response to an earlier, abandoned command is no event: skipped.
            if let Some(event) = self.parse_event(line)? {
                self.events.push_back(event);
            }
        }
        Ok(())
    }

    fn execute_as<C: Command, T: DeserializeOwned>(
        &mut self,
        command: &C,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
        watching: bool,
    ) -> Result<T, QmpError> {
        if self.broken {
            return Err(QmpError::Closed);
        }
        // Events already queued are older than this command: drop them, so that the ones
        // seen before its response (e.g. STOP for `stop`) are known to be its effects
        // (a watching channel keeps them instead, see `execute_watching`).
        if !watching {
            self.discard_pending()?;
        }
        self.encode(command)?;
        self.send(fd)?;
        self.response::<T>(C::NAME, Instant::now() + timeout)
    }

    /// Reads up to the response of the command last sent (`name`, for messages), keeping the
    /// events that come before it.
    fn response<T: DeserializeOwned>(&mut self, name: &str, deadline: Instant) -> Result<T, QmpError> {
        loop {
            let line = self.next_line(deadline)?;
            let bytes = &self.buf[line.0..line.1];
            let envelope: Envelope<'_> = match serde_json::from_slice(bytes) {
                Ok(envelope) => envelope,
                Err(e) => return Err(self.fail(QmpError::Protocol(format!("{e}")))),
            };
            if let Some(name) = envelope.event {
                let event = Event {
                    name: name.into_owned(),
                    data: envelope.data.and_then(|d| serde_json::from_str(d.get()).ok()).unwrap_or_default(),
                    time_ms: event_time_ms(envelope.timestamp),
                };
                self.keep(event);
                continue;
            }
            if let Some(ret) = envelope.ret {
                return serde_json::from_str(ret.get())
                    .map_err(|e| self.fail(QmpError::Protocol(format!("cannot read the result of {name}: {e}"))));
            }
            if envelope.error.is_some() {
                let error: qapi::Error = serde_json::from_slice(bytes)
                    .map_err(|e| self.fail(QmpError::Protocol(format!("bad error reply: {e}"))))?;
                return Err(QmpError::Command(error));
            }
            return Err(self.fail(QmpError::Protocol(format!(
                "neither event nor response: {}",
                String::from_utf8_lossy(bytes).chars().take(200).collect::<String>()
            ))));
        }
    }

    /// Writes `{"execute": NAME, "arguments": ARGS}` and a newline into the output buffer,
    /// leaving `arguments` out when empty: QEMU 7.2 answers a command that carries an empty
    /// `arguments` object ~70 µs later than the same command without it (measured with
    /// `stop`/`cont` on TCG, ~30% of the round trip), and QMP treats both alike.
    fn encode<C: Command>(&mut self, command: &C) -> Result<(), QmpError> {
        let encode_error = |e: serde_json::Error| QmpError::Protocol(format!("cannot encode {}: {e}", C::NAME));
        self.out.clear();
        self.out.extend_from_slice(b"{\"execute\":");
        serde_json::to_writer(&mut self.out, C::NAME).map_err(encode_error)?;
        let without_arguments = self.out.len();
        self.out.extend_from_slice(b",\"arguments\":");
        let arguments = self.out.len();
        serde_json::to_writer(&mut self.out, command).map_err(encode_error)?;
        if self.out[arguments..] == *b"{}" {
            self.out.truncate(without_arguments);
        }
        self.out.extend_from_slice(b"}\n");
        Ok(())
    }

    fn keep(&mut self, event: Event) {
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    fn parse_event(&mut self, line: (usize, usize)) -> Result<Option<Event>, QmpError> {
        let envelope: Envelope<'_> = serde_json::from_slice(&self.buf[line.0..line.1])
            .map_err(|e| QmpError::Protocol(format!("{e}")))
            .inspect_err(|_| self.broken = true)?;
        Ok(envelope.event.map(|name| Event {
            name: name.into_owned(),
            data: envelope.data.and_then(|d| serde_json::from_str(d.get()).ok()).unwrap_or_default(),
            time_ms: event_time_ms(envelope.timestamp),
        }))
    }

    /// Reads whatever QEMU already sent without waiting and drops complete lines (events).
    fn discard_pending(&mut self) -> Result<(), QmpError> {
        self.events.clear();
        // A peer that never stops writing must neither keep the client here nor grow the
        // buffer without bound: past one line's worth, the rest is read as the reply's events.
        let mut discarded = 0;
        while discarded <= MAX_LINE {
            self.make_room();
            match rustix::net::recv(self.stream.as_fd(), &mut self.buf[self.tail..], RecvFlags::DONTWAIT) {
                Ok((0, _)) => return Err(self.fail(QmpError::Stale)),
                Ok((n, _)) => {
                    self.tail += n;
                    discarded += n;
                }
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(self.fail(QmpError::Io(e.into()))),
            }
        }
        if let Some(last_newline) = self.buf[self.head..self.tail].iter().rposition(|&b| b == b'\n') {
            self.head += last_newline + 1;
        }
        Ok(())
    }

    fn send(&mut self, fd: Option<BorrowedFd<'_>>) -> Result<(), QmpError> {
        let mut sent = 0;
        if let Some(fd) = fd {
            let fds = [fd];
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(QmpError::Protocol("cannot attach a file descriptor".into()));
            }
            sent = rustix::net::sendmsg(&self.stream, &[IoSlice::new(&self.out)], &mut control, SendFlags::NOSIGNAL)
                .map_err(|e| self.fail(send_error(e, 0)))?;
        }
        while sent < self.out.len() {
            match rustix::net::send(&self.stream, &self.out[sent..], SendFlags::NOSIGNAL) {
                Ok(n) => sent += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(self.fail(send_error(e, sent))),
            }
        }
        Ok(())
    }

    /// The next complete line (without its terminator), as a range of `buf`.
    fn next_line(&mut self, deadline: Instant) -> Result<(usize, usize), QmpError> {
        // Bytes after `head` already known to hold no newline.
        let mut checked = 0;
        loop {
            let from = self.head + checked;
            if let Some(offset) = self.buf[from..self.tail].iter().position(|&b| b == b'\n') {
                let line = (self.head, from + offset);
                self.head = from + offset + 1;
                return Ok(line);
            }
            checked = self.tail - self.head;
            if checked > MAX_LINE {
                return Err(self.fail(QmpError::Protocol("line too long".into())));
            }
            self.make_room();
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.fail(QmpError::Timeout));
            }
            // Adjust the socket's timeout only when it is far from the time left, so that the
            // usual command (bound = the socket's timeout) costs no extra system call.
            if self.socket_timeout > remaining + SLACK || self.socket_timeout + SLACK < remaining {
                self.stream.set_read_timeout(Some(remaining)).map_err(QmpError::Io)?;
                self.socket_timeout = remaining;
            }
            match self.stream.read(&mut self.buf[self.tail..]) {
                Ok(0) => return Err(self.fail(QmpError::Closed)),
                Ok(n) => self.tail += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    if Instant::now() >= deadline {
                        return Err(self.fail(QmpError::Timeout));
                    }
                }
                Err(e) => return Err(self.fail(QmpError::Io(e))),
            }
        }
    }

    fn line(&self, range: (usize, usize)) -> &[u8] {
        &self.buf[range.0..range.1]
    }

    /// Moves unread bytes to the front and makes sure some space is free after them.
    fn make_room(&mut self) {
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        } else if self.head > 0 && self.tail + 4096 > self.buf.len() {
            self.buf.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        if self.tail + 4096 > self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
    }

    fn fail(&mut self, error: QmpError) -> QmpError {
        self.broken = true;
        error
    }
}

fn send_error(e: rustix::io::Errno, already_sent: usize) -> QmpError {
    match e {
        rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET if already_sent == 0 => QmpError::Stale,
        rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET => QmpError::Closed,
        rustix::io::Errno::AGAIN => QmpError::Timeout,
        e => QmpError::Io(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader, Write},
        thread,
    };

    use super::*;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;

    /// A scripted QMP peer on the other end of a socketpair: for each command line it reads, it
    /// writes the next chunk of the script (raw bytes, so lines may be split or cut).
    fn peer(before_greeting: &'static str, replies: Vec<&'static [u8]>) -> (UnixStream, thread::JoinHandle<()>) {
        let (ours, theirs) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
        let handle = thread::spawn(move || {
            let mut writer = theirs.try_clone().unwrap_or_else(|e| panic!("clone: {e}"));
            let mut reader = BufReader::new(theirs);
            let _ = writer.write_all(before_greeting.as_bytes());
            let _ = writer.write_all(GREETING.as_bytes());
            let _ = writer.write_all(b"\n");
            // qmp_capabilities.
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let _ = writer.write_all(b"{\"return\": {}}\n");
            for reply in replies {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                for chunk in reply.chunks(7) {
                    let _ = writer.write_all(chunk);
                    let _ = writer.flush();
                }
            }
        });
        (ours, handle)
    }

    fn connect(stream: UnixStream) -> Qmp {
        Qmp::handshake(stream, Duration::from_secs(5)).unwrap_or_else(|e| panic!("handshake: {e}"))
    }

    #[test]
    fn lines_before_the_greeting_are_skipped() {
        let (stream, peer) = peer("{\"event\": \"STOP\"}\n{\"return\": {}}\n", vec![]);
        let qmp = connect(stream);
        assert!(!qmp.is_broken());
        drop(qmp);
        let _ = peer.join();
    }

    #[test]
    fn a_peer_that_never_greets_is_refused() {
        let junk: &'static str =
            Box::leak("{\"event\": \"X\"}\n".repeat(MAX_LINES_BEFORE_GREETING + 1).into_boxed_str());
        let (stream, peer) = peer(junk, vec![]);
        match Qmp::handshake(stream, Duration::from_secs(5)) {
            Err(QmpError::Protocol(why)) => assert!(why.contains("no QMP greeting"), "{why}"),
            Err(e) => panic!("expected a protocol error, got {e}"),
            Ok(_) => panic!("a peer without a greeting was accepted"),
        }
        let _ = peer.join();
    }

    #[test]
    fn replies_split_across_reads_and_events_between_them_are_read() {
        let (stream, peer) = peer(
            "",
            vec![
                b"{\"event\": \"STOP\", \"data\": {}}\n{\"return\": {}}\n",
                b"{\"return\": {\"status\": \"paused\", \"running\": false}}\n",
            ],
        );
        let mut qmp = connect(stream);
        qmp.execute(&qmp::stop {}).unwrap_or_else(|e| panic!("stop: {e}"));
        assert!(qmp.saw_event("STOP"), "the STOP event before the reply was kept");
        let status: serde_json::Value =
            qmp.execute_loose(&qmp::query_status {}).unwrap_or_else(|e| panic!("query-status: {e}"));
        assert_eq!(status["status"], "paused");
        assert!(!qmp.saw_event("STOP"), "events are per command");
        drop(qmp);
        let _ = peer.join();
    }

    #[test]
    fn command_errors_keep_the_channel_usable() {
        let (stream, peer) = peer(
            "",
            vec![b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no such device\"}}\n", b"{\"return\": {}}\n"],
        );
        let mut qmp = connect(stream);
        match qmp.execute(&qmp::cont {}) {
            Err(QmpError::Command(e)) => assert_eq!(e.desc, "no such device"),
            other => panic!("expected a command error, got {other:?}"),
        }
        assert!(!qmp.is_broken());
        qmp.execute(&qmp::cont {}).unwrap_or_else(|e| panic!("cont: {e}"));
        drop(qmp);
        let _ = peer.join();
    }

    #[test]
    fn eof_in_the_middle_of_a_reply_breaks_the_channel() {
        let (stream, peer) = peer("", vec![b"{\"return\": {\"sta"]);
        let mut qmp = connect(stream);
        match qmp.execute_loose::<_, serde_json::Value>(&qmp::query_status {}) {
            Err(QmpError::Closed) => {}
            other => panic!("expected Closed, got {other:?}"),
        }
        assert!(qmp.is_broken());
        assert!(matches!(qmp.execute(&qmp::stop {}), Err(QmpError::Closed)));
        let _ = peer.join();
    }

    #[test]
    fn garbage_instead_of_a_reply_is_a_protocol_error() {
        let (stream, peer) = peer("", vec![b"this is not json\n"]);
        let mut qmp = connect(stream);
        assert!(matches!(qmp.execute(&qmp::stop {}), Err(QmpError::Protocol(_))));
        assert!(qmp.is_broken());
        drop(qmp);
        let _ = peer.join();
    }

    #[test]
    fn a_silent_peer_times_out_within_the_bound() {
        let (ours, theirs) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
        let started = Instant::now();
        let result = Qmp::handshake(ours, Duration::from_millis(200));
        assert!(matches!(result, Err(QmpError::Timeout)), "{:?}", result.err());
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(theirs);
    }

    /// A negotiated client and the server end of its socketpair, played by the test itself
    /// (commands are read with `reader`).
    fn negotiated() -> (Qmp, UnixStream, BufReader<UnixStream>) {
        let (ours, mut theirs) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
        theirs.set_read_timeout(Some(Duration::from_secs(5))).unwrap_or_else(|e| panic!("timeout: {e}"));
        theirs.set_write_timeout(Some(Duration::from_secs(5))).unwrap_or_else(|e| panic!("timeout: {e}"));
        let mut reader = BufReader::new(theirs.try_clone().unwrap_or_else(|e| panic!("clone: {e}")));
        theirs.write_all(format!("{GREETING}\n").as_bytes()).unwrap_or_else(|e| panic!("greeting: {e}"));
        let client = thread::spawn(move || Qmp::handshake(ours, Duration::from_secs(5)));
        assert!(read_command(&mut reader).contains("qmp_capabilities"));
        theirs.write_all(b"{\"return\": {}}\n").unwrap_or_else(|e| panic!("reply: {e}"));
        let qmp = match client.join() {
            Ok(Ok(qmp)) => qmp,
            Ok(Err(e)) => panic!("handshake: {e}"),
            Err(_) => panic!("the handshake panicked"),
        };
        (qmp, theirs, reader)
    }

    fn read_command(reader: &mut BufReader<UnixStream>) -> String {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap_or_else(|e| panic!("reading a command: {e}"));
        line
    }

    /// Polls `done` every millisecond for up to 5 s.
    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Bytes the client has not read yet.
    fn unread(probe: &UnixStream) -> u64 {
        rustix::io::ioctl_fionread(probe).unwrap_or_else(|e| panic!("FIONREAD: {e}"))
    }

    fn in_thread<T: Send + 'static>(
        mut qmp: Qmp,
        call: impl FnOnce(&mut Qmp) -> T + Send + 'static,
    ) -> thread::JoinHandle<(Qmp, T)> {
        thread::spawn(move || {
            let result = call(&mut qmp);
            (qmp, result)
        })
    }

    fn joined<T>(handle: thread::JoinHandle<(Qmp, T)>) -> (Qmp, T) {
        handle.join().unwrap_or_else(|_| panic!("the client thread panicked"))
    }

    #[test]
    fn a_reply_cut_mid_line_is_read_when_its_rest_arrives() {
        let (qmp, mut server, mut reader) = negotiated();
        let probe = qmp.stream.try_clone().unwrap_or_else(|e| panic!("clone: {e}"));
        let client = in_thread(qmp, |q| q.execute_loose::<_, serde_json::Value>(&qmp::query_status {}));
        assert!(read_command(&mut reader).contains("query-status"));
        server.write_all(b"{\"return\": {\"sta").unwrap_or_else(|e| panic!("write: {e}"));
        // The client has taken the fragment and waits for the rest of the line.
        wait_until("the client read the fragment", || unread(&probe) == 0);
        server.write_all(b"tus\": \"paused\", \"running\": false}}\n").unwrap_or_else(|e| panic!("write: {e}"));
        let (qmp, status) = joined(client);
        let status = status.unwrap_or_else(|e| panic!("query-status: {e}"));
        assert_eq!(status["status"], "paused");
        assert!(!qmp.is_broken());
    }

    #[test]
    fn events_are_told_apart_by_when_they_arrive() {
        let (qmp, mut server, mut reader) = negotiated();
        // Before the command: not its effect, dropped when it is sent.
        server.write_all(b"{\"event\": \"RESUME\", \"data\": {}}\n").unwrap_or_else(|e| panic!("write: {e}"));
        let client = in_thread(qmp, |q| q.execute(&qmp::stop {}));
        assert!(read_command(&mut reader).contains("\"stop\""));
        // Between the command and its response: kept for the caller.
        server
            .write_all(b"{\"event\": \"STOP\", \"data\": {}}\n{\"return\": {}}\n{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true}}\n")
            .unwrap_or_else(|e| panic!("write: {e}"));
        let (mut qmp, stopped) = joined(client);
        stopped.unwrap_or_else(|e| panic!("stop: {e}"));
        assert!(qmp.saw_event("STOP"));
        assert!(!qmp.saw_event("RESUME"), "an event older than the command was attributed to it");
        // After the response: read by whoever waits for it.
        let event = qmp
            .wait_event(Instant::now() + Duration::from_secs(5), |e| e.name == "SHUTDOWN")
            .unwrap_or_else(|e| panic!("wait_event: {e}"));
        assert_eq!(event.data["guest"], true);
        // STOP stays queued for a later wait; an event that never comes ends at the deadline.
        assert!(qmp.wait_event(Instant::now(), |e| e.name == "STOP").is_ok());
        let started = Instant::now();
        let nothing = qmp.wait_event(Instant::now() + Duration::from_millis(100), |e| e.name == "RESET");
        assert!(matches!(nothing, Err(QmpError::Timeout)), "{:?}", nothing.err());
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn an_oversized_line_is_refused_after_a_bounded_read() {
        let (qmp, mut server, mut reader) = negotiated();
        let client = in_thread(qmp, |q| q.execute(&qmp::stop {}));
        assert!(read_command(&mut reader).contains("\"stop\""));
        let block = vec![b'x'; 64 << 10];
        let mut written = 0;
        // One line longer than MAX_LINE, without its end; writes fail once the client gives up.
        while written <= MAX_LINE + block.len() {
            if server.write_all(&block).is_err() {
                break;
            }
            written += block.len();
        }
        let (qmp, result) = joined(client);
        match result {
            Err(QmpError::Protocol(why)) => assert!(why.contains("line too long"), "{why}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
        assert!(qmp.is_broken());
        assert!(qmp.buf.len() <= 2 * MAX_LINE + (64 << 10), "buffer grew to {} bytes", qmp.buf.len());
    }

    #[test]
    fn a_peer_that_floods_events_cannot_hold_a_command_forever() {
        let (qmp, server, _reader) = negotiated();
        let flooding = thread::spawn(move || {
            let line = b"{\"event\": \"BALLOON_CHANGE\", \"data\": {\"actual\": 1}}\n".repeat(1024);
            let mut server = server;
            // Until the client hangs up (the write timeout bounds a stalled client).
            while server.write_all(&line).is_ok() {}
        });
        let started = Instant::now();
        let (qmp, result) = joined(in_thread(qmp, |q| q.execute_within(&qmp::stop {}, Duration::from_millis(300))));
        assert!(matches!(result, Err(QmpError::Timeout)), "{:?}", result.err());
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert!(qmp.events.len() <= MAX_EVENTS);
        assert!(qmp.buf.len() <= 2 * MAX_LINE + (64 << 10));
        drop(qmp);
        let _ = flooding.join();
    }

    #[test]
    fn junk_and_a_split_greeting_before_negotiation_are_tolerated() {
        let (ours, mut theirs) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
        theirs.set_read_timeout(Some(Duration::from_secs(5))).unwrap_or_else(|e| panic!("timeout: {e}"));
        let mut reader = BufReader::new(theirs.try_clone().unwrap_or_else(|e| panic!("clone: {e}")));
        let probe = ours.try_clone().unwrap_or_else(|e| panic!("clone: {e}"));
        let client = thread::spawn(move || Qmp::handshake(ours, Duration::from_secs(5)));
        // Not JSON, an empty line, bytes that are not UTF-8, a late reply: all skipped.
        theirs.write_all(b"garbage\n\n\xff\xfe\x00\n{\"return\": {}}\n").unwrap_or_else(|e| panic!("write: {e}"));
        let (first, rest) = GREETING.split_at(20);
        theirs.write_all(first.as_bytes()).unwrap_or_else(|e| panic!("write: {e}"));
        wait_until("the client read the greeting's start", || unread(&probe) == 0);
        theirs.write_all(format!("{rest}\n").as_bytes()).unwrap_or_else(|e| panic!("write: {e}"));
        assert!(read_command(&mut reader).contains("qmp_capabilities"));
        theirs.write_all(b"{\"return\": {}}\n").unwrap_or_else(|e| panic!("write: {e}"));
        match client.join() {
            Ok(Ok(qmp)) => assert!(!qmp.is_broken()),
            Ok(Err(e)) => panic!("handshake: {e}"),
            Err(_) => panic!("the handshake panicked"),
        }
    }

    #[test]
    fn eof_in_the_middle_of_the_greeting_is_closed_not_a_hang() {
        let (ours, mut theirs) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
        theirs.write_all(&GREETING.as_bytes()[..30]).unwrap_or_else(|e| panic!("write: {e}"));
        drop(theirs);
        let started = Instant::now();
        let result = Qmp::handshake(ours, Duration::from_secs(5));
        assert!(matches!(result, Err(QmpError::Closed)), "{:?}", result.err());
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn a_closed_peer_is_stale_before_the_command_is_sent() {
        let (mut qmp, server, reader) = negotiated();
        drop((server, reader));
        // Nothing was sent: the caller may retry on a fresh connection.
        assert!(matches!(qmp.execute(&qmp::stop {}), Err(QmpError::Stale)));
        assert!(qmp.is_broken());
    }
}
