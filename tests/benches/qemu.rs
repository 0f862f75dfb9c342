//! Suspend+resume through the host library and the QEMU driver, against raw QMP `stop`/`cont`
//! on the same running TCG QEMU, in the same run.
//!
//! `cargo bench -p capvirt-tests --bench qemu`. Rounds alternate between the two clients so
//! that drift (CPU frequency, other load) affects both alike; the figure per client is the
//! median over rounds of the mean time per operation (one operation = one suspend or one
//! resume = one QMP command round trip).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use capvirt_host::{Host, HostConfig, Value};
use capvirt_tests::qemu::{qemu_plugin_dir, spec_value, Sandbox};

const ROUNDS: usize = 60;
/// Suspend+resume pairs per round and client.
const PAIRS: usize = 100;
const WARMUP_PAIRS: usize = 200;

fn main() {
    // `cargo test --benches` runs bench binaries without `--bench`: QEMU only on demand.
    if !std::env::args().any(|a| a == "--bench") {
        println!("qemu bench: skipped (run it with `cargo bench -p capvirt-tests --bench qemu`)");
        return;
    }
    let sandbox = Sandbox::new();
    let disk = sandbox.boot_disk("boot");
    let uri = sandbox.uri("root", "&accel=tcg");
    let host = Host::new(HostConfig { plugin_dirs: vec![qemu_plugin_dir().to_path_buf()], ..Default::default() })
        .unwrap_or_else(|e| panic!("host: {e}"));
    let conn = host.connect(&uri, false).unwrap_or_else(|e| panic!("connect: {e}"));
    let spec = spec_value("bench", &disk, "virtio");
    conn.call("domain.define", Value::record([("spec", spec)])).unwrap_or_else(|e| panic!("define: {e}"));
    conn.call("domain.start", Value::record([("domain", Value::from("bench"))]))
        .unwrap_or_else(|e| panic!("start: {e}"));
    let version = conn
        .call("host.info", Value::Unit)
        .ok()
        .and_then(|info| info.get("hypervisor_version").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default();

    let args = Value::record([("domain", Value::from("bench"))]);
    let mut capvirt_pair = || {
        conn.call("domain.suspend", args.clone()).unwrap_or_else(|e| panic!("suspend: {e}"));
        conn.call("domain.resume", args.clone()).unwrap_or_else(|e| panic!("resume: {e}"));
    };
    // The raw client takes the last of the domain's monitor sockets (qmp0.sock, qmp1.sock…;
    // the library connection holds the first one it found free).
    let run = sandbox.root("root").join("domains/bench/run");
    let channels = std::fs::read_dir(&run)
        .unwrap_or_else(|e| panic!("{}: {e}", run.display()))
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".sock"))
        .count();
    let socket = run.join(format!("qmp{}.sock", channels.saturating_sub(1)));
    let mut raw = RawQmp::connect(&socket);
    let mut raw_pair = || {
        raw.round_trip(b"{\"execute\":\"stop\"}\n");
        raw.round_trip(b"{\"execute\":\"cont\"}\n");
    };

    for _ in 0..WARMUP_PAIRS {
        capvirt_pair();
        raw_pair();
    }
    let mut raw_rounds = Vec::with_capacity(ROUNDS);
    let mut capvirt_rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        raw_rounds.push(per_op(PAIRS, &mut raw_pair));
        capvirt_rounds.push(per_op(PAIRS, &mut capvirt_pair));
    }
    if std::env::var_os("QEMU_BENCH_VERBOSE").is_some() {
        let show = |rounds: &[Duration]| rounds.iter().map(|d| format!("{:.0}", us(*d))).collect::<Vec<_>>().join(" ");
        println!("raw rounds (us/op): {}", show(&raw_rounds));
        println!("capvirt rounds (us/op): {}", show(&capvirt_rounds));
    }
    let (raw_median, raw_min) = summary(&mut raw_rounds);
    let (capvirt_median, capvirt_min) = summary(&mut capvirt_rounds);
    println!("QEMU {version}, TCG, 64 MiB guest; {ROUNDS} rounds x {PAIRS} suspend+resume pairs per client");
    println!(
        "raw QMP stop/cont (std UnixStream):   median {:7.1} us/op   (best round {:7.1})",
        us(raw_median),
        us(raw_min)
    );
    println!(
        "capvirt domain.suspend/resume (host): median {:7.1} us/op   (best round {:7.1})",
        us(capvirt_median),
        us(capvirt_min)
    );
    println!(
        "ratio capvirt/raw: {:.3} (target <= 1.15); capvirt overhead {:.1} us/op",
        capvirt_median.as_secs_f64() / raw_median.as_secs_f64(),
        us(capvirt_median) - us(raw_median)
    );
    conn.call("domain.destroy", args).unwrap_or_else(|e| panic!("destroy: {e}"));
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Mean time per operation of `pairs` pairs (two operations each).
fn per_op(pairs: usize, mut pair: impl FnMut()) -> Duration {
    let started = Instant::now();
    for _ in 0..pairs {
        pair();
    }
    started.elapsed() / (2 * pairs as u32)
}

fn summary(rounds: &mut [Duration]) -> (Duration, Duration) {
    rounds.sort();
    (rounds[rounds.len() / 2], rounds[0])
}

/// The baseline: what an application speaking QMP by hand does, line-buffered reads and one
/// write per command, skipping event lines by prefix.
struct RawQmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl RawQmp {
    fn connect(path: &std::path::Path) -> RawQmp {
        let stream = UnixStream::connect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap_or_else(|e| panic!("{e}"));
        let writer = stream.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let mut raw = RawQmp { reader: BufReader::new(stream), writer, line: String::new() };
        raw.read_line(); // greeting
        raw.round_trip(b"{\"execute\":\"qmp_capabilities\"}\n");
        raw
    }

    fn read_line(&mut self) {
        self.line.clear();
        let n = self.reader.read_line(&mut self.line).unwrap_or_else(|e| panic!("QMP read: {e}"));
        assert!(n > 0, "QMP closed");
    }

    fn round_trip(&mut self, command: &[u8]) {
        self.writer.write_all(command).unwrap_or_else(|e| panic!("QMP write: {e}"));
        loop {
            self.read_line();
            if self.line.starts_with("{\"return\"") {
                return;
            }
            assert!(!self.line.starts_with("{\"error\""), "QMP error: {}", self.line);
        }
    }
}
