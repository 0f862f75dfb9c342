//! `capvirt plugin verify`, through the real CLI: the in-tree test driver conforms, a lying
//! fixture is caught lie by lie, one line each, and a plugin that aborts inside `invoke` is
//! reported with its signal without taking the verifier down.

use capvirt_tests::{artifacts, Run, Sandbox};

fn verify(args: &[&str], mode: Option<&str>) -> Run {
    let sb = Sandbox::new();
    let mut argv = vec!["plugin", "verify"];
    argv.extend_from_slice(args);
    match mode {
        Some(mode) => sb.capvirt_env(&argv, &[("CAPVIRT_FIXTURE_MODE", mode)]),
        None => sb.capvirt(&argv),
    }
}

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}\n{}", run.stdout, run.stderr))
}

fn path_of(path: &std::path::Path) -> String {
    path.display().to_string()
}

#[test]
fn the_test_driver_passes_and_every_declared_capability_is_called() {
    let plugin = path_of(&artifacts().test_plugin);
    let run = verify(&[&plugin, "--format", "json"], None);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let report = json(&run);
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["failures"], serde_json::json!([]));
    assert!(report["uri"].as_str().unwrap_or_default().starts_with("test:///capvirt-verify-"), "{report:#}");
    let checks = report["checks"].as_array().cloned().unwrap_or_default();
    let declared = report["capabilities"].as_array().cloned().unwrap_or_default();
    assert!(declared.len() >= 18, "{report:#}");
    for capability in &declared {
        assert_eq!(capability["status"], "accepted", "{capability}");
        let id = capability["id"].as_str().unwrap_or_default();
        assert!(
            checks.iter().any(|c| c["capability"] == id && c["passed"] == true && c["skipped"] == false),
            "{id} was never called: {report:#}"
        );
    }
    // The contract clauses of the proposals ran: suspend twice, info of an unknown domain,
    // define of an invalid spec, block stats monotonic, undefine of a running domain.
    for (capability, clause) in [
        ("domain.suspend", "case 2 (given paused, expect invalid-state)"),
        ("domain.info", "case 4 (given unknown-domain, expect not-found)"),
        ("domain.define", "case 3 (given invalid-spec, expect invalid-argument)"),
        ("domain.block-stats", "monotonic (rd_req, rd_bytes, wr_req, wr_bytes, errs)"),
        ("domain.undefine", "case 2 (given running, expect invalid-state)"),
    ] {
        assert!(
            checks.iter().any(|c| c["capability"] == capability && c["clause"] == clause && c["passed"] == true),
            "{capability}: {clause} did not pass: {report:#}"
        );
    }

    let text = verify(&[&plugin], None);
    assert_eq!(text.code, 0, "{}\n{}", text.stdout, text.stderr);
    assert!(text.stdout.contains(" passed, 0 skipped, 0 failed\n"), "{}", text.stdout);
    assert!(!text.stdout.contains("FAIL"), "{}", text.stdout);
}

