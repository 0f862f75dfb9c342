//! The child side of an isolated driver (`capvirt driver-child PLUGIN`): loads one plugin
//! with the host's loader checks and serves its connections over the socket on standard
//! input until the host closes it.
//!
//! The child does no dispatch of its own: the only peer is the host that started it (the
//! other end of a socket pair), which sends only calls its dispatch path granted.

use std::{
    collections::HashMap,
    os::fd::AsFd,
    path::Path,
    sync::{Arc, Mutex},
};

use abi_stable::{sabi_trait::TD_Opaque, std_types::RStr};
use capvirt_plugin_api::{CallContext_TO, DriverBox, PluginModuleRef, Value};
use capvirt_rpc::{CallFailure, DriverSupport, ErrorKind, Executor, Hello, IncomingCall, PeerIdentity, Reporter};

use crate::{driver::ObserverBridge, loader, remote::ReporterObserver};

/// Why the child could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("standard input is not the host's socket: {0}")]
    NoSocket(std::io::Error),
    #[error("plugin {path} refused: {reason}")]
    Refused { path: String, reason: String },
    #[error("{0}")]
    Serve(String),
}

/// Serves the plugin at `path` (with its SHA-256 `pin`, when the host pinned it) on the
/// socket that is this process's standard input. Returns when the host closes it.
pub fn run(path: &Path, pin: Option<&str>) -> Result<(), ChildError> {
    // A child outliving its host would keep the driver's connections open for nobody.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let socket = std::io::stdin().as_fd().try_clone_to_owned().map_err(ChildError::NoSocket)?;
    let socket = std::os::unix::net::UnixStream::from(socket);
    socket.set_nonblocking(true).map_err(ChildError::NoSocket)?;
    let raw = loader::load(path, pin)
        .map_err(|refusal| ChildError::Refused { path: path.display().to_string(), reason: refusal.reason })?;
    let executor = Arc::new(PluginExecutor {
        module: raw.module,
        hello: Hello::new(
            raw.manifest.registry_version.to_string(),
            raw.manifest.capabilities.iter().map(|c| c.id.to_string()).collect(),
            format!("capvirt {} driver child for {}", env!("CARGO_PKG_VERSION"), raw.manifest.name),
        ),
        connections: Mutex::new(HashMap::new()),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| ChildError::Serve(e.to_string()))?;
    runtime.block_on(async {
        let socket = tokio::net::UnixStream::from_std(socket).map_err(|e| ChildError::Serve(e.to_string()))?;
        capvirt_rpc::serve_connection(socket, executor, capvirt_rpc::DEFAULT_MAX_MESSAGE_BYTES)
            .await
            .map_err(|e| ChildError::Serve(e.to_string()))
    })
}

/// Calls straight into the loaded plugin.
struct PluginExecutor {
    module: PluginModuleRef,
    hello: Hello,
    /// Open driver connections by (URI, read-only).
    connections: Mutex<HashMap<(String, bool), Arc<DriverBox>>>,
}

impl PluginExecutor {
    /// The connection the host opened for (`uri`, `readonly`).
    fn driver(&self, uri: &str, readonly: bool) -> Result<Arc<DriverBox>, CallFailure> {
        let key = (uri.to_string(), readonly);
        self.connections.lock().ok().and_then(|c| c.get(&key).cloned()).ok_or_else(|| {
            CallFailure::new(
                ErrorKind::InvalidArgument,
                format!("no connection to {uri} was opened in this driver process"),
            )
        })
    }

    /// Opens a connection with the host's connect options (read-only, image allow-list…).
    fn open(&self, uri: &str, readonly: bool, options: &Value) -> Result<(), CallFailure> {
        let key = (uri.to_string(), readonly);
        let driver = (self.module.connect())(uri.into(), options)
            .into_result()
            .map_err(|error| CallFailure::from_driver(&error))?;
        if let Ok(mut connections) = self.connections.lock() {
            connections.insert(key, Arc::new(driver));
        }
        Ok(())
    }
}

impl Executor for PluginExecutor {
    fn hello(&self) -> Hello {
        self.hello.clone()
    }

    fn connect(
        &self,
        uri: &str,
        readonly: bool,
        options: Option<Value>,
        _peer: Option<PeerIdentity>,
    ) -> Result<Option<DriverSupport>, CallFailure> {
        let options = options.unwrap_or_else(|| Value::record([("readonly", Value::Bool(readonly))]));
        // The host that started this child knows the plugin already.
        self.open(uri, readonly, &options).map(|()| None)
    }

    fn call(&self, call: IncomingCall, reporter: &Reporter) -> Result<Value, CallFailure> {
        if call.capability.is_empty() {
            return Err(CallFailure::new(ErrorKind::InvalidArgument, "a call must name a capability"));
        }
        let driver = self.driver(&call.uri, call.readonly)?;
        // The driver's progress and events go to the host; its cancellation is the host's.
        let observer = ReporterObserver(reporter);
        let bridge = ObserverBridge(&observer);
        let context = CallContext_TO::from_ptr(&bridge, TD_Opaque);
        driver
            .invoke(RStr::from(call.capability.as_str()), &call.args, context)
            .into_result()
            .map_err(|error| CallFailure::from_driver(&error))
    }
}
