//! Capability contracts (`[contract]` in a proposal), compiled from the words as written into
//! typed cases that `capvirt plugin verify` runs generically and `capvirt proposal check`
//! lints. Pure data; no IO.
//!
//! A case is one call in one situation: the verifier puts a scratch domain in the `given`
//! state (through `domain.define`, `domain.start`, `domain.suspend`), fills every
//! `DomainName` parameter with its name and every `DomainSpec` parameter with its spec, adds
//! the case's `with` arguments, calls the capability through the host's dispatch path, and
//! compares the outcome with `expect`, the domain's state afterwards (`domain.info`) with
//! `then`, and the result with `result`.

use std::fmt;

use capvirt_plugin_api::Value;

use super::{
    model::{CapabilityFile, ErrorCode},
    types::{Ty, TypeBody, TypeTable},
};

/// A domain state the verifier can bring a scratch domain into, or observe afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DomainCondition {
    Running,
    Paused,
    ShutOff,
    /// Not defined at all.
    Undefined,
}

impl DomainCondition {
    pub const ALL: [DomainCondition; 4] =
        [DomainCondition::Running, DomainCondition::Paused, DomainCondition::ShutOff, DomainCondition::Undefined];

    /// The word in proposals (the registry's `DomainState` words, and `undefined`).
    pub fn as_str(self) -> &'static str {
        match self {
            DomainCondition::Running => "running",
            DomainCondition::Paused => "paused",
            DomainCondition::ShutOff => "shut off",
            DomainCondition::Undefined => "undefined",
        }
    }

    pub fn parse(word: &str) -> Option<DomainCondition> {
        DomainCondition::ALL.into_iter().find(|c| c.as_str() == word)
    }
}

impl fmt::Display for DomainCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The situation a case starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Given {
    /// The scratch domain in this state; domain parameters name it.
    Domain(DomainCondition),
    /// Domain parameters name a domain that does not exist.
    UnknownDomain,
    /// Spec parameters carry a spec that passes the registry's types but that no driver may
    /// accept (a `usb-disk` device without an image); nothing is defined beforehand.
    InvalidSpec,
}

impl Given {
    pub fn parse(word: &str) -> Option<Given> {
        match word {
            "unknown-domain" => Some(Given::UnknownDomain),
            "invalid-spec" => Some(Given::InvalidSpec),
            other => DomainCondition::parse(other).map(Given::Domain),
        }
    }

    /// The scratch domain's state before the call.
    pub fn before(self) -> DomainCondition {
        match self {
            Given::Domain(condition) => condition,
            Given::UnknownDomain | Given::InvalidSpec => DomainCondition::Undefined,
        }
    }
}

impl fmt::Display for Given {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Given::Domain(condition) => f.write_str(condition.as_str()),
            Given::UnknownDomain => f.write_str("unknown-domain"),
            Given::InvalidSpec => f.write_str("invalid-spec"),
        }
    }
}

/// The outcome a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Expect {
    Ok,
    Error(ErrorCode),
}

impl Expect {
    pub fn parse(word: &str) -> Option<Expect> {
        if word == "ok" {
            return Some(Expect::Ok);
        }
        ERROR_CODES.iter().find(|(w, _)| *w == word).map(|(_, code)| Expect::Error(*code))
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Ok => f.write_str("ok"),
            Expect::Error(code) => f.write_str(error_code_word(*code)),
        }
    }
}

/// Every error kind a proposal can name, with its word.
pub const ERROR_CODES: [(&str, ErrorCode); 6] = [
    ("not-found", ErrorCode::NotFound),
    ("invalid-argument", ErrorCode::InvalidArgument),
    ("invalid-state", ErrorCode::InvalidState),
    ("unsupported", ErrorCode::Unsupported),
    ("driver-failure", ErrorCode::DriverFailure),
    ("timeout", ErrorCode::Timeout),
];

pub fn error_code_word(code: ErrorCode) -> &'static str {
    ERROR_CODES.iter().find(|(_, c)| *c == code).map_or("error", |(w, _)| w)
}

/// What the result must show about the scratch domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultCheck {
    /// A record whose `name` is the domain and whose `state` is its state afterwards.
    DescribesDomain,
    /// A list holding such a record.
    ListsDomain,
    /// A list with no record for the domain.
    OmitsDomain,
}

impl ResultCheck {
    pub const ALL: [ResultCheck; 3] =
        [ResultCheck::DescribesDomain, ResultCheck::ListsDomain, ResultCheck::OmitsDomain];

