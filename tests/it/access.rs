//! Access control by OS identity through the real CLI: as root, `capvirt` runs as the
//! unprivileged user nobody (uid 65534, via `setpriv`) under the built-in policy and under
//! policy files, and every denial is audited with nobody's uid.

use std::{fs, os::unix::fs::chown, path::PathBuf, process::Command};

use capvirt_tests::{artifacts, run, set_mode, Run, TempDir};

const NOBODY: u32 = 65534;
/// A group id no account has here, so a policy entry for it matches only the test's caller.
const OPERATORS: u32 = 64999;

/// A world-readable copy of `capvirt` and the test driver, a system config directory (root's,
/// empty unless a test writes a policy) and an audit log directory nobody can write.
struct Setup {
    dir: TempDir,
}

impl Setup {
    fn new() -> Setup {
        if !rustix::process::geteuid().is_root() {
            panic!("the access tests run capvirt as another user and need root");
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        set_mode(dir.path(), 0o755);
        // A hard link where possible: a copy is open for writing for a moment, and a child
        // another test thread forks in that moment inherits the descriptor, so executing the
        // copy can fail with ETXTBSY ("Text file busy") until that child execs.
        let copy = |from: &PathBuf, to: PathBuf| {
            if fs::hard_link(from, &to).is_err() {
                fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
            }
            set_mode(&to, 0o755);
        };
        copy(&artifacts().capvirt, dir.path().join("capvirt"));
        for sub in ["plugins", "etc", "log"] {
            fs::create_dir(dir.path().join(sub)).unwrap_or_else(|e| panic!("mkdir {sub}: {e}"));
            set_mode(&dir.path().join(sub), 0o755);
        }
        copy(&artifacts().test_plugin, dir.path().join("plugins/libcapvirt_driver_test.so"));
        chown(dir.path().join("log"), Some(NOBODY), Some(NOBODY)).unwrap_or_else(|e| panic!("chown log: {e}"));
        Setup { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the access policy, root-owned, with `mode`.
    fn policy(&self, text: &str, mode: u32) {
        let path = self.path("etc/access.toml");
        fs::write(&path, text).unwrap_or_else(|e| panic!("write policy: {e}"));
        set_mode(&path, mode);
    }

    /// Runs `capvirt ARGS…` as nobody with the extra supplementary `groups`.
    fn as_nobody(&self, groups: &[u32], args: &[&str]) -> Run {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={NOBODY}")).arg(format!("--regid={NOBODY}"));
        if groups.is_empty() {
            cmd.arg("--clear-groups");
        } else {
            let list: Vec<String> = groups.iter().map(u32::to_string).collect();
            cmd.arg(format!("--groups={}", list.join(",")));
        }
        cmd.arg("--").arg(self.path("capvirt"));
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.path("log"))
            // Lies a caller can tell: the identity comes from the kernel, not from these.
            .env("USER", "root")
            .env("LOGNAME", "root")
            .env("CAPVIRT_PLUGIN_DIR", self.path("plugins"))
            .env("CAPVIRT_SYSCONFDIR", self.path("etc"))
            .arg("--audit-log")
            .arg(self.path("log/audit.jsonl"))
            .args(args);
        run(cmd)
    }

    fn audit_records(&self) -> Vec<serde_json::Value> {
        let text = fs::read_to_string(self.path("log/audit.jsonl")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}"))).collect()
    }
}

fn code(run: &Run, expected: i32) -> &str {
    assert_eq!(run.code, expected, "stdout: {}\nstderr: {}", run.stdout, run.stderr);
    run.stderr.trim_end()
}

#[test]
fn nobody_reads_but_cannot_suspend_under_the_built_in_policy_and_the_denial_is_audited() {
    let setup = Setup::new();
    let list = setup.as_nobody(&[], &["list"]);
    code(&list, 0);
    assert!(list.stdout.contains("test") && list.stdout.contains("running"), "{}", list.stdout);
    let info = setup.as_nobody(&[], &["dominfo", "test"]);
    code(&info, 0);
    assert!(info.stdout.contains("running"), "{}", info.stdout);

    let denied = setup.as_nobody(&[], &["suspend", "test"]);
    let message = code(&denied, 3);
    assert!(
        message.contains("user nobody (uid 65534)")
            && message.contains("`domain.suspend`")
            && message.contains("built-in access policy"),
        "{message}"
    );
    let records = setup.audit_records();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record["event"], "refused");
    assert_eq!(record["outcome"], "denied");
    assert_eq!(record["capability"], "domain.suspend");
    assert_eq!((record["uid"].as_u64(), record["gid"].as_u64()), (Some(65534), Some(65534)));
    assert_eq!(record["user"], "nobody");
    assert!(record["error"].as_str().is_some_and(|e| e.contains("uid 65534")), "{record}");
    // The log nobody wrote is a valid chain and private to nobody.
    code(&setup.as_nobody(&[], &["audit", "verify"]), 0);
}

#[test]
fn a_policy_file_grants_a_group_suspend_and_nothing_else() {
    let setup = Setup::new();
    setup.policy(&format!("default = [\"readonly\"]\n[groups]\n\"{OPERATORS}\" = [\"domain.suspend\"]\n"), 0o644);
    // Without the group: denied, and the message names the file and the rules that applied.
    let message = code(&setup.as_nobody(&[], &["suspend", "test"]), 3).to_string();
    assert!(message.contains("access.toml") && message.contains("default = [readonly]"), "{message}");
    // With it: the driver suspends the domain (the test driver reports it paused).
    let run = setup.as_nobody(&[OPERATORS], &["suspend", "test"]);
    code(&run, 0);
    // The group grants exactly what it lists.
    let destroy = setup.as_nobody(&[OPERATORS], &["destroy", "test"]);
    assert!(code(&destroy, 3).contains("`domain.destroy`"));
    let events: Vec<String> =
        setup.audit_records().iter().map(|r| format!("{} {} {}", r["event"], r["capability"], r["uid"])).collect();
    assert_eq!(
        events,
        [
            r#""refused" "domain.suspend" 65534"#,
            r#""intent" "domain.suspend" 65534"#,
            r#""outcome" "domain.suspend" 65534"#,
            r#""refused" "domain.destroy" 65534"#,
        ]
    );
}

#[test]
fn a_user_entry_by_name_and_wildcards() {
    let setup = Setup::new();
    setup.policy("default = []\n[users]\nnobody = [\"domain.*\"]\n", 0o644);
    code(&setup.as_nobody(&[], &["suspend", "test"]), 0);
    // `default = []` and no `host.*` for nobody: even reading host facts is denied.
    let host = setup.as_nobody(&[], &["call", "host.info"]);
    assert!(code(&host, 3).contains("`host.info`"));
}

#[test]
fn a_policy_file_others_could_have_written_is_refused() {
    let setup = Setup::new();
    setup.policy("default = [\"*\"]\n", 0o664);
    let message = code(&setup.as_nobody(&[], &["suspend", "test"]), 1).to_string();
    assert!(message.contains("access.toml") && message.contains("writable by group"), "{message}");
    // Reading is refused too: nothing runs under a policy that cannot be trusted.
    code(&setup.as_nobody(&[], &["list"]), 1);
    // Owned by someone else than root: refused as well.
    set_mode(&setup.path("etc/access.toml"), 0o644);
    chown(setup.path("etc/access.toml"), Some(NOBODY), None).unwrap_or_else(|e| panic!("chown: {e}"));
    let message = code(&setup.as_nobody(&[], &["suspend", "test"]), 1).to_string();
    assert!(message.contains("owned by uid 65534"), "{message}");
    // And a policy in a directory others can write.
    chown(setup.path("etc/access.toml"), Some(0), None).unwrap_or_else(|e| panic!("chown: {e}"));
    set_mode(&setup.path("etc"), 0o777);
    let message = code(&setup.as_nobody(&[], &["suspend", "test"]), 1).to_string();
    assert!(message.contains("directory") && message.contains("writable by group and others"), "{message}");
}

#[test]
fn root_may_call_everything_whatever_the_file_says() {
    let setup = Setup::new();
    setup.policy("default = []\n[users]\nroot = []\n", 0o644);
    let mut cmd = Command::new(setup.path("capvirt"));
    cmd.env("CAPVIRT_PLUGIN_DIR", setup.path("plugins")).env("CAPVIRT_SYSCONFDIR", setup.path("etc")).args([
        "--audit-log",
        &setup.path("root-audit.jsonl").display().to_string(),
        "suspend",
        "test",
    ]);
    let done = run(cmd);
    code(&done, 0);
}

#[test]
fn a_copied_registry_cannot_make_suspend_readonly_for_the_access_policy() {
    let setup = Setup::new();
    let copy = setup.path("registry");
    crate::cli::copy_dir(&capvirt_tests::workspace_root().join("proposals"), &copy);
    let proposal = copy.join("capabilities/domain.suspend.toml");
    let text = fs::read_to_string(&proposal).unwrap_or_else(|e| panic!("{e}"));
    assert!(text.contains("\nmutates = true\n"));
    fs::write(&proposal, text.replace("\nmutates = true\n", "\nmutates = false\n")).unwrap_or_else(|e| panic!("{e}"));
    let mut mode = vec![copy.clone()];
    while let Some(path) = mode.pop() {
        let dir = path.is_dir();
        set_mode(&path, if dir { 0o755 } else { 0o644 });
        if dir {
            mode.extend(fs::read_dir(&path).unwrap_or_else(|e| panic!("{e}")).flatten().map(|e| e.path()));
        }
    }
    let run = setup.as_nobody(&[], &["--registry", &copy.display().to_string(), "suspend", "test"]);
    assert!(code(&run, 3).contains("`domain.suspend`"));
    assert_eq!(setup.audit_records().len(), 1);
}
