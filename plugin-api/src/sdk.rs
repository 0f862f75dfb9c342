//! The vendor-facing SDK: implement [`Plugin`], call [`crate::export_plugin!`].

use abi_stable::{sabi_types::RRef, std_types::RStr};

use crate::{abi::CallContext_TO, Manifest, PluginError, Text, Value};

/// A driver, as a vendor writes it. The SDK adapts it to the ABI, catching panics.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// Describes the plugin; called once at load time.
    fn manifest() -> Manifest;

    /// Opens a connection to `uri` (one of the manifest's schemes).
    fn connect(uri: &str, options: &Value) -> Result<Self, PluginError>;

    /// Performs `capability`. `args` have been validated by the host against the registry's
    /// declared types, so the typed accessors of [`Args`] fail only on a registry/driver mismatch.
    fn invoke(&self, capability: &str, args: &Args<'_>, ctx: &Context<'_>) -> Result<Value, PluginError>;
}

/// Typed access to a call's argument record.
#[derive(Clone, Copy, Debug)]
pub struct Args<'a> {
    record: &'a Value,
}

impl<'a> Args<'a> {
    pub fn new(record: &'a Value) -> Self {
        Args { record }
    }

    /// The whole argument record.
    pub fn value(&self) -> &'a Value {
        self.record
    }

    /// An optional argument (absent or `Unit` gives `None`).
    #[inline]
    pub fn opt(&self, name: &str) -> Option<&'a Value> {
        self.record.get(name).filter(|v| !v.is_unit())
    }

    /// A required argument.
    #[inline]
    pub fn get(&self, name: &str) -> Result<&'a Value, PluginError> {
        self.opt(name).ok_or_else(|| missing(name))
    }

    #[inline]
    pub fn str(&self, name: &str) -> Result<&'a str, PluginError> {
        let v = self.get(name)?;
        v.as_str().ok_or_else(|| mistyped(name, "a string", v))
    }

    /// A string argument as the host holds it: cloning it copies no bytes when the caller
    /// passed a `'static` string, so a result that repeats the argument can reuse it.
    #[inline]
    pub fn text(&self, name: &str) -> Result<&'a Text, PluginError> {
        let v = self.get(name)?;
        v.as_text().ok_or_else(|| mistyped(name, "a string", v))
    }

    pub fn opt_str(&self, name: &str) -> Result<Option<&'a str>, PluginError> {
        match self.opt(name) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| mistyped(name, "a string", v)),
        }
    }

    pub fn u64(&self, name: &str) -> Result<u64, PluginError> {
        let v = self.get(name)?;
        v.as_u64().ok_or_else(|| mistyped(name, "an unsigned integer", v))
    }

    /// A boolean argument, `default` when absent.
    pub fn bool_or(&self, name: &str, default: bool) -> Result<bool, PluginError> {
        match self.opt(name) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| mistyped(name, "a boolean", v)),
        }
    }
}

// The error paths stay out of line: every driver call reads its arguments through these.
#[cold]
fn missing(name: &str) -> PluginError {
    PluginError::invalid_argument(format!("missing argument `{name}`"))
}

#[cold]
fn mistyped(name: &str, expected: &str, got: &Value) -> PluginError {
    PluginError::invalid_argument(format!("argument `{name}` must be {expected}, got {}", got.kind_name()))
}

/// Per-call services from the host (progress reports, cancellation).
pub struct Context<'a> {
    inner: CallContext_TO<'a, RRef<'a, ()>>,
}

impl<'a> Context<'a> {
    pub(crate) fn new(inner: CallContext_TO<'a, RRef<'a, ()>>) -> Self {
        Context { inner }
    }

    /// Reports progress (`total` 0 when unknown).
    pub fn progress(&self, done: u64, total: u64) {
        self.inner.progress(done, total);
    }

    /// Reports a named event with a payload.
    pub fn event(&self, name: &str, data: &Value) {
        self.inner.event(RStr::from(name), data);
    }

    /// Whether the caller asked the operation to stop.
    pub fn is_cancelled(&self) -> bool {
        self.inner.is_cancelled()
    }
}
