//! `capvirt proposal new|check|review|promote`: the maintainer workflow on the registry's
//! source tree (`--registry DIR`, else the nearest `proposals/` from the current directory).
//! The work happens in [`capvirt_maint`]; this file parses arguments, reads and writes files,
//! and prints.

use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ArgGroup, ArgMatches, Command};

use crate::{context::Context, opt_string, output, CliError, OutputFormat};
use capvirt_host::{
    registry::model::{Stage, VoteKind},
    ErrorCategory,
};
use capvirt_maint::{
    lint::{self, Finding, Report},
    promote::{self, PromoteError, PromoteRequest},
    review::{self, VoteRequest},
    scaffold, source,
};

pub fn cli() -> Command {
    let id = || Arg::new("id").value_name("ID").required(true).help("Capability id, e.g. domain.set-vcpus");
    Command::new("proposal")
        .about("Maintainer workflow: scaffold, check, review and promote capability proposals")
        .long_about(
            "Maintainer workflow on the registry source tree: --registry DIR, else the nearest proposals/ \
             directory from the current directory. See proposals/README.md.",
        )
        .subcommand_required(true)
        .subcommand(Command::new("new").about("Scaffold a draft proposal with every required section").arg(id()))
        .subcommand(
            Command::new("check")
                .about("Lint proposals: schema, naming, hypervisor-agnostic, passthrough, stage rules")
                .arg(
                    Arg::new("paths")
                        .value_name("PATH")
                        .num_args(0..)
                        .help("Registry directories or proposal files [default: the whole registry]"),
                )
                .arg(format_arg()),
        )
        .subcommand(
            Command::new("review")
                .about("Record a maintainer's vote inside the proposal (comments and layout are kept)")
                .arg(id())
                .arg(Arg::new("approve").long("approve").action(ArgAction::SetTrue).help("Approve the next step"))
                .arg(
                    Arg::new("request-changes")
                        .long("request-changes")
                        .action(ArgAction::SetTrue)
                        .help("Ask for changes (blocks promotion until withdrawn)"),
                )
                .arg(Arg::new("reject").long("reject").action(ArgAction::SetTrue).help("Vote to reject the proposal"))
                .group(ArgGroup::new("vote").args(["approve", "request-changes", "reject"]).required(true))
                .arg(
                    Arg::new("as")
                        .long("as")
                        .value_name("NAME")
                        .required(true)
                        .help("The voting maintainer, as listed in registry.toml"),
                )
                .arg(Arg::new("comment").long("comment").value_name("TEXT").help("Why"))
                .arg(
                    Arg::new("date")
                        .long("date")
                        .value_name("YYYY-MM-DD")
                        .help("Date of the vote [default: today, UTC]"),
                ),
        )
        .subcommand(
            Command::new("promote")
                .about("Move a proposal to its next stage; needs the review quorum and a clean lint")
                .arg(id())
                .arg(
                    Arg::new("to")
                        .long("to")
                        .value_name("STAGE")
                        .required(true)
                        .value_parser(Stage::ALL.map(Stage::as_str))
                        .help("Target stage"),
                )
                .arg(
                    Arg::new("replaced-by")
                        .long("replaced-by")
                        .value_name("ID")
                        .help("The capability replacing this one (deprecations)"),
                )
                .arg(Arg::new("record").long("record").value_name("TEXT").help("The decision record (why)")),
        )
}

/// `--format text|json` (defaults to the global `--output`).
pub(crate) fn format_arg() -> Arg {
    Arg::new("format")
        .long("format")
        .value_name("FORMAT")
        .value_parser(["text", "json"])
        .help("Report format [default: json with --output json, else text]")
}

pub(crate) fn report_format(m: &ArgMatches, ctx: &Context) -> OutputFormat {
    match opt_string(m, "format").as_deref() {
        Some("json") => OutputFormat::Json,
        Some(_) => OutputFormat::Table,
        None => ctx.output(),
    }
}

pub fn exec(m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    match m.subcommand() {
        Some(("new", sub)) => new(sub, ctx),
        Some(("check", sub)) => check(sub, ctx),
        Some(("review", sub)) => review(sub, ctx),
        Some(("promote", sub)) => promote(sub, ctx),
        _ => Err(CliError::usage("expected `proposal new|check|review|promote`")),
    }
}

fn cwd() -> Result<PathBuf, CliError> {
    std::env::current_dir().map_err(|e| CliError::other(format!("cannot determine the current directory: {e}")))
}

/// Shows `path` relative to the current directory when it is below it.
fn display(path: &Path) -> String {
    let relative = std::env::current_dir().ok().and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf));
    match relative {
        Some(p) if p.as_os_str().is_empty() => ".".into(),
        Some(p) => p.display().to_string(),
        None => path.display().to_string(),
    }
}

