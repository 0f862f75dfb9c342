//! Access control by OS identity: which [`Caller`]s may call which capabilities. Checked in the
//! policy step ([`crate::policy::authorize_capability`]), so no [`crate::policy::Grant`] — and
//! no driver call — exists without it.
//!
//! The policy is the root-owned file `access.toml` in the system config directory
//! (`/etc/capvirt/access.toml`, see [`crate::config::system_dir`]):
//!
//! ```toml
//! # What everyone not matched below may call (this is also the default).
//! default = ["readonly"]
//!
//! [users]                     # user name or numeric uid → patterns
//! alice = ["readonly", "domain.suspend", "domain.resume"]
//! "1001" = ["*"]
//!
//! [groups]                    # group name or numeric gid (primary or supplementary)
//! vmops = ["domain.*"]
//!
//! [certificates]              # TLS clients: certificate subject CN → local user name or uid
//! "alice.ops.example.org" = "alice"
//! ```
//!
//! A caller may call a capability when any pattern of `default`, of its user's entry or of one
//! of its groups' entries matches: `*` (everything), `PREFIX.*` (e.g. `domain.*`), an exact id,
//! or `readonly` (every capability whose reviewed registry entry has `mutates = false`: the
//! host enforces the embedded registry's `mutates` flags whatever `--registry` says). Root
//! (uid 0) may call everything: it owns this file. Without the file the built-in policy
//! applies: root everything, everyone else `readonly`. A file that is not owned by root or is
//! writable by group or others (or sits in such a directory) is refused, never half-trusted.
//!
//! A TLS client (`capvirt daemon --listen tcp:…`) has no OS identity: the daemon verified its
//! certificate against its CA, and `[certificates]` maps the certificate's subject CN to a
//! local user, whose uid and groups then decide as for a local caller (mapping to `root`
//! grants everything: say so only for an administrator's certificate). A certificate whose CN
//! is not listed gets the `default` patterns only (see [`crate::caller::UNMAPPED_ID`]).

use std::{collections::BTreeMap, path::Path, path::PathBuf};

use serde::Deserialize;

use crate::{caller::Caller, config, registry::Capability};

/// The file name in the system config directory.
pub const ACCESS_FILE: &str = "access.toml";

/// Largest policy file read.
const MAX_FILE: u64 = 1 << 20;

/// Who may call what.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    /// The file it came from; `None`: the built-in policy.
    source: Option<PathBuf>,
    /// For the built-in policy: the file that was looked for and is absent.
    absent: Option<PathBuf>,
    default: Rule,
    users: Vec<(u32, Rule)>,
    groups: Vec<(u32, Rule)>,
    /// Certificate CN → the local user's (uid, primary gid).
    certificates: BTreeMap<String, (u32, u32)>,
}

/// One entry: its name for messages (`default`, `user alice`, `group 100`) and its patterns.
#[derive(Debug, Clone)]
struct Rule {
    label: String,
    patterns: Vec<Pattern>,
    /// The patterns as written, for messages.
    text: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    All,
    Readonly,
    /// `domain.*`, stored with its dot: `domain.`.
    Prefix(String),
    Exact(String),
}

/// Why a policy file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read access policy {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("access policy {path} refused: {why}")]
    Unsafe { path: PathBuf, why: String },
    #[error("invalid access policy {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessFile {
    #[serde(default = "readonly")]
    default: Vec<String>,
    #[serde(default)]
    users: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    certificates: BTreeMap<String, String>,
}

fn readonly() -> Vec<String> {
    vec!["readonly".to_string()]
}

impl Default for AccessPolicy {
    fn default() -> Self {
        AccessPolicy::built_in()
    }
}

impl AccessPolicy {
    /// Root everything, everyone else only capabilities that do not change state.
    pub fn built_in() -> AccessPolicy {
        AccessPolicy {
            source: None,
            absent: None,
            default: Rule { label: "default".into(), patterns: vec![Pattern::Readonly], text: readonly() },
            users: Vec::new(),
            groups: Vec::new(),
            certificates: BTreeMap::new(),
        }
    }

    /// The local user (uid, gid) a TLS client certificate with this subject CN maps to;
    /// `None`: unmapped (no CN, or not in `[certificates]`).
    pub fn certificate_user(&self, common_name: Option<&str>) -> Option<(u32, u32)> {
        self.certificates.get(common_name?).copied()
    }

