//! Container start and stop latency through the host library and the container driver, on
//! real bubblewrap sandboxes.
//!
//! `cargo bench -p capvirt-tests --bench container`. One round = `domain.start` (returns once
//! the container's init has executed: bwrap ran, its PID 1 and bwrap are in the cgroups, init
//! runs its program) then `domain.destroy` (returns once no process of the tree is left and
//! its cgroups are removed). Reference in the same run: a bare `bwrap` running `/bin/true` to
//! completion with the same namespaces and view, no cgroups, no capvirt.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use capvirt_host::{Host, HostConfig, Value};
use capvirt_tests::container::{container_plugin_dir, Sandbox};

const ROUNDS: usize = 60;
const WARMUP: usize = 5;

fn main() {
    // `cargo test --benches` runs bench binaries without `--bench`: containers only on demand.
    if !std::env::args().any(|a| a == "--bench") {
        println!("container bench: skipped (run it with `cargo bench -p capvirt-tests --bench container`)");
        return;
    }
    let sandbox = Sandbox::new();
    let host = Host::new(HostConfig { plugin_dirs: vec![container_plugin_dir().to_path_buf()], ..Default::default() })
        .unwrap_or_else(|e| panic!("host: {e}"));
    let conn = host.connect(&sandbox.uri("root"), false).unwrap_or_else(|e| panic!("connect: {e}"));
    let spec = Value::record([
        ("name", Value::from("bench")),
        ("memory_mib", Value::UInt(64)),
        ("vcpus", Value::UInt(1)),
        ("boot", Value::record([("init", Value::list([Value::from("/bin/sleep"), Value::from("1000")]))])),
    ]);
    conn.call("domain.define", Value::record([("spec", spec)])).unwrap_or_else(|e| panic!("define: {e}"));
    let version = conn
        .call("host.info", Value::Unit)
        .ok()
        .and_then(|info| info.get("hypervisor_version").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default();
    let args = Value::record([("domain", Value::from("bench"))]);

    let mut starts = Vec::with_capacity(ROUNDS);
    let mut destroys = Vec::with_capacity(ROUNDS);
    let mut bare = Vec::with_capacity(ROUNDS);
    for round in 0..WARMUP + ROUNDS {
        let t = Instant::now();
        conn.call("domain.start", args.clone()).unwrap_or_else(|e| panic!("start: {e}"));
        let started = t.elapsed();
        let t = Instant::now();
        conn.call("domain.destroy", args.clone()).unwrap_or_else(|e| panic!("destroy: {e}"));
        let destroyed = t.elapsed();
        let t = Instant::now();
        let status = Command::new("bwrap")
            .args(["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--hostname", "bare"])
            .args(["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib"])
            .args(["--symlink", "usr/lib64", "/lib64", "--ro-bind", "/etc", "/etc", "--tmpfs", "/tmp"])
            .args(["--proc", "/proc", "--dev", "/dev", "--", "/bin/true"])
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("bwrap: {e}"));
        let bare_run = t.elapsed();
        assert!(status.success(), "bare bwrap failed: {status}");
        if round >= WARMUP {
            starts.push(started);
            destroys.push(destroyed);
            bare.push(bare_run);
        }
    }
    println!("container bench: bubblewrap {version}, {ROUNDS} rounds (after {WARMUP} warm-up rounds)");
    report("start → init running (domain.start)", &mut starts);
    report("destroy → all processes gone, cgroups removed (domain.destroy)", &mut destroys);
    report("reference: bare bwrap running /bin/true to exit", &mut bare);
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!("{what}: median {:.2} ms, p10 {:.2} ms, p90 {:.2} ms", ms(at(0.5)), ms(at(0.1)), ms(at(0.9)));
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
