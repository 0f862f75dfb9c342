//! [`Connection`]: what [`crate::Host::connect`] returns — an in-process driver connection
//! (the whole dispatch path runs here) or a remote one (the daemon runs it).

use std::sync::Arc;

use capvirt_plugin_api::Value;

use crate::{
    caller::Caller,
    driver::{CallObserver, NoObserver},
    error::CallError,
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
