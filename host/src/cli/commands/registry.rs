//! `capvirt registry list|show ID`: the capabilities this host enforces.

use clap::{Arg, ArgMatches, Command};

use crate::{
    cli::{context::Context, output, CliError, OutputFormat},
    registry::Capability,
};

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
}

pub fn exec(m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    match m.subcommand() {
        Some(("list", _)) => list(ctx),
        Some(("show", sub)) => {
            let id = sub.get_one::<String>("id").cloned().unwrap_or_default();
            show(ctx, &id)
        }
        _ => Err(CliError::usage("expected `registry list` or `registry show ID`")),
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
            crate::ErrorCategory::NotFound,
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
