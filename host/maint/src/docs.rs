//! `capvirt registry docs --out DIR`: the API reference generated from the registry, as
//! Markdown and as a static HTML site (rendered from the same Markdown with pulldown-cmark),
//! plus a support matrix (capability × installed driver) built from the plugins' manifests,
//! like libvirt's hvsupport page.
//!
//! Pure: returns `(path, contents)` pairs; the caller writes them. Output is deterministic
//! (no timestamps), so regenerated docs only change when the registry or plugins do.

use std::fmt::Write as _;

use pulldown_cmark::{html, Options, Parser};

use capvirt_host::{
    plugins::PluginInfo,
    registry::{model::Stage, Capability, Registry, TypeBody},
};

/// What is installed, for the support matrix.
#[derive(Debug, Clone, Default)]
pub struct Installed {
    pub loaded: Vec<PluginInfo>,
    /// `(file, reason)` of plugins the host refused.
    pub refused: Vec<(String, String)>,
}

/// Every page, Markdown and HTML, plus the stylesheet: `(path relative to DIR, contents)`.
pub fn render(registry: &Registry, installed: &Installed) -> Vec<(String, String)> {
    let mut pages = Vec::new();
    let mut page = |path: &str, title: &str, depth: usize, markdown: &dyn Fn(Ext) -> String| {
        pages.push((format!("{path}.md"), markdown(Ext::Md)));
        pages.push((format!("{path}.html"), html_page(registry, title, depth, &markdown(Ext::Html))));
    };
    page("index", "Capabilities", 0, &|ext| index(registry, ext));
    page("types", "Types", 0, &|ext| types(registry, ext));
    page("support-matrix", "Support matrix", 0, &|ext| support_matrix(registry, installed, ext));
    for cap in registry.capabilities() {
        page(&format!("capabilities/{}", cap.id()), cap.id(), 1, &|ext| capability(registry, cap, installed, ext));
    }
    pages.push(("style.css".to_string(), STYLE.to_string()));
    pages
}

/// Link targets differ between the Markdown and the HTML pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ext {
    Md,
    Html,
}

impl Ext {
    fn as_str(self) -> &'static str {
        match self {
            Ext::Md => "md",
            Ext::Html => "html",
        }
    }
}

/// Text from the registry inside Markdown: never raw HTML. Code spans (`` `list<T>` ``) are
/// left alone, since Markdown shows their content literally.
fn text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_code = false;
    for c in s.chars() {
        match c {
            '`' => {
                in_code = !in_code;
                out.push(c);
            }
            '<' if !in_code => out.push_str("&lt;"),
            '>' if !in_code => out.push_str("&gt;"),
            '&' if !in_code => out.push_str("&amp;"),
            _ => out.push(c),
        }
    }
    out
}

fn cell(s: &str) -> String {
    text(s).replace('|', "\\|").replace('\n', " ")
}

fn anchor(name: &str) -> String {
    name.to_ascii_lowercase()
}

fn stage_blurb(stage: Stage) -> &'static str {
    match stage {
        Stage::Draft => "proposal under review; not callable",
        Stage::Experimental => {
            "callable only when enabled (`--enable ID`, `CAPVIRT_ENABLE` or `enable` in the host config)"
        }
        Stage::Stable => "callable; covered by the registry's compatibility promise",
        Stage::Deprecated => "callable with a warning; use its replacement",
        Stage::Removed => "no longer callable; plugins implementing it are refused",
        Stage::Rejected => "rejected in review; never callable",
    }
}