    pub fn as_str(self) -> &'static str {
        match self {
            ResultCheck::DescribesDomain => "describes-domain",
            ResultCheck::ListsDomain => "lists-domain",
            ResultCheck::OmitsDomain => "omits-domain",
        }
    }

    pub fn parse(word: &str) -> Option<ResultCheck> {
        ResultCheck::ALL.into_iter().find(|c| c.as_str() == word)
    }
}

/// One compiled case.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// Index in `[[contract.cases]]` (cases are named `case N`, from 1).
    pub index: usize,
    pub given: Given,
    pub expect: Expect,
    /// The state afterwards; `None` when unchecked.
    pub then: Option<DomainCondition>,
    pub result: Option<ResultCheck>,
    /// Extra arguments (TOML values converted).
    pub with: Vec<(String, Value)>,
}

impl Case {
    /// `case 2 (given paused, expect invalid-state)`: how reports name the clause.
    pub fn clause(&self) -> String {
        format!("case {} (given {}, expect {})", self.index + 1, self.given, self.expect)
    }
}

/// A compiled contract.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Contract {
    pub monotonic: Vec<String>,
    pub cases: Vec<Case>,
}

/// A problem in a contract: where (`case` index and key, or a top-level key) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContractProblem {
    pub case: Option<usize>,
    pub key: &'static str,
    pub message: String,
}

/// Compiles a proposal's `[contract]` against its declaration: every word known, every
/// expected error declared in `errors`, generated arguments possible (a `DomainName` parameter
/// for domain situations, a `DomainSpec` one for `invalid-spec`), `with` naming declared
/// parameters, `monotonic` naming unsigned fields of the result record. Returns the cases that
/// compiled and every problem.
pub fn compile(
    doc: &CapabilityFile,
    types: &TypeTable,
    params: &[super::FieldDef],
    result: &Ty,
) -> (Contract, Vec<ContractProblem>) {
    let mut problems = Vec::new();
    let mut contract = Contract::default();
    let Some(written) = &doc.contract else { return (contract, problems) };
    let has_param_of = |type_name: &str| params.iter().any(|p| types.type_name(&p.ty) == type_name);
    let has_domain = has_param_of("DomainName");
    let has_spec = has_param_of("DomainSpec");

    let result_fields = types.record_fields(result);
    for field in &written.monotonic {
        let ok = result_fields
            .and_then(|fields| fields.iter().find(|f| &f.name == field))
            .is_some_and(|f| matches!(types.base(&f.ty), Ty::UInt));
        if ok {
            contract.monotonic.push(field.clone());
        } else {
            problems.push(ContractProblem {
                case: None,
                key: "monotonic",
                message: format!(
                    "`{field}` is not an unsigned integer field of the result `{}`",
                    types.type_name(result)
                ),
            });
        }
    }

    for (index, case) in written.cases.iter().enumerate() {
        let before = problems.len();
        let mut problem =
            |key: &'static str, message: String| problems.push(ContractProblem { case: Some(index), key, message });
        let given = Given::parse(&case.given);
        match given {
            None => problem("given", format!("unknown situation `{}` (expected one of {})", case.given, given_words())),
            Some(Given::InvalidSpec) if !has_spec => {
                problem("given", "`invalid-spec` needs a `DomainSpec` parameter to carry the spec".into())
            }
            Some(Given::UnknownDomain) if !has_domain => {
                problem("given", "`unknown-domain` needs a `DomainName` parameter to name the domain".into())
            }
            _ => {}
        }
        let expect = Expect::parse(&case.expect);
        match expect {
            None => problem(
                "expect",
                format!(
                    "unknown outcome `{}` (expected `ok` or an error kind: {})",
                    case.expect,
                    ERROR_CODES.map(|(w, _)| w).join(", ")
                ),
            ),
            Some(Expect::Error(code)) if !doc.errors.contains(&code) => problem(
                "expect",
                format!(
                    "expects `{}`, which the capability does not declare in `errors` ({})",
                    case.expect,
                    declared_errors(&doc.errors)
                ),
            ),
            _ => {}
        }
        let then = match case.then.as_deref() {
            None => None,
            Some(word) => match DomainCondition::parse(word) {
                Some(condition) => Some(condition),
                None => {
                    problem(
                        "then",
                        format!(
                            "unknown state `{word}` (expected one of {})",
                            DomainCondition::ALL.map(|c| format!("`{c}`")).join(", ")
                        ),
                    );
                    None
                }
            },
        };
        let result_check = match case.result.as_deref() {
            None => None,
            Some(word) => match ResultCheck::parse(word) {
                Some(check) => Some(check),
                None => {
                    problem(
                        "result",
                        format!(
                            "unknown result check `{word}` (expected one of {})",
                            ResultCheck::ALL.map(|c| format!("`{}`", c.as_str())).join(", ")
                        ),
                    );
                    None
                }
            },
        };
        if let (Some(check), Some(Expect::Error(_))) = (result_check, expect) {
            problem("result", format!("`{}` needs `expect = \"ok\"`: an error has no result", check.as_str()));
        }
        let mut with = Vec::new();
        for (name, value) in case.with.iter().flatten() {
            match params.iter().find(|p| &p.name == name) {
                Some(_) => with.push((name.clone(), Value::from_toml(value))),
                None => problem("with", format!("`{name}` is not a parameter of `{}`", doc.id)),
            }
        }
        for param in params.iter().filter(|p| p.required) {
            let generated = matches!(types.type_name(&param.ty).as_str(), "DomainName" | "DomainSpec");
            if !generated && !with.iter().any(|(n, _)| n == &param.name) {
                problem("with", format!("required parameter `{}` has no value: give it in `with`", param.name));
            }
        }
        if problems.len() == before {
            if let (Some(given), Some(expect)) = (given, expect) {
                contract.cases.push(Case { index, given, expect, then, result: result_check, with });
            }
        }
    }
    (contract, problems)
}

