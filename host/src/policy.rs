//! The policy step of the dispatch path. Deny by default: the only way to obtain a [`Grant`]
//! is [`authorize`], and a driver cannot be invoked without one.

use std::collections::BTreeSet;

use crate::{
    error::CallError,
    registry::{Capability, Registry, Stage},
};

/// Host-wide policy settings.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Experimental capabilities enabled explicitly (`--enable ID` or host config).
    pub enabled: BTreeSet<String>,
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

/// Looks `id` up in the registry and decides whether it may be called on a connection with
/// the given read-only flag.
pub fn authorize<'r>(
    registry: &'r Registry,
    policy: &Policy,
    id: &str,
    uri: &str,
    readonly: bool,
) -> Result<Grant<'r>, CallError> {
    let capability = registry
        .lookup(id)
        .ok_or_else(|| CallError::Unknown { id: id.to_string(), registry_version: registry.version().clone() })?;
    authorize_capability(capability, policy, uri, readonly)
}

/// The policy decision for an already looked-up capability.
pub fn authorize_capability<'r>(
    capability: &'r Capability,
    policy: &Policy,
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

    #[test]
    fn stages_gate_calls() {
        let registry = registry();
        let none = Policy::default();
        let enabled = Policy { enabled: ["test.experimental".to_string()].into() };
        let uri = "test:///default";
        assert!(authorize(&registry, &none, "domain.info", uri, false).is_ok());
        assert!(matches!(
            authorize(&registry, &none, "test.experimental", uri, false),
            Err(CallError::NotEnabled { .. })
        ));
        assert!(authorize(&registry, &enabled, "test.experimental", uri, false).is_ok());
        let deprecated = authorize(&registry, &none, "test.deprecated", uri, false).unwrap_or_else(|e| panic!("{e}"));
        assert!(deprecated.deprecated);
        for refused in ["test.draft", "test.removed", "domain.monitor-command"] {
            assert!(
                matches!(authorize(&registry, &enabled, refused, uri, false), Err(CallError::Refused { .. })),
                "{refused}"
            );
        }
        let removed = authorize(&registry, &none, "test.removed", uri, false).expect_err("removed");
        assert!(removed.to_string().contains("use `domain.info`"), "{removed}");
        assert!(matches!(authorize(&registry, &none, "nope.nope", uri, false), Err(CallError::Unknown { .. })));
    }

    #[test]
    fn readonly_refuses_only_mutating_capabilities() {
        let registry = registry();
        let policy = Policy::default();
        assert!(matches!(
            authorize(&registry, &policy, "domain.suspend", "test:///default", true),
            Err(CallError::ReadOnly { .. })
        ));
        assert!(authorize(&registry, &policy, "domain.info", "test:///default", true).is_ok());
    }
}