    /// The file it came from (`None`: built in).
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Reads `DIR/access.toml`; the built-in policy when it does not exist. The file (and every
    /// directory above it) must be owned by root and not writable by group or others.
    pub fn load(dir: &Path) -> Result<AccessPolicy, AccessError> {
        let path = dir.join(ACCESS_FILE);
        match config::read_root_owned(&path, MAX_FILE) {
            Ok(None) => Ok(AccessPolicy { absent: Some(path), ..AccessPolicy::built_in() }),
            Ok(Some(text)) => AccessPolicy::parse(&path, &text),
            Err(config::RootOwnedError::Io(source)) => Err(AccessError::Read { path, source }),
            Err(config::RootOwnedError::Unsafe(why)) => Err(AccessError::Unsafe { path, why }),
        }
    }

    /// Parses a policy file's text; user and group names are resolved through the OS user
    /// database now (a name it does not know matches nobody, with a warning).
    pub fn parse(path: &Path, text: &str) -> Result<AccessPolicy, AccessError> {
        let invalid = |message: String| AccessError::Invalid { path: path.to_path_buf(), message };
        let file: AccessFile = toml::from_str(text).map_err(|e| invalid(crate::error::one_line(&e.to_string())))?;
        let rule = |label: String, text: Vec<String>| -> Result<Rule, AccessError> {
            let patterns: Result<Vec<Pattern>, AccessError> =
                text.iter().map(|p| parse_pattern(p).map_err(|why| invalid(format!("{label}: {why}")))).collect();
            Ok(Rule { label, patterns: patterns?, text })
        };
        let mut policy = AccessPolicy {
            source: Some(path.to_path_buf()),
            absent: None,
            default: rule("default".into(), file.default)?,
            users: Vec::new(),
            groups: Vec::new(),
            certificates: BTreeMap::new(),
        };
        for (cn, name) in file.certificates {
            if cn.is_empty() {
                return Err(invalid("certificates: an empty common name matches no certificate".into()));
            }
            let user = match name.parse::<u32>() {
                Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten(),
                Err(_) => nix::unistd::User::from_name(&name).ok().flatten(),
            };
            match user {
                Some(user) => {
                    policy.certificates.insert(cn, (user.uid.as_raw(), user.gid.as_raw()));
                }
                None => {
                    tracing::warn!(target: "capvirt::access", "{}: certificate {cn:?} maps to {name:?}, which is no user on this host; it is treated as unmapped", path.display())
                }
            }
        }
        for (name, patterns) in file.users {
            let uid = match name.parse::<u32>() {
                Ok(uid) => Some(uid),
                Err(_) => nix::unistd::User::from_name(&name).ok().flatten().map(|u| u.uid.as_raw()),
            };
            let rule = rule(format!("user {name}"), patterns)?;
            match uid {
                Some(uid) => policy.users.push((uid, rule)),
                None => {
                    tracing::warn!(target: "capvirt::access", "{}: no user {name:?} on this host; its entry matches nobody", path.display())
                }
            }
        }
        for (name, patterns) in file.groups {
            let gid = match name.parse::<u32>() {
                Ok(gid) => Some(gid),
                Err(_) => nix::unistd::Group::from_name(&name).ok().flatten().map(|g| g.gid.as_raw()),
            };
            let rule = rule(format!("group {name}"), patterns)?;
            match gid {
                Some(gid) => policy.groups.push((gid, rule)),
                None => {
                    tracing::warn!(target: "capvirt::access", "{}: no group {name:?} on this host; its entry matches nobody", path.display())
                }
            }
        }
        Ok(policy)
    }

    /// Whether `caller` may call `capability`; on refusal, the reason naming the rules that
    /// applied. `capability.mutates()` is the reviewed flag (see `Host::with_registry`).
    #[inline]
    pub fn check(&self, caller: &Caller, capability: &Capability) -> Result<(), String> {
        if caller.is_root() {
            return Ok(());
        }
        // No allocation on the way to a yes: this runs on every call.
        if self.rules_for(caller).any(|rule| rule.patterns.iter().any(|p| p.matches(capability))) {
            return Ok(());
        }
        Err(self.refusal(caller, capability.mutates()))
    }

    fn rules_for<'a>(&'a self, caller: &'a Caller) -> impl Iterator<Item = &'a Rule> + 'a {
        std::iter::once(&self.default)
            .chain(self.users.iter().filter(|(uid, _)| *uid == caller.uid).map(|(_, r)| r))
            .chain(self.groups.iter().filter(|(gid, _)| caller.all_groups().any(|g| g == *gid)).map(|(_, r)| r))
    }

    #[cold]
    fn refusal(&self, caller: &Caller, mutates: bool) -> String {
        let change = if mutates { " (it changes state)" } else { "" };
        match &self.source {
            None => format!(
                "it changes state, and the built-in access policy lets only root call such capabilities (there is no {})",
                self.absent.as_deref().map_or_else(|| ACCESS_FILE.to_string(), |p| p.display().to_string())
            ),
            Some(path) => {
                let rules: Vec<String> =
                    self.rules_for(caller).map(|r| format!("{} = [{}]", r.label, r.text.join(", "))).collect();
                format!("no rule of {} allows it{change}; rules that apply: {}", path.display(), rules.join("; "))
            }
        }
    }
}

impl Pattern {
    #[inline]
    fn matches(&self, capability: &Capability) -> bool {
        match self {
            Pattern::All => true,
            Pattern::Readonly => !capability.mutates(),
            Pattern::Prefix(prefix) => capability.id().starts_with(prefix.as_str()),
            Pattern::Exact(id) => capability.id() == id,
        }
    }
}