/// The registry source tree maintainer commands work on.
fn registry_root(ctx: &Context) -> Result<PathBuf, CliError> {
    if let Some(dir) = &ctx.globals.registry_dir {
        return Ok(dir.clone());
    }
    source::find_registry_dir(&cwd()?).ok_or_else(|| {
        CliError::usage(
            "no registry source tree here: run inside a capvirt checkout (with proposals/) or pass --registry DIR",
        )
    })
}

fn read_registry(root: &Path) -> Result<Vec<capvirt_host::registry::SourceFile>, CliError> {
    source::read_dir(root).map_err(|e| CliError::usage(format!("cannot read registry {}: {e}", display(root))))
}

fn write(root: &Path, relative: &str, text: &str) -> Result<(), CliError> {
    let path = root.join(relative);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| CliError::other(format!("cannot create {}: {e}", parent.display())))?;
    }
    source::write_atomic(&path, text).map_err(|e| CliError::other(format!("cannot write {}: {e}", display(&path))))
}

fn new(m: &ArgMatches, ctx: &Context) -> Result<(), CliError> {
    let id = opt_string(m, "id").unwrap_or_default();
    let root = registry_root(ctx)?;
    let files = read_registry(&root)?;
    let draft = scaffold::scaffold(&files, &id).map_err(|e| CliError::usage(e.to_string()))?;
    write(&root, &draft.path, &draft.text)?;
    output::print(&format!(
        "Created {} (stage draft).\nFill in every TODO, then run `capvirt proposal check` and ask maintainers for review.\n",
        display(&root.join(&draft.path))
    ));
    Ok(())
}

/// A registry root and the files below it that were named.
struct CheckTarget {
    root: PathBuf,
    /// The whole registry was named (or nothing was).
    whole: bool,
    only: Vec<String>,
}

fn check_targets(paths: &[String], ctx: &Context) -> Result<Vec<CheckTarget>, CliError> {
    if paths.is_empty() {
        return Ok(vec![CheckTarget { root: registry_root(ctx)?, whole: true, only: Vec::new() }]);
    }
    let mut targets: Vec<CheckTarget> = Vec::new();
    for arg in paths {
        let path = Path::new(arg);
        let (root, file) = if path.is_dir() {
            let root = if path.join("registry.toml").is_file() { path.to_path_buf() } else { path.join("proposals") };
            if !root.join("registry.toml").is_file() {
                return Err(CliError::usage(format!("{arg} is not a registry directory (no registry.toml)")));
            }
            (root, None)
        } else if path.is_file() {
            let (root, relative) = file_in_registry(path).ok_or_else(|| {
                CliError::usage(format!(
                    "{arg} is not a file of a registry (registry.toml, types.toml or capabilities/*.toml)"
                ))
            })?;
            (root, Some(relative))
        } else {
            return Err(CliError::usage(format!("{arg}: no such file or directory")));
        };
        let index = match targets.iter().position(|t| t.root == root) {
            Some(i) => i,
            None => {
                targets.push(CheckTarget { root, whole: false, only: Vec::new() });
                targets.len() - 1
            }
        };
        match file {
            None => targets[index].whole = true,
            Some(relative) => targets[index].only.push(relative),
        }
    }
    Ok(targets)
}

/// The registry root holding `file`, and the file's path relative to it.
fn file_in_registry(file: &Path) -> Option<(PathBuf, String)> {
    let name = file.file_name()?.to_str()?.to_string();
    let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if (name == "registry.toml" || name == "types.toml") && parent.join("registry.toml").is_file() {
        return Some((parent.to_path_buf(), name));
    }
    if name.ends_with(".toml") && parent.file_name().is_some_and(|n| n == "capabilities") {
        let root = parent.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if root.join("registry.toml").is_file() {
            return Some((root.to_path_buf(), format!("capabilities/{name}")));
        }
    }
    None
}

fn check(m: &ArgMatches, ctx: &Context) -> Result<(), CliError> {
    let paths: Vec<String> = m.get_many::<String>("paths").map(|v| v.cloned().collect()).unwrap_or_default();
    let format = report_format(m, ctx);
    let mut files_checked = 0;
    let mut findings: Vec<(String, Finding)> = Vec::new();
    for target in check_targets(&paths, ctx)? {
        let files = read_registry(&target.root)?;
        let mut report: Report = lint::check(&files);
        if !target.whole {
            report = report.restricted_to(&target.only);
        }
        files_checked += report.files;
        let root = display(&target.root);
        findings.extend(report.findings.into_iter().map(|f| (root.clone(), f)));
    }
    let total = Report { files: files_checked, findings: findings.iter().map(|(_, f)| f.clone()).collect() };
    match format {
        OutputFormat::Json => {
            let items: Vec<serde_json::Value> = findings
                .iter()
                .map(|(root, f)| {
                    serde_json::json!({
                        "file": joined(root, &f.file),
                        "line": f.line, "column": f.column, "severity": f.severity, "rule": f.rule, "message": f.message,
                    })
                })
                .collect();
            output::print(&output::json_value(&serde_json::json!({
                "files": total.files, "errors": total.errors(), "warnings": total.warnings(), "findings": items,
            })));
        }
        OutputFormat::Table => {
            let mut text: String = findings.iter().map(|(root, f)| format!("{}\n", f.render(root))).collect();
            text.push_str(&format!("proposal check: {}\n", total.summary()));
            output::print(&text);
        }
    }
    if total.has_errors() {
        return Err(CliError::other(format!(
            "the registry has {} error{}",
            total.errors(),
            if total.errors() == 1 { "" } else { "s" }
        )));
    }
    Ok(())
}

