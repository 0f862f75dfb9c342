//! `capvirt proposal promote ID --to STAGE`: moves a proposal along its lifecycle
//! (draft → experimental → stable → deprecated → removed, or rejected), refusing without the
//! review quorum or when the proposal would not pass the lint at its new stage. It sets
//! `since`, the review decision, and bumps `registry.toml`'s version by what the change
//! requires (as `registry diff` classifies it).
//!
//! Both files are edited with `toml_edit`, so comments and layout survive.

use std::str::FromStr;

use semver::Version;
use toml_edit::{DocumentMut, Item, Table};

use super::{
    capability_file,
    diff::{self, Bump, Change},
    find_file,
    lint::{self, Finding, Severity},
    put_file, registry_file,
    review::Tally,
};
use capvirt_host::registry::{model::Stage, Registry, SourceFile};

/// What to do.
#[derive(Debug, Clone)]
pub struct PromoteRequest<'a> {
    pub id: &'a str,
    pub to: Stage,
    /// Sets `replaced_by` (deprecations).
    pub replaced_by: Option<&'a str>,
    /// Sets the review's decision record.
    pub record: Option<&'a str>,
}

/// A promotion ready to be written.
#[derive(Debug, Clone)]
pub struct Promotion {
    pub id: String,
    pub from: Stage,
    pub to: Stage,
    pub old_version: Version,
    pub new_version: Version,
    pub bump: Bump,
    /// What the promotion changes, as `registry diff` sees it.
    pub changes: Vec<Change>,
    pub tally: Tally,
    /// `(path relative to the registry root, new text)`: the proposal and `registry.toml`.
    pub files: Vec<(String, String)>,
    /// Warnings the lint still has for the proposal at its new stage.
    pub warnings: Vec<Finding>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PromoteError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot promote `{id}` from {from} to {to}: {}", reasons.join("; "))]
    Refused {
        id: String,
        from: Stage,
        to: Stage,
        reasons: Vec<String>,
        /// Lint errors of the proposal at the target stage.
        findings: Vec<Finding>,
    },
}

/// The stages a proposal at `from` may move to.
pub fn next_stages(from: Stage) -> &'static [Stage] {
    match from {
        Stage::Draft => &[Stage::Experimental, Stage::Rejected],
        Stage::Experimental => &[Stage::Stable, Stage::Removed, Stage::Rejected],
        Stage::Stable => &[Stage::Deprecated],
        Stage::Deprecated => &[Stage::Removed, Stage::Stable],
        // A rejected proposal may be reopened for discussion, as a draft.
        Stage::Rejected => &[Stage::Draft],
        Stage::Removed => &[],
    }
}

