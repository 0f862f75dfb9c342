//! `capvirt plugin verify PATH.so`: a plugin's conformance to the registry, for vendors. The
//! work happens in [`capvirt_host::verify`]; this file parses arguments and prints the report. The
//! hidden `plugin verify-child` is the child process the verifier re-executes itself as.

use std::{io::Write, path::PathBuf, time::Duration};

use clap::{Arg, ArgMatches, Command};

use crate::{args, context::Context, opt_string, output, CliError, OutputFormat};
use capvirt_host::verify::{self, suite, Report, VerifyOptions, CHILD_SUBCOMMAND};

/// Default bound of a whole verification (a QEMU plugin starts real processes).
const DEFAULT_TIMEOUT_SECS: u64 = 300;

pub fn cli() -> Command {
    let uri = || {
        Arg::new("uri").long("uri").value_name("URI").help(
            "Connection to verify on [default: per the plugin's scheme: test:///capvirt-verify-PID, \
         qemu:///session?root=PRIVATE-DIR, else SCHEME:///capvirt-verify]",
        )
    };
    let spec = || {
        Arg::new("spec")
            .long("spec")
            .value_name("FILE")
            .help("Domain spec (TOML) for the scratch domains; its name is replaced [default: 1 vCPU, no disks]")
    };
    Command::new("plugin")
        .about("Vendor tools: verify a plugin file against the registry")
        .subcommand_required(true)
        .subcommand(
            Command::new("verify")
                .about("Check a plugin file against the registry: loading, manifest, and every capability's contract")
                .long_about(
                    "Loads PATH in a child process (a crash is reported, not fatal), runs the loader's checks, \
                     reports every declared capability, then calls each one through the host's dispatch path \
                     with result checking on, running the `[contract]` cases of its proposal against scratch \
                     domains. Exits 1 when anything fails, one line per failure.",
                )
                .arg(Arg::new("path").value_name("PATH.so").required(true).help("The plugin file"))
                .arg(uri())
                .arg(spec())
                .arg(
                    Arg::new("timeout")
                        .long("timeout")
                        .value_name("SECS")
                        .value_parser(clap::value_parser!(u64).range(1..))
                        .help("Bound of the whole run; the child is killed after it [default: 300]"),
                )
                .arg(super::proposal::format_arg()),
        )
        .subcommand(
            Command::new(CHILD_SUBCOMMAND).hide(true).arg(Arg::new("dir").required(true)).arg(uri()).arg(spec()),
        )
}

pub fn exec(m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    match m.subcommand() {
        Some(("verify", sub)) => verify(sub, ctx),
        Some((CHILD_SUBCOMMAND, sub)) => child(sub, ctx),
        _ => Err(CliError::usage("expected `plugin verify PATH.so`")),
    }
}

fn verify(m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    let path = PathBuf::from(opt_string(m, "path").unwrap_or_default());
    if !path.is_file() {
        return Err(CliError::usage(format!("{} is not a file", path.display())));
    }
    let spec = opt_string(m, "spec").map(PathBuf::from);
    if let Some(spec) = &spec {
        // Read once here so a bad file is a usage error, not a failure inside the child.
        args::read_toml_file("spec", spec)?;
    }
    let exe =
        std::env::current_exe().map_err(|e| CliError::other(format!("cannot locate the capvirt executable: {e}")))?;
    let global_args = match &ctx.globals.registry_dir {
        Some(dir) => vec!["--registry".to_string(), dir.display().to_string()],
        None => Vec::new(),
    };
    let options = VerifyOptions {
        plugin: path,
        exe,
        global_args,
        uri: opt_string(m, "uri"),
        spec,
        timeout: Duration::from_secs(m.get_one::<u64>("timeout").copied().unwrap_or(DEFAULT_TIMEOUT_SECS)),
    };
    let report = verify::verify(&options).map_err(|e| CliError::other(e.to_string()))?;
    match super::proposal::report_format(m, ctx) {
        OutputFormat::Json => {
            let mut value = serde_json::to_value(&report).unwrap_or_default();
            if let Some(object) = value.as_object_mut() {
                object.insert("passed".into(), report.passed().into());
                object.insert("failures".into(), report.failures().into());
            }
            output::print(&output::json_value(&value));
        }
        OutputFormat::Table => output::print(&render(&report)),
    }
    let failures = report.failures().len();
    match (failures, report.passed()) {
        (0, true) => Ok(()),
        (0, false) => Err(CliError::other("plugin verify: the plugin could not be verified")),
        (1, _) => Err(CliError::other("plugin verify: 1 failure")),
        (n, _) => Err(CliError::other(format!("plugin verify: {n} failures"))),
    }
}

