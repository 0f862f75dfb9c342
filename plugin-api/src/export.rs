//! The FFI side of the SDK: the library header and the `extern "C"` functions behind the root
//! module. Every boundary crossing into vendor code is wrapped in `catch_unwind`, because a
//! panic reaching abi_stable's boundary makes it exit the whole host process.

use std::{
    cell::RefCell,
    panic::{self, AssertUnwindSafe},
    sync::Once,
};

use abi_stable::{
    library::{CheckTypeLayout, LibHeader, RootModuleResult},
    prefix_type::PrefixTypeTrait,
    sabi_trait::TD_Opaque,
    sabi_types::RRef,
    std_types::{RBox, RResult, RStr},
};

use crate::{
    abi::{CallContext_TO, Driver, DriverBox, Driver_TO, PluginModule, PluginModuleRef},
    sdk::{Args, Context},
    Manifest, Plugin, PluginError, Value,
};

/// The library header that [`crate::export_plugin!`] places under abi_stable's symbol name.
pub const fn lib_header<P: Plugin>() -> LibHeader {
    // SAFETY: `root_module_loader::<P>` returns a `PluginModuleRef`, the module type passed as
    // the type parameter, which is what `from_constructor` requires of its constructor.
    unsafe { LibHeader::from_constructor::<PluginModuleRef>(root_module_loader::<P>, CheckTypeLayout::Yes) }
}

extern "C" fn root_module_loader<P: Plugin>() -> RootModuleResult {
    abi_stable::library::__call_root_module_loader(root_module::<P>)
}

fn root_module<P: Plugin>() -> PluginModuleRef {
    install_panic_capture();
    PluginModule { manifest: manifest::<P>, connect: connect::<P> }.leak_into_prefix()
}

extern "C" fn manifest<P: Plugin>() -> Manifest {
    match guarded(P::manifest) {
        Ok(manifest) => manifest,
        // A plugin that cannot describe itself declares nothing, so the host refuses it.
        Err(err) => Manifest::new("", "", "0.0.0", "0.0.0").description(&err.message),
    }
}

extern "C" fn connect<P: Plugin>(uri: RStr<'_>, options: &Value) -> RResult<DriverBox, PluginError> {
    guarded(|| P::connect(uri.as_str(), options))
        .and_then(|inner| inner)
        .map(|plugin| Driver_TO::from_value(SdkDriver(plugin), TD_Opaque))
        .into()
}

/// Adapts a vendor's [`Plugin`] to the ABI trait.
struct SdkDriver<P>(P);

impl<P: Plugin> Driver for SdkDriver<P> {
    fn invoke<'a>(
        &self,
        capability: RStr<'_>,
        args: &Value,
        context: CallContext_TO<'a, RRef<'a, ()>>,
    ) -> RResult<Value, PluginError> {
        let context = Context::new(context);
        guarded(|| self.0.invoke(capability.as_str(), &Args::new(args), &context)).and_then(|inner| inner).into()
    }
}

// `RBox` is named so that a change in the boxed pointer type is caught here at compile time.
const _: fn(DriverBox) -> Driver_TO<'static, RBox<()>> = |d| d;

thread_local! {
    /// The message and location of the last panic on this thread, captured by our hook.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Replaces the plugin's panic hook (its own copy of std's, separate from the host's) with one
/// that records the panic for the error message instead of printing to the host's stderr.
fn install_panic_capture() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        panic::set_hook(Box::new(|info| {
            let message = if let Some(s) = info.payload().downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = info.payload().downcast_ref::<String>() {
                s.clone()
            } else {
                "unknown panic payload".to_string()
            };
            let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            LAST_PANIC.with(|slot| *slot.borrow_mut() = Some(format!("{message}{location}")));
        }));
    });
}

/// Runs vendor code, turning a panic into [`crate::ErrorKind::Internal`].
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, PluginError> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|_| {
        let detail = LAST_PANIC.with(|slot| slot.borrow_mut().take()).unwrap_or_else(|| "no details".to_string());
        PluginError::internal(format!("driver panicked: {detail}"))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn export_symbol_matches_abi_stable() {
        // `export_plugin!` hard-codes this name so vendors need no direct abi_stable dependency.
        assert_eq!(abi_stable::library::ROOT_MODULE_LOADER_NAME, "_1as_0lib_1header_0root_bmodule_bloader");
    }
}
