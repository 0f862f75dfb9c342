//! Plugin discovery and load-time checks: bad files and bad plugins are refused with a
//! reason, one bad plugin never stops the others, and a panicking plugin cannot take the
//! host down.

use std::{fs, path::PathBuf};

use capvirt_host::{CallError, ErrorKind, Host, HostConfig, Value};
use capvirt_tests::{artifacts, plugin_dir, set_mode, Run, Sandbox};

/// Some real shared library that is not a capvirt plugin.
fn foreign_shared_library() -> PathBuf {
    ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6", "/lib64/libm.so.6"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no libm.so.6 found to use as a foreign shared library"))
}

/// The JSON listing of a run of `capvirt plugins` in which some plugin was refused (exit 1).
fn plugins_json(run: &Run) -> Vec<serde_json::Value> {
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("refused (reason"), "{}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

#[test]
fn bad_files_are_refused_and_the_good_plugin_still_loads() {
    let libm = foreign_shared_library();
    let dir =
        plugin_dir(&[("libcapvirt_driver_test.so", &artifacts().test_plugin), ("libcapvirt_driver_libm.so", &libm)]);
    install(dir.path(), "libcapvirt_driver_empty.so", b"");
    install(dir.path(), "libcapvirt_driver_text.so", b"#!/bin/sh\necho not a library\n");
    install(dir.path(), "README.txt", b"ignored: not named like a plugin");
    let sb = Sandbox::with_plugins(dir.path().to_path_buf());

    let listed = plugins_json(&sb.capvirt(&["-o", "json", "plugins"]));
    let status = |file: &str| {
        listed
            .iter()
            .find(|p| p["path"].as_str().is_some_and(|path| path.ends_with(file)))
            .unwrap_or_else(|| panic!("{file} not listed: {listed:?}"))
            .clone()
    };
    assert_eq!(listed.len(), 4, "{listed:?}");
    assert_eq!(status("libcapvirt_driver_test.so")["status"], "loaded");
    let libm = status("libcapvirt_driver_libm.so");
    assert_eq!(libm["status"], "refused");
    assert!(libm["reason"].as_str().unwrap_or_default().contains("not a capvirt plugin"), "{libm}");
    assert!(status("libcapvirt_driver_empty.so")["reason"].as_str().unwrap_or_default().contains("empty file"));
    assert!(status("libcapvirt_driver_text.so")["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("not a shared library"));

    let table = sb.capvirt(&["plugins"]);
    assert_eq!(table.code, 1, "{}", table.stderr);
    assert_eq!(table.stderr, "error: 3 plugins were refused (reasons above)\n");
    assert!(table.stdout.contains("refused: empty file"), "{}", table.stdout);
    let list = sb.capvirt(&["list"]);
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert!(list.stdout.contains("test"));
}

fn fixture_sandbox() -> Sandbox {
    let dir = plugin_dir(&[
        ("libcapvirt_driver_test.so", &artifacts().test_plugin),
        ("libcapvirt_driver_fixture.so", &artifacts().fixture_plugin),
    ]);
    Sandbox::with_plugin_dir(dir)
}

#[test]
fn a_plugin_implementing_a_rejected_capability_is_refused() {
    let sb = fixture_sandbox();
    let listed = plugins_json(&sb.capvirt_env(&["-o", "json", "plugins"], &[("CAPVIRT_FIXTURE_MODE", "rejected")]));
    let fixture = listed.iter().find(|p| p["name"] == "fixture").unwrap_or_else(|| panic!("{listed:?}"));
    assert_eq!(fixture["status"], "refused");
    assert!(fixture["reason"].as_str().unwrap_or_default().contains("domain.monitor-command"), "{fixture}");
    let run = sb.capvirt_env(&["-c", "fixture:///x", "list"], &[("CAPVIRT_FIXTURE_MODE", "rejected")]);
    assert_eq!(run.code, 4, "{}", run.stderr);
    assert!(run.stderr.contains("refused plugins"), "{}", run.stderr);
    // The good plugin beside it is unaffected.
    assert_eq!(sb.capvirt_env(&["list"], &[("CAPVIRT_FIXTURE_MODE", "rejected")]).code, 0);
}

#[test]
fn unknown_capabilities_are_ignored_with_a_warning_and_never_callable() {
    let sb = fixture_sandbox();
    let env = [("CAPVIRT_FIXTURE_MODE", "unknown")];
    let run = sb.capvirt_env(&["-c", "fixture:///x", "capabilities"], &env);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("warning: plugin `fixture`: capability `domain.teleport` ignored"), "{}", run.stderr);
    assert!(run.stdout.contains("ignored: domain.teleport"), "{}", run.stdout);
    let call = sb.capvirt_env(&["-c", "fixture:///x", "call", "domain.teleport"], &env);
    assert_eq!(call.code, 3, "{}", call.stderr);
    assert_eq!(sb.capvirt_env(&["-c", "fixture:///x", "list"], &env).code, 0);
}

#[test]
fn a_plugin_built_against_another_registry_major_is_refused() {
    let sb = fixture_sandbox();
    let listed = plugins_json(&sb.capvirt_env(&["-o", "json", "plugins"], &[("CAPVIRT_FIXTURE_MODE", "major")]));
    let fixture = listed.iter().find(|p| p["name"] == "fixture").unwrap_or_else(|| panic!("{listed:?}"));
    assert_eq!(fixture["status"], "refused");
    assert!(fixture["reason"].as_str().unwrap_or_default().contains("registry 2.0.0"), "{fixture}");
}

#[test]
fn an_error_kind_from_a_later_plugin_api_is_a_driver_failure_naming_its_code() {
    // ErrorKind is an open numeric code (plugin-api 2.0): a plugin built against a later 2.y
    // may answer a kind this host does not know. In process and through an isolated child, it
    // arrives intact, exits 1 and names the code beside the plugin's message.
    let sb = fixture_sandbox();
    for isolate in [false, true] {
        let mut argv = vec!["-c", "fixture:///x", "dominfo", "vm1"];
        if isolate {
            argv.insert(0, "--isolate");
        }
        let run = sb.capvirt_env(&argv, &[("CAPVIRT_FIXTURE_MODE", "later-kind")]);
        assert_eq!(run.code, 1, "isolate={isolate}: {}", run.stderr);
        assert!(
            run.stderr.contains("unknown error kind (code 4242): the domain is hibernating"),
            "isolate={isolate}: {}",
            run.stderr
        );
    }
}

#[test]
fn a_panic_while_connecting_is_an_error_not_a_crash() {
    let sb = fixture_sandbox();
    let run = sb.capvirt_env(&["-c", "fixture:///x", "list"], &[("CAPVIRT_FIXTURE_MODE", "connect-panic")]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("driver panicked: fixture refuses to connect"), "{}", run.stderr);
}

#[test]
fn a_panicking_method_is_reported_and_the_host_keeps_working() {
    let dir = plugin_dir(&[
        ("libcapvirt_driver_test.so", &artifacts().test_plugin),
        ("libcapvirt_driver_fixture.so", &artifacts().fixture_plugin),
    ]);
    let host = Host::new(HostConfig { plugin_dirs: vec![dir.path().to_path_buf()], ..Default::default() })
        .unwrap_or_else(|e| panic!("{e}"));
    let fixture = host.connect("fixture:///x", false).unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..3 {
        let err = fixture.call("domain.info", Value::record([("domain", "x")])).expect_err("panics");
        match &err {
            CallError::Driver { error, .. } => {
                assert_eq!(error.kind, ErrorKind::Internal);
                assert!(error.message.contains("fixture panics in domain.info"), "{err}");
            }
            other => panic!("unexpected {other}"),
        }
    }
    // The same plugin and the others keep working.
    assert!(fixture.call("domain.list", Value::Unit).is_ok());
    let test = host.connect("test:///default", false).unwrap_or_else(|e| panic!("{e}"));
    assert!(test.call("domain.info", Value::record([("domain", "test")])).is_ok());
    // A capability the plugin does not declare is refused by the host, not sent.
    let err = fixture.call("domain.suspend", Value::record([("domain", "x")])).expect_err("undeclared");
    assert!(matches!(err, CallError::NotImplemented { .. }), "{err}");
}

#[test]
fn malformed_results_are_caught_by_default() {
    let dir = plugin_dir(&[("libcapvirt_driver_fixture.so", &artifacts().fixture_plugin)]);
    let host = Host::new(HostConfig {
        plugin_dirs: vec![dir.path().to_path_buf()],
        check_results: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let conn = host.connect("fixture:///x", false).unwrap_or_else(|e| panic!("{e}"));
    let err = conn.call("host.info", Value::Unit).expect_err("malformed");
    assert!(matches!(err, CallError::MalformedResult { .. }), "{err}");
    // The library and the CLI check by default.
    assert!(HostConfig::default().check_results);
    let sb = Sandbox::with_plugins(dir.path().to_path_buf());
    let run = sb.capvirt(&["-c", "fixture:///x", "nodeinfo"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("returned a malformed result for `host.info`"), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
}

#[test]
fn two_plugins_cannot_serve_the_same_scheme() {
    let test = &artifacts().test_plugin;
    let dir = plugin_dir(&[("libcapvirt_driver_a.so", test), ("libcapvirt_driver_b.so", test)]);
    let sb = Sandbox::with_plugins(dir.path().to_path_buf());
    let listed = plugins_json(&sb.capvirt(&["-o", "json", "plugins"]));
    assert_eq!(listed.iter().filter(|p| p["status"] == "loaded").count(), 1, "{listed:?}");
    let refused = listed.iter().find(|p| p["status"] == "refused").unwrap_or_else(|| panic!("{listed:?}"));
    assert!(refused["reason"].as_str().unwrap_or_default().contains("already loaded"), "{refused}");
}

#[test]
fn plugin_dir_option_overrides_the_environment() {
    let empty = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let sb = Sandbox::with_plugins(empty.path().to_path_buf());
    let without = sb.capvirt(&["list"]);
    assert_eq!(without.code, 4, "{}", without.stderr);
    assert!(without.stderr.contains("no plugins found"), "{}", without.stderr);
    let dir = capvirt_tests::test_plugin_dir().display().to_string();
    assert_eq!(sb.capvirt(&["--plugin-dir", &dir, "list"]).code, 0);
}

/// Writes `bytes` as `name` in `dir` with mode 0644 (group and others cannot write).
fn install(dir: &std::path::Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    set_mode(&path, 0o644);
}

/// The entry of `listed` whose path ends with `file`.
fn entry<'a>(listed: &'a [serde_json::Value], file: &str) -> &'a serde_json::Value {
    listed
        .iter()
        .find(|p| p["path"].as_str().is_some_and(|path| path.ends_with(file)))
        .unwrap_or_else(|| panic!("{file} not listed: {listed:?}"))
}

fn reason(entry: &serde_json::Value) -> &str {
    entry["reason"].as_str().unwrap_or_default()
}

/// `capvirt -o json plugins`, whatever its exit code.
fn listing(sb: &Sandbox, extra: &[&str]) -> (Run, Vec<serde_json::Value>) {
    let mut args = extra.to_vec();
    args.extend(["-o", "json", "plugins"]);
    let run = sb.capvirt(&args);
    let listed = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {} {}", run.stdout, run.stderr));
    (run, listed)
}

/// The good plugin beside refused files keeps serving calls, through the CLI and the library.
fn assert_test_plugin_serves(sb: &Sandbox, dirs: &[PathBuf]) {
    let list = sb.capvirt(&["list"]);
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert!(list.stdout.contains("test"), "{}", list.stdout);
    let dominfo = sb.capvirt(&["dominfo", "test"]);
    assert_eq!(dominfo.code, 0, "{}", dominfo.stderr);
    let host =
        Host::new(HostConfig { plugin_dirs: dirs.to_vec(), ..Default::default() }).unwrap_or_else(|e| panic!("{e}"));
    let conn = host.connect("test:///default", false).unwrap_or_else(|e| panic!("{e}"));
    assert!(conn.call("domain.info", Value::record([("domain", "test")])).is_ok());
}

#[test]
fn truncated_copies_of_a_real_plugin_are_refused_and_never_crash_the_host() {
    let real = fs::read(&artifacts().test_plugin).unwrap_or_else(|e| panic!("{e}"));
    let len = real.len();
    let dir = plugin_dir(&[("libcapvirt_driver_test.so", &artifacts().test_plugin)]);
    let mut cuts = vec![1_000, 20_000, 100_000, 400_000, 1_000_000, len / 2, len - 4096, len - 8, len - 1];
    cuts.retain(|cut| *cut < len);
    for cut in &cuts {
        install(dir.path(), &format!("libcapvirt_driver_cut{cut}.so"), &real[..*cut]);
    }
    let sb = Sandbox::with_plugins(dir.path().to_path_buf());
    let (run, listed) = listing(&sb, &[]);
    assert_eq!(run.code, 1, "not 135 (SIGBUS): {}", run.stderr);
    assert_eq!(run.stderr, format!("error: {} plugins were refused (reasons above)\n", cuts.len()));
    assert_eq!(entry(&listed, "libcapvirt_driver_test.so")["status"], "loaded", "{listed:?}");
    for cut in &cuts {
        let cut_entry = entry(&listed, &format!("libcapvirt_driver_cut{cut}.so"));
        assert_eq!(cut_entry["status"], "refused", "{cut_entry}");
        assert!(reason(cut_entry).contains("truncated or corrupt"), "cut at {cut} of {len}: {cut_entry}");
    }
    assert_test_plugin_serves(&sb, &[dir.path().to_path_buf()]);
}

#[test]
fn a_directory_named_like_a_plugin_is_refused() {
    let dir = plugin_dir(&[("libcapvirt_driver_test.so", &artifacts().test_plugin)]);
    fs::create_dir(dir.path().join("libcapvirt_driver_x.so")).unwrap_or_else(|e| panic!("{e}"));
    let sb = Sandbox::with_plugins(dir.path().to_path_buf());
    let (_, listed) = listing(&sb, &[]);
    let x = entry(&listed, "libcapvirt_driver_x.so");
    assert_eq!(x["status"], "refused");
    assert_eq!(reason(x), "is a directory, not a plugin file", "{x}");
    assert_test_plugin_serves(&sb, &[dir.path().to_path_buf()]);
}

#[test]
fn plugins_that_group_or_others_can_write_are_refused() {
    let test = &artifacts().test_plugin;
    let dir = plugin_dir(&[("libcapvirt_driver_test.so", test), ("libcapvirt_driver_gw.so", test)]);
    set_mode(&dir.path().join("libcapvirt_driver_gw.so"), 0o775);
    // A group other users are in (nobody's primary group): its members could swap the file.
    std::os::unix::fs::chown(dir.path().join("libcapvirt_driver_gw.so"), None, Some(SHARED_GID))
        .unwrap_or_else(|e| panic!("chown: {e}"));
    // A directory others can write: everything in it is refused, even a good plugin.
    let open_dir = plugin_dir(&[("libcapvirt_driver_other.so", test)]);
    set_mode(open_dir.path(), 0o777);
    std::os::unix::fs::chown(open_dir.path(), None, Some(SHARED_GID)).unwrap_or_else(|e| panic!("chown: {e}"));
    // A link to a file in that directory is refused too: whoever can write there can swap it.
    let target = open_dir.path().join("libcapvirt_driver_other.so");
    std::os::unix::fs::symlink(&target, dir.path().join("libcapvirt_driver_link.so")).unwrap_or_else(|e| panic!("{e}"));
    let sb = Sandbox::with_plugins(dir.path().to_path_buf());
    let dirs = [dir.path().to_path_buf(), open_dir.path().to_path_buf()];
    let (_, listed) =
        listing(&sb, &["--plugin-dir", &dirs[0].display().to_string(), "--plugin-dir", &dirs[1].display().to_string()]);
    assert_eq!(entry(&listed, "libcapvirt_driver_test.so")["status"], "loaded", "{listed:?}");
    let gw = entry(&listed, "libcapvirt_driver_gw.so");
    assert_eq!(gw["status"], "refused");
    assert!(reason(gw).starts_with("file "), "{gw}");
    assert!(reason(gw).ends_with("libcapvirt_driver_gw.so is writable by group (mode 0775; `chmod go-w` it)"), "{gw}");
    let other = entry(&listed, "libcapvirt_driver_other.so");
    assert_eq!(other["status"], "refused");
    assert_eq!(
        reason(other),
        format!("directory {} is writable by group and others (mode 0777; `chmod go-w` it)", dirs[1].display()),
        "{other}"
    );
    let link = entry(&listed, "libcapvirt_driver_link.so");
    let real_dir = fs::canonicalize(open_dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        reason(link),
        format!("directory {} is writable by group and others (mode 0777; `chmod go-w` it)", real_dir.display()),
        "{link}"
    );
    assert_test_plugin_serves(&sb, &dirs);
}

/// `nogroup`: the primary group of `nobody`, so never private to root.
const SHARED_GID: u32 = 65534;

/// Where umask is 002, build directories are writable by the user's private group (Debian's
/// OpenSSH allows that too): a plugin there loads.
#[test]
fn a_group_holding_only_the_owner_may_write() {
    let test = &artifacts().test_plugin;
    let dir = plugin_dir(&[("libcapvirt_driver_test.so", test)]);
    set_mode(dir.path(), 0o775);
    set_mode(&dir.path().join("libcapvirt_driver_test.so"), 0o775);
    let sb = Sandbox::with_plugins(dir.path().to_path_buf());
    let (_, listed) = listing(&sb, &["--plugin-dir", &dir.path().display().to_string()]);
    let owner_group = fs::metadata(dir.path()).map(|m| std::os::unix::fs::MetadataExt::gid(&m)).unwrap_or(0);
    // The test runs as root (CI) or as a user whose files get their private group.
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let shared = passwd.lines().filter(|l| l.split(':').nth(3) == Some(&owner_group.to_string())).count() > 1;
    let expected = if shared { "refused" } else { "loaded" };
    assert_eq!(entry(&listed, "libcapvirt_driver_test.so")["status"], expected, "{listed:?}");
}

#[test]
fn plugins_exits_zero_only_when_nothing_was_refused() {
    let sb = Sandbox::new();
    let run = sb.capvirt(&["plugins"]);
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{}", run.stdout);
    assert!(run.stdout.contains("loaded (25 capabilities)"), "{}", run.stdout);
}

#[test]
fn misnamed_shared_libraries_get_a_rename_hint() {
    let test = &artifacts().test_plugin;
    let libm = foreign_shared_library();
    let dir = plugin_dir(&[
        ("libcapvirt_driver_test.so", test),
        ("libfoo.so", test),
        ("capvirt_driver_bar.so", test),
        // Not a plugin at all: no advice to rename it.
        ("libm.so", &libm),
    ]);
    let sb = Sandbox::with_plugins(dir.path().to_path_buf());
    let (run, listed) = listing(&sb, &[]);
    assert_eq!(run.code, 0, "misnamed files are not refusals: {}", run.stderr);
    assert_eq!(listed.len(), 3, "libm.so is not listed: {listed:?}");
    let foo = entry(&listed, "/libfoo.so");
    assert_eq!(foo["status"], "ignored");
    assert_eq!(
        reason(foo),
        "not named libcapvirt_driver_*.so, so not loaded: rename it to libcapvirt_driver_foo.so to load it"
    );
    assert!(reason(entry(&listed, "/capvirt_driver_bar.so")).contains("rename it to libcapvirt_driver_bar.so"));
    let table = sb.capvirt(&["plugins"]);
    assert!(table.stdout.contains("ignored: not named libcapvirt_driver_*.so"), "{}", table.stdout);
}

#[test]
fn a_missing_plugin_dir_is_a_usage_error_naming_it() {
    let sb = Sandbox::new();
    let missing = sb.path("no-such-dir");
    let missing = missing.display().to_string();
    for command in [&["plugins"][..], &["list"][..]] {
        let mut args = vec!["--plugin-dir", missing.as_str()];
        args.extend(command);
        let run = sb.capvirt(&args);
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert!(run.stderr.contains(&format!("plugin directory {missing} does not exist")), "{}", run.stderr);
    }
}

#[test]
fn a_panicking_manifest_is_refused_with_its_panic_message() {
    let sb = fixture_sandbox();
    let listed =
        plugins_json(&sb.capvirt_env(&["-o", "json", "plugins"], &[("CAPVIRT_FIXTURE_MODE", "manifest-panic")]));
    let fixture = entry(&listed, "libcapvirt_driver_fixture.so");
    assert_eq!(fixture["status"], "refused");
    assert!(reason(fixture).starts_with("manifest() panicked: fixture cannot describe itself"), "{fixture}");
    assert_eq!(sb.capvirt_env(&["list"], &[("CAPVIRT_FIXTURE_MODE", "manifest-panic")]).code, 0);
}

#[test]
fn a_pinned_plugin_that_changed_is_refused_until_pinned_again() {
    let sb = fixture_sandbox();
    let config = sb.path("capvirt/config.toml");
    let pin = sb.capvirt(&["plugins", "--pin"]);
    assert_eq!(pin.code, 0, "{}", pin.stderr);
    assert!(
        pin.stdout.contains(&format!("Pinned the SHA-256 of 2 plugin file(s) in {}.", config.display())),
        "{}",
        pin.stdout
    );
    let text = fs::read_to_string(&config).unwrap_or_else(|e| panic!("{e}"));
    let fixture = fs::canonicalize(sb.plugins.join("libcapvirt_driver_fixture.so")).unwrap_or_else(|e| panic!("{e}"));
    assert!(text.contains(&format!("\"{}\" = \"sha256:", fixture.display())), "{text}");
    assert_eq!(sb.capvirt(&["plugins"]).code, 0);

    // Still a valid shared object, but not the file that was pinned.
    let mut changed = fs::read(&fixture).unwrap_or_else(|e| panic!("{e}"));
    changed.extend_from_slice(b"tampered");
    fs::write(&fixture, &changed).unwrap_or_else(|e| panic!("{e}"));
    let (run, listed) = listing(&sb, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let refused = entry(&listed, "libcapvirt_driver_fixture.so");
    assert_eq!(refused["status"], "refused");
    assert!(reason(refused).starts_with("its SHA-256 changed since it was pinned (pinned sha256:"), "{refused}");
    assert_eq!(entry(&listed, "libcapvirt_driver_test.so")["status"], "loaded");
    assert_eq!(sb.capvirt(&["-c", "fixture:///x", "list"]).code, 4);
    assert_test_plugin_serves(&sb, std::slice::from_ref(&sb.plugins));

    // Re-pinning accepts the file as it is now.
    assert_eq!(sb.capvirt(&["plugins", "--pin"]).code, 1, "this run still refused it");
    let (run, listed) = listing(&sb, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(entry(&listed, "libcapvirt_driver_fixture.so")["status"], "loaded", "{listed:?}");
}

// ---------------------------------------------------------------------------------------------
// The manifest cache: `-c URI` loads only the plugin serving URI's scheme.

/// The manifest cache file of a sandbox (`$XDG_CACHE_HOME/capvirt/plugins-*.json`), if written.
fn cache_file(sb: &Sandbox) -> Option<PathBuf> {
    let dir = fs::read_dir(sb.path("capvirt")).ok()?;
    dir.filter_map(Result::ok).map(|e| e.path()).find(|p| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("plugins-") && n.ends_with(".json"))
    })
}

/// The warning a full discovery prints for the fixture in `unknown` mode: seeing it means the
/// fixture was loaded, not seeing it that only the plugin serving the URI was.
const FIXTURE_LOADED: &str = "warning: plugin `fixture`: capability `domain.teleport` ignored";

#[test]
fn a_cached_run_loads_only_the_plugin_serving_the_uri_and_answers_the_same() {
    let sb = fixture_sandbox();
    let env = [("CAPVIRT_FIXTURE_MODE", "unknown")];
    assert_eq!(cache_file(&sb), None);
    let uncached = sb.capvirt_env(&["dominfo", "test"], &env);
    assert_eq!(uncached.code, 0, "{}", uncached.stderr);
    assert!(uncached.stderr.contains(FIXTURE_LOADED), "no cache yet: every plugin loads: {}", uncached.stderr);
    let cache = cache_file(&sb).unwrap_or_else(|| panic!("no cache written under {}", sb.path("capvirt").display()));
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&cache).map(|m| m.permissions().mode() & 0o777).unwrap_or_default();
    assert_eq!(mode, 0o600, "{}", cache.display());

    let cached = sb.capvirt_env(&["dominfo", "test"], &env);
    assert_eq!((cached.code, &cached.stdout), (0, &uncached.stdout), "{}", cached.stderr);
    assert!(!cached.stderr.contains(FIXTURE_LOADED), "the fixture was loaded: {}", cached.stderr);
    // The plugin served from the cache is admitted on its real manifest: its own warnings stay.
    let fixture = sb.capvirt_env(&["-c", "fixture:///x", "list"], &env);
    assert_eq!(fixture.code, 0, "{}", fixture.stderr);
    assert!(fixture.stderr.contains(FIXTURE_LOADED), "{}", fixture.stderr);
    // Errors are the same too.
    let missing = sb.capvirt_env(&["dominfo", "no-such-domain"], &env);
    fs::remove_file(&cache).unwrap_or_else(|e| panic!("{e}"));
    let missing_uncached = sb.capvirt_env(&["dominfo", "no-such-domain"], &env);
    let without_fixture = |stderr: &str| {
        stderr.lines().filter(|l| !l.starts_with("warning: plugin `fixture`")).collect::<Vec<_>>().join("\n")
    };
    assert_eq!(missing.code, 5, "{}", missing.stderr);
    assert_eq!(
        (missing_uncached.code, without_fixture(&missing_uncached.stderr)),
        (5, missing.stderr.trim_end().to_string())
    );
    // `capvirt plugins` loads everything, with or without a cache.
    let first = sb.capvirt_env(&["-o", "json", "plugins"], &env);
    let second = sb.capvirt_env(&["-o", "json", "plugins"], &env);
    assert_eq!((first.code, second.code), (0, 0), "{} {}", first.stderr, second.stderr);
    assert_eq!(first.stdout, second.stdout);
    assert!(second.stdout.contains("domain.teleport"), "{}", second.stdout);
    assert!(second.stderr.contains(FIXTURE_LOADED), "{}", second.stderr);
}

#[test]
fn a_replaced_plugin_file_is_noticed() {
    let dir = plugin_dir(&[("libcapvirt_driver_a.so", &artifacts().test_plugin)]);
    let sb = Sandbox::with_plugin_dir(dir);
    assert_eq!(sb.capvirt(&["list"]).code, 0);
    assert!(cache_file(&sb).is_some());
    assert_eq!(sb.capvirt(&["list"]).code, 0, "served from the cache");
    // Same name, new content: the fixture, which serves `fixture://` only.
    let file = sb.plugins.join("libcapvirt_driver_a.so");
    let fixture = fs::read(&artifacts().fixture_plugin).unwrap_or_else(|e| panic!("{e}"));
    install(&sb.plugins, "libcapvirt_driver_a.so.new", &fixture);
    fs::rename(sb.plugins.join("libcapvirt_driver_a.so.new"), &file).unwrap_or_else(|e| panic!("{e}"));
    let stale = sb.capvirt(&["list"]);
    assert_eq!(stale.code, 4, "{}", stale.stderr);
    assert!(stale.stderr.contains("served schemes: fixture"), "{}", stale.stderr);
    assert_eq!(sb.capvirt(&["-c", "fixture:///x", "list"]).code, 0);
    // Rewritten in place (same inode), the test driver again.
    fs::write(&file, fs::read(&artifacts().test_plugin).unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sb.capvirt(&["-c", "fixture:///x", "list"]).code, 4);
    assert_eq!(sb.capvirt(&["list"]).code, 0);
}

#[test]
fn a_corrupt_cache_is_ignored_and_rewritten() {
    let sb = fixture_sandbox();
    let env = [("CAPVIRT_FIXTURE_MODE", "unknown")];
    assert_eq!(sb.capvirt_env(&["list"], &env).code, 0);
    let cache = cache_file(&sb).unwrap_or_else(|| panic!("no cache written"));
    let good = fs::read(&cache).unwrap_or_else(|e| panic!("{e}"));
    for corrupt in [&b""[..], b"{\"format\": 1, \"host\"", b"\xff\xfe not json", &good[..good.len() / 2]] {
        fs::write(&cache, corrupt).unwrap_or_else(|e| panic!("{e}"));
        let run = sb.capvirt_env(&["list"], &env);
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert!(run.stderr.contains(FIXTURE_LOADED), "a corrupt cache cannot answer: {}", run.stderr);
        let rewritten = fs::read(&cache).unwrap_or_else(|e| panic!("{e}"));
        assert!(serde_json::from_slice::<serde_json::Value>(&rewritten).is_ok(), "not rewritten");
        let cached = sb.capvirt_env(&["list"], &env);
        assert!(!cached.stderr.contains(FIXTURE_LOADED), "{}", cached.stderr);
    }
    // A cache naming a file that does not serve the scheme makes no difference either: the
    // file is checked and admitted on its real manifest.
    let text = String::from_utf8_lossy(&good).replace("\"test\"", "\"fixture\"");
    fs::write(&cache, text).unwrap_or_else(|e| panic!("{e}"));
    let run = sb.capvirt_env(&["-c", "fixture:///x", "list"], &env);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[test]
fn refused_plugins_are_still_reported_with_a_cache() {
    let real = fs::read(&artifacts().test_plugin).unwrap_or_else(|e| panic!("{e}"));
    let sb = fixture_sandbox();
    install(&sb.plugins, "libcapvirt_driver_cut.so", &real[..real.len() / 2]);
    let env = [("CAPVIRT_FIXTURE_MODE", "major")];
    for round in 0..2 {
        let list = sb.capvirt_env(&["list"], &env);
        assert_eq!(list.code, 0, "round {round}: {}", list.stderr);
        let (run, listed) = listing(&sb, &[]);
        assert_eq!(run.code, 1, "round {round}: {}", run.stderr);
        assert!(reason(entry(&listed, "libcapvirt_driver_cut.so")).contains("truncated"), "{listed:?}");
        // Without the fixture's mode the fixture loads: the listing is the current truth.
        assert_eq!(entry(&listed, "libcapvirt_driver_fixture.so")["status"], "loaded");
        let refused = sb.capvirt_env(&["-c", "fixture:///x", "list"], &env);
        assert_eq!(refused.code, 4, "round {round}: {}", refused.stderr);
        assert!(refused.stderr.contains("registry 2.0.0"), "round {round}: {}", refused.stderr);
        assert!(refused.stderr.contains("libcapvirt_driver_cut.so"), "round {round}: {}", refused.stderr);
    }
}

// ---------------------------------------------------------------------------------------------
// The registry version a plugin was built for.

#[test]
fn a_plugin_for_a_newer_registry_minor_loads_and_says_what_is_not_callable() {
    let sb = fixture_sandbox();
    let env = [("CAPVIRT_FIXTURE_MODE", "newer")];
    let run = sb.capvirt_env(&["-o", "json", "plugins"], &env);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}"));
    let fixture = entry(&listed, "libcapvirt_driver_fixture.so");
    assert_eq!((&fixture["status"], &fixture["registry_version"]), (&"loaded".into(), &"1.9.0".into()), "{fixture}");
    let ignored = fixture["ignored"].as_array().cloned().unwrap_or_default();
    let why =
        |id: &str| ignored.iter().find(|i| i["id"] == id).map(|i| i["reason"].as_str().unwrap_or_default().to_string());
    assert_eq!(
        why("domain.hibernate").as_deref(),
        Some("not callable: unknown to this host's registry 1.1.0 (the plugin targets newer registry 1.9.0)")
    );
    assert_eq!(
        why("domain.info").as_deref(),
        Some(
            "not callable: implements contract version 2, this host's registry declares version 1 (the plugin \
             targets newer registry 1.9.0)"
        )
    );
    assert_eq!(why("domain.list"), None);
    let table = sb.capvirt_env(&["plugins"], &env);
    assert!(
        table.stdout.contains("loaded (1 capabilities; not callable here: domain.hibernate, domain.info)"),
        "{}",
        table.stdout
    );
    assert_eq!(sb.capvirt_env(&["-c", "fixture:///x", "list"], &env).code, 0);
    let info = sb.capvirt_env(&["-c", "fixture:///x", "dominfo", "x"], &env);
    assert_eq!(info.code, 4, "{}", info.stderr);
    assert!(info.stderr.contains("domain.info"), "{}", info.stderr);
}

#[test]
fn result_fields_of_a_newer_registry_minor_are_dropped_for_that_plugin_only() {
    let sb = fixture_sandbox();
    // Built for 1.2.0: the fields 1.1.0 does not declare are dropped, at the top and nested.
    let newer = sb.capvirt_env(
        &["-c", "fixture:///x", "-o", "json", "dominfo", "web"],
        &[("CAPVIRT_FIXTURE_MODE", "newer-fields")],
    );
    assert_eq!(newer.code, 0, "{}", newer.stderr);
    let info: serde_json::Value =
        serde_json::from_str(&newer.stdout).unwrap_or_else(|e| panic!("{e}: {}", newer.stdout));
    assert_eq!(
        (&info["name"], &info["state"], &info["vcpus"]),
        (&"web".into(), &"running".into(), &2.into()),
        "{info}"
    );
    assert!(info.get("balloon_kib").is_none(), "{info}");
    let interface = &info["interfaces"][0];
    assert_eq!(interface["id"], "net0", "{info}");
    assert!(interface.get("mtu").is_none(), "{info}");
    // Only unknown fields are forgiven: a known field of the wrong type is still refused.
    let bad = sb.capvirt_env(&["-c", "fixture:///x", "dominfo", "bad"], &[("CAPVIRT_FIXTURE_MODE", "newer-fields")]);
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    assert!(bad.stderr.contains("`result.vcpus`: expected an unsigned integer, got a string"), "{}", bad.stderr);
    // The same result from a plugin built for this host's registry is malformed, naming the field.
    let same = sb.capvirt_env(&["-c", "fixture:///x", "dominfo", "web"], &[("CAPVIRT_FIXTURE_MODE", "extra-fields")]);
    assert_eq!(same.code, 1, "{}", same.stderr);
    assert!(same.stderr.contains("malformed result for `domain.info`"), "{}", same.stderr);
    assert!(same.stderr.contains("`result.interfaces[0]`: unknown field `mtu`"), "{}", same.stderr);
}

#[test]
fn a_plugin_for_another_registry_major_is_refused_naming_both_versions() {
    let sb = fixture_sandbox();
    let listed = plugins_json(&sb.capvirt_env(&["-o", "json", "plugins"], &[("CAPVIRT_FIXTURE_MODE", "major")]));
    assert_eq!(
        reason(entry(&listed, "libcapvirt_driver_fixture.so")),
        "built against registry 2.0.0, this host's registry is 1.1.0: another major version is incompatible (upgrade \
         capvirt to a host with that registry major)"
    );
    assert_eq!(entry(&listed, "libcapvirt_driver_test.so")["status"], "loaded");
}