#[test]
fn a_lying_plugin_fails_with_one_precise_line_per_lie() {
    let plugin = path_of(&artifacts().fixture_plugin);
    let run = verify(&[&plugin], Some("liar"));
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.stderr, "error: plugin verify: 6 failures\n");
    let failures: Vec<&str> = run.stdout.lines().filter(|l| l.starts_with("FAIL ")).collect();
    let expected = [
        "FAIL domain.suspnd: manifest: not in registry",
        "FAIL domain.reboot: case 1 (given running, expect ok): expected ok, got unsupported",
        "FAIL domain.reboot: case 2 (given shut off, expect invalid-state): expected invalid-state, got unsupported",
        "FAIL domain.reboot: case 3 (given unknown-domain, expect not-found): expected not-found, got unsupported",
        "FAIL domain.resume: case 2 (given running, expect invalid-state): expected invalid-state, got driver-failure",
        "FAIL host.info: case 1 (given running, expect ok): expected ok, got malformed-result",
    ];
    assert_eq!(failures.len(), expected.len(), "{}", run.stdout);
    for (line, prefix) in failures.iter().zip(expected) {
        assert!(line.starts_with(prefix), "{line:?} should start with {prefix:?}\n{}", run.stdout);
    }
    assert!(failures[0].ends_with("did you mean `domain.suspend`?"), "{}", failures[0]);
    assert!(run.stdout.contains("domain.suspnd    v1  unknown:"), "{}", run.stdout);

    let report = json(&verify(&[&plugin, "--format", "json"], Some("liar")));
    assert_eq!(report["passed"], false);
    assert_eq!(report["failures"].as_array().map(Vec::len), Some(6), "{report:#}");
    let suspnd = report["capabilities"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == "domain.suspnd").cloned())
        .unwrap_or_default();
    assert_eq!(suspnd["status"], "unknown", "{report:#}");
}

#[test]
fn a_plugin_that_aborts_inside_invoke_is_reported_not_fatal() {
    let plugin = path_of(&artifacts().fixture_plugin);
    let run = verify(&[&plugin, "--format", "json"], Some("abort"));
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    let report = json(&run);
    assert_eq!(
        report["crashed"],
        "domain.list: case 1 (given running, expect ok): plugin crashed: killed by signal 6 (SIGABRT)",
        "{report:#}"
    );
    // What ran before the crash is kept.
    assert!(report["checks"].as_array().is_some_and(|c| !c.is_empty()), "{report:#}");
    assert!(report["manifest"]["name"] == "fixture", "{report:#}");

    // The private copy and the child's scratch files are removed although the child died.
    let sb = Sandbox::new();
    let tmp = sb.path("tmp");
    std::fs::create_dir(&tmp).unwrap_or_else(|e| panic!("{e}"));
    let tmp_text = path_of(&tmp);
    let run =
        sb.capvirt_env(&["plugin", "verify", &plugin], &[("CAPVIRT_FIXTURE_MODE", "abort"), ("TMPDIR", &tmp_text)]);
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains(
            "FAIL domain.list: case 1 (given running, expect ok): plugin crashed: killed by signal 6 (SIGABRT)"
        ),
        "{}",
        run.stdout
    );
    let left: Vec<_> =
        std::fs::read_dir(&tmp).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_plugin_without_lifecycle_capabilities_skips_what_it_cannot_set_up() {
    // The default fixture declares list, info (which panics) and host.info (malformed).
    let plugin = path_of(&artifacts().fixture_plugin);
    let run = verify(&[&plugin], Some("panic"));
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("skip domain.list: case 1 (given running, expect ok): skipped: the plugin does not implement domain.define, domain.start"), "{}", run.stdout);
    assert!(
        run.stdout.contains(
            "FAIL domain.info: case 4 (given unknown-domain, expect not-found): expected not-found, got internal"
        ),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("FAIL host.info: called once (no runnable contract case): answered malformed-result"),
        "{}",
        run.stdout
    );
}

#[test]
fn files_that_are_not_plugins_are_refused_with_the_loader_reason() {
    let sb = Sandbox::new();
    let file = sb.write("libcapvirt_driver_text.so", "#!/bin/sh\necho not a library\n");
    let run = sb.capvirt(&["plugin", "verify", &file]);
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    let fail: Vec<&str> = run.stdout.lines().filter(|l| l.starts_with("FAIL ")).collect();
    assert_eq!(fail.len(), 1, "{}", run.stdout);
    assert!(fail[0].starts_with("FAIL (plugin): load: refused: "), "{}", fail[0]);
    assert!(fail[0].contains("not a shared library"), "{}", fail[0]);

    let missing = sb.capvirt(&["plugin", "verify", "/nonexistent/libx.so"]);
    assert_eq!(missing.code, 2, "{}", missing.stderr);
    assert_eq!(missing.stderr, "error: /nonexistent/libx.so is not a file\n");
}

