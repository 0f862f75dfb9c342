//! What a plugin says about itself before anything is called.

use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};

use crate::Value;

/// A plugin's self-description, checked by the host against its registry at load time.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Manifest {
    /// Short driver name, e.g. `qemu`; unique among loaded plugins.
    pub name: RString,
    pub vendor: RString,
    /// The plugin's own semver version.
    pub version: RString,
    /// The registry version (semver) the plugin was built against.
    pub registry_version: RString,
    /// URI schemes served, e.g. `qemu` for `qemu:///session`.
    pub schemes: RVec<RString>,
    /// Every capability the driver implements, with the capability version it implements.
    pub capabilities: RVec<CapabilityImpl>,
    pub description: RString,
    /// Extension point for manifest data added later (a record; `Unit` when empty).
    pub extra: Value,
}

/// One capability a driver implements.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct CapabilityImpl {
    /// Registry id, e.g. `domain.suspend`.
    pub id: RString,
    /// The capability contract version implemented.
    pub version: u32,
}

impl CapabilityImpl {
    pub fn new(id: &str, version: u32) -> Self {
        CapabilityImpl { id: RString::from(id), version }
    }
}

impl Manifest {
    /// A manifest with the identity fields set and nothing implemented yet.
    pub fn new(name: &str, vendor: &str, version: &str, registry_version: &str) -> Self {
        Manifest {
            name: name.into(),
            vendor: vendor.into(),
            version: version.into(),
            registry_version: registry_version.into(),
            schemes: RVec::new(),
            capabilities: RVec::new(),
            description: RString::new(),
            extra: Value::Unit,
        }
    }

    pub fn scheme(mut self, scheme: &str) -> Self {
        self.schemes.push(scheme.into());
        self
    }

    pub fn description(mut self, text: &str) -> Self {
        self.description = text.into();
        self
    }

    /// Declares capabilities, all at contract version 1.
    pub fn capabilities<'a>(mut self, ids: impl IntoIterator<Item = &'a str>) -> Self {
        self.capabilities.extend(ids.into_iter().map(|id| CapabilityImpl::new(id, 1)));
        self
    }

    pub fn capability(mut self, id: &str, version: u32) -> Self {
        self.capabilities.push(CapabilityImpl::new(id, version));
        self
    }

    pub fn implements(&self, id: &str) -> bool {
        self.capabilities.iter().any(|c| c.id == id)
    }
}