/// Plans the promotion; nothing is written.
pub fn promote(files: &[SourceFile], request: &PromoteRequest<'_>) -> Result<Promotion, PromoteError> {
    let info = registry_file(files).map_err(PromoteError::Invalid)?;
    let (path, doc) = capability_file(files, request.id).map_err(PromoteError::Invalid)?;
    let old = Registry::from_sources(files).map_err(|e| {
        PromoteError::Invalid(format!(
            "the registry does not compile, fix it first (see `capvirt proposal check`): {}",
            e.to_string().replace('\n', ";")
        ))
    })?;
    let (from, to) = (doc.stage, request.to);
    let mut reasons = Vec::new();
    let allowed = next_stages(from);
    if from == to {
        reasons.push(format!("it already is {to}"));
    } else if !allowed.contains(&to) {
        let list: Vec<&str> = allowed.iter().map(|s| s.as_str()).collect();
        reasons.push(format!(
            "{from} → {to} is not a lifecycle step (from {from}: {})",
            if list.is_empty() { "none, it is final".to_string() } else { list.join(", ") }
        ));
    }
    let tally = Tally::of(&doc, &info, from);
    if to == Stage::Rejected {
        if !tally.rejects() {
            reasons.push(format!(
                "rejecting needs {} maintainers voting `reject` at stage {from} ({})",
                tally.quorum,
                tally.describe()
            ));
        }
    } else if !tally.accepts() {
        reasons.push(format!(
            "no quorum: {} approvals by maintainers at stage {from} and no open objection are needed ({}); record votes with `capvirt proposal review {} --approve --as NAME`",
            tally.quorum,
            tally.describe(),
            request.id
        ));
    }

    // Edit with the current version first, to learn what the change requires.
    let text = find_file(files, &path).map(|f| f.text.clone()).unwrap_or_default();
    let invalid = |e: String| PromoteError::Invalid(format!("{path}: {e}"));
    let mut edited = edit_capability(&text, request, &info.version).map_err(invalid)?;
    let mut new_files = files.to_vec();
    put_file(&mut new_files, &path, edited.clone());
    let changes = match Registry::from_sources(&new_files) {
        Ok(new) => diff::diff(&old, &new).changes,
        Err(e) => {
            reasons.push(format!("the promoted registry would not compile: {}", e.to_string().replace('\n', ";")));
            Vec::new()
        }
    };
    let max = changes.iter().map(|c| c.class).max();
    let bump = Bump::required(max, &info.version).max(Bump::Patch);
    let new_version = bump.apply(&info.version);
    edited = edit_capability(&text, request, &new_version).map_err(invalid)?;
    let registry_text = find_file(files, "registry.toml").map(|f| f.text.clone()).unwrap_or_default();
    let registry_text =
        set_version(&registry_text, &new_version).map_err(|e| PromoteError::Invalid(format!("registry.toml: {e}")))?;
    put_file(&mut new_files, &path, edited.clone());
    put_file(&mut new_files, "registry.toml", registry_text.clone());

    let report = lint::check(&new_files);
    let quorum_refused =
        !reasons.is_empty() && reasons.iter().any(|r| r.starts_with("no quorum") || r.starts_with("rejecting"));
    let (errors, warnings): (Vec<Finding>, Vec<Finding>) = report
        .findings
        .into_iter()
        .filter(|f| f.file == path || f.file == "registry.toml")
        // The lint's review findings would only restate a missing quorum already reported.
        .filter(|f| !(quorum_refused && f.rule == lint::Rule::Review))
        .partition(|f| f.severity == Severity::Error);
    if !errors.is_empty() {
        reasons.push(format!(
            "at stage {to} the proposal fails the lint ({} error{})",
            errors.len(),
            if errors.len() == 1 { "" } else { "s" }
        ));
    }
    if !reasons.is_empty() {
        return Err(PromoteError::Refused { id: request.id.to_string(), from, to, reasons, findings: errors });
    }
    Ok(Promotion {
        id: request.id.to_string(),
        from,
        to,
        old_version: info.version.clone(),
        new_version,
        bump,
        changes,
        tally,
        files: vec![(path, edited), ("registry.toml".to_string(), registry_text)],
        warnings,
    })
}

/// The proposal text at its new stage.
fn edit_capability(text: &str, request: &PromoteRequest<'_>, version: &Version) -> Result<String, String> {
    let mut doc = DocumentMut::from_str(text).map_err(|e| e.message().to_string())?;
    let root = doc.as_table_mut();
    set_str(root, "stage", request.to.as_str());
    match request.to {
        Stage::Draft | Stage::Rejected => {
            root.remove("since");
        }
        _ => set_str_after(root, "since", &version.to_string(), "stage"),
    }
    if let Some(replacement) = request.replaced_by {
        set_str(root, "replaced_by", replacement);
    }
    let review = root
        .entry("review")
        .or_insert_with(|| Item::Table(Table::new()))
        .as_table_mut()
        .ok_or("`review` must be a table ([review])")?;
    let decision = match request.to {
        Stage::Draft => Some("pending"),
        Stage::Rejected => Some("rejected"),
        Stage::Experimental | Stage::Stable | Stage::Deprecated => Some("accepted"),
        // A removed capability was accepted once; the decision stays on record.
        Stage::Removed => None,
    };
    if let Some(decision) = decision {
        set_str(review, "decision", decision);
    }
    if let Some(record) = request.record {
        set_str(review, "record", record);
    }
    Ok(doc.to_string())
}