fn given_words() -> String {
    let mut words: Vec<String> = DomainCondition::ALL.map(|c| format!("`{c}`")).to_vec();
    words.push("`unknown-domain`".into());
    words.push("`invalid-spec`".into());
    words.join(", ")
}

fn declared_errors(errors: &[ErrorCode]) -> String {
    if errors.is_empty() {
        "none declared".into()
    } else {
        errors.iter().map(|c| error_code_word(*c)).collect::<Vec<_>>().join(", ")
    }
}

/// Whether `ty` is an enum type named `DomainState` holding every state word contracts use
/// (the lint warns when the registry's words and the contract's drift apart).
pub fn missing_state_words(types: &TypeTable) -> Vec<&'static str> {
    let Some(def) = types.defs.iter().find(|d| d.name == "DomainState") else { return Vec::new() };
    let TypeBody::Enum { values } = &def.body else { return Vec::new() };
    DomainCondition::ALL
        .into_iter()
        .filter(|c| *c != DomainCondition::Undefined)
        .map(DomainCondition::as_str)
        .filter(|w| !values.iter().any(|v| v == w))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    fn registry() -> Registry {
        Registry::embedded().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_contract_of_the_embedded_registry_compiles_whole() {
        let registry = registry();
        let mut with_contract = 0;
        for cap in registry.capabilities() {
            let (contract, problems) = compile(&cap.doc, &registry.types, &cap.params, &cap.result);
            assert_eq!(problems, Vec::new(), "{}", cap.id());
            let written = cap.doc.contract.as_ref().map_or(0, |c| c.cases.len());
            assert_eq!(contract.cases.len(), written, "{}", cap.id());
            with_contract += usize::from(written > 0);
        }
        assert!(with_contract >= 12, "only {with_contract} capabilities have a contract");
        assert!(missing_state_words(&registry.types).is_empty());
    }

    #[test]
    fn bad_words_and_undeclared_errors_are_problems_and_their_cases_are_dropped() {
        let registry = registry();
        let Some(cap) = registry.lookup("domain.suspend") else { panic!("domain.suspend missing") };
        let mut doc = cap.doc.clone();
        let case = |given: &str, expect: &str, then: Option<&str>| crate::registry::model::ContractCase {
            given: given.into(),
            expect: expect.into(),
            then: then.map(String::from),
            result: None,
            with: None,
            note: String::new(),
        };
        doc.contract = Some(crate::registry::model::Contract {
            monotonic: vec!["rd_req".into()],
            cases: vec![
                case("running", "ok", Some("paused")),
                case("asleep", "ok", None),
                case("paused", "timeout", None),
                case("running", "ok", Some("frozen")),
                case("invalid-spec", "invalid-argument", None),
            ],
        });
        let (contract, problems) = compile(&doc, &registry.types, &cap.params, &cap.result);
        let keys: Vec<(Option<usize>, &str)> = problems.iter().map(|p| (p.case, p.key)).collect();
        assert_eq!(
            keys,
            vec![
                (None, "monotonic"),
                (Some(1), "given"),
                (Some(2), "expect"),
                (Some(3), "then"),
                (Some(4), "given"),
                (Some(4), "expect"),
            ],
            "{problems:#?}"
        );
        assert_eq!(contract.cases.len(), 1);
        assert_eq!(contract.cases[0].clause(), "case 1 (given running, expect ok)");
        assert_eq!(contract.cases[0].then, Some(DomainCondition::Paused));
    }
}
