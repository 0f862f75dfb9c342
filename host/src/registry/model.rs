//! The registry files as written: `registry.toml`, `types.toml` and one file per capability.
//!
//! Pure data with serde; parsing from text happens in [`super::Registry::from_sources`], which
//! also compiles these declarations into checked types. Nothing here does IO.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `registry.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryFile {
    /// Semver of the registry as a whole.
    pub version: semver::Version,
    #[serde(default)]
    pub description: String,
    pub review: ReviewPolicy,
    #[serde(default)]
    pub maintainers: Vec<Maintainer>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReviewPolicy {
    /// Approvals by distinct maintainers needed to change a proposal's stage.
    pub quorum: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Maintainer {
    pub name: String,
    #[serde(default)]
    pub email: String,
}

/// `types.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TypesFile {
    #[serde(default)]
    pub types: BTreeMap<String, TypeDecl>,
}

/// One named type.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TypeDecl {
    pub kind: TypeKind,
    #[serde(default)]
    pub doc: String,
    /// `string` only: a checked format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<StringFormat>,
    /// `string`/`bytes`: maximum length in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<u64>,
    /// `int`/`uint`: inclusive bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    /// `enum`: the allowed values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// `record`: the fields, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldDecl>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TypeKind {
    String,
    Uint,
    Int,
    Bool,
    Float,
    Bytes,
    Enum,
    Record,
}

/// Checked string formats.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum StringFormat {
    /// A plain identifier: `[A-Za-z0-9][A-Za-z0-9._-]*`, never `..`; cannot name a path.
    Name,
    /// A host path: non-empty, no control characters.
    Path,
    /// `scheme://…` with no whitespace or control characters.
    Uri,
}

/// A record field or a capability parameter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FieldDecl {
    pub name: String,
    /// A type expression: primitive kind, type name, or `list<T>`.
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default = "default_true")]
    pub required: bool,
    /// Value used when an optional field is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<toml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    /// Human label for table and detail output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default)]
    pub doc: String,
}

fn default_true() -> bool {
    true
}

/// One capability proposal (`capabilities/<id>.toml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CapabilityFile {
    /// `namespace.verb[-noun]`, e.g. `domain.suspend`.
    pub id: String,
    /// Contract version of this capability; bumped with each compatible extension.
    pub version: u32,
    pub title: String,
    pub stage: Stage,
    /// Registry version in which the capability reached its current callable stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<semver::Version>,
    /// Whether the capability changes state (refused on read-only connections, audited).
    pub mutates: bool,
    /// What it is.
    pub summary: String,
    /// How and why applications use it.
    pub motivation: String,
    /// Error kinds the capability may report.
    #[serde(default)]
    pub errors: Vec<ErrorCode>,
    #[serde(default)]
    pub params: Vec<FieldDecl>,
    #[serde(default)]
    pub result: ResultDecl,
    /// Per-driver implementation notes, keyed by driver name.
    #[serde(default)]
    pub mapping: BTreeMap<String, Mapping>,
    /// How the CLI exposes it as a virsh-style command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cli: Option<CliHint>,
    /// Deprecated capabilities name the capability that replaces them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open_questions: Vec<String>,
    #[serde(default)]
    pub review: Review,
    /// Machine-readable behaviour, executed by `capvirt plugin verify` (see
    /// [`super::contract`]); written after the review record so it stays out of merges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract: Option<Contract>,
}

/// `[contract]`: what a conforming driver does, as cases a verifier can run generically
/// against a scratch domain. Words are kept as written and checked by
/// [`super::contract::compile`] (a bad contract is a lint error, never a host failure).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Contract {
    /// Result fields (unsigned integers) that never decrease between two calls in a row on the
    /// same running domain (`rd_req`, `cpu_time_ns`…).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub monotonic: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cases: Vec<ContractCase>,
}

