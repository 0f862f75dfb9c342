//! An example capvirt driver plugin: a toy hypervisor whose domains are records in a state
//! directory. It does what a vendor's driver does — declare capabilities in a manifest, parse
//! its URIs, keep state across connections, answer each capability with the registry's result
//! shape and error kinds — without a real hypervisor behind it. See `plugin-api/GUIDE.md`.
//!
//! URIs: `example:///session` (state under `$XDG_STATE_HOME/capvirt/example`, else
//! `~/.local/state/capvirt/example`), `example:///system` (`/var/lib/capvirt/example`), and
//! either with `?root=DIR` for another state root.

#![forbid(unsafe_code)]

mod store;

use std::path::PathBuf;

use capvirt_plugin_api::prelude::*;
use store::{Device, Domain, State, Store};

/// The registry version this plugin was written against: every capability it declares is in
/// registry 1.0.0 with contract version 1. (Not the plugin-api version: see the guide.)
const REGISTRY_VERSION: &str = "1.0.0";

/// One open connection: where its state lives.
pub struct ExampleDriver {
    uri: String,
    store: Store,
}

impl Plugin for ExampleDriver {
    fn manifest() -> Manifest {
        Manifest::new("example", "Example Corp", env!("CARGO_PKG_VERSION"), REGISTRY_VERSION)
            .scheme("example")
            .description("A toy hypervisor whose domains are records in a state directory")
            .capabilities([
                "host.info",
                "domain.list",
                "domain.info",
                "domain.define",
                "domain.undefine",
                "domain.start",
                "domain.destroy",
                "domain.suspend",
                "domain.resume",
            ])
    }

    /// Called once per CLI process: every `capvirt` command connects afresh, so the driver
    /// finds its domains again in the state root instead of keeping them in memory.
    fn connect(uri: &str, options: &Value) -> Result<Self, PluginError> {
        let root = state_root(uri)?;
        // `readonly`: the host refuses mutating capabilities on such a connection itself; a
        // read-only connection also creates nothing on disk.
        let readonly = options.get("readonly").and_then(Value::as_bool).unwrap_or(false);
        Ok(ExampleDriver { uri: uri.to_string(), store: Store::open(root, !readonly)? })
    }

    fn invoke(&self, capability: &str, args: &Args<'_>, _ctx: &Context<'_>) -> Result<Value, PluginError> {
        match capability {
            "host.info" => Ok(self.host_info()),
            "domain.list" => self.list(args.bool_or("all", false)?),
            "domain.info" => self.info(args.str("domain")?),
            "domain.define" => self.define(args.get("spec")?),
            "domain.undefine" => self.undefine(args.str("domain")?),
            "domain.start" => self.transition(args.str("domain")?, "start", start),
            "domain.destroy" => self.transition(args.str("domain")?, "destroy", destroy),
            "domain.suspend" => self.transition(args.str("domain")?, "suspend", suspend),
            "domain.resume" => self.transition(args.str("domain")?, "resume", resume),
            // The host calls only what the manifest declares; this is for a host that does not.
            other => Err(PluginError::unsupported(format!("the example driver does not implement `{other}`"))),
        }
    }
}

capvirt_plugin_api::export_plugin!(ExampleDriver);

impl ExampleDriver {
    /// `HostInfo` (registry `proposals/types.toml`), fields in declared order.
    fn host_info(&self) -> Value {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        Value::record([
            ("uri", Value::string(&self.uri)),
            ("hostname", Value::string(hostname.trim())),
            ("hypervisor", Value::from("example")),
            ("hypervisor_version", Value::from(env!("CARGO_PKG_VERSION"))),
            ("cpus", Value::UInt(cpus)),
            ("memory_kib", Value::UInt(host_memory_kib())),
        ])
    }

    /// `list<DomainSummary>`, sorted by name; active (running or paused) ones unless `all`.
    fn list(&self, all: bool) -> Result<Value, PluginError> {
        let table = self.store.read()?;
        Ok(Value::list(
            table.domains.iter().filter(|(_, d)| all || d.state.is_active()).map(|(name, d)| {
                Value::record([("name", Value::string(name)), ("state", Value::from(d.state.as_str()))])
            }),
        ))
    }

    /// `DomainInfo` as registry 1.0.0 declares it. Registry 1.1.0 added the optional
    /// `hypervisor_version`; a host with registry 1.0.0 checks results against its own
    /// registry and refuses a field it does not know, so a plugin returns only the fields of
    /// the registry version its manifest declares.
    fn info(&self, name: &str) -> Result<Value, PluginError> {
        let table = self.store.read()?;
        let domain = table.domains.get(name).ok_or_else(|| not_defined(name))?;
        let active = domain.state.is_active();
        let max_memory_kib = domain.memory_mib * 1024;
        Ok(Value::record([
            ("name", Value::string(name)),
            ("state", Value::from(domain.state.as_str())),
            ("vcpus", Value::UInt(domain.vcpus)),
            ("memory_kib", Value::UInt(if active { max_memory_kib } else { 0 })),
            ("max_memory_kib", Value::UInt(max_memory_kib)),
            ("cpu_time_ns", Value::UInt(domain.cpu_time_now())),
            ("persistent", Value::Bool(true)),
        ]))
    }