/// Sets `registry.toml`'s version, keeping its comments.
fn set_version(text: &str, version: &Version) -> Result<String, String> {
    let mut doc = DocumentMut::from_str(text).map_err(|e| e.message().to_string())?;
    set_str(doc.as_table_mut(), "version", &version.to_string());
    Ok(doc.to_string())
}

/// Sets a string value, keeping the comments and spacing around an existing one, and the
/// existing key with its own decor (the comment lines above the key: `Table::insert` would
/// replace the key and drop them, such as `registry.toml`'s header above `version`).
fn set_str(table: &mut Table, key: &str, value: &str) {
    let mut new = toml_edit::Value::from(value);
    if let Some(old) = table.get_mut(key).and_then(Item::as_value_mut) {
        *new.decor_mut() = old.decor().clone();
        *old = new;
        return;
    }
    table.insert(key, Item::Value(new));
}

/// Like [`set_str`], placing a new key right after `after` rather than at the table's end.
fn set_str_after(table: &mut Table, key: &str, value: &str, after: &str) {
    if table.contains_key(key) {
        return set_str(table, key, value);
    }
    // Re-insert the keys that follow `after`, so the new key lands in between.
    let keys: Vec<String> = table.iter().map(|(k, _)| k.to_string()).collect();
    let Some(position) = keys.iter().position(|k| k == after) else {
        return set_str(table, key, value);
    };
    let tail: Vec<(toml_edit::Key, Item)> = keys[position + 1..].iter().filter_map(|k| table.remove_entry(k)).collect();
    set_str(table, key, value);
    for (k, item) in tail {
        table.insert_formatted(&k, item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capvirt_host::registry::source::embedded_files;

    #[test]
    fn lifecycle_steps() {
        assert_eq!(next_stages(Stage::Draft), &[Stage::Experimental, Stage::Rejected]);
        assert!(next_stages(Stage::Removed).is_empty());
        assert!(!next_stages(Stage::Draft).contains(&Stage::Stable), "stable only after experimental");
    }

    #[test]
    fn version_bump_keeps_the_comments_above_and_beside_it() {
        let text = "# The registry.\n#\n# Semver.\nversion = \"1.1.0\" # current\ndescription = \"d\"\n";
        let bumped = set_version(text, &Version::new(1, 2, 0)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bumped, "# The registry.\n#\n# Semver.\nversion = \"1.2.0\" # current\ndescription = \"d\"\n");
    }

    #[test]
    fn since_lands_after_stage_and_comments_survive() {
        let text = "# head\nid = \"x.y\"\nstage = \"draft\" # stage comment\nmutates = false\n[review]\ndecision = \"pending\"\n";
        let request = PromoteRequest { id: "x.y", to: Stage::Experimental, replaced_by: None, record: None };
        let out = edit_capability(text, &request, &Version::new(1, 1, 0)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            out,
            "# head\nid = \"x.y\"\nstage = \"experimental\" # stage comment\nsince = \"1.1.0\"\nmutates = false\n[review]\ndecision = \"accepted\"\n"
        );
    }

    #[test]
    fn the_rejected_passthrough_cannot_be_promoted() {
        let files = embedded_files();
        for to in [Stage::Experimental, Stage::Draft] {
            let request = PromoteRequest { id: "domain.monitor-command", to, replaced_by: None, record: None };
            let Err(PromoteError::Refused { reasons, .. }) = promote(&files, &request) else {
                panic!("promotion to {to} accepted")
            };
            assert!(!reasons.is_empty());
        }
    }
}