/// `[[contract.cases]]`: one call in one situation and what must come of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ContractCase {
    /// The situation: the scratch domain's state (`running`, `paused`, `shut off`,
    /// `undefined`), or `unknown-domain` (domain parameters name a domain that does not
    /// exist), or `invalid-spec` (spec parameters carry a spec that passes the registry's
    /// types but no driver may accept: a `usb-disk` without an image).
    pub given: String,
    /// `ok`, or the error kind the call must fail with (`invalid-state`, `not-found`…).
    pub expect: String,
    /// The scratch domain's state afterwards, as `domain.info` reports it (`undefined`: it does
    /// not exist). Absent: unchecked after `ok`, unchanged after an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then: Option<String>,
    /// What the result must show: `describes-domain` (a record with the domain's name and
    /// state), `lists-domain` (a list with a record for it), `omits-domain` (a list without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Arguments besides the generated ones (domain names and specs), as TOML values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with: Option<toml::Table>,
    /// Why, for readers.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// Lifecycle stage of a proposal.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Draft,
    Experimental,
    Stable,
    Deprecated,
    Removed,
    Rejected,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Draft => "draft",
            Stage::Experimental => "experimental",
            Stage::Stable => "stable",
            Stage::Deprecated => "deprecated",
            Stage::Removed => "removed",
            Stage::Rejected => "rejected",
        }
    }

    /// Whether a driver may ship an implementation (rejected/removed ones get it refused).
    pub fn is_forbidden(self) -> bool {
        matches!(self, Stage::Removed | Stage::Rejected)
    }

    /// Whether the host may call it at all (experimental ones only once enabled).
    pub fn is_callable(self) -> bool {
        matches!(self, Stage::Experimental | Stage::Stable | Stage::Deprecated)
    }

    /// Every stage, in lifecycle order.
    pub const ALL: [Stage; 6] =
        [Stage::Draft, Stage::Experimental, Stage::Stable, Stage::Deprecated, Stage::Removed, Stage::Rejected];
}

impl std::str::FromStr for Stage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Stage::ALL.into_iter().find(|stage| stage.as_str() == s).ok_or_else(|| {
            let all: Vec<&str> = Stage::ALL.iter().map(|stage| stage.as_str()).collect();
            format!("unknown stage `{s}` (expected one of {})", all.join(", "))
        })
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error kinds a capability declares, mirroring the plugin ABI's kinds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    NotFound,
    InvalidArgument,
    InvalidState,
    Unsupported,
    DriverFailure,
    Timeout,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResultDecl {
    #[serde(rename = "type", default = "unit_type")]
    pub ty: String,
    #[serde(default)]
    pub doc: String,
}

impl Default for ResultDecl {
    fn default() -> Self {
        ResultDecl { ty: unit_type(), doc: String::new() }
    }
}

fn unit_type() -> String {
    "unit".to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    pub note: String,
}

/// CLI exposure of a capability, so that no command is written by hand.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CliHint {
    /// Command name, virsh style (`suspend`, `dominfo`…).
    pub command: String,
    /// Parameters taken positionally, in order; the others become `--name` options.
    #[serde(default)]
    pub positional: Vec<String>,
    /// Positional parameters given as a path to a TOML file holding the value.
    #[serde(default)]
    pub file_args: Vec<String>,
    /// The result's bytes are written to an extra positional argument of this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_file: Option<String>,
    /// One-line help.
    #[serde(default)]
    pub about: String,
    /// Printed on success in table output; `{param}` and `{param.field}` are substituted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The driver reports progress; the CLI shows a progress bar.
    #[serde(default)]
    pub progress: bool,
}

/// The review record kept inside each proposal.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Review {
    #[serde(default)]
    pub decision: Decision,
    /// Decision record: why it was accepted or rejected.
    #[serde(default)]
    pub record: String,
    #[serde(default)]
    pub votes: Vec<Vote>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    #[default]
    Pending,
    Accepted,
    Rejected,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Vote {
    pub by: String,
    pub vote: VoteKind,
    #[serde(default)]
    pub date: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The proposal's stage when the vote was cast: a vote approves the step out of that stage
    /// (`capvirt proposal promote` counts only votes cast at the current stage). Absent on
    /// votes recorded by hand before the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_stage: Option<Stage>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum VoteKind {
    Approve,
    RequestChanges,
    Reject,
}