fn index(registry: &Registry, ext: Ext) -> String {
    let e = ext.as_str();
    let mut s = format!("# capvirt capability registry {}\n\n", registry.version());
    if !registry.info.description.is_empty() {
        let _ = writeln!(s, "{}\n", text(&registry.info.description));
    }
    let _ = writeln!(
        s,
        "Every operation a capvirt driver performs is one of these reviewed, hypervisor-agnostic capabilities. \
         See also the [shared types](types.{e}) and the [support matrix](support-matrix.{e}).\n"
    );
    for (heading, stages) in [
        ("Callable capabilities", &[Stage::Stable, Stage::Experimental, Stage::Deprecated][..]),
        ("Proposals and records", &[Stage::Draft, Stage::Removed, Stage::Rejected][..]),
    ] {
        let caps: Vec<&Capability> = registry.capabilities().iter().filter(|c| stages.contains(&c.stage())).collect();
        if caps.is_empty() {
            continue;
        }
        let _ = writeln!(s, "## {heading}\n\n| Capability | Stage | Since | Mutates | Title |\n|---|---|---|---|---|");
        for cap in caps {
            let _ = writeln!(
                s,
                "| [`{id}`](capabilities/{id}.{e}) | {} | {} | {} | {} |",
                cap.stage(),
                cap.doc.since.as_ref().map_or("—".to_string(), ToString::to_string),
                if cap.mutates() { "yes" } else { "no" },
                cell(&cap.doc.title),
                id = cap.id(),
            );
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "## Registry\n\nVersion {}; a stage change needs approval by {} of the maintainers ({}).",
        registry.version(),
        registry.info.review.quorum,
        registry.info.maintainers.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
    );
    s
}

/// A type expression with named types linked to their definition.
fn type_link(registry: &Registry, expr: &str, prefix: &str, ext: Ext) -> String {
    let expr = expr.trim();
    if let Some(inner) = expr.strip_prefix("list<").and_then(|r| r.strip_suffix('>')) {
        return format!("list&lt;{}&gt;", type_link(registry, inner, prefix, ext));
    }
    if registry.types.lookup(expr).is_some() {
        format!("[`{expr}`]({prefix}types.{}#{})", ext.as_str(), anchor(expr))
    } else {
        format!("`{expr}`")
    }
}

fn capability(registry: &Registry, cap: &Capability, installed: &Installed, ext: Ext) -> String {
    let doc = &cap.doc;
    let e = ext.as_str();
    let mut s = format!("# `{}` — {}\n\n", doc.id, text(&doc.title));
    let _ = writeln!(
        s,
        "| Stage | Since | Contract version | Mutates |\n|---|---|---|---|\n| **{}** | {} | {} | {} |\n",
        doc.stage,
        doc.since.as_ref().map_or("—".to_string(), |v| format!("registry {v}")),
        doc.version,
        if doc.mutates { "yes (refused on read-only connections, audited)" } else { "no" }
    );
    let _ = writeln!(s, "*{}.*\n", stage_blurb(doc.stage));
    if let Some(replacement) = &doc.replaced_by {
        let _ = writeln!(s, "Replaced by [`{replacement}`]({replacement}.{e}).\n");
    }
    let _ = writeln!(
        s,
        "## What it is\n\n{}\n\n## Why applications use it\n\n{}\n",
        text(&doc.summary),
        text(&doc.motivation)
    );
    s.push_str("## Contract\n\n### Parameters\n\n");
    if cap.params.is_empty() {
        s.push_str("None.\n\n");
    } else {
        s.push_str("| Name | Type | Required | Default | Description |\n|---|---|---|---|---|\n");
        for p in &cap.params {
            let bounds = match (p.bounds.min, p.bounds.max) {
                (None, None) => String::new(),
                (min, max) => format!(
                    " ({}..={})",
                    min.map_or(String::new(), |m| m.to_string()),
                    max.map_or(String::new(), |m| m.to_string())
                ),
            };
            let _ = writeln!(
                s,
                "| `{}` | {}{bounds} | {} | {} | {} |",
                p.name,
                type_link(registry, &p.ty_text, "../", ext),
                if p.required { "yes" } else { "no" },
                p.default.as_ref().map_or("—".to_string(), |d| format!("`{d}`")),
                cell(&p.doc)
            );
        }
        s.push('\n');
    }
    let _ = write!(s, "### Result\n\n{}", type_link(registry, &doc.result.ty, "../", ext));
    if !doc.result.doc.is_empty() {
        let _ = write!(s, " — {}", text(&doc.result.doc));
    }
    s.push_str("\n\n### Errors\n\n");
    if doc.errors.is_empty() {
        s.push_str("None declared.\n\n");
    } else {
        let errors: Vec<String> = doc
            .errors
            .iter()
            .map(|e| {
                format!(
                    "`{}`",
                    serde_json::to_value(e).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
                )
            })
            .collect();
        let _ = writeln!(s, "{}\n", errors.join(", "));
    }
    if let Some(contract) = &doc.contract {
        s.push_str("### Behaviour\n\nChecked against every plugin by `capvirt plugin verify`.\n\n");
        if !contract.cases.is_empty() {
            s.push_str("| Given | Also passed | Outcome | Then | Result |\n|---|---|---|---|---|\n");
            for case in &contract.cases {
                let with: Vec<String> =
                    case.with.iter().flatten().map(|(name, value)| format!("`{name} = {value}`")).collect();
                let _ = writeln!(
                    s,
                    "| {} | {} | `{}` | {} | {} |",
                    cell(&case.given),
                    if with.is_empty() { "-".to_string() } else { cell(&with.join(", ")) },
                    cell(&case.expect),
                    case.then.as_deref().map_or("-".to_string(), cell),
                    case.result.as_deref().map_or("-".to_string(), cell),
                );
            }
            s.push('\n');
        }
        if !contract.monotonic.is_empty() {
            let fields: Vec<String> = contract.monotonic.iter().map(|f| format!("`{f}`")).collect();
            let _ = writeln!(s, "Never decrease between two calls on a running domain: {}.\n", fields.join(", "));
        }
    }
    if let Some(cli) = &doc.cli {
        let args: Vec<String> = cli.positional.iter().map(|p| p.to_uppercase()).collect();
        let _ = write!(s, "### Command line\n\n`capvirt {} {}`", cli.command, args.join(" "));
        if !cli.about.is_empty() {
            let _ = write!(s, " — {}", text(&cli.about));
        }
        s.push_str("\n\n");
    }
    if doc.stage.is_callable() {
        let _ = writeln!(s, "Also reachable as `capvirt call {} --arg name=value…`.\n", doc.id);
    }
    s.push_str(
        "## Per-driver mapping\n\n| Driver | How it implements the capability | Installed plugin |\n|---|---|---|\n",
    );
    let mut drivers: Vec<&str> = doc.mapping.keys().map(String::as_str).collect();
    for plugin in &installed.loaded {
        if !drivers.contains(&plugin.name.as_str()) {
            drivers.push(&plugin.name);
        }
    }
    for driver in drivers {
        let note = doc.mapping.get(driver).map_or("—".to_string(), |m| cell(&m.note));
        let support = match installed.loaded.iter().find(|p| p.name == driver) {
            Some(plugin) => support_cell(cap, plugin),
            None => "not installed".to_string(),
        };
        let _ = writeln!(s, "| `{driver}` | {note} | {support} |");
    }
    s.push('\n');
    let _ = writeln!(s, "## Review\n\nDecision: **{}**.\n", format!("{:?}", doc.review.decision).to_lowercase());
    if !doc.review.record.trim().is_empty() {
        let _ = writeln!(s, "{}\n", text(doc.review.record.trim()));
    }
    if !doc.review.votes.is_empty() {
        s.push_str("| Maintainer | Vote | Date | Comment |\n|---|---|---|---|\n");
        for v in &doc.review.votes {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                cell(&v.by),
                super::review::vote_word(v.vote),
                cell(&v.date),
                v.comment.as_deref().map_or(String::new(), cell)
            );
        }
        s.push('\n');
    }
    if !doc.open_questions.is_empty() {
        s.push_str("## Open questions\n\n");
        for q in &doc.open_questions {
            let _ = writeln!(s, "- {}", text(q));
        }
        s.push('\n');
    }
    s
}

