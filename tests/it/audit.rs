//! The audit log through the real CLI: records for every attempt, the caller's OS identity,
//! the hash chain and `capvirt audit verify`, and refusal of mutating calls that cannot be
//! audited (fail closed).

use std::fs;

use capvirt_host::{audit::AuditSetting, CallError, Host, HostConfig, Value};
use capvirt_tests::{test_plugin_dir, Run, Sandbox};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn ok(run: &Run) -> &str {
    assert_eq!(run.code, 0, "stderr: {}\nstdout: {}", run.stderr, run.stdout);
    &run.stdout
}

fn failed(run: &Run, code: i32) -> String {
    assert_eq!(run.code, code, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    run.stderr.trim_end().to_string()
}

/// A sandbox whose log holds `n` suspend calls (two records each: intent and outcome).
fn log_with_suspends(n: usize) -> Sandbox {
    let sb = Sandbox::new();
    for _ in 0..n {
        ok(&sb.capvirt(&["suspend", "test"]));
    }
    sb
}

fn log_lines(sb: &Sandbox) -> Vec<String> {
    let text = fs::read_to_string(sb.path("audit.jsonl")).unwrap_or_else(|e| panic!("read log: {e}"));
    text.lines().map(String::from).collect()
}

/// Writes `lines` (each with its newline) plus `tail` as `name` and verifies it.
fn verify_copy(sb: &Sandbox, name: &str, lines: &[String], tail: &str) -> Run {
    let text = lines.iter().map(|l| format!("{l}\n")).collect::<String>() + tail;
    let path = sb.write(name, &text);
    sb.capvirt(&["audit", "verify", &path])
}

#[test]
fn records_carry_seq_chain_and_the_real_uid_not_user() {
    let sb = Sandbox::new();
    ok(&sb.capvirt_env(&["suspend", "test"], &[("USER", "mallory"), ("LOGNAME", "mallory")]));
    failed(&sb.capvirt(&["-r", "destroy", "test"]), 3);
    let records = sb.audit_records();
    assert_eq!(records.len(), 3, "{records:?}");
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record["seq"], i as u64 + 1);
        assert_eq!(record["uid"], uid);
        assert_eq!(record["gid"], gid);
        assert_ne!(record["user"], "mallory");
        if uid == 0 {
            assert_eq!(record["user"], "root");
        }
    }
    assert_eq!(records[0]["prev"], GENESIS);
    assert_eq!(records[0]["event"], "intent");
    assert_eq!(records[0]["args"], serde_json::json!({"domain": "test"}));
    assert_eq!(records[1]["event"], "outcome");
    assert_eq!(records[1]["intent"], 1);
    assert_eq!(records[1]["outcome"], "ok");
    assert_eq!(records[2]["event"], "refused");
    assert_eq!(records[2]["outcome"], "denied");
    let mode = fs::metadata(sb.path("audit.jsonl")).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    assert_eq!(mode.map(|m| m & 0o777).ok(), Some(0o600));
    let verified = sb.capvirt(&["audit", "verify"]);
    assert!(ok(&verified).contains("3 records, hash chain intact"), "{}", verified.stdout);
}

#[test]
fn unknown_ids_and_invalid_arguments_are_recorded_bounded_and_redacted() {
    let sb = Sandbox::new();
    failed(&sb.capvirt(&["call", "domain.teleport", "--arg", "domain=test", "--arg", "password=hunter2"]), 3);
    failed(&sb.capvirt(&["call", "domain.suspend", "--arg", "domain=test", "--arg", "bogus=xyz"]), 2);
    let long = "x".repeat(5000);
    failed(&sb.capvirt(&["call", "domain.suspend", "--arg", &format!("domain={long}")]), 2);
    let records = sb.audit_records();
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(records[0]["event"], "refused");
    assert_eq!(records[0]["capability"], "domain.teleport");
    assert_eq!(records[0]["outcome"], "denied");
    assert_eq!(records[0]["args"], serde_json::json!({"domain": "test", "password": "[redacted]"}));
    assert_eq!(records[1]["capability"], "domain.suspend");
    assert_eq!(records[1]["outcome"], "failed");
    assert_eq!(records[1]["args"], serde_json::json!({"domain": "test", "bogus": "xyz"}));
    assert!(records[1]["error"].as_str().is_some_and(|e| e.contains("bogus")), "{}", records[1]);
    let domain = records[2]["args"]["domain"].as_str().unwrap_or_default();
    assert!(domain.len() < 300 && domain.contains("more bytes"), "{domain}");
    assert!(records[2]["error"].as_str().is_some_and(|e| e.len() < 1100), "{}", records[2]);
    let text = fs::read_to_string(sb.path("audit.jsonl")).unwrap_or_default();
    assert!(!text.contains("hunter2"));
    ok(&sb.capvirt(&["audit", "verify"]));
}

