//! `capvirt proposal review`: votes recorded inside the proposal, edited with `toml_edit` so
//! that the author's comments and layout survive.
//!
//! A vote records the stage the proposal was at, because it approves (or objects to) the step
//! out of that stage: `proposal promote` counts only votes cast at the current stage. Each
//! maintainer has one vote per stage; voting again at the same stage replaces it.

use std::str::FromStr;

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table};

use super::{capability_file, lint, registry_file};
use capvirt_host::registry::{
    model::{CapabilityFile, Stage, VoteKind},
    RegistryFile, SourceFile,
};

/// A vote to record.
#[derive(Debug, Clone)]
pub struct VoteRequest<'a> {
    pub id: &'a str,
    pub by: &'a str,
    pub vote: VoteKind,
    pub comment: Option<&'a str>,
    /// `YYYY-MM-DD`.
    pub date: &'a str,
}

/// Where a proposal's review stands at one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    pub stage: Stage,
    pub quorum: u32,
    pub approvals: Vec<String>,
    pub change_requests: Vec<String>,
    pub rejections: Vec<String>,
}

impl Tally {
    pub fn of(doc: &CapabilityFile, info: &RegistryFile, stage: Stage) -> Tally {
        let names = |kind| lint::votes_of_kind(doc, info, Some(stage), kind).into_iter().map(String::from).collect();
        Tally {
            stage,
            quorum: info.review.quorum,
            approvals: names(VoteKind::Approve),
            change_requests: names(VoteKind::RequestChanges),
            rejections: names(VoteKind::Reject),
        }
    }

    /// Enough approvals, and no maintainer asking for changes or rejecting.
    pub fn accepts(&self) -> bool {
        self.approvals.len() >= self.quorum as usize && self.change_requests.is_empty() && self.rejections.is_empty()
    }

    /// Enough maintainers rejecting.
    pub fn rejects(&self) -> bool {
        self.rejections.len() >= self.quorum as usize
    }

    /// One line: `approvals 1/2 (ada); changes requested by brendan`.
    pub fn describe(&self) -> String {
        let list = |names: &[String]| if names.is_empty() { String::new() } else { format!(" ({})", names.join(", ")) };
        let mut s = format!(
            "approvals at stage {}: {}/{}{}",
            self.stage,
            self.approvals.len(),
            self.quorum,
            list(&self.approvals)
        );
        if !self.change_requests.is_empty() {
            s.push_str(&format!("; changes requested by {}", self.change_requests.join(", ")));
        }
        if !self.rejections.is_empty() {
            s.push_str(&format!("; rejected by {}", self.rejections.join(", ")));
        }
        s
    }
}

/// The edited proposal.
#[derive(Debug, Clone)]
pub struct Reviewed {
    pub path: String,
    pub text: String,
    /// The maintainer had voted before; that vote was replaced.
    pub replaced: bool,
    pub tally: Tally,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error(
        "`{name}` is not a maintainer in registry.toml (maintainers: {maintainers}); only maintainers review proposals"
    )]
    NotMaintainer { name: String, maintainers: String },
    #[error("{0}")]
    Invalid(String),
}

/// Records `request` in the proposal's `[[review.votes]]`, returning the new text.
pub fn record_vote(files: &[SourceFile], request: &VoteRequest<'_>) -> Result<Reviewed, ReviewError> {
    let info = registry_file(files).map_err(ReviewError::Invalid)?;
    if !info.maintainers.iter().any(|m| m.name == request.by) {
        let names: Vec<&str> = info.maintainers.iter().map(|m| m.name.as_str()).collect();
        return Err(ReviewError::NotMaintainer {
            name: request.by.to_string(),
            maintainers: if names.is_empty() { "none".into() } else { names.join(", ") },
        });
    }
    if !is_date(request.date) {
        return Err(ReviewError::Invalid(format!("date {:?} is not of the form YYYY-MM-DD", request.date)));
    }
    let (path, doc) = capability_file(files, request.id).map_err(ReviewError::Invalid)?;
    let text = files.iter().find(|f| f.path == path).map(|f| f.text.as_str()).unwrap_or_default();
    let mut edit = DocumentMut::from_str(text).map_err(|e| ReviewError::Invalid(format!("{path}: {}", e.message())))?;
    let replaced =
        set_vote(&mut edit, request, doc.stage).map_err(|why| ReviewError::Invalid(format!("{path}: {why}")))?;
    let text = edit.to_string();
    let reviewed: CapabilityFile = toml::from_str(&text)
        .map_err(|e| ReviewError::Invalid(format!("{path}: the edited review would not parse: {}", e.message())))?;
    let tally = Tally::of(&reviewed, &info, doc.stage);
    Ok(Reviewed { path, text, replaced, tally })
}

