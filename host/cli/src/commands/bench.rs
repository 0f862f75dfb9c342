//! `capvirt bench call CAPABILITY [--arg k=v]… [--clients N] [--calls M]`: a load generator
//! in the manner of redis-benchmark. Each client has its own connection (its own socket on a
//! remote URI) and thread; every call takes the normal dispatch path.

use std::time::{Duration, Instant};

use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};

use crate::{commands::call, context::Context, output, CliError, OutputFormat};
use capvirt_host::host::Connection;

pub fn cli() -> Command {
    Command::new("bench")
        .about("Measure calls per second and latency against the selected URI")
        .subcommand_required(true)
        .subcommand(
            Command::new("call")
                .about("Call one capability repeatedly from parallel clients; print calls/s and latency percentiles")
                .arg(
                    Arg::new("capability")
                        .value_name("CAPABILITY")
                        .required(true)
                        .help("Capability id, e.g. domain.info"),
                )
                .arg(
                    Arg::new("arg")
                        .long("arg")
                        .short('a')
                        .value_name("KEY=VALUE")
                        .action(ArgAction::Append)
                        .help("An argument (repeatable), as for `capvirt call`"),
                )
                .arg(
                    Arg::new("clients")
                        .long("clients")
                        .short('n')
                        .value_name("N")
                        .value_parser(value_parser!(u32).range(1..=1024))
                        .default_value("1")
                        .help("Parallel clients, each with its own connection"),
                )
                .arg(
                    Arg::new("calls")
                        .long("calls")
                        .value_name("M")
                        .value_parser(value_parser!(u64).range(1..=100_000_000))
                        .default_value("10000")
                        .help("Measured calls in all (split across the clients)"),
                )
                .arg(
                    Arg::new("warmup")
                        .long("warmup")
                        .value_name("W")
                        .value_parser(value_parser!(u64).range(0..=10_000_000))
                        .default_value("100")
                        .help("Unmeasured calls per client first"),
                ),
        )
}

pub fn exec(m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    let Some(("call", m)) = m.subcommand() else {
        return Err(CliError::usage("expected `capvirt bench call CAPABILITY`"));
    };
    let id = m.get_one::<String>("capability").cloned().unwrap_or_default();
    let registry = std::sync::Arc::clone(&ctx.registry);
    let args = call::arg_record(&registry, &id, m)?;
    let clients = m.get_one::<u32>("clients").copied().unwrap_or(1) as usize;
    let calls = m.get_one::<u64>("calls").copied().unwrap_or(10_000);
    let warmup = m.get_one::<u64>("warmup").copied().unwrap_or(0);
    let connections: Vec<Connection> = (0..clients).map(|_| ctx.connect()).collect::<Result<_, _>>()?;
    // One call first: a refusal is reported as such, not as a benchmark of refusals.
    connections[0].call(&id, args.clone())?;
    let per_client: Vec<u64> =
        (0..clients as u64).map(|i| calls / clients as u64 + u64::from(i < calls % clients as u64)).collect();
    let started = Instant::now();
    let results: Vec<Result<Vec<u64>, CliError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = connections
            .iter()
            .zip(&per_client)
            .map(|(conn, &count)| {
                let args = &args;
                let id = &id;
                scope.spawn(move || -> Result<Vec<u64>, CliError> {
                    for _ in 0..warmup {
                        conn.call(id, args.clone())?;
                    }
                    let mut latencies = Vec::with_capacity(usize::try_from(count.min(1 << 20)).unwrap_or(0));
                    for _ in 0..count {
                        let call_started = Instant::now();
                        conn.call(id, args.clone())?;
                        latencies.push(u64::try_from(call_started.elapsed().as_nanos()).unwrap_or(u64::MAX));
                    }
                    Ok(latencies)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err(CliError::other("a client thread panicked"))))
            .collect()
    });
    let elapsed = started.elapsed();
    let mut latencies = Vec::new();
    for result in results {
        latencies.extend(result?);
    }
    latencies.sort_unstable();
    let report = Report::new(&latencies, elapsed);
    let uri = ctx.globals.uri();
    match ctx.output() {
        OutputFormat::Json => output::print(&output::json_value(&serde_json::json!({
            "capability": id,
            "uri": uri,
            "clients": clients,
            "calls": latencies.len(),
            "seconds": elapsed.as_secs_f64(),
            "calls_per_second": report.calls_per_second,
            "latency_us": { "mean": report.mean, "p50": report.p50, "p90": report.p90, "p99": report.p99, "max": report.max },
        }))),
        OutputFormat::Table => output::print(&format!(
            "====== {id} on {uri} ======\n  {} calls, {clients} parallel client{}, completed in {:.3} s\n  \
             calls/s: {:.0}\n  latency (µs): mean {:.2}  p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}\n",
            latencies.len(),
            if clients == 1 { "" } else { "s" },
            elapsed.as_secs_f64(),
            report.calls_per_second,
            report.mean,
            report.p50,
            report.p90,
            report.p99,
            report.max,
        )),
    }
    Ok(())
}

/// Throughput and latency percentiles (µs) of sorted latencies (ns).
struct Report {
    calls_per_second: f64,
    mean: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Report {
    fn new(sorted_ns: &[u64], elapsed: Duration) -> Report {
        let us = |ns: u64| ns as f64 / 1000.0;
        // Nearest-rank percentile.
        let pct = |p: f64| {
            let rank = ((p / 100.0) * sorted_ns.len() as f64).ceil() as usize;
            sorted_ns.get(rank.saturating_sub(1)).copied().map_or(0.0, us)
        };
        let total: u128 = sorted_ns.iter().map(|&n| u128::from(n)).sum();
        Report {
            calls_per_second: sorted_ns.len() as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
            mean: if sorted_ns.is_empty() { 0.0 } else { total as f64 / sorted_ns.len() as f64 / 1000.0 },
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
            max: sorted_ns.last().copied().map_or(0.0, us),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let ns: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        let report = Report::new(&ns, Duration::from_secs(2));
        assert_eq!((report.p50, report.p90, report.p99, report.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(report.calls_per_second, 50.0);
        assert_eq!(report.mean, 50.5);
    }
}