/// Whether `plugin` implements `cap` the way the host would admit it.
fn support_cell(cap: &Capability, plugin: &PluginInfo) -> String {
    match plugin.capabilities.iter().find(|(id, _)| id == cap.id()) {
        None => "not implemented".to_string(),
        Some((_, version)) if *version == 0 || *version > cap.doc.version => {
            format!("ignored: implements contract v{version}, the registry declares v{}", cap.doc.version)
        }
        Some(_) if !cap.stage().is_callable() => format!("declared, but {} (plugin refused)", cap.stage()),
        Some((_, version)) => format!("implemented in {} {} (contract v{version})", plugin.name, plugin.version),
    }
}

fn support_matrix(registry: &Registry, installed: &Installed, ext: Ext) -> String {
    let e = ext.as_str();
    let mut s = format!("# Support matrix — registry {}\n\n", registry.version());
    s.push_str(
        "Which installed driver implements which callable capability, from the plugins' manifests as the host admits \
         them (a capability a plugin declares at a contract version newer than the registry's is ignored).\n\n",
    );
    if installed.loaded.is_empty() {
        s.push_str("No driver plugin is installed (searched `--plugin-dir`, `$CAPVIRT_PLUGIN_DIR`, or the executable's directory and the system plugin directory).\n\n");
    } else {
        s.push_str(
            "## Drivers\n\n| Driver | Version | Vendor | Schemes | Built against registry |\n|---|---|---|---|---|\n",
        );
        for p in &installed.loaded {
            let _ = writeln!(
                s,
                "| `{}` | {} | {} | {} | {} |",
                p.name,
                cell(&p.version),
                cell(&p.vendor),
                p.schemes.iter().map(|x| format!("`{x}`")).collect::<Vec<_>>().join(", "),
                cell(&p.registry_version)
            );
        }
        s.push('\n');
    }
    let callable: Vec<&Capability> = registry.capabilities().iter().filter(|c| c.stage().is_callable()).collect();
    s.push_str("## Capabilities\n\n| Capability | Stage | Since |");
    for p in &installed.loaded {
        let _ = write!(s, " `{}` |", p.name);
    }
    s.push_str("\n|---|---|---|");
    for _ in &installed.loaded {
        s.push_str("---|");
    }
    s.push('\n');
    for cap in &callable {
        let _ = write!(
            s,
            "| [`{id}`](capabilities/{id}.{e}) | {} | {} |",
            cap.stage(),
            cap.doc.since.as_ref().map_or("—".to_string(), ToString::to_string),
            id = cap.id()
        );
        for p in &installed.loaded {
            let _ = write!(s, " {} |", matrix_cell(cap, p));
        }
        s.push('\n');
    }
    if !installed.loaded.is_empty() {
        s.push_str("| **Implemented** | | |");
        for p in &installed.loaded {
            let count = callable.iter().filter(|c| matrix_cell(c, p).starts_with("yes")).count();
            let _ = write!(s, " {count} of {} |", callable.len());
        }
        s.push('\n');
    }
    s.push('\n');
    if !installed.refused.is_empty() {
        s.push_str("## Refused plugins\n\n");
        for (file, reason) in &installed.refused {
            let _ = writeln!(s, "- `{}`: {}", cell(file), text(reason));
        }
        s.push('\n');
    }
    s
}

