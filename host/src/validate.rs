//! The validation step of the dispatch path: arguments are checked against the capability's
//! declared parameters. Only [`validate`] creates [`ValidArgs`], and a driver cannot be invoked
//! without them.

use capvirt_plugin_api::Value;

use crate::{
    error::CallError,
    policy::Grant,
    registry::{CapabilityIndex, Registry},
};

/// An argument record that matches its capability's declared parameters, normalized
/// (defaults filled in, integers converted to the declared signedness).
#[derive(Debug)]
pub struct ValidArgs {
    capability: CapabilityIndex,
    value: Value,
}

impl ValidArgs {
    pub fn value(&self) -> &Value {
        &self.value
    }
    pub fn capability(&self) -> CapabilityIndex {
        self.capability
    }
}

/// Validates `args` for the granted capability. `Unit` stands for an empty record.
pub fn validate(registry: &Registry, grant: &Grant<'_>, mut args: Value) -> Result<ValidArgs, CallError> {
    let capability = grant.capability();
    if args.is_unit() {
        args = Value::record_empty();
    }
    registry
        .validate_args(capability, &mut args)
        .map_err(|error| CallError::InvalidArguments { id: capability.id().to_string(), error })?;
    Ok(ValidArgs { capability: capability.index, value: args })
}
