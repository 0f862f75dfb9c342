//! The maintainer workflow (issue 4) through the real `capvirt` binary: lint rules with a
//! failing and a passing fixture each, review and quorum, promotion and its refusals, the
//! semver diff for every change class, generated docs with the support matrix, and the four
//! run-time feature gates. Every test works on a copy of `proposals/` in a tempdir.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use capvirt_host::registry::{source, Registry, SourceFile};
use capvirt_maint::diff::{self, Bump, ChangeClass};
use capvirt_tests::{capvirt, run, test_plugin_dir, workspace_root, Run, TempDir};

const DATE: &str = "2026-12-01";

fn fixtures() -> PathBuf {
    workspace_root().join("tests").join("fixtures").join("maint")
}

fn tempdir() -> TempDir {
    TempDir::new().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("mkdir {}: {e}", to.display()));
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let entry = entry.unwrap_or_else(|e| panic!("{e}"));
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        }
    }
}

/// A tempdir holding `proposals/`, a copy of the real registry.
fn workspace() -> TempDir {
    let dir = tempdir();
    copy_dir(&workspace_root().join("proposals"), &dir.path().join("proposals"));
    dir
}

/// A tempdir holding `proposals/`: the small fixture registry, the real types and a few real
/// capabilities (so snapshots do not change when the real registry grows).
fn small_workspace() -> TempDir {
    let dir = tempdir();
    let root = dir.path().join("proposals");
    fs::create_dir_all(root.join("capabilities")).unwrap_or_else(|e| panic!("{e}"));
    fs::copy(fixtures().join("small").join("registry.toml"), root.join("registry.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let real = workspace_root().join("proposals");
    fs::copy(real.join("types.toml"), root.join("types.toml")).unwrap_or_else(|e| panic!("{e}"));
    for id in ["domain.info", "domain.suspend", "domain.block-stats", "domain.monitor-command"] {
        let name = format!("{id}.toml");
        fs::copy(real.join("capabilities").join(&name), root.join("capabilities").join(&name))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    dir
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()))
}

/// Replaces `from` (which must occur) by `to` in the file.
fn edit(path: &Path, from: &str, to: &str) {
    let text = read(path);
    assert!(text.contains(from), "{} does not contain {from:?}", path.display());
    write(path, &text.replacen(from, to, 1));
}

fn capvirt_in(dir: &Path, args: &[&str]) -> Run {
    let state = dir.join(".state");
    fs::create_dir_all(&state).unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = capvirt(test_plugin_dir(), &state);
    cmd.current_dir(dir).args(args);
    run(cmd)
}

fn ok(run: &Run, what: &str) {
    assert_eq!(run.code, 0, "{what} failed:\nstdout: {}\nstderr: {}", run.stdout, run.stderr);
}

fn registry_version(dir: &Path) -> semver::Version {
    let files = source::read_dir(&dir.join("proposals")).unwrap_or_else(|e| panic!("{e}"));
    capvirt_maint::registry_file(&files).unwrap_or_else(|e| panic!("{e}")).version
}

// ---------------------------------------------------------------------------------------
// proposal check

const RULES: &[&str] = &[
    "syntax",
    "schema",
    "registry",
    "naming",
    "hypervisor-agnostic",
    "passthrough",
    "completeness",
    "stable-mappings",
    "deprecated-replacement",
    "review",
    "contract",
];

/// Copies the fixture files of `rule/kind` into a fresh registry copy and checks them.
fn check_fixture(rule: &str, kind: &str) -> Run {
    let dir = workspace();
    let source = fixtures().join("lint").join(rule).join(kind);
    let mut args = vec!["proposal".to_string(), "check".to_string()];
    let mut names: Vec<String> = fs::read_dir(&source)
        .unwrap_or_else(|e| panic!("{}: {e}", source.display()))
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        fs::copy(source.join(&name), dir.path().join("proposals").join("capabilities").join(&name))
            .unwrap_or_else(|e| panic!("{e}"));
        args.push(format!("proposals/capabilities/{name}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    capvirt_in(dir.path(), &args)
}

#[test]
fn every_lint_rule_has_a_failing_and_a_passing_fixture() {
    for rule in RULES {
        let pass = check_fixture(rule, "pass");
        assert_eq!(pass.code, 0, "{rule}/pass: {}{}", pass.stdout, pass.stderr);
        assert!(pass.stdout.ends_with(": 0 errors, 0 warnings in 1 file\n"), "{rule}/pass:\n{}", pass.stdout);

        let fail = check_fixture(rule, "fail");
        assert_eq!(fail.code, 1, "{rule}/fail must fail:\n{}{}", fail.stdout, fail.stderr);
        assert!(fail.stdout.contains(&format!("error[{rule}]")), "{rule}/fail:\n{}", fail.stdout);
        assert!(fail.stderr.contains("error: the registry has"), "{}", fail.stderr);
        insta::assert_snapshot!(format!("lint_{rule}"), fail.stdout);
    }
}

#[test]
fn the_real_registry_passes_its_own_lint() {
    let dir = workspace();
    let text = capvirt_in(dir.path(), &["proposal", "check"]);
    ok(&text, "proposal check");
    assert!(text.stdout.starts_with("proposal check: 0 errors, 0 warnings in "), "{}", text.stdout);
    // Also when named explicitly, and as JSON.
    let json = capvirt_in(dir.path(), &["proposal", "check", "proposals", "--format", "json"]);
    ok(&json, "proposal check --format json");
    let report: serde_json::Value = serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report["errors"], 0);
    assert_eq!(report["findings"], serde_json::json!([]));
}

#[test]
fn check_reports_json_with_positions() {
    let dir = workspace();
    let target = dir.path().join("proposals/capabilities/domain.run-script.toml");
    fs::copy(fixtures().join("lint/passthrough/fail/domain.run-script.toml"), &target)
        .unwrap_or_else(|e| panic!("{e}"));
    let run = capvirt_in(dir.path(), &["--output", "json", "proposal", "check"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report["errors"], 1, "{report:#}");
    let finding = &report["findings"][0];
    assert_eq!(finding["file"], "proposals/capabilities/domain.run-script.toml");
    assert_eq!(finding["rule"], "passthrough");
    assert_eq!(finding["severity"], "error");
    // `type = "string"` of the second parameter.
    let line = read(&target).lines().position(|l| l == "type = \"string\"").map(|i| i + 1);
    assert_eq!(finding["line"].as_u64().map(|l| l as usize), line);
    assert_eq!(finding["column"], 8);
}

#[test]
fn a_draft_only_warns_and_exits_zero() {
    let dir = workspace();
    let new = capvirt_in(dir.path(), &["proposal", "new", "domain.set-vcpus"]);
    ok(&new, "proposal new");
    insta::assert_snapshot!("new_stdout", new.stdout);
    let check = capvirt_in(dir.path(), &["proposal", "check", "proposals/capabilities/domain.set-vcpus.toml"]);
    ok(&check, "proposal check of a fresh draft");
    insta::assert_snapshot!("new_draft_check", check.stdout);
    // The scaffold has every section the seed asks for.
    let text = read(&dir.path().join("proposals/capabilities/domain.set-vcpus.toml"));
    for section in [
        "summary =",
        "motivation =",
        "[[params]]",
        "[result]",
        "errors =",
        "[mapping.test]",
        "open_questions =",
        "[review]",
    ] {
        assert!(text.contains(section), "scaffold lacks {section}:\n{text}");
    }
    // The host still works with the draft in its registry.
    let registry = source::read_dir(&dir.path().join("proposals")).unwrap_or_else(|e| panic!("{e}"));
    Registry::from_sources(&registry).unwrap_or_else(|e| panic!("{e}"));

    let again = capvirt_in(dir.path(), &["proposal", "new", "domain.set-vcpus"]);
    assert_eq!(again.code, 2);
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
    let vendorless = capvirt_in(dir.path(), &["proposal", "new", "domain.qmp-query"]);
    assert_eq!(vendorless.code, 2);
    assert!(vendorless.stderr.contains("names `qmp`"), "{}", vendorless.stderr);
}

// ---------------------------------------------------------------------------------------
// review, quorum, promotion

fn review(dir: &Path, id: &str, vote: &str, by: &str) -> Run {
    capvirt_in(dir, &["proposal", "review", id, vote, "--as", by, "--date", DATE])
}

fn promote(dir: &Path, id: &str, to: &str) -> Run {
    capvirt_in(dir, &["proposal", "promote", id, "--to", to])
}

#[test]
fn a_proposal_goes_from_new_to_stable() {
    let dir = workspace();
    let base = registry_version(dir.path());
    let file = dir.path().join("proposals/capabilities/domain.set-vcpus.toml");
    ok(&capvirt_in(dir.path(), &["proposal", "new", "domain.set-vcpus"]), "new");
    // The author fills the scaffold in.
    write(&file, &read(&fixtures().join("workflow-draft.toml")));
    let draft = read(&file);

    // Not without quorum.
    let early = promote(dir.path(), "domain.set-vcpus", "experimental");
    assert_eq!(early.code, 3, "{}", early.stderr);
    assert!(early.stderr.contains("no quorum") && early.stderr.contains("0/2"), "{}", early.stderr);

    // Reviewers must be maintainers.
    let outsider = review(dir.path(), "domain.set-vcpus", "--approve", "mallory");
    assert_eq!(outsider.code, 3, "{}", outsider.stderr);
    assert!(outsider.stderr.contains("`mallory` is not a maintainer"), "{}", outsider.stderr);

    let ada = review(dir.path(), "domain.set-vcpus", "--approve", "ada");
    ok(&ada, "review ada");
    insta::assert_snapshot!("review_ada", ada.stdout);
    let objection = capvirt_in(
        dir.path(),
        &[
            "proposal",
            "review",
            "domain.set-vcpus",
            "--request-changes",
            "--as",
            "brendan",
            "--comment",
            "Say what happens to a running guest that cannot hot-plug.",
            "--date",
            DATE,
        ],
    );
    ok(&objection, "review brendan");
    // The edit keeps every line the author wrote, comments included.
    let reviewed = read(&file);
    assert!(reviewed.starts_with(draft.trim_end()), "review rewrote the author's text:\n{reviewed}");
    assert!(reviewed.contains("mutates = true   # changes the domain's configuration"));

    let blocked = promote(dir.path(), "domain.set-vcpus", "experimental");
    assert_eq!(blocked.code, 3);
    assert!(blocked.stderr.contains("changes requested by brendan"), "{}", blocked.stderr);

    ok(&review(dir.path(), "domain.set-vcpus", "--approve", "brendan"), "review brendan again");
    assert_eq!(read(&file).matches("by = \"brendan\"").count(), 1, "a new vote replaces the earlier one");
    let skip = promote(dir.path(), "domain.set-vcpus", "stable");
    assert_eq!(skip.code, 3);
    assert!(skip.stderr.contains("draft → stable is not a lifecycle step"), "{}", skip.stderr);

    let experimental = promote(dir.path(), "domain.set-vcpus", "experimental");
    ok(&experimental, "promote to experimental");
    let v1 = Bump::Minor.apply(&base);
    assert_eq!(registry_version(dir.path()), v1);
    assert!(
        experimental
            .stdout
            .contains(&format!("Registry version {base} → {v1} (minor bump: compatible change); since = \"{v1}\"")),
        "{}",
        experimental.stdout
    );
    assert!(read(&file).contains(&format!("stage = \"experimental\"\nsince = \"{v1}\"\n")));

    // Votes cast at draft do not carry over to the next step.
    let stale = promote(dir.path(), "domain.set-vcpus", "stable");
    assert_eq!(stale.code, 3);
    assert!(stale.stderr.contains("approvals at stage experimental: 0/2"), "{}", stale.stderr);
    ok(&review(dir.path(), "domain.set-vcpus", "--approve", "ada"), "ada at experimental");
    ok(&review(dir.path(), "domain.set-vcpus", "--approve", "chiara"), "chiara at experimental");

    // Stable needs a real driver's mapping besides the test driver's.
    let test_only = promote(dir.path(), "domain.set-vcpus", "stable");
    assert_eq!(test_only.code, 3);
    assert!(test_only.stderr.contains("error[stable-mappings]"), "{}", test_only.stderr);
    edit(
        &file,
        "[cli]",
        "[mapping.qemu]\nnote = \"QMP `device_add`/`device_del` of vCPU devices; the stored definition is updated too.\"\n\n[cli]",
    );
    let stable = promote(dir.path(), "domain.set-vcpus", "stable");
    ok(&stable, "promote to stable");
    let v2 = Bump::Minor.apply(&v1);
    assert_eq!(registry_version(dir.path()), v2);

    let final_text = read(&file).replace(&format!("\"{v2}\""), "\"<VERSION>\"");
    insta::assert_snapshot!("stable_proposal", final_text);
    let check = capvirt_in(dir.path(), &["proposal", "check"]);
    ok(&check, "check after promotion");

    // CI's view: the registry grew compatibly and was bumped enough.
    let original = workspace_root().join("proposals");
    let diff = capvirt_in(dir.path(), &["registry", "diff", &original.display().to_string(), "proposals"]);
    ok(&diff, "registry diff");
    assert!(diff.stdout.contains("compatible  domain.set-vcpus: new capability (stable)"), "{}", diff.stdout);
}

#[test]
fn passthrough_proposals_cannot_be_promoted() {
    let dir = workspace();
    // A draft with its quorum whose `script` parameter is a free-form command string.
    fs::copy(
        fixtures().join("promote/domain.run-script.toml"),
        dir.path().join("proposals/capabilities/domain.run-script.toml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let check = capvirt_in(dir.path(), &["proposal", "check"]);
    ok(&check, "a passthrough draft only warns");
    assert!(check.stdout.contains("warning[passthrough]"), "{}", check.stdout);
    let refused = promote(dir.path(), "domain.run-script", "experimental");
    assert_eq!(refused.code, 3, "{}", refused.stdout);
    assert!(!refused.stderr.contains("no quorum"), "{}", refused.stderr);
    insta::assert_snapshot!("promote_passthrough", refused.stderr);

    // The rejected monitor passthrough is a clean record, and can go nowhere callable.
    let before = read(&dir.path().join("proposals/capabilities/domain.monitor-command.toml"));
    let monitor = promote(dir.path(), "domain.monitor-command", "experimental");
    assert_eq!(monitor.code, 3);
    assert!(
        monitor.stderr.contains("error[passthrough]: parameter `command` is a free-form command string"),
        "{}",
        monitor.stderr
    );
    assert!(
        monitor.stderr.contains("error[hypervisor-agnostic]: id `domain.monitor-command` names `monitor`"),
        "{}",
        monitor.stderr
    );
    assert_eq!(read(&dir.path().join("proposals/capabilities/domain.monitor-command.toml")), before, "nothing written");
}

#[test]
fn rejection_and_deprecation_follow_the_lifecycle() {
    let dir = workspace();
    ok(&capvirt_in(dir.path(), &["proposal", "new", "domain.set-vcpus"]), "new");
    // Rejection needs the quorum voting reject.
    ok(&review(dir.path(), "domain.set-vcpus", "--reject", "ada"), "ada rejects");
    let one = promote(dir.path(), "domain.set-vcpus", "rejected");
    assert_eq!(one.code, 3);
    assert!(one.stderr.contains("rejecting needs 2 maintainers"), "{}", one.stderr);
    ok(&review(dir.path(), "domain.set-vcpus", "--reject", "chiara"), "chiara rejects");
    let rejected = capvirt_in(
        dir.path(),
        &["proposal", "promote", "domain.set-vcpus", "--to", "rejected", "--record", "Not needed: use domain.define."],
    );
    ok(&rejected, "reject");
    let text = read(&dir.path().join("proposals/capabilities/domain.set-vcpus.toml"));
    assert!(text.contains("stage = \"rejected\"") && text.contains("decision = \"rejected\""), "{text}");
    assert!(!text.contains("since ="), "{text}");
    ok(&capvirt_in(dir.path(), &["proposal", "check"]), "a rejected record is lint-clean");

    // Deprecating a stable capability needs votes and a replacement.
    for by in ["ada", "brendan"] {
        ok(&review(dir.path(), "domain.reboot", "--approve", by), "approve deprecation");
    }
    let no_replacement = promote(dir.path(), "domain.reboot", "deprecated");
    assert_eq!(no_replacement.code, 3);
    assert!(no_replacement.stderr.contains("error[deprecated-replacement]"), "{}", no_replacement.stderr);
    let deprecated = capvirt_in(
        dir.path(),
        &["proposal", "promote", "domain.reboot", "--to", "deprecated", "--replaced-by", "domain.shutdown"],
    );
    ok(&deprecated, "deprecate");
    assert!(deprecated.stdout.contains("(minor bump: compatible change)"), "{}", deprecated.stdout);
    let removed = promote(dir.path(), "domain.reboot", "removed");
    assert_eq!(removed.code, 3, "votes cast at stable do not remove");
}

// ---------------------------------------------------------------------------------------
// registry diff

fn real_sources() -> Vec<SourceFile> {
    source::read_dir(&workspace_root().join("proposals")).unwrap_or_else(|e| panic!("{e}"))
}

/// The real registry with `from` replaced by `to` in `path` (which must contain it).
fn edited(files: &[SourceFile], path: &str, from: &str, to: &str) -> Vec<SourceFile> {
    let mut files = files.to_vec();
    let file = files.iter_mut().find(|f| f.path == path).unwrap_or_else(|| panic!("no {path}"));
    assert!(file.text.contains(from), "{path} does not contain {from:?}");
    file.text = file.text.replacen(from, to, 1);
    files
}

fn compile(files: &[SourceFile]) -> Registry {
    Registry::from_sources(files).unwrap_or_else(|e| panic!("{e}"))
}

/// Diffs the real registry against an edited copy; returns the classes of the changes.
fn classify(new: &[SourceFile]) -> diff::DiffReport {
    diff::diff(&compile(&real_sources()), &compile(new))
}

fn assert_change(report: &diff::DiffReport, class: ChangeClass, text: &str) {
    assert!(
        report.changes.iter().any(|c| c.class == class && format!("{}: {}", c.subject, c.description).contains(text)),
        "expected {class:?} change containing {text:?}, got {:#?}",
        report.changes
    );
}

#[test]
fn diff_classifies_each_change_class() {
    let real = real_sources();
    let cap = |id: &str| format!("capabilities/{id}.toml");
    use ChangeClass::{Breaking, Compatible, DocsOnly};

    // Breaking.
    let removed: Vec<SourceFile> = real.iter().filter(|f| f.path != cap("domain.save")).cloned().collect();
    assert_change(&classify(&removed), Breaking, "domain.save: removed capability");
    let no_param = edited(&real, &cap("domain.shutdown"), "name = \"timeout_secs\"", "name = \"grace_secs\"");
    let report = classify(&no_param);
    assert_change(&report, Breaking, "domain.shutdown: parameter `timeout_secs` removed");
    assert_change(&report, Compatible, "domain.shutdown: new optional parameter `grace_secs`");
    let tightened = edited(&real, &cap("domain.shutdown"), "max = 3600", "max = 600");
    assert_change(&classify(&tightened), Breaking, "parameter `timeout_secs`: bounds tightened from ..=3600 to ..=600");
    let default = edited(&real, &cap("domain.shutdown"), "default = 60", "default = 30");
    assert_change(&classify(&default), Breaking, "parameter `timeout_secs`: default changed from 60 to 30");
    let retyped = edited(&real, &cap("domain.block-stats"), "type = \"DeviceName\"", "type = \"string\"");
    assert_change(&classify(&retyped), Breaking, "parameter `device` changed type from `DeviceName` to `string`");
    let new_required = edited(
        &real,
        &cap("domain.suspend"),
        "[result]",
        "[[params]]\nname = \"reason\"\ntype = \"string\"\ndoc = \"Why.\"\n\n[result]",
    );
    assert_change(&classify(&new_required), Breaking, "domain.suspend: new required parameter `reason`");
    let now_required = edited(&real, &cap("domain.block-stats"), "required = false\n", "");
    assert_change(&classify(&now_required), Breaking, "parameter `device` is now required");
    let enum_value =
        edited(&real, "types.toml", "values = [\"virtio\", \"sata\", \"usb\"]", "values = [\"virtio\", \"sata\"]");
    assert_change(&classify(&enum_value), Breaking, "type DiskBus: enum value `usb` removed");
    let lowered = edited(&real, &cap("domain.suspend"), "stage = \"stable\"", "stage = \"experimental\"");
    assert_change(&classify(&lowered), Breaking, "domain.suspend: stage lowered from stable to experimental");
    let report = classify(&lowered);
    assert_eq!(report.required_bump, Bump::Major);
    assert!(!report.ok(), "the version was not bumped");

    // Compatible.
    let mut new_cap = real.clone();
    new_cap.push(SourceFile { path: cap("domain.pause"), text: read(&fixtures().join("gates/domain.pause.toml")) });
    assert_change(&classify(&new_cap), Compatible, "domain.pause: new capability (experimental)");
    let optional = edited(
        &real,
        &cap("domain.suspend"),
        "[result]",
        "[[params]]\nname = \"reason\"\ntype = \"string\"\nrequired = false\ndoc = \"Why.\"\n\n[result]",
    );
    assert_change(&classify(&optional), Compatible, "domain.suspend: new optional parameter `reason`");
    let deprecated = edited(
        &real,
        &cap("domain.reboot"),
        "stage = \"stable\"",
        "stage = \"deprecated\"\nreplaced_by = \"domain.shutdown\"",
    );
    assert_change(
        &classify(&deprecated),
        Compatible,
        "domain.reboot: deprecated (stable → deprecated), replaced by `domain.shutdown`",
    );
    let report = classify(&deprecated);
    assert_eq!(report.required_bump, Bump::Minor);
    let bumped = edited(&deprecated, "registry.toml", "version = \"1.", "version = \"2.");
    assert!(classify(&bumped).ok(), "a larger bump than required is fine");

    // Docs-only.
    let docs = edited(&real, &cap("domain.suspend"), "summary = \"", "summary = \"Really: ");
    let report = classify(&docs);
    assert_change(&report, DocsOnly, "domain.suspend: documentation changed: summary");
    assert_eq!(report.required_bump, Bump::Patch);
    assert!(!report.ok());
    let version = compile(&real).version().clone();
    let patched = edited(
        &docs,
        "registry.toml",
        &format!("version = \"{version}\""),
        &format!("version = \"{}\"", Bump::Patch.apply(&version)),
    );
    assert!(classify(&patched).ok());
}

fn git(dir: &Path, args: &[&str]) {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@capvirt.invalid", "-c", "commit.gpgsign=false"])
        .args(args)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE");
    let out = run(cmd);
    assert_eq!(out.code, 0, "git {args:?}: {}", out.stderr);
}

#[test]
fn registry_diff_reads_git_revisions_and_checks_the_bump() {
    let dir = small_workspace();
    git(dir.path(), &["init", "-q"]);
    git(dir.path(), &["add", "proposals"]);
    git(dir.path(), &["commit", "-qm", "registry 1.0.0"]);
    let suspend = dir.path().join("proposals/capabilities/domain.suspend.toml");
    edit(
        &suspend,
        "[result]",
        "[[params]]\nname = \"reason\"\ntype = \"string\"\nrequired = false\ndoc = \"Why.\"\n\n[result]",
    );
    edit(&dir.path().join("proposals/capabilities/domain.block-stats.toml"), "required = false\n", "");
    edit(&dir.path().join("proposals/capabilities/domain.info.toml"), "summary = \"", "summary = \"Now: ");
    git(dir.path(), &["commit", "-qam", "unversioned changes"]);

    let too_small = capvirt_in(dir.path(), &["registry", "diff", "HEAD~1", "HEAD"]);
    assert_eq!(too_small.code, 1);
    insta::assert_snapshot!("diff_not_bumped", too_small.stdout);
    assert!(too_small.stderr.contains("require a major bump (version 2.0.0 or later)"), "{}", too_small.stderr);

    edit(&dir.path().join("proposals/registry.toml"), "version = \"1.0.0\"", "version = \"2.0.0\"");
    // A revision against the working tree, and JSON.
    let json = capvirt_in(dir.path(), &["registry", "diff", "HEAD~1", "proposals", "--format", "json"]);
    ok(&json, "bumped diff");
    let report: serde_json::Value = serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report["required_bump"], "major");
    assert_eq!(report["actual_bump"], "major");
    assert_eq!(report["ok"], true);
    assert_eq!(report["changes"].as_array().map(Vec::len), Some(3));

    let bad = capvirt_in(dir.path(), &["registry", "diff", "no-such-rev", "HEAD"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("\"no-such-rev\" is neither a directory nor a git revision"), "{}", bad.stderr);
}

// ---------------------------------------------------------------------------------------
// registry docs

#[test]
fn docs_describe_each_capability_and_the_support_matrix() {
    let dir = small_workspace();
    fs::copy(fixtures().join("gates/domain.pause.toml"), dir.path().join("proposals/capabilities/domain.pause.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = dir.path().join("site");
    let run = capvirt_in(dir.path(), &["--registry", "proposals", "registry", "docs", "--out", "site"]);
    ok(&run, "registry docs");
    for page in
        ["index", "types", "support-matrix", "capabilities/domain.suspend", "capabilities/domain.monitor-command"]
    {
        assert!(out.join(format!("{page}.md")).is_file(), "{page}.md");
        let html = read(&out.join(format!("{page}.html")));
        assert!(html.starts_with("<!DOCTYPE html>") && html.contains("</html>"), "{page}.html");
    }
    assert!(out.join("style.css").is_file());
    insta::assert_snapshot!("support_matrix", read(&out.join("support-matrix.md")));
    let suspend = read(&out.join("capabilities/domain.suspend.md"));
    let qemu_row = suspend.lines().find(|l| l.starts_with("| `qemu` |")).unwrap_or_default();
    assert!(qemu_row.contains("QMP `stop`") && qemu_row.ends_with("| not installed |"), "{suspend}");
    assert!(suspend.contains("| `test` | Marks the domain paused. | implemented in test "), "{suspend}");
    assert!(
        read(&out.join("capabilities/domain.suspend.html")).contains("<td>stable</td>")
            || suspend.contains("**stable**")
    );
}

// ---------------------------------------------------------------------------------------
// feature gates at run time

/// The real registry plus an experimental `domain.pause` (no driver implements it), a
/// removed `domain.legacy-reset`, and `domain.suspend` deprecated in favour of `domain.pause`.
fn gated_registry() -> TempDir {
    let dir = workspace();
    let caps = dir.path().join("proposals/capabilities");
    for name in ["domain.pause.toml", "domain.legacy-reset.toml"] {
        fs::copy(fixtures().join("gates").join(name), caps.join(name)).unwrap_or_else(|e| panic!("{e}"));
    }
    edit(
        &caps.join("domain.suspend.toml"),
        "stage = \"stable\"",
        "stage = \"deprecated\"\nreplaced_by = \"domain.pause\"",
    );
    dir
}

fn call(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Run {
    let state = dir.join(".state");
    fs::create_dir_all(&state).unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = capvirt(test_plugin_dir(), &state);
    cmd.current_dir(dir).args(["--registry", "proposals"]).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(cmd)
}

#[test]
fn feature_gates_apply_at_run_time() {
    let dir = gated_registry();
    let d = dir.path();
    let pause = ["call", "domain.pause", "--arg", "domain=test"];
    ok(&capvirt_in(d, &["proposal", "check"]), "the gated fixture registry is lint-clean");

    // Experimental: refused unless enabled; once enabled the policy lets it through and the
    // test driver, which does not implement it, says so.
    let refused = call(d, &[], &pause);
    assert_eq!(refused.code, 3, "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .contains("capability `domain.pause` is experimental and not enabled (use --enable domain.pause)"),
        "{}",
        refused.stderr
    );
    let enabled_by_flag = call(d, &[], &["--enable", "domain.pause", "call", "domain.pause", "--arg", "domain=test"]);
    let enabled_by_env = call(d, &[("CAPVIRT_ENABLE", "domain.other, domain.pause")], &pause);
    let config = d.join("host.toml");
    write(&config, "# host config\nenable = [\"domain.pause\"]\n");
    let config_path = config.display().to_string();
    let enabled_by_config = call(d, &[("CAPVIRT_CONFIG", &config_path)], &pause);
    let xdg = d.join("xdg");
    fs::create_dir_all(xdg.join("capvirt")).unwrap_or_else(|e| panic!("{e}"));
    write(&xdg.join("capvirt/config.toml"), "enable = [\"domain.pause\"]\n");
    let xdg_path = xdg.display().to_string();
    let enabled_by_xdg = call(d, &[("XDG_CONFIG_HOME", &xdg_path)], &pause);
    for (how, run) in [
        ("--enable", &enabled_by_flag),
        ("CAPVIRT_ENABLE", &enabled_by_env),
        ("CAPVIRT_CONFIG", &enabled_by_config),
        ("XDG_CONFIG_HOME", &enabled_by_xdg),
    ] {
        assert_eq!(run.code, 4, "{how}: {}", run.stderr);
        assert!(run.stderr.contains("the `test` driver does not implement `domain.pause`"), "{how}: {}", run.stderr);
    }
    // A broken config is refused with its path.
    write(&config, "enable = \"domain.pause\"\n");
    let broken = call(d, &[("CAPVIRT_CONFIG", &config_path)], &pause);
    assert_eq!(broken.code, 2);
    assert!(broken.stderr.contains(&format!("invalid host config {config_path}")), "{}", broken.stderr);
    let missing = call(d, &[("CAPVIRT_CONFIG", "/nonexistent/capvirt.toml")], &pause);
    assert_eq!(missing.code, 2);
    assert!(missing.stderr.contains("cannot read host config /nonexistent/capvirt.toml"), "{}", missing.stderr);

    // Deprecated: works, with a warning naming the replacement.
    let suspend = call(d, &[], &["suspend", "test"]);
    assert_eq!(suspend.code, 0, "{}", suspend.stderr);
    assert!(suspend.stdout.contains("Domain 'test' suspended"), "{}", suspend.stdout);
    assert!(
        suspend.stderr.contains("capability `domain.suspend` is deprecated") && suspend.stderr.contains("domain.pause"),
        "{}",
        suspend.stderr
    );

    // Removed and rejected: refused by policy, even when "enabled".
    let removed =
        call(d, &[], &["--enable", "domain.legacy-reset", "call", "domain.legacy-reset", "--arg", "domain=test"]);
    assert_eq!(removed.code, 3);
    assert!(
        removed
            .stderr
            .contains("capability `domain.legacy-reset` is removed: removed from the registry; use `domain.reboot`"),
        "{}",
        removed.stderr
    );
    let rejected = call(
        d,
        &[],
        &[
            "--enable",
            "domain.monitor-command",
            "call",
            "domain.monitor-command",
            "--arg",
            "domain=test",
            "--arg",
            "command=info",
        ],
    );
    assert_eq!(rejected.code, 3);
    assert!(rejected.stderr.contains("capability `domain.monitor-command` is rejected"), "{}", rejected.stderr);
}
