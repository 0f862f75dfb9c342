//! [`Connection`]: what [`crate::Host::connect`] returns — an in-process driver connection
//! (the whole dispatch path runs here) or a remote one (the daemon runs it).

use std::sync::Arc;

use capvirt_plugin_api::Value;

pub use capvirt_rpc::DriverSupport;

use crate::{
    caller::Caller,
    driver::{CallObserver, NoObserver},
    error::{CallError, HostError},
    host::LocalConnection,
    plugins::LoadedPlugin,
    registry::Registry,
    remote::RemoteConnection,
};

/// An open connection. Calls may come from several threads.
pub enum Connection {
    /// A plugin loaded in this process.
    Local(LocalConnection),
    /// A daemon reached through a transport (`DRIVER+unix://…`); boxed: it carries a runtime.
    Remote(Box<RemoteConnection>),
}

impl Connection {
    /// The URI as given to [`crate::Host::connect`].
    pub fn uri(&self) -> &str {
        match self {
            Connection::Local(c) => c.uri(),
            Connection::Remote(c) => c.uri(),
        }
    }

    pub fn is_readonly(&self) -> bool {
        match self {
            Connection::Local(c) => c.is_readonly(),
            Connection::Remote(c) => c.is_readonly(),
        }
    }

    /// The plugin serving a local connection (`None` when a daemon serves it).
    pub fn plugin(&self) -> Option<&LoadedPlugin> {
        match self {
            Connection::Local(c) => Some(c.plugin()),
            Connection::Remote(_) => None,
        }
    }

    /// The driver serving this connection: its name, version, the capabilities callable
    /// through it (with the contract version it implements) and those it declares but cannot
    /// serve here. A remote connection asks the daemon (see [`RemoteConnection::driver_support`]).
    pub fn driver_support(&self) -> Result<DriverSupport, HostError> {
        match self {
            Connection::Local(c) => {
                let plugin = c.plugin();
                let callable = c
                    .registry()
                    .capabilities()
                    .iter()
                    .filter(|cap| plugin.implements(cap.index))
                    .map(|cap| (cap.id().to_string(), plugin.implemented_version(cap.id()).unwrap_or(0)))
                    .collect();
                Ok(DriverSupport {
                    name: plugin.info.name.clone(),
                    version: plugin.info.version.clone(),
                    callable,
                    ignored: plugin.ignored.clone(),
                })
            }
            Connection::Remote(c) => c.driver_support(),
        }
    }

    /// The registry this side knows (a daemon enforces its own).
    pub fn registry(&self) -> &Registry {
        match self {
            Connection::Local(c) => c.registry(),
            Connection::Remote(c) => Arc::as_ref(c.registry()),
        }
    }

    /// Calls capability `id` with an argument record (`Value::Unit` for none).
    pub fn call(&self, id: &str, args: Value) -> Result<Value, CallError> {
        self.call_observed(id, args, &NoObserver)
    }

    /// [`Connection::call`], reporting progress and events to `observer`.
    pub fn call_observed(&self, id: &str, args: Value, observer: &dyn CallObserver) -> Result<Value, CallError> {
        match self {
            Connection::Local(c) => c.call_observed(id, args, observer),
            Connection::Remote(c) => c.call(id, args, observer),
        }
    }

    /// [`Connection::call_observed`] on behalf of `caller` (a daemon's peer). A remote
    /// connection's far side judges its own peer, so there `caller` is not sent.
    pub fn call_observed_as(
        &self,
        caller: &Caller,
        id: &str,
        args: Value,
        observer: &dyn CallObserver,
    ) -> Result<Value, CallError> {
        match self {
            Connection::Local(c) => c.call_observed_as(caller, id, args, observer),
            Connection::Remote(c) => c.call(id, args, observer),
        }
    }
}
