//! `capvirt registry list|show ID|diff OLD NEW|docs --out DIR`: the capabilities this host
//! enforces, how two registries differ, and the generated API reference.

use std::path::PathBuf;

use clap::{Arg, ArgMatches, Command};

use super::proposal::{format_arg, report_format};
use crate::{context::Context, opt_string, output, CliError, OutputFormat};
use capvirt_host::registry::{Capability, Registry};
use capvirt_maint::{diff, docs, source};

pub fn cli() -> Command {
    Command::new("registry")
        .about("Inspect the capability registry")
        .subcommand_required(true)
        .subcommand(Command::new("list").about("List every capability with its stage"))
        .subcommand(
            Command::new("show")
                .about("Show one capability's contract")
                .arg(Arg::new("id").value_name("ID").required(true)),
        )
        .subcommand(
            Command::new("diff")
                .about("Classify every change between two registries and check the semver bump")
                .long_about(
                    "Classify every change between two registries as breaking, compatible or docs-only, print the \
                     semver bump they require, and fail when NEW's registry.toml bumps the version less. OLD and NEW \
                     are registry directories or git revisions (REV, or REV:DIR for a registry elsewhere than \
                     proposals/ in the repository around the current directory).",
                )
                .arg(Arg::new("old").value_name("OLD").required(true).help("Directory or git revision"))
                .arg(Arg::new("new").value_name("NEW").required(true).help("Directory or git revision"))
                .arg(format_arg()),
        )
        .subcommand(
            Command::new("docs")
                .about("Generate the API reference (Markdown and HTML) and the driver support matrix")
                .arg(
                    Arg::new("out")
                        .long("out")
                        .value_name("DIR")
                        .required(true)
                        .help("Output directory (created; generated files are replaced)"),
                ),
        )
}

pub fn exec(m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    match m.subcommand() {
        Some(("list", _)) => list(ctx),
        Some(("show", sub)) => {
            let id = sub.get_one::<String>("id").cloned().unwrap_or_default();
            show(ctx, &id)
        }
        Some(("diff", sub)) => registry_diff(sub, ctx),
        Some(("docs", sub)) => registry_docs(sub, ctx),
        _ => Err(CliError::usage("expected `registry list`, `show ID`, `diff OLD NEW` or `docs --out DIR`")),
    }
}

fn list(ctx: &Context) -> Result<(), CliError> {
    let registry = &ctx.registry;
    match ctx.output() {
        OutputFormat::Json => {
            let items: Vec<serde_json::Value> = registry
                .capabilities()
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "id": c.id(), "version": c.doc.version, "stage": c.stage().as_str(),
                        "since": c.doc.since.as_ref().map(ToString::to_string), "mutates": c.mutates(), "title": c.doc.title,
                    })
                })
                .collect();
            output::print(&output::json_value(
                &serde_json::json!({"version": registry.version().to_string(), "capabilities": items}),
            ));
        }
        OutputFormat::Table => {
            let header: Vec<String> = ["Capability", "Stage", "Since", "Mutates", "Title"].map(String::from).to_vec();
            let cells: Vec<Vec<String>> = registry
                .capabilities()
                .iter()
                .map(|c| {
                    vec![
                        c.id().to_string(),
                        c.stage().to_string(),
                        c.doc.since.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".into()),
                        if c.mutates() { "yes" } else { "no" }.to_string(),
                        c.doc.title.clone(),
                    ]
                })
                .collect();
            output::print(&format!("Registry {}\n\n{}", registry.version(), output::table(&header, &cells)));
        }
    }
    Ok(())
}

fn show(ctx: &Context, id: &str) -> Result<(), CliError> {
    let registry = &ctx.registry;
    let cap = registry.lookup(id).ok_or_else(|| {
        CliError::new(
            capvirt_host::ErrorCategory::NotFound,
            format!("capability `{id}` is not in the registry {}", registry.version()),
        )
    })?;
    match ctx.output() {
        OutputFormat::Json => {
            let doc = serde_json::to_value(&cap.doc).map_err(|e| CliError::other(e.to_string()))?;
            output::print(&output::json_value(&doc));
        }
        OutputFormat::Table => output::print(&describe(ctx, cap)),
    }
    Ok(())
}