    /// Stores a `DomainSpec` (already validated against the registry's type by the host). The
    /// toy has no disks, display, network or kernel: a spec asking for them is refused whole,
    /// and nothing is stored.
    fn define(&self, spec: &Value) -> Result<Value, PluginError> {
        let spec = Args::new(spec);
        let name = spec.str("name")?;
        for section in ["disks", "graphics", "boot", "filesystems", "interfaces"] {
            if spec.opt(section).is_some() {
                return Err(PluginError::invalid_argument(format!(
                    "domain '{name}': the example hypervisor has no `{section}`; leave it out"
                )));
            }
        }
        let devices = spec.opt("devices").and_then(Value::as_list).unwrap_or_default();
        let devices = devices.iter().map(device).collect::<Result<Vec<_>, _>>()?;
        if let Some(twice) = devices.iter().enumerate().find(|(i, d)| devices[..*i].iter().any(|e| e.id == d.id)) {
            return Err(PluginError::invalid_argument(format!(
                "domain '{name}': device id `{}` is used twice",
                twice.1.id
            )));
        }
        let domain = Domain {
            vcpus: spec.u64("vcpus")?,
            memory_mib: spec.u64("memory_mib")?,
            state: State::ShutOff,
            devices,
            cpu_time_ns: 0,
            running_since_ns: None,
        };
        self.store.update(|table| {
            if table.domains.get(name).is_some_and(|d| d.state.is_active()) {
                return Err(PluginError::invalid_state(format!(
                    "domain '{name}' is active; destroy it before redefining it"
                )));
            }
            table.domains.insert(name.to_string(), domain);
            Ok(Value::Unit)
        })
    }

    fn undefine(&self, name: &str) -> Result<Value, PluginError> {
        self.store.update(|table| {
            let domain = table.domains.get(name).ok_or_else(|| not_defined(name))?;
            if domain.state.is_active() {
                return Err(PluginError::invalid_state(format!(
                    "domain '{name}' is active; destroy it before undefining it"
                )));
            }
            table.domains.remove(name);
            Ok(Value::Unit)
        })
    }

    /// Applies a lifecycle transition to `name` under the state root's lock.
    fn transition(
        &self,
        name: &str,
        verb: &str,
        apply: fn(&mut Domain) -> Result<(), State>,
    ) -> Result<Value, PluginError> {
        self.store.update(|table| {
            let domain = table.domains.get_mut(name).ok_or_else(|| not_defined(name))?;
            apply(domain).map_err(|state| {
                PluginError::invalid_state(format!("cannot {verb} domain '{name}': it is {}", state.as_str()))
            })?;
            Ok(Value::Unit)
        })
    }
}

// Transitions: `Err(current state)` when the domain is not in a state that allows them.

fn start(d: &mut Domain) -> Result<(), State> {
    match d.state {
        State::ShutOff => {
            *d = Domain { state: State::Running, cpu_time_ns: 0, running_since_ns: Some(store::now_ns()), ..d.clone() };
            Ok(())
        }
        other => Err(other),
    }
}

fn destroy(d: &mut Domain) -> Result<(), State> {
    match d.state {
        State::Running | State::Paused => {
            *d = Domain { state: State::ShutOff, cpu_time_ns: 0, running_since_ns: None, ..d.clone() };
            Ok(())
        }
        other => Err(other),
    }
}

fn suspend(d: &mut Domain) -> Result<(), State> {
    match d.state {
        State::Running => {
            // The CPU time stands still while paused.
            *d = Domain { state: State::Paused, cpu_time_ns: d.cpu_time_now(), running_since_ns: None, ..d.clone() };
            Ok(())
        }
        other => Err(other),
    }
}

fn resume(d: &mut Domain) -> Result<(), State> {
    match d.state {
        State::Paused => {
            *d = Domain { state: State::Running, running_since_ns: Some(store::now_ns()), ..d.clone() };
            Ok(())
        }
        other => Err(other),
    }
}

/// A `DeviceSpec`; `usb-disk` needs `path` and `format` (the registry's rule).
fn device(spec: &Value) -> Result<Device, PluginError> {
    let spec = Args::new(spec);
    let (kind, id) = (spec.str("kind")?, spec.str("id")?);
    if kind == "usb-disk" && (spec.opt("path").is_none() || spec.opt("format").is_none()) {
        return Err(PluginError::invalid_argument(format!("device `{id}`: a usb-disk needs `path` and `format`")));
    }
    Ok(Device { kind: kind.to_string(), id: id.to_string() })
}

