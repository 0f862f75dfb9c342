//! Define-to-console-marker time of the test guest (`tests/guest/build`) under TCG: from the
//! `domain.define` call, through `domain.start`, to `domain.console-read` first showing the
//! guest's `CAPVIRT-GUEST-READY` line (polled every 20 ms), through the host library and the
//! QEMU driver. Each round defines a fresh domain on a fresh raw disk and destroys it after.
//!
//! Then snapshot create and revert times (`domain.snapshot-create`, `domain.snapshot-revert`)
//! of one booted guest on a qcow2 disk: each round takes a snapshot of the running guest,
//! reverts to it and deletes it; the boot above is what a revert replaces.
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
    guest();
    let sandbox = Sandbox::new();
    let uri = sandbox.uri("root", "&accel=tcg");
    let enabled = ["domain.console-read", "domain.snapshot-create", "domain.snapshot-revert", "domain.snapshot-delete"];
    let policy = Policy { enabled: enabled.iter().map(|id| id.to_string()).collect(), ..Default::default() };
    let host =
        Host::new(HostConfig { plugin_dirs: vec![qemu_plugin_dir().to_path_buf()], policy, ..Default::default() })
            .unwrap_or_else(|e| panic!("host: {e}"));
    let conn = host.connect(&uri, false).unwrap_or_else(|e| panic!("connect: {e}"));
    let mut times = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let name = format!("bench{round}");
        let disk = sandbox.blank_image(&name, "raw");
        let spec = guest_spec(&name, &disk, "raw");
        let domain = Value::record([("domain", Value::string(&name))]);
        let started = Instant::now();
        conn.call("domain.define", Value::record([("spec", spec)])).unwrap_or_else(|e| panic!("define: {e}"));
        conn.call("domain.start", domain.clone()).unwrap_or_else(|e| panic!("start: {e}"));
        wait_ready(&conn, &name, started);
        let took = started.elapsed();
        times.push(took);
        eprintln!("round {round}: {:.2} s", took.as_secs_f64());
        conn.call("domain.destroy", domain.clone()).unwrap_or_else(|e| panic!("destroy: {e}"));
        conn.call("domain.undefine", domain).unwrap_or_else(|e| panic!("undefine: {e}"));
    }
    println!(
        "define → {GUEST_READY} on the console, {} rounds, {} under TCG: {}",
        ROUNDS,
        under_test().banner,
        summary(&mut times)
    );

    // Snapshots of one booted guest on a qcow2 disk.
    let name = "snap";
    let disk = sandbox.blank_image(name, "qcow2");
    let domain = Value::record([("domain", Value::string(name))]);
    conn.call("domain.define", Value::record([("spec", guest_spec(name, &disk, "qcow2"))]))
        .unwrap_or_else(|e| panic!("define: {e}"));
    conn.call("domain.start", domain.clone()).unwrap_or_else(|e| panic!("start: {e}"));
    wait_ready(&conn, name, Instant::now());
    let (mut creates, mut reverts) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
    for round in 0..ROUNDS {
        let snapshot = Value::record([("domain", Value::from(name)), ("name", Value::string(&format!("s{round}")))]);
        let started = Instant::now();
        conn.call("domain.snapshot-create", snapshot.clone()).unwrap_or_else(|e| panic!("snapshot-create: {e}"));
        creates.push(started.elapsed());
        let started = Instant::now();
        conn.call("domain.snapshot-revert", snapshot.clone()).unwrap_or_else(|e| panic!("snapshot-revert: {e}"));
        reverts.push(started.elapsed());
        eprintln!(
            "snapshot round {round}: create {:.3} s, revert {:.3} s",
            creates[round].as_secs_f64(),
            reverts[round].as_secs_f64()
        );
        conn.call("domain.snapshot-delete", snapshot).unwrap_or_else(|e| panic!("snapshot-delete: {e}"));
    }
    let state = conn.call("domain.info", domain.clone()).unwrap_or_else(|e| panic!("info: {e}"));
    assert_eq!(state.get("state").and_then(Value::as_str), Some("running"), "the guest runs on after the reverts");
    println!("snapshot-create of the running guest (128 MiB), {ROUNDS} rounds: {}", summary(&mut creates));
    println!("snapshot-revert of the running guest (128 MiB), {ROUNDS} rounds: {}", summary(&mut reverts));
    conn.call("domain.destroy", domain.clone()).unwrap_or_else(|e| panic!("destroy: {e}"));
    conn.call("domain.undefine", domain).unwrap_or_else(|e| panic!("undefine: {e}"));
}

/// Median, min and max.
fn summary(times: &mut [Duration]) -> String {
    times.sort();
    let secs = |d: Duration| d.as_secs_f64();
    format!(
        "median {:.3} s, min {:.3} s, max {:.3} s",
        secs(times[times.len() / 2]),
        secs(times[0]),
        secs(times[times.len() - 1])
    )
}

/// Polls the console of `name` until the guest's READY line shows.
fn wait_ready(conn: &capvirt_host::Connection, name: &str, started: Instant) {
    let mut offset = 0;
    let mut seen = Vec::new();
    loop {
        let args = Value::record([("domain", Value::string(name)), ("offset", Value::UInt(offset))]);
        let read = conn.call("domain.console-read", args).unwrap_or_else(|e| panic!("console-read: {e}"));
        seen.extend_from_slice(read.get("data").and_then(Value::as_bytes).unwrap_or_default());
        offset = read.get("next_offset").and_then(Value::as_u64).unwrap_or(offset);
        if seen.windows(GUEST_READY.len()).any(|w| w == GUEST_READY.as_bytes()) {
            return;
        }
        assert!(started.elapsed() < BOUND, "no {GUEST_READY} within {BOUND:?}: {}", String::from_utf8_lossy(&seen));
        thread::sleep(POLL);
    }
}

/// The test guest on one virtio disk of `format`, with a user-mode interface.
fn guest_spec(name: &str, disk: &std::path::Path, format: &'static str) -> Value {
    let guest = guest();
    let path = |p: &std::path::Path| Value::string(p.to_str().unwrap_or_default());
    let forward =
        Value::record([("host_port", Value::UInt(u64::from(free_local_port()))), ("guest_port", Value::UInt(80))]);
    Value::record([
        ("name", Value::string(name)),
        ("memory_mib", Value::UInt(128)),
        ("vcpus", Value::UInt(1)),
        (
            "disks",
            Value::list([Value::record([
                ("path", path(disk)),
                ("format", Value::from(format)),
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
    ])
}
