//! Entry points for the fuzz targets under `tests/fuzz` and their regression replay
//! (`tests/it/fuzz_regressions.rs`): the QMP client and the spec validation are private to
//! this driver, and fuzzing them needs no QEMU. Built only with the `fuzzing` feature.
//!
//! The functions return normally on any input (errors included); a panic or an assertion
//! failing in them is a bug the fuzzer found.

use std::{
    io::{BufRead, BufReader},
    os::unix::net::UnixStream,
    thread,
    time::{Duration, Instant},
};

use capvirt_plugin_api::{
    types::{DeviceSpec, DomainSpec},
    PluginError,
};
use qapi::qmp;
use rustix::{
    event::{PollFd, PollFlags, Timespec},
    net::SendFlags,
};

use crate::{
    qmp::Qmp,
    spec::{self, HostLimits, ImagePolicy, Machine},
};

/// Separates the chunks of a QMP script: never valid in UTF-8, so never part of QMP text.
pub const CHUNK_SEPARATOR: u8 = 0xff;

/// How long the scripted server waits for the client's next command before sending its next
/// chunk anyway (the client may be waiting for more of a reply instead).
const SERVER_PATIENCE: Duration = Duration::from_millis(1);
/// Chunks played at most (each may cost [`SERVER_PATIENCE`]); the rest of the script is dropped.
const MAX_CHUNKS: usize = 16;

/// Plays `script` as the server side of a QMP connection to this driver's client.
///
/// The script is split at [`CHUNK_SEPARATOR`]: the first chunk is sent at once (anything before
/// the greeting, and the greeting), each further chunk after the client's next command line (or
/// after [`SERVER_PATIENCE`]); then the server closes the connection. The client negotiates and
/// runs a fixed sequence of commands whose replies it reads as typed and untyped results.
pub fn qmp_exchange(script: &[u8]) {
    let Ok((client_end, server_end)) = UnixStream::pair() else { return };
    let chunks: Vec<Vec<u8>> = script.split(|&b| b == CHUNK_SEPARATOR).take(MAX_CHUNKS).map(<[u8]>::to_vec).collect();
    let server = thread::spawn(move || serve(server_end, chunks));
    if let Ok(mut client) = Qmp::handshake(client_end, Duration::from_secs(1)) {
        let _ = client.execute_loose::<_, serde_json::Value>(&qmp::query_status {});
        let _ = client.execute(&qmp::stop {});
        let _ = client.execute(&qmp::query_version {});
        let _ = client.execute_loose::<_, serde_json::Value>(&qmp::query_migrate {});
        let _ = client.wait_event(Instant::now() + Duration::from_millis(5), |e| e.name == "STOP");
        let _ = client.execute(&qmp::cont {});
    }
    let _ = server.join();
}

fn serve(stream: UnixStream, chunks: Vec<Vec<u8>>) {
    // The client may stop reading at any point; the server must never block on it for long.
    if stream.set_write_timeout(Some(Duration::from_secs(1))).is_err()
        || stream.set_read_timeout(Some(Duration::from_secs(1))).is_err()
    {
        return;
    }
    let Ok(reader) = stream.try_clone() else { return };
    let mut commands = BufReader::new(reader);
    let mut command = Vec::new();
    let mut ends_with_newline = true;
    for (index, chunk) in chunks.iter().enumerate() {
        // A chunk is an answer to a command, unless the previous one left a line unfinished
        // (then the client is still reading it).
        if index > 0 && ends_with_newline {
            // (No command in time is no reason to stop: the chunk goes anyway.)
            if commands.buffer().contains(&b'\n') || command_arrives(&stream) {
                command.clear();
                if let Ok(0) = commands.read_until(b'\n', &mut command) {
                    return;
                }
            }
        }
        if !send_all(&stream, chunk) {
            return;
        }
        if !chunk.is_empty() {
            ends_with_newline = chunk.ends_with(b"\n");
        }
    }
}

/// Whether the client sends something within [`SERVER_PATIENCE`] (`poll`: socket timeouts
/// are rounded up to the kernel's tick, several milliseconds).
fn command_arrives(stream: &UnixStream) -> bool {
    let mut fds = [PollFd::new(stream, PollFlags::IN)];
    let patience = Timespec { tv_sec: 0, tv_nsec: SERVER_PATIENCE.subsec_nanos().into() };
    matches!(rustix::event::poll(&mut fds, Some(&patience)), Ok(n) if n > 0)
}

/// `send` with MSG_NOSIGNAL: libFuzzer's process does not ignore SIGPIPE as Rust's `main` does.
fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        match rustix::net::send(stream, bytes, SendFlags::NOSIGNAL) {
            Ok(n) => bytes = &bytes[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
    }
    true
}

/// The image policy fuzzed specs are checked against: the default deny list, no allow list.
fn images() -> &'static ImagePolicy {
    static IMAGES: std::sync::OnceLock<ImagePolicy> = std::sync::OnceLock::new();
    IMAGES.get_or_init(ImagePolicy::default)
}

/// Host limits the fuzzed specs are validated against.
fn limits() -> HostLimits<'static> {
    HostLimits { memory_mib: 64 << 10, images: images(), bridges: true }
}

/// Validates a domain spec as `define` does; a valid one must survive the trip through its
/// stored form (`domain.toml`) and validate again to the same definition (a stored definition
/// is validated again by restore and migrate).
pub fn define(spec: &DomainSpec) -> Result<(), PluginError> {
    let machine = spec::validate(spec, limits())?;
    let stored = toml::to_string(&machine).map_err(|e| PluginError::internal(format!("encode: {e}")))?;
    let read_back: Machine =
        toml::from_str(&stored).unwrap_or_else(|e| panic!("a stored definition does not read back: {e}\n{stored}"));
    assert_eq!(read_back, machine, "the stored definition changed on the way");
    let again = spec::validate(&machine.to_spec(), limits())
        .unwrap_or_else(|e| panic!("a valid definition does not validate again: {}", e.message));
    assert_eq!(again, machine, "validating a definition again changed it");
    Ok(())
}

/// Validates a device as `attach-device` does.
pub fn attach(device: &DeviceSpec) -> Result<(), PluginError> {
    spec::device(device, images()).map(drop)
}