fn not_defined(name: &str) -> PluginError {
    PluginError::not_found(format!("domain '{name}' is not defined"))
}

/// `SCHEME:///session|system[?root=DIR]` → the state root, as capvirt's own state-keeping
/// drivers spell it (so `capvirt plugin verify`'s default `?root=PRIVATE-DIR` works).
fn state_root(uri: &str) -> Result<PathBuf, PluginError> {
    let invalid = |why: &str| PluginError::invalid_argument(format!("{uri}: {why}"));
    let rest = uri.strip_prefix("example://").ok_or_else(|| invalid("not an example:// URI"))?;
    let (location, query) = rest.split_once('?').map_or((rest, ""), |(l, q)| (l, q));
    let Some(instance) = location.strip_prefix('/') else {
        return Err(PluginError::unsupported(format!(
            "{uri}: remote hosts are not supported; use example:///session or example:///system"
        )));
    };
    let mut root = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "root" {
            return Err(invalid(&format!("unknown parameter `{key}` (known: root)")));
        }
        if root.is_some() {
            return Err(invalid("parameter `root` given twice"));
        }
        let value = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| invalid("parameter `root` is not valid UTF-8"))?;
        if value.is_empty() || value.chars().any(char::is_control) {
            return Err(invalid("`root` must be a non-empty path without control characters"));
        }
        root = Some(PathBuf::from(value.as_ref()));
    }
    match (instance, root) {
        ("session" | "system", Some(root)) => Ok(root),
        ("session", None) => session_root(),
        ("system", None) => Ok(PathBuf::from("/var/lib/capvirt/example")),
        (other, _) => Err(invalid(&format!("unknown instance {other:?}; use example:///session or example:///system"))),
    }
}

/// `$XDG_STATE_HOME/capvirt/example`, else `~/.local/state/capvirt/example`.
fn session_root() -> Result<PathBuf, PluginError> {
    let absolute = |var: &str| std::env::var_os(var).map(PathBuf::from).filter(|p| p.is_absolute());
    absolute("XDG_STATE_HOME")
        .or_else(|| absolute("HOME").map(|home| home.join(".local/state")))
        .map(|base| base.join("capvirt/example"))
        .ok_or_else(|| {
            PluginError::invalid_argument("example:///session needs $XDG_STATE_HOME or $HOME; pass ?root=DIR")
        })
}

/// Total memory of the host in KiB, from `/proc/meminfo` (0 when unknown).
fn host_memory_kib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_their_state_root_or_are_refused_with_the_reason() {
        assert_eq!(state_root("example:///session?root=/tmp/a%20b").ok(), Some(PathBuf::from("/tmp/a b")));
        assert_eq!(state_root("example:///system").ok(), Some(PathBuf::from("/var/lib/capvirt/example")));
        for (bad, why) in [
            ("example://host/session", "remote hosts are not supported"),
            ("example:///other", "unknown instance \"other\""),
            ("example:///session?root=", "non-empty path"),
            ("example:///session?root=/a&root=/b", "given twice"),
            ("example:///session?cache=1", "unknown parameter `cache`"),
            ("example:///session?root=%FF", "not valid UTF-8"),
            ("test:///default", "not an example:// URI"),
        ] {
            let message = state_root(bad).err().map(|e| e.message.to_string()).unwrap_or_default();
            assert!(message.contains(why), "{bad}: {message:?}");
        }
    }

    #[test]
    fn transitions_follow_the_contracts() {
        let mut d = Domain {
            vcpus: 1,
            memory_mib: 64,
            state: State::ShutOff,
            devices: vec![],
            cpu_time_ns: 0,
            running_since_ns: None,
        };
        assert_eq!(suspend(&mut d), Err(State::ShutOff));
        assert_eq!(start(&mut d), Ok(()));
        assert_eq!(start(&mut d), Err(State::Running));
        assert_eq!(resume(&mut d), Err(State::Running));
        assert_eq!(suspend(&mut d), Ok(()));
        let frozen = d.cpu_time_now();
        assert_eq!(d.cpu_time_now(), frozen, "no CPU time while paused");
        assert_eq!(suspend(&mut d), Err(State::Paused));
        assert_eq!(resume(&mut d), Ok(()));
        assert!(d.cpu_time_now() >= frozen);
        assert_eq!(destroy(&mut d), Ok(()));
        assert_eq!((d.state, d.cpu_time_now()), (State::ShutOff, 0));
        assert_eq!(destroy(&mut d), Err(State::ShutOff));
    }
}