#[test]
fn verify_names_the_first_edited_deleted_inserted_reordered_or_cut_record() {
    let sb = log_with_suspends(3);
    let lines = log_lines(&sb);
    assert_eq!(lines.len(), 6);
    assert!(ok(&verify_copy(&sb, "intact.jsonl", &lines, "")).contains("6 records"));

    let mut edited = lines.clone();
    edited[2] = edited[2].replace("\"domain\":\"test\"", "\"domain\":\"web\"");
    assert_ne!(edited[2], lines[2]);
    let err = failed(&verify_copy(&sb, "edited.jsonl", &edited, ""), 1);
    assert!(err.contains("line 3 (seq 3): altered"), "{err}");

    let mut deleted = lines.clone();
    deleted.remove(1);
    let err = failed(&verify_copy(&sb, "deleted.jsonl", &deleted, ""), 1);
    assert!(err.contains("line 2 (seq 3)") && err.contains("deleted"), "{err}");

    let mut inserted = lines.clone();
    inserted.insert(2, lines[1].clone());
    let err = failed(&verify_copy(&sb, "inserted.jsonl", &inserted, ""), 1);
    assert!(err.contains("line 3 (seq 2)") && err.contains("inserted"), "{err}");

    let mut reordered = lines.clone();
    reordered.swap(2, 3);
    let err = failed(&verify_copy(&sb, "reordered.jsonl", &reordered, ""), 1);
    assert!(err.contains("line 3 (seq 4)"), "{err}");

    let err = failed(&verify_copy(&sb, "cut.jsonl", &lines[..5], &lines[5][..40]), 1);
    assert!(err.contains("line 6") && err.contains("cut tail"), "{err}");

    let missing = sb.path("missing.jsonl").display().to_string();
    failed(&sb.capvirt(&["audit", "verify", &missing]), 5);
}

#[test]
fn a_damaged_tail_stops_mutating_calls_until_the_log_is_moved_aside() {
    let sb = log_with_suspends(1);
    let path = sb.path("audit.jsonl");
    let text = fs::read_to_string(&path).unwrap_or_default();
    fs::write(&path, &text[..text.len() - 10]).unwrap_or_else(|e| panic!("{e}"));
    let err = failed(&sb.capvirt(&["suspend", "test"]), 1);
    assert!(err.contains("cannot be continued") && err.contains("audit.jsonl"), "{err}");
    ok(&sb.capvirt(&["dominfo", "test"]));
    fs::rename(&path, sb.path("audit.jsonl.damaged")).unwrap_or_else(|e| panic!("{e}"));
    ok(&sb.capvirt(&["suspend", "test"]));
    ok(&sb.capvirt(&["audit", "verify"]));
}

/// A log written before records were chained (by an earlier capvirt) is moved aside once and
/// a new chain started: an upgrade does not stop every mutating call.
#[test]
fn a_log_from_before_chaining_is_moved_aside_and_a_new_chain_started() {
    let sb = Sandbox::new();
    let path = sb.path("audit.jsonl");
    let legacy = "{\"timestamp\":\"2026-11-25T09:46:48Z\",\"message\":\"audit\",\"capability\":\"domain.define\",\"outcome\":\"ok\"}\n";
    fs::write(&path, legacy.repeat(3)).unwrap_or_else(|e| panic!("{e}"));
    ok(&sb.capvirt(&["suspend", "test"]));
    assert!(ok(&sb.capvirt(&["audit", "verify"])).contains("2 records"));
    let aside: Vec<_> = fs::read_dir(path.parent().unwrap_or(&path))
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("audit.jsonl.pre-chain-"))
        .collect();
    assert_eq!(aside.len(), 1, "the old log is kept beside the new one");
    assert_eq!(fs::read_to_string(aside[0].path()).unwrap_or_default(), legacy.repeat(3));
}