fn matrix_cell(cap: &Capability, plugin: &PluginInfo) -> String {
    match plugin.capabilities.iter().find(|(id, _)| id == cap.id()) {
        Some((_, version)) if *version >= 1 && *version <= cap.doc.version => {
            format!("yes (v{version}, plugin {})", cell(&plugin.version))
        }
        Some((_, version)) => format!("ignored (v{version})"),
        None => "no".to_string(),
    }
}

fn types(registry: &Registry, _ext: Ext) -> String {
    let mut s = format!("# Shared types — registry {}\n\n", registry.version());
    s.push_str("Value types shared by capabilities. Owned by the registry: every driver reads and returns exactly these shapes.\n\n");
    for def in registry.types.iter() {
        let _ = writeln!(s, "<a id=\"{}\"></a>\n\n## `{}`\n\n{}\n", anchor(&def.name), def.name, text(&def.doc));
        match &def.body {
            TypeBody::Scalar { base, format, max_len, bounds } => {
                let mut facts = vec![format!("a `{}`", registry.types.type_name(base))];
                if let Some(format) = format {
                    facts.push(format!("format `{}`", format!("{format:?}").to_lowercase()));
                }
                if let Some(max) = max_len {
                    facts.push(format!("at most {max} bytes"));
                }
                if let Some(min) = bounds.min {
                    facts.push(format!("≥ {min}"));
                }
                if let Some(max) = bounds.max {
                    facts.push(format!("≤ {max}"));
                }
                let _ = writeln!(s, "{}.\n", facts.join(", "));
            }
            TypeBody::Enum { values } => {
                let values: Vec<String> = values.iter().map(|v| format!("`{v}`")).collect();
                let _ = writeln!(s, "One of {}.\n", values.join(", "));
            }
            TypeBody::Record { fields } => {
                s.push_str("| Field | Type | Required | Default | Description |\n|---|---|---|---|---|\n");
                for f in fields {
                    let _ = writeln!(
                        s,
                        "| `{}` | {} | {} | {} | {} |",
                        f.name,
                        type_link(registry, &f.ty_text, "", _ext),
                        if f.required { "yes" } else { "no" },
                        f.default.as_ref().map_or("—".to_string(), |d| format!("`{d}`")),
                        cell(&f.doc)
                    );
                }
                s.push('\n');
            }
        }
    }
    s
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn html_page(registry: &Registry, title: &str, depth: usize, markdown: &str) -> String {
    let root = "../".repeat(depth);
    let mut body = String::new();
    html::push_html(&mut body, Parser::new_ext(markdown, Options::ENABLE_TABLES));
    let version = registry.version();
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{} — capvirt registry {version}</title>\n<link rel=\"stylesheet\" href=\"{root}style.css\">\n</head>\n<body>\n\
         <nav><a href=\"{root}index.html\">Capabilities</a> · <a href=\"{root}types.html\">Types</a> · <a href=\"{root}support-matrix.html\">Support matrix</a></nav>\n\
         <main>\n{body}</main>\n<footer>Generated by <code>capvirt registry docs</code> from registry {version}.</footer>\n</body>\n</html>\n",
        escape_html(title)
    )
}