/// The report for people: the manifest, each declared capability, a summary, each failure.
fn render(report: &Report) -> String {
    let mut text = format!("Plugin file: {}\n", report.plugin);
    if let Some(m) = &report.manifest {
        text.push_str(&format!(
            "Plugin: {} {} by {} (registry {}), schemes: {}\n",
            m.name,
            m.version,
            m.vendor,
            m.registry_version,
            m.schemes.join(", ")
        ));
    }
    if !report.capabilities.is_empty() {
        text.push_str("Declared capabilities:\n");
        let width = report.capabilities.iter().map(|c| c.id.len()).max().unwrap_or(0);
        for c in &report.capabilities {
            text.push_str(&format!("  {:width$}  v{}  {}: {}\n", c.id, c.version, c.status.as_str(), c.detail));
        }
    }
    if let Some(uri) = &report.uri {
        text.push_str(&format!("Conformance suite on {uri}\n"));
    }
    let skipped = report.checks.iter().filter(|c| c.skipped).count();
    let passed = report.checks.iter().filter(|c| c.passed && !c.skipped).count();
    let failed = report.checks.iter().filter(|c| !c.passed).count();
    text.push_str(&format!("Checks: {passed} passed, {skipped} skipped, {failed} failed\n"));
    for check in report.checks.iter().filter(|c| c.skipped) {
        text.push_str(&format!("skip {}\n", one_line(&check.line())));
    }
    for line in report.failures() {
        text.push_str(&format!("FAIL {}\n", one_line(&line)));
    }
    text
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The child: loads the copy in `dir`, runs the suite, writes one JSON event per line.
fn child(m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    let dir = PathBuf::from(opt_string(m, "dir").unwrap_or_default());
    let spec = match opt_string(m, "spec") {
        Some(path) => Some(args::read_toml_file("spec", std::path::Path::new(&path))?),
        None => None,
    };
    // Made and removed by the parent, so nothing is left behind when this process dies.
    let scratch = dir.join(verify::RUN_DIR);
    // The registry source is the CLI's (an unreviewed `--registry DIR` is hardened as the
    // host does) and its calls are audited like every CLI call; the rest are the defaults.
    let audit = ctx.audit_setting()?;
    let registry = match &ctx.globals.registry_dir {
        Some(dir) => capvirt_host::host::RegistrySource::Dir(dir.clone()),
        None => capvirt_host::host::RegistrySource::Embedded,
    };
    let system = ctx.system()?;
    let base = capvirt_host::host::HostConfig {
        registry,
        audit,
        policy: capvirt_host::policy::Policy { access: system.access.clone(), ..Default::default() },
        image_allow: system.config.images.allow.clone(),
        qemu_user: system.config.qemu.user.clone(),
        ..Default::default()
    };
    let options = suite::SuiteOptions { plugin_dir: &dir, uri: opt_string(m, "uri"), spec, scratch: &scratch, base };
    let mut emit = |event: verify::Event| {
        if let Ok(line) = serde_json::to_string(&event) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    };
    suite::run(std::sync::Arc::clone(&ctx.registry), &options, &mut emit);
    Ok(())
}