fn set_vote(edit: &mut DocumentMut, request: &VoteRequest<'_>, stage: Stage) -> Result<bool, String> {
    let review = edit
        .entry("review")
        .or_insert_with(|| Item::Table(Table::new()))
        .as_table_mut()
        .ok_or("`review` must be a table ([review])")?;
    let votes = review
        .entry("votes")
        .or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()))
        .as_array_of_tables_mut()
        .ok_or("`review.votes` must be an array of tables ([[review.votes]])")?;
    // One vote per maintainer and stage: a new vote replaces the one cast at the same stage,
    // votes on earlier steps stay as the record of who approved them.
    let existing = votes.iter_mut().find(|t| {
        t.get("by").and_then(Item::as_str) == Some(request.by)
            && t.get("at_stage").and_then(Item::as_str) == Some(stage.as_str())
    });
    let replaced = existing.is_some();
    let table = match existing {
        Some(table) => table,
        None => {
            let mut table = Table::new();
            table.insert("by", toml_edit::value(request.by));
            votes.push(table);
            let last = votes.len() - 1;
            votes.get_mut(last).ok_or("vote not recorded")?
        }
    };
    table.insert("vote", toml_edit::value(vote_word(request.vote)));
    table.insert("date", toml_edit::value(request.date));
    match request.comment {
        Some(comment) => {
            table.insert("comment", toml_edit::value(comment));
        }
        None => {
            table.remove("comment");
        }
    }
    table.insert("at_stage", toml_edit::value(stage.as_str()));
    Ok(replaced)
}

pub fn vote_word(kind: VoteKind) -> &'static str {
    match kind {
        VoteKind::Approve => "approve",
        VoteKind::RequestChanges => "request-changes",
        VoteKind::Reject => "reject",
    }
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() })
        && matches!(s[5..7].parse::<u8>(), Ok(1..=12))
        && matches!(s[8..10].parse::<u8>(), Ok(1..=31))
}

/// Today's date (UTC) as `YYYY-MM-DD`.
pub fn today() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().chars().take(10).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use capvirt_host::registry::source::embedded_files;

    fn with_draft(text: &str) -> Vec<SourceFile> {
        let mut files = embedded_files();
        files.push(SourceFile { path: "capabilities/domain.set-vcpus.toml".into(), text: text.into() });
        files
    }

    const DRAFT: &str = r#"# Header comment kept.
id = "domain.set-vcpus"
version = 1
title = "Set vCPUs"   # trailing comment kept
stage = "draft"
mutates = true
summary = "s"
motivation = "m"

[review]
# Votes below.
decision = "pending"
"#;

    fn request<'a>(by: &'a str, vote: VoteKind, comment: Option<&'a str>) -> VoteRequest<'a> {
        VoteRequest { id: "domain.set-vcpus", by, vote, comment, date: "2026-12-01" }
    }

    #[test]
    fn votes_are_appended_and_replaced_keeping_comments() {
        let files = with_draft(DRAFT);
        let first = record_vote(&files, &request("ada", VoteKind::RequestChanges, Some("Say \"why\".")))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!first.replaced);
        assert!(first.text.starts_with(&DRAFT[..DRAFT.len() - 1]), "original text kept verbatim:\n{}", first.text);
        assert!(first.text.contains("# trailing comment kept") && first.text.contains("# Votes below."));
        assert_eq!(first.tally.change_requests, vec!["ada".to_string()]);

        let mut files = with_draft(&first.text);
        let second = record_vote(&files, &request("ada", VoteKind::Approve, None)).unwrap_or_else(|e| panic!("{e}"));
        assert!(second.replaced);
        assert_eq!(second.text.matches("[[review.votes]]").count(), 1);
        assert!(!second.text.contains("comment ="), "{}", second.text);
        files = with_draft(&second.text);
        let third = record_vote(&files, &request("brendan", VoteKind::Approve, None)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(third.tally.approvals, vec!["ada".to_string(), "brendan".to_string()]);
        assert!(third.tally.accepts());
    }

    #[test]
    fn non_maintainers_and_bad_dates_are_refused() {
        let files = with_draft(DRAFT);
        let err = record_vote(&files, &request("mallory", VoteKind::Approve, None)).map(|r| r.path).unwrap_err();
        assert!(matches!(err, ReviewError::NotMaintainer { .. }), "{err}");
        let mut bad = request("ada", VoteKind::Approve, None);
        bad.date = "01/12/2026";
        assert!(record_vote(&files, &bad).is_err());
        assert_eq!(today().len(), 10);
        assert!(is_date(&today()));
    }
}
