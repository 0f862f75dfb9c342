//! The frozen 2.x boundary: the root module every plugin exports and the trait objects that
//! cross it. Nothing here may change layout within a major version (see the crate docs).

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::RRef,
    sabi_types::VersionStrings,
    std_types::{RBox, RResult, RStr},
    StableAbi,
};

use crate::{Manifest, PluginError, Value};

/// The root module of a driver plugin.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// The plugin's manifest. Never fails.
    pub manifest: extern "C" fn() -> Manifest,
    /// Opens a connection for `uri`. `options` is a record of host-supplied settings
    /// (e.g. `readonly`), `Unit` when there are none.
    #[sabi(last_prefix_field)]
    pub connect: extern "C" fn(uri: RStr<'_>, options: &Value) -> RResult<DriverBox, PluginError>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "capvirt_driver";
    const NAME: &'static str = "capvirt driver plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// An open driver connection. Every capability, present and future, goes through `invoke`.
///
/// Implementations must be thread-safe: the host may call from several threads at once
/// (e.g. polling progress while a migration runs).
#[sabi_trait]
pub trait Driver: Send + Sync {
    /// Performs `capability` with `args` (a record already validated by the host against the
    /// registry's declared parameter types) and returns its declared result.
    #[sabi(last_prefix_field)]
    fn invoke<'a>(
        &self,
        capability: RStr<'_>,
        args: &Value,
        context: CallContext_TO<'a, RRef<'a, ()>>,
    ) -> RResult<Value, PluginError>;
}

/// A boxed, owned driver connection as it crosses the boundary.
pub type DriverBox = Driver_TO<'static, RBox<()>>;

/// Per-call services the host offers a driver while it works.
#[sabi_trait]
pub trait CallContext {
    /// Reports progress of a long operation (bytes, steps…; `total` 0 when unknown).
    fn progress(&self, done: u64, total: u64);
    /// Reports a named event with a payload, for later event kinds.
    fn event(&self, name: RStr<'_>, data: &Value);
    /// Whether the caller asked to stop; long operations should check it between steps.
    #[sabi(last_prefix_field)]
    fn is_cancelled(&self) -> bool;
}