fn describe(ctx: &Context, cap: &Capability) -> String {
    let types = &ctx.registry.types;
    let doc = &cap.doc;
    let mut s = format!("{} — {}\n", doc.id, doc.title);
    s.push_str(&format!(
        "Stage: {}{}  Version: {}  Mutates: {}\n\n",
        doc.stage,
        doc.since.as_ref().map(|v| format!(" since {v}")).unwrap_or_default(),
        doc.version,
        if doc.mutates { "yes" } else { "no" }
    ));
    s.push_str(&format!("What it is:\n  {}\n\nWhy applications use it:\n  {}\n\n", doc.summary, doc.motivation));
    s.push_str("Parameters:\n");
    if cap.params.is_empty() {
        s.push_str("  (none)\n");
    }
    for p in &cap.params {
        let req = if p.required {
            "required".to_string()
        } else {
            format!("optional{}", p.default.as_ref().map(|d| format!(", default {d}")).unwrap_or_default())
        };
        s.push_str(&format!("  {}: {} ({req}) — {}\n", p.name, p.ty_text, p.doc));
    }
    s.push_str(&format!(
        "Result: {}{}\n",
        types.type_name(&cap.result),
        if doc.result.doc.is_empty() { String::new() } else { format!(" — {}", doc.result.doc) }
    ));
    if !doc.errors.is_empty() {
        let errors: Vec<String> = doc.errors.iter().map(|e| format!("{e:?}")).collect();
        s.push_str(&format!("Errors: {}\n", errors.join(", ")));
    }
    if let Some(cli) = &doc.cli {
        s.push_str(&format!(
            "CLI: capvirt {} {}\n",
            cli.command,
            cli.positional.iter().map(|p| p.to_uppercase()).collect::<Vec<_>>().join(" ")
        ));
    }
    if !doc.mapping.is_empty() {
        s.push_str("\nDriver mappings:\n");
        for (driver, mapping) in &doc.mapping {
            s.push_str(&format!("  {driver}: {}\n", mapping.note));
        }
    }
    s.push_str(&format!("\nReview: {:?}", doc.review.decision));
    let approvals: Vec<&str> = doc.review.votes.iter().map(|v| v.by.as_str()).collect();
    if !approvals.is_empty() {
        s.push_str(&format!(" (votes: {})", approvals.join(", ")));
    }
    s.push('\n');
    if !doc.review.record.trim().is_empty() {
        s.push_str(&format!("  {}\n", doc.review.record.trim().replace('\n', "\n  ")));
    }
    s
}

fn load_side(arg: &str, cwd: &std::path::Path) -> Result<(String, Registry), CliError> {
    let reference = source::RegistryRef::parse(arg);
    let label = reference.label();
    let files = reference.read(cwd).map_err(|e| CliError::usage(format!("cannot read registry {label}: {e}")))?;
    let registry = Registry::from_sources(&files)
        .map_err(|e| CliError::other(format!("registry {label} is invalid: {}", e.to_string().replace('\n', "; "))))?;
    Ok((label, registry))
}

fn registry_diff(m: &ArgMatches, ctx: &Context) -> Result<(), CliError> {
    let cwd =
        std::env::current_dir().map_err(|e| CliError::other(format!("cannot determine the current directory: {e}")))?;
    let (old_label, old) = load_side(&opt_string(m, "old").unwrap_or_default(), &cwd)?;
    let (new_label, new) = load_side(&opt_string(m, "new").unwrap_or_default(), &cwd)?;
    let report = diff::diff(&old, &new);
    let actual = report.actual_bump.map_or("backwards", diff::Bump::as_str);
    match report_format(m, ctx) {
        OutputFormat::Json => {
            let mut value = serde_json::to_value(&report).map_err(|e| CliError::other(e.to_string()))?;
            if let Some(object) = value.as_object_mut() {
                object.insert("old".into(), old_label.clone().into());
                object.insert("new".into(), new_label.clone().into());
                object.insert("ok".into(), report.ok().into());
            }
            output::print(&output::json_value(&value));
        }
        OutputFormat::Table => {
            let mut text =
                format!("Registry {} ({old_label}) → {} ({new_label})\n\n", report.old_version, report.new_version);
            if report.changes.is_empty() {
                text.push_str("No changes.\n\n");
            }
            let width = report.changes.iter().map(|c| c.class.as_str().len()).max().unwrap_or(0);
            for change in &report.changes {
                text.push_str(&format!(
                    "{:<width$}  {}: {}\n",
                    change.class.as_str(),
                    change.subject,
                    change.description
                ));
            }
            if !report.changes.is_empty() {
                text.push('\n');
            }
            text.push_str(&format!(
                "Required bump: {} (at least {}); registry.toml bumps {actual}: {}\n",
                report.required_bump,
                report.minimum_version(),
                if report.ok() { "ok" } else { "NOT ENOUGH" }
            ));
            output::print(&text);
        }
    }
    if !report.ok() {
        return Err(CliError::other(format!(
            "registry.toml's version {} → {} is a {actual} bump, but the changes require a {} bump (version {} or later)",
            report.old_version,
            report.new_version,
            report.required_bump,
            report.minimum_version()
        )));
    }
    Ok(())
}

fn registry_docs(m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    let out = PathBuf::from(opt_string(m, "out").unwrap_or_default());
    let registry = std::sync::Arc::clone(&ctx.registry);
    let host = ctx.host()?;
    let installed = docs::Installed {
        loaded: host.plugins().loaded.iter().map(|p| p.info.clone()).collect(),
        refused: host
            .plugins()
            .refused
            .iter()
            .map(|r| {
                (r.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), r.reason.clone())
            })
            .collect(),
    };
    let pages = docs::render(&registry, &installed);
    source::write_all(&out, &pages).map_err(|e| CliError::other(format!("cannot write the docs: {e}")))?;
    let drivers: Vec<&str> = installed.loaded.iter().map(|p| p.name.as_str()).collect();
    output::print(&format!(
        "Wrote {} files to {} for registry {}: {} capabilities, support matrix for {}.\nOpen {}/index.html or start from {}/index.md.\n",
        pages.len(),
        out.display(),
        registry.version(),
        registry.capabilities().len(),
        if drivers.is_empty() { "no installed driver".to_string() } else { drivers.join(", ") },
        out.display(),
        out.display()
    ));
    Ok(())
}