const STYLE: &str = "body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 0 auto; padding: 1rem 2rem; line-height: 1.5; color: #1b1b1b; }
nav { border-bottom: 1px solid #ccc; padding-bottom: .5rem; margin-bottom: 1rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
code { background: #f5f5f5; padding: 0 .2rem; border-radius: 3px; }
footer { border-top: 1px solid #ccc; margin-top: 2rem; padding-top: .5rem; color: #666; font-size: .9rem; }
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_capability_gets_both_pages_and_links_match_the_format() {
        let registry = Registry::embedded().unwrap_or_else(|e| panic!("{e}"));
        let plugin = PluginInfo {
            name: "test".into(),
            vendor: "capvirt".into(),
            version: "0.1.0".into(),
            registry_version: "1.0.0".into(),
            schemes: vec!["test".into()],
            description: String::new(),
            capabilities: vec![("domain.suspend".into(), 1)],
        };
        let pages = render(&registry, &Installed { loaded: vec![plugin], refused: Vec::new() });
        let get = |path: &str| pages.iter().find(|(p, _)| p == path).map(|(_, c)| c.as_str()).unwrap_or_default();
        for cap in registry.capabilities() {
            assert!(!get(&format!("capabilities/{}.md", cap.id())).is_empty());
            assert!(get(&format!("capabilities/{}.html", cap.id())).contains("<table>"));
        }
        let matrix = get("support-matrix.md");
        assert!(
            matrix.contains(
                "| [`domain.suspend`](capabilities/domain.suspend.md) | stable | 1.0.0 | yes (v1, plugin 0.1.0) |"
            ),
            "{matrix}"
        );
        assert!(
            matrix.contains("| [`domain.resume`](capabilities/domain.resume.md) | stable | 1.0.0 | no |"),
            "{matrix}"
        );
        assert!(get("support-matrix.html").contains("href=\"capabilities/domain.suspend.html\""));
        assert!(get("capabilities/domain.define.html").contains("href=\"../types.html#domainspec\""));
        assert!(!get("index.md").contains(".html"));
    }
}