/// `*`, `readonly`, `a.b.*` or an id (`a.b-c`): lowercase letters, digits, `-` and dots.
fn parse_pattern(text: &str) -> Result<Pattern, String> {
    let id_like = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|part| {
                !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
    };
    match text {
        "*" => Ok(Pattern::All),
        "readonly" => Ok(Pattern::Readonly),
        _ => match text.strip_suffix(".*") {
            Some(prefix) if id_like(prefix) => Ok(Pattern::Prefix(format!("{prefix}."))),
            None if id_like(text) => Ok(Pattern::Exact(text.to_string())),
            _ => Err(format!(
                "{:?} is not `*`, `readonly`, a capability id or `PREFIX.*`",
                crate::audit::redact::cut(text, 64)
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    fn capability<'r>(registry: &'r Registry, id: &str) -> &'r Capability {
        registry.lookup(id).unwrap_or_else(|| panic!("{id} not in the embedded registry"))
    }

    #[test]
    fn built_in_policy_is_root_everything_others_readonly() {
        let registry = Registry::embedded().unwrap_or_else(|e| panic!("{e}"));
        let policy = AccessPolicy::built_in();
        let nobody = Caller::with_groups(65534, 65534, vec![]);
        let root = Caller::with_groups(0, 0, vec![]);
        assert!(policy.check(&nobody, capability(&registry, "domain.info")).is_ok());
        let denied = policy.check(&nobody, capability(&registry, "domain.suspend"));
        assert!(denied.is_err_and(|why| why.contains("built-in access policy") && why.contains("changes state")));
        assert!(policy.check(&root, capability(&registry, "domain.suspend")).is_ok());
    }

    #[test]
    fn users_groups_wildcards_and_ids() {
        let registry = Registry::embedded().unwrap_or_else(|e| panic!("{e}"));
        let text = "default = []\n[users]\n\"1001\" = [\"domain.suspend\"]\nroot = [\"readonly\"]\n[groups]\n\"2000\" = [\"domain.*\", \"readonly\"]\nno-such-group-here = [\"*\"]\n";
        let policy = AccessPolicy::parse(Path::new("a.toml"), text).unwrap_or_else(|e| panic!("{e}"));
        let suspend = capability(&registry, "domain.suspend");
        let info = capability(&registry, "domain.info");
        let host_info = capability(&registry, "host.info");
        let user = Caller::with_groups(1001, 1001, vec![]);
        assert!(policy.check(&user, suspend).is_ok());
        let why = policy.check(&user, info).expect_err("no rule allows domain.info");
        assert!(why.contains("a.toml") && why.contains("user 1001 = [domain.suspend]") && why.contains("default = []"));
        let member = Caller::with_groups(1002, 1002, vec![2000]);
        assert!(policy.check(&member, suspend).is_ok() && policy.check(&member, host_info).is_ok());
        let primary = Caller::with_groups(1003, 2000, vec![]);
        assert!(policy.check(&primary, suspend).is_ok());
        let other = Caller::with_groups(1004, 1004, vec![]);
        assert!(policy.check(&other, info).is_err());
    }

    #[test]
    fn certificates_map_to_local_users_and_unmapped_ones_get_the_default() {
        let registry = Registry::embedded().unwrap_or_else(|e| panic!("{e}"));
        let text = "default = [\"readonly\"]\n[users]\nnobody = [\"*\"]\n[certificates]\nadmin = \"root\"\nops = \"nobody\"\nghost = \"no-such-user-here\"\n";
        let policy = AccessPolicy::parse(Path::new("a.toml"), text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(policy.certificate_user(Some("admin")), Some((0, 0)));
        let nobody = policy.certificate_user(Some("ops"));
        assert!(nobody.is_some_and(|(uid, _)| uid != 0));
        assert_eq!(policy.certificate_user(Some("ghost")), None);
        assert_eq!(policy.certificate_user(None), None);
        let suspend = capability(&registry, "domain.suspend");
        let mapped = Caller::from_certificate("CN=ops", nobody);
        assert!(policy.check(&mapped, suspend).is_ok(), "user nobody's rule applies");
        let unmapped = Caller::from_certificate("CN=stranger", policy.certificate_user(Some("stranger")));
        let why = policy.check(&unmapped, suspend).expect_err("only the default applies");
        assert!(why.contains("default = [readonly]") && !why.contains("user nobody"), "{why}");
        assert!(policy.check(&unmapped, capability(&registry, "domain.info")).is_ok());
        assert_eq!(unmapped.describe(), "the certificate CN=stranger (mapped to no user)");
    }

    #[test]
    fn bad_files_are_refused_whole() {
        for bad in [
            "default = [\"domain*\"]",
            "default = [\"Domain.info\"]",
            "users = 1",
            "defualt = []",
            "default = [\"a..b\"]",
        ] {
            assert!(AccessPolicy::parse(Path::new("a.toml"), bad).is_err(), "{bad}");
        }
        assert!(AccessPolicy::parse(Path::new("a.toml"), "[certificates]\n\"\" = \"root\"").is_err());
        assert_eq!(parse_pattern("domain.*"), Ok(Pattern::Prefix("domain.".into())));
        assert_eq!(parse_pattern("domain.attach-device"), Ok(Pattern::Exact("domain.attach-device".into())));
    }
}
