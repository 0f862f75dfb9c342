//! The policy step of the dispatch path. Deny by default: the only way to obtain a [`Grant`]
//! is [`authorize`], and a driver cannot be invoked without one. A grant is always for one
//! [`Caller`]: the stage, the connection's read-only flag and the access policy by OS identity
//! ([`AccessPolicy`]) are all checked before it exists.

use std::collections::BTreeSet;

use crate::{
    access::AccessPolicy,
    caller::Caller,
    error::CallError,
    registry::{Capability, Registry, Stage},
};

/// Host-wide policy settings.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Experimental capabilities enabled explicitly (`--enable ID` or host config).
    pub enabled: BTreeSet<String>,
    /// Who may call what (default: the built-in policy, root everything, others read-only).
    pub access: AccessPolicy,
}

/// Proof that a call passed the policy step. Only [`authorize`] creates one.
#[derive(Debug)]
pub struct Grant<'r> {
    capability: &'r Capability,
    /// The capability is deprecated: callable, with a warning.
    pub deprecated: bool,
}

impl<'r> Grant<'r> {
    pub fn capability(&self) -> &'r Capability {
        self.capability
    }
}

/// Looks `id` up in the registry and decides whether `caller` may call it on a connection with
/// the given read-only flag.
pub fn authorize<'r>(
    registry: &'r Registry,
    policy: &Policy,
    caller: &Caller,
    id: &str,
    uri: &str,
    readonly: bool,
) -> Result<Grant<'r>, CallError> {
    let capability = registry
        .lookup(id)
        .ok_or_else(|| CallError::Unknown { id: id.to_string(), registry_version: registry.version().clone() })?;
    authorize_capability(capability, policy, caller, uri, readonly)
}

/// The policy decision for an already looked-up capability. `capability.mutates()` must be
/// the reviewed flag (the host's registry keeps the embedded one's, see `Host::with_registry`).
pub fn authorize_capability<'r>(
    capability: &'r Capability,
    policy: &Policy,
    caller: &Caller,
    uri: &str,
    readonly: bool,
) -> Result<Grant<'r>, CallError> {
    let id = capability.id();
    let refused = |reason: String| CallError::Refused { id: id.to_string(), stage: capability.stage(), reason };
    let deprecated = match capability.stage() {
        Stage::Stable => false,
        Stage::Deprecated => true,
        Stage::Experimental if policy.enabled.contains(id) => false,
        Stage::Experimental => return Err(CallError::NotEnabled { id: id.to_string() }),
        Stage::Draft => return Err(refused("the proposal is still under review".into())),
        Stage::Removed => {
            return Err(refused(match &capability.doc.replaced_by {
                Some(other) => format!("removed from the registry; use `{other}`"),
                None => "removed from the registry".into(),
            }))
        }
        Stage::Rejected => {
            return Err(refused(format!(
                "it was rejected in review and can never be called (see `capvirt registry show {id}`)"
            )))
        }
    };
    if readonly && capability.mutates() {
        return Err(CallError::ReadOnly { id: id.to_string(), uri: uri.to_string() });
    }
    if let Err(rule) = policy.access.check(caller, capability) {
        return Err(CallError::AccessDenied { id: id.to_string(), caller: caller.describe(), rule });
    }
    Ok(Grant { capability, deprecated })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{source, SourceFile};

    /// The embedded registry plus one capability per stage.
    fn registry() -> Registry {
        let mut files = source::embedded_files();
        for (id, stage, extra) in [
            ("test.experimental", "experimental", "since = \"1.0.0\""),
            ("test.deprecated", "deprecated", "since = \"1.0.0\"\nreplaced_by = \"domain.info\""),
            ("test.draft", "draft", ""),
            ("test.removed", "removed", "since = \"1.0.0\"\nreplaced_by = \"domain.info\""),
        ] {
            files.push(SourceFile {
                path: format!("capabilities/{id}.toml"),
                text: format!(
                    "id = \"{id}\"\nversion = 1\ntitle = \"t\"\nstage = \"{stage}\"\n{extra}\nmutates = false\nsummary = \"s\"\nmotivation = \"m\"\n"
                ),
            });
        }
        Registry::from_sources(&files).unwrap_or_else(|e| panic!("{e}"))
    }

    fn root() -> &'static Caller {
        static ROOT: std::sync::OnceLock<Caller> = std::sync::OnceLock::new();
        ROOT.get_or_init(|| Caller::with_groups(0, 0, vec![]))
    }

    #[test]
    fn every_grant_passed_the_access_policy() {
        let registry = registry();
        let policy = Policy::default();
        let nobody = Caller::with_groups(65534, 65534, vec![]);
        let denied = authorize(&registry, &policy, &nobody, "domain.suspend", "test:///default", false);
        let message = denied.map(|_| ()).map_err(|e| (e.category(), e.to_string()));
        assert!(
            matches!(&message, Err((crate::error::ErrorCategory::Denied, m)) if m.contains("uid 65534") && m.contains("`domain.suspend`") && m.contains("built-in")),
            "{message:?}"
        );
        assert!(authorize(&registry, &policy, &nobody, "domain.info", "test:///default", false).is_ok());
        assert!(authorize(&registry, &policy, root(), "domain.suspend", "test:///default", false).is_ok());
    }

    #[test]
    fn stages_gate_calls() {
        let registry = registry();
        let none = Policy::default();
        let enabled = Policy { enabled: ["test.experimental".to_string()].into(), ..Default::default() };
        let uri = "test:///default";
        assert!(authorize(&registry, &none, root(), "domain.info", uri, false).is_ok());
        assert!(matches!(
            authorize(&registry, &none, root(), "test.experimental", uri, false),
            Err(CallError::NotEnabled { .. })
        ));
        assert!(authorize(&registry, &enabled, root(), "test.experimental", uri, false).is_ok());
        let deprecated =
            authorize(&registry, &none, root(), "test.deprecated", uri, false).unwrap_or_else(|e| panic!("{e}"));
        assert!(deprecated.deprecated);
        for refused in ["test.draft", "test.removed", "domain.monitor-command"] {
            assert!(
                matches!(authorize(&registry, &enabled, root(), refused, uri, false), Err(CallError::Refused { .. })),
                "{refused}"
            );
        }
        let removed = authorize(&registry, &none, root(), "test.removed", uri, false).expect_err("removed");
        assert!(removed.to_string().contains("use `domain.info`"), "{removed}");
        assert!(matches!(authorize(&registry, &none, root(), "nope.nope", uri, false), Err(CallError::Unknown { .. })));
    }

    #[test]
    fn readonly_refuses_only_mutating_capabilities() {
        let registry = registry();
        let policy = Policy::default();
        assert!(matches!(
            authorize(&registry, &policy, root(), "domain.suspend", "test:///default", true),
            Err(CallError::ReadOnly { .. })
        ));
        assert!(authorize(&registry, &policy, root(), "domain.info", "test:///default", true).is_ok());
    }
}