#[test]
fn concurrent_processes_extend_one_chain() {
    let sb = Sandbox::new();
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..6).map(|_| scope.spawn(|| sb.capvirt(&["suspend", "test"]))).collect();
        for run in runs {
            ok(&run.join().unwrap_or_else(|_| panic!("thread panicked")));
        }
    });
    assert!(ok(&sb.capvirt(&["audit", "verify"])).contains("12 records"));
}

#[test]
fn mutating_calls_are_refused_before_the_driver_when_the_log_cannot_be_written() {
    let sb = Sandbox::new();
    let blocker = sb.write("not-a-dir", "");
    let unwritable = format!("{blocker}/audit.jsonl");
    let saved = sb.path("saved.toml").display().to_string();
    let run = sb.capvirt_env(&["save", "test", &saved], &[("CAPVIRT_AUDIT_LOG", &unwritable)]);
    let err = failed(&run, 1);
    assert!(err.contains(&unwritable) && err.contains("Not a directory") && err.contains("not called"), "{err}");
    assert!(!sb.path("saved.toml").exists(), "the driver ran although the call could not be audited");
    // Reading works without a log.
    let info = sb.capvirt_env(&["dominfo", "test"], &[("CAPVIRT_AUDIT_LOG", &unwritable)]);
    assert!(ok(&info).contains("running"));

    // Discarding records is not a way out.
    for sink in ["/dev/null", "/dev/full"] {
        let err = failed(&sb.capvirt(&["--audit-log", sink, "suspend", "test"]), 1);
        assert!(err.contains(sink) && err.contains("not a regular file"), "{err}");
    }

    // A user's config cannot let calls through unaudited…
    fs::create_dir_all(sb.path("capvirt")).unwrap_or_else(|e| panic!("{e}"));
    sb.write("capvirt/config.toml", "[audit]\nfail_open = true\n");
    let err = failed(&sb.capvirt_env(&["save", "test", &saved], &[("CAPVIRT_AUDIT_LOG", &unwritable)]), 2);
    assert!(err.contains("[audit] is set only by root") && err.contains("/etc/capvirt/capvirt.toml"), "{err}");
    assert!(!sb.path("saved.toml").exists());
    fs::remove_file(sb.path("capvirt/config.toml")).unwrap_or_else(|e| panic!("{e}"));
    // …only root's system config can, and the call says so.
    fs::create_dir_all(sb.path("etc")).unwrap_or_else(|e| panic!("{e}"));
    sb.write("etc/capvirt.toml", "[audit]\nfail_open = true\n");
    let sysconf = sb.path("etc").display().to_string();
    let run = sb.capvirt_env(
        &["save", "test", &saved],
        &[("CAPVIRT_AUDIT_LOG", &unwritable), ("CAPVIRT_SYSCONFDIR", &sysconf)],
    );
    ok(&run);
    assert!(run.stderr.contains("unaudited"), "{}", run.stderr);
    assert!(sb.path("saved.toml").exists());
}

