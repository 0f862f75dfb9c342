//! The driver step of the dispatch path: one handle per open connection, whose only entry
//! point demands a policy [`Grant`] and [`ValidArgs`], so an ungated call does not compile.
//!
//! A handle wraps an in-process plugin connection or an isolated one (a child process, see
//! [`crate::isolate`]) behind the same `invoke`.

use abi_stable::{sabi_trait::TD_Opaque, std_types::RStr};
use capvirt_plugin_api::{CallContext, CallContext_TO, DriverBox, PluginError, Value};

use crate::{policy::Grant, validate::ValidArgs};

/// Receives what a driver reports while a call runs (progress, events) and can cancel it.
pub trait CallObserver: Sync {
    fn progress(&self, _done: u64, _total: u64) {}
    fn event(&self, _name: &str, _data: &Value) {}
    fn is_cancelled(&self) -> bool {
        false
    }
}

/// An observer that ignores everything.
pub struct NoObserver;
impl CallObserver for NoObserver {}

/// An open connection to a driver.
pub struct DriverHandle {
    inner: Backend,
}

enum Backend {
    InProcess(DriverBox),
    Isolated(Box<crate::isolate::IsolatedDriver>),
}

impl DriverHandle {
    pub(crate) fn new(inner: DriverBox) -> Self {
        DriverHandle { inner: Backend::InProcess(inner) }
    }

    pub(crate) fn isolated(inner: crate::isolate::IsolatedDriver) -> Self {
        DriverHandle { inner: Backend::Isolated(Box::new(inner)) }
    }

    /// Performs the granted capability with validated arguments.
    pub fn invoke(
        &self,
        grant: &Grant<'_>,
        args: &ValidArgs,
        observer: &dyn CallObserver,
    ) -> Result<Value, PluginError> {
        let capability = grant.capability();
        if args.capability() != capability.index {
            // Arguments validated for another capability: a host bug, never sent to a driver.
            return Err(PluginError::internal(format!(
                "arguments were validated for a different capability than `{}`",
                capability.id()
            )));
        }
        match &self.inner {
            Backend::InProcess(driver) => {
                let bridge = ObserverBridge(observer);
                let context = CallContext_TO::from_ptr(&bridge, TD_Opaque);
                driver.invoke(RStr::from(capability.id()), args.value(), context).into_result()
            }
            Backend::Isolated(driver) => driver.invoke(capability.id(), args.value(), observer),
        }
    }
}

/// Adapts a host [`CallObserver`] to the ABI's [`CallContext`] trait.
pub(crate) struct ObserverBridge<'a>(pub &'a dyn CallObserver);

impl CallContext for ObserverBridge<'_> {
    fn progress(&self, done: u64, total: u64) {
        self.0.progress(done, total);
    }
    fn event(&self, name: RStr<'_>, data: &Value) {
        self.0.event(name.as_str(), data);
    }
    fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
}
