//! Define-to-console-marker time of the test guest (`tests/guest/build`) under TCG: from the
//! `domain.define` call, through `domain.start`, to `domain.console-read` first showing the
//! guest's `CAPVIRT-GUEST-READY` line (polled every 20 ms), through the host library and the
//! QEMU driver. Each round defines a fresh domain on a fresh raw disk and destroys it after.
//!
//! `cargo bench -p capvirt-tests --bench guest` (`CAPVIRT_TEST_QEMU` picks the QEMU, and
//! `CAPVIRT_TEST_GUEST` a built guest, as for the tests).

use std::{
    thread,
    time::{Duration, Instant},
};

use capvirt_host::{policy::Policy, Host, HostConfig, Value};
use capvirt_tests::qemu::{free_local_port, guest, qemu_plugin_dir, under_test, Sandbox, GUEST_CMDLINE, GUEST_READY};

const ROUNDS: usize = 10;
const POLL: Duration = Duration::from_millis(20);
const BOUND: Duration = Duration::from_secs(180);

fn main() {
    // `cargo test --benches` runs bench binaries without `--bench`: QEMU only on demand.
    if !std::env::args().any(|a| a == "--bench") {
        println!("guest bench: skipped (run it with `cargo bench -p capvirt-tests --bench guest`)");
        return;
    }
    let guest = guest();
    let sandbox = Sandbox::new();
    let uri = sandbox.uri("root", "&accel=tcg");
    let policy = Policy { enabled: ["domain.console-read".to_string()].into_iter().collect(), ..Default::default() };
    let host =
        Host::new(HostConfig { plugin_dirs: vec![qemu_plugin_dir().to_path_buf()], policy, ..Default::default() })
            .unwrap_or_else(|e| panic!("host: {e}"));
    let conn = host.connect(&uri, false).unwrap_or_else(|e| panic!("connect: {e}"));
    let path = |p: &std::path::Path| Value::string(p.to_str().unwrap_or_default());
    let mut times = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let name = format!("bench{round}");
        let disk = sandbox.blank_image(&name, "raw");
        let forward =
            Value::record([("host_port", Value::UInt(u64::from(free_local_port()))), ("guest_port", Value::UInt(80))]);
        let spec = Value::record([
            ("name", Value::string(&name)),
            ("memory_mib", Value::UInt(128)),
            ("vcpus", Value::UInt(1)),
            (
                "disks",
                Value::list([Value::record([
                    ("path", path(&disk)),
                    ("format", Value::from("raw")),
                    ("bus", Value::from("virtio")),
                ])]),
            ),
            (
                "boot",
                Value::record([
                    ("kernel", path(&guest.kernel)),
                    ("initrd", path(&guest.initrd)),
                    ("cmdline", Value::from(GUEST_CMDLINE)),
                ]),
            ),
            (
                "interfaces",
                Value::list([Value::record([("kind", Value::from("user")), ("forwards", Value::list([forward]))])]),
            ),
        ]);
        let domain = Value::record([("domain", Value::string(&name))]);
        let started = Instant::now();
        conn.call("domain.define", Value::record([("spec", spec)])).unwrap_or_else(|e| panic!("define: {e}"));
        conn.call("domain.start", domain.clone()).unwrap_or_else(|e| panic!("start: {e}"));
        let mut offset = 0;
        let mut seen = Vec::new();
        loop {
            let args = Value::record([("domain", Value::string(&name)), ("offset", Value::UInt(offset))]);
            let read = conn.call("domain.console-read", args).unwrap_or_else(|e| panic!("console-read: {e}"));
            seen.extend_from_slice(read.get("data").and_then(Value::as_bytes).unwrap_or_default());
            offset = read.get("next_offset").and_then(Value::as_u64).unwrap_or(offset);
            if seen.windows(GUEST_READY.len()).any(|w| w == GUEST_READY.as_bytes()) {
                break;
            }
            assert!(started.elapsed() < BOUND, "no {GUEST_READY} within {BOUND:?}: {}", String::from_utf8_lossy(&seen));
            thread::sleep(POLL);
        }
        let took = started.elapsed();
        times.push(took);
        eprintln!("round {round}: {:.2} s", took.as_secs_f64());
        conn.call("domain.destroy", domain.clone()).unwrap_or_else(|e| panic!("destroy: {e}"));
        conn.call("domain.undefine", domain).unwrap_or_else(|e| panic!("undefine: {e}"));
    }
    times.sort();
    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "define → {GUEST_READY} on the console, {} rounds, {} under TCG: median {:.2} s, min {:.2} s, max {:.2} s",
        ROUNDS,
        under_test().banner,
        secs(times[ROUNDS / 2]),
        secs(times[0]),
        secs(times[ROUNDS - 1])
    );
}