#[test]
fn the_qemu_driver_passes_on_a_real_qemu_with_a_given_spec() {
    let qemu = capvirt_tests::qemu::Sandbox::new();
    let disk = qemu.boot_disk("verify-disk");
    let spec = qemu.write(
        "verify-spec.toml",
        &format!(
            "name = \"ignored\"\nmemory_mib = 64\nvcpus = 1\n\n[[disks]]\npath = \"{}\"\nformat = \"qcow2\"\nbus = \"virtio\"\n",
            disk.display()
        ),
    );
    let uri = qemu.uri("verify-root", "&accel=tcg");
    let plugin = path_of(&artifacts().qemu_plugin);
    let spec = path_of(&spec);
    let run = verify(&[&plugin, "--uri", &uri, "--spec", &spec, "--timeout", "240", "--format", "json"], None);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let report = json(&run);
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["uri"], uri.as_str());
    let checks = report["checks"].as_array().cloned().unwrap_or_default();
    assert!(checks.iter().all(|c| c["skipped"] == false), "{report:#}");
    assert!(
        checks.iter().any(|c| c["capability"] == "domain.suspend"
            && c["clause"] == "case 1 (given running, expect ok)"
            && c["detail"] == "ok, then paused"),
        "{report:#}"
    );
}

#[test]
fn declared_capabilities_are_classified_even_when_the_plugin_is_refused() {
    let plugin = path_of(&artifacts().fixture_plugin);
    let status = |report: &serde_json::Value, id: &str| {
        report["capabilities"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["id"] == id).cloned())
            .unwrap_or_else(|| panic!("{id} not reported: {report:#}"))
    };

    let rejected = verify(&[&plugin, "--format", "json"], Some("rejected"));
    assert_eq!(rejected.code, 1, "{}\n{}", rejected.stdout, rejected.stderr);
    let report = json(&rejected);
    assert_eq!(status(&report, "domain.monitor-command")["status"], "rejected", "{report:#}");
    assert_eq!(status(&report, "domain.list")["status"], "accepted", "{report:#}");
    let failures = report["failures"].as_array().cloned().unwrap_or_default();
    assert_eq!(failures.len(), 1, "{report:#}");
    assert!(
        failures[0]
            .as_str()
            .unwrap_or_default()
            .starts_with("(plugin): load: refused: implements `domain.monitor-command`"),
        "{report:#}"
    );

    let unknown = json(&verify(&[&plugin, "--format", "json"], Some("unknown")));
    let teleport = status(&unknown, "domain.teleport");
    assert_eq!(teleport["status"], "unknown", "{unknown:#}");
    assert!(!teleport["detail"].as_str().unwrap_or_default().contains("did you mean"), "{teleport}");

    // A plugin for a newer registry minor: what this host cannot call is reported, not failed.
    let newer = verify(&[&plugin, "--format", "json"], Some("newer"));
    let report = json(&newer);
    let hibernate = status(&report, "domain.hibernate");
    assert_eq!(hibernate["status"], "not-callable", "{report:#}");
    assert!(hibernate["detail"].as_str().unwrap_or_default().contains("targets newer registry 1.9.0"), "{hibernate}");
    let info = status(&report, "domain.info");
    assert_eq!(info["status"], "newer-contract", "{report:#}");
    assert_eq!(info["version"], 2);
    assert!(
        report["failures"]
            .as_array()
            .is_some_and(|f| f.iter().all(|l| !l.as_str().unwrap_or_default().contains("hibernate"))),
        "{report:#}"
    );

    let major = verify(&[&plugin], Some("major"));
    assert_eq!(major.code, 1, "{}", major.stdout);
    assert!(major.stdout.contains("FAIL (plugin): load: refused: built against registry 2.0.0"), "{}", major.stdout);
}