fn joined(root: &str, file: &str) -> String {
    let root = root.trim_end_matches('/');
    if root.is_empty() || root == "." {
        file.to_string()
    } else {
        format!("{root}/{file}")
    }
}

fn review(m: &ArgMatches, ctx: &Context) -> Result<(), CliError> {
    let id = opt_string(m, "id").unwrap_or_default();
    let by = opt_string(m, "as").unwrap_or_default();
    let comment = opt_string(m, "comment");
    let date = opt_string(m, "date").unwrap_or_else(review::today);
    let vote = if m.get_flag("approve") {
        VoteKind::Approve
    } else if m.get_flag("request-changes") {
        VoteKind::RequestChanges
    } else {
        VoteKind::Reject
    };
    let root = registry_root(ctx)?;
    let files = read_registry(&root)?;
    let request = VoteRequest { id: &id, by: &by, vote, comment: comment.as_deref(), date: &date };
    let reviewed = review::record_vote(&files, &request).map_err(|e| match e {
        review::ReviewError::NotMaintainer { .. } => CliError::new(ErrorCategory::Denied, e.to_string()),
        review::ReviewError::Invalid(_) => CliError::usage(e.to_string()),
    })?;
    write(&root, &reviewed.path, &reviewed.text)?;
    let verb = match vote {
        VoteKind::Approve => "approval",
        VoteKind::RequestChanges => "request for changes",
        VoteKind::Reject => "rejection",
    };
    let tally = &reviewed.tally;
    let mut text = format!(
        "Recorded {by}'s {verb} of {id}{} in {}.\n{}{}.\n",
        if reviewed.replaced { " (replacing their earlier vote)" } else { "" },
        display(&root.join(&reviewed.path)),
        tally.describe()[..1].to_uppercase(),
        &tally.describe()[1..],
    );
    let next = promote::next_stages(tally.stage);
    if tally.accepts() && !next.is_empty() {
        if let Some(next) = next.iter().find(|s| **s != Stage::Rejected) {
            text.push_str(&format!("Quorum reached: `capvirt proposal promote {id} --to {next}`.\n"));
        }
    } else if tally.rejects() {
        text.push_str(&format!("Quorum for rejection reached: `capvirt proposal promote {id} --to rejected`.\n"));
    }
    output::print(&text);
    Ok(())
}

fn promote(m: &ArgMatches, ctx: &Context) -> Result<(), CliError> {
    let id = opt_string(m, "id").unwrap_or_default();
    let to: Stage = opt_string(m, "to").unwrap_or_default().parse().map_err(CliError::usage)?;
    let replaced_by = opt_string(m, "replaced-by");
    let record = opt_string(m, "record");
    let root = registry_root(ctx)?;
    let root_label = display(&root);
    let files = read_registry(&root)?;
    let request = PromoteRequest { id: &id, to, replaced_by: replaced_by.as_deref(), record: record.as_deref() };
    let plan = match promote::promote(&files, &request) {
        Ok(plan) => plan,
        Err(PromoteError::Invalid(message)) => return Err(CliError::usage(message)),
        Err(refused @ PromoteError::Refused { .. }) => {
            if let PromoteError::Refused { findings, .. } = &refused {
                for finding in findings {
                    eprintln!("{}", finding.render(&root_label));
                }
            }
            return Err(CliError::new(ErrorCategory::Denied, refused.to_string()));
        }
    };
    // The proposal first: a failure between the two writes leaves the version unbumped,
    // which `registry diff` in CI then reports.
    for (relative, text) in &plan.files {
        write(&root, relative, text)?;
    }
    let mut text = format!(
        "Promoted {} from {} to {}.\nRegistry version {} → {} ({} bump",
        plan.id, plan.from, plan.to, plan.old_version, plan.new_version, plan.bump
    );
    if let Some(top) = plan.changes.first() {
        text.push_str(&format!(": {} change", top.class.as_str()));
    }
    text.push(')');
    match plan.to {
        Stage::Draft | Stage::Rejected => text.push_str(".\n"),
        _ => text.push_str(&format!("; since = \"{}\".\n", plan.new_version)),
    }
    for warning in &plan.warnings {
        text.push_str(&format!("{}\n", warning.render(&root_label)));
    }
    output::print(&text);
    Ok(())
}