#[test]
fn the_library_refuses_unaudited_mutations_and_leaves_the_domain_unchanged() {
    let sb = Sandbox::new();
    let host = |audit| {
        Host::new(HostConfig { plugin_dirs: vec![test_plugin_dir().to_path_buf()], audit, ..Default::default() })
            .unwrap_or_else(|e| panic!("host: {e}"))
    };
    let uri = "test:///audit-fail-closed";
    let setup = host(AuditSetting::Off).connect(uri, false).unwrap_or_else(|e| panic!("{e}"));
    let spec = Value::record([("name", Value::from("vm1")), ("memory_mib", Value::Int(64)), ("vcpus", Value::Int(1))]);
    setup.call("domain.define", Value::record([("spec", spec)])).unwrap_or_else(|e| panic!("{e}"));
    setup.call("domain.start", Value::record([("domain", "vm1")])).unwrap_or_else(|e| panic!("{e}"));

    let blocked = sb.path("audit.jsonl").join("x");
    fs::write(sb.path("audit.jsonl"), "").unwrap_or_else(|e| panic!("{e}"));
    let closed = host(AuditSetting::Log { path: Some(blocked), fail_open: false });
    let conn = closed.connect(uri, false).unwrap_or_else(|e| panic!("{e}"));
    let err = conn.call("domain.suspend", Value::record([("domain", "vm1")])).expect_err("refused");
    assert!(matches!(err, CallError::AuditUnavailable { .. }), "{err}");
    let info = conn.call("domain.info", Value::record([("domain", "vm1")])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.get("state").and_then(Value::as_str), Some("running"));
}

#[test]
fn an_overriding_registry_cannot_turn_auditing_off() {
    let sb = Sandbox::new();
    let copy = sb.path("registry");
    crate::cli::copy_dir(&capvirt_tests::workspace_root().join("proposals"), &copy);
    let proposal = copy.join("capabilities/domain.suspend.toml");
    let text = fs::read_to_string(&proposal).unwrap_or_else(|e| panic!("{e}"));
    assert!(text.contains("\nmutates = true\n"));
    fs::write(&proposal, text.replace("\nmutates = true\n", "\nmutates = false\n")).unwrap_or_else(|e| panic!("{e}"));
    ok(&sb.capvirt(&["--registry", &copy.display().to_string(), "suspend", "test"]));
    let events: Vec<String> =
        sb.audit_records().iter().map(|r| format!("{} {}", r["event"], r["capability"])).collect();
    assert_eq!(events, [r#""intent" "domain.suspend""#, r#""outcome" "domain.suspend""#]);
}

#[test]
fn a_system_connection_is_audited_where_root_configured_not_where_the_caller_says() {
    let sb = Sandbox::with_plugins(capvirt_tests::qemu::qemu_plugin_dir().to_path_buf());
    fs::create_dir_all(sb.path("etc")).unwrap_or_else(|e| panic!("{e}"));
    let system_log = sb.path("system-audit.jsonl").display().to_string();
    sb.write("etc/capvirt.toml", &format!("[audit]\npath = \"{system_log}\"\n"));
    let sysconf = sb.path("etc").display().to_string();
    let uri = format!("qemu:///system?root={}", sb.path("state").display());
    let mine = sb.path("mine.jsonl").display().to_string();

    let refused =
        sb.capvirt_env(&["--audit-log", &mine, "-c", &uri, "suspend", "vm1"], &[("CAPVIRT_SYSCONFDIR", &sysconf)]);
    let err = failed(&refused, 2);
    assert!(err.contains("--audit-log") && err.contains(&system_log) && err.contains("capvirt.toml"), "{err}");
    assert!(!sb.path("mine.jsonl").exists() && !sb.path("system-audit.jsonl").exists());

    // The harness's CAPVIRT_AUDIT_LOG is ignored; the attempt is in root's log.
    let run = sb.capvirt_env(&["-c", &uri, "suspend", "vm1"], &[("CAPVIRT_SYSCONFDIR", &sysconf)]);
    failed(&run, 5);
    assert!(sb.audit_records().is_empty(), "the caller's log got a system connection's records");
    let text = fs::read_to_string(&system_log).unwrap_or_else(|e| panic!("{system_log}: {e}"));
    let events: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}")))
        .map(|r| format!("{} {} {}", r["event"], r["capability"], r["outcome"]))
        .collect();
    assert_eq!(events, [r#""intent" "domain.suspend" null"#, r#""outcome" "domain.suspend" "failed""#]);
    // Naming the configured file itself is fine.
    failed(
        &sb.capvirt_env(
            &["--audit-log", &system_log, "-c", &uri, "suspend", "vm1"],
            &[("CAPVIRT_SYSCONFDIR", &sysconf)],
        ),
        5,
    );
}
