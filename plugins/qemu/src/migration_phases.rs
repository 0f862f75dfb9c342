//! The five phases of a live migration between hosts (`domain.migrate-begin`, `-prepare`,
//! `-perform`, `-finish`, `-confirm`), which the host runs across two connections, libvirt's
//! v3 protocol: the source describes the domain, the destination starts a QEMU waiting on a TCP
//! port it chooses, the source streams to it, the destination checks that the guest runs, the
//! source lets go (or takes the guest back).
//!
//! QEMU's migration URIs are built here from a parsed [`IpAddr`] and a port, never from caller
//! text. What the phases must remember between calls is kept in the domain's runtime directory
//! (removed with the QEMU), so a fresh process or daemon finds it too.

use std::net::{IpAddr, SocketAddr};

use capvirt_plugin_api::{events::EventKind, prelude::*, types::DomainState};
use qapi::qmp;
use serde::{Deserialize, Serialize};

use crate::{
    driver::{check_images_exist, Op, QemuDriver},
    emulator, events,
    migration::{
        check_live, migrate_command, open_fresh, set_local_bandwidth, settle_incoming, wait_incoming, Incoming,
    },
    privilege,
    qemu::{self, StartMode},
    spec::{self, Live, Machine},
    store::{self, DomainPaths, Liveness},
};

/// The description format this driver writes and reads.
const DESCRIPTION_FORMAT: u32 = 1;
/// The registry's bound on a description (`MigrationDescription`).
const MAX_DESCRIPTION: usize = 1 << 20;
/// In the destination's runtime directory: the domain receives a migration (prepare's record).
const INCOMING_RECORD: &str = "migration-incoming.toml";
/// In the source's runtime directory: the domain's state was sent (perform's record).
const OUTGOING_RECORD: &str = "migration-outgoing.toml";

/// What `domain.migrate-begin` returns: the same two records as a save file's header.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Description {
    format: u32,
    definition: Machine,
    live: Live,
}

/// What prepare created, for finish to undo.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IncomingRecord {
    /// The definition prepare replaced (restored when the migration fails), if any.
    #[serde(default)]
    previous: Option<Machine>,
}

/// What perform sent, for confirm.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutgoingRecord {
    /// The QEMU that sent it (another one is never stopped or resumed by confirm).
    pid: i32,
    /// Whether the guest ran before (a cancelled migration resumes it then).
    running: bool,
}

/// An address a migration stream may use: an IP address that names one host.
fn stream_address(text: &str) -> Result<IpAddr, PluginError> {
    let ip: IpAddr =
        text.parse().map_err(|_| PluginError::invalid_argument(format!("{text:?} is not an IP address")))?;
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_unspecified() || ip.is_multicast() || broadcast {
        return Err(PluginError::invalid_argument(format!("{ip} does not name one host")));
    }
    Ok(ip)
}

/// QEMU's `tcp:` URI for a socket address (IPv6 in brackets).
fn tcp_uri(address: SocketAddr) -> String {
    format!("tcp:{address}")
}

/// The port an incoming QEMU listens on, from `query-migrate`'s `socket-address` (a string in
/// QEMU's `InetSocketAddress`).
fn listening_port(info: &serde_json::Value) -> Option<u16> {
    let addresses = info.get("socket-address")?.as_array()?;
    addresses.iter().find_map(|a| {
        let port = a.get("port")?;
        port.as_str().and_then(|p| p.parse().ok()).or_else(|| port.as_u64().and_then(|p| u16::try_from(p).ok()))
    })
}

fn parse_description(bytes: &[u8]) -> Result<Description, PluginError> {
    let bad = |why: &str| PluginError::invalid_argument(format!("not a QEMU driver's migration description: {why}"));
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8"))?;
    let description: Description =
        toml::from_str(text).map_err(|e| bad(e.to_string().lines().next().unwrap_or("unreadable")))?;
    if description.format != DESCRIPTION_FORMAT {
        return Err(PluginError::unsupported(format!(
            "migration description format {} (this driver reads {DESCRIPTION_FORMAT})",
            description.format
        )));
    }
    Ok(description)
}

impl QemuDriver {
    pub(crate) fn migrate_begin(&self, name: &str) -> Result<Value, PluginError> {
        let lock = self.store.lock(name, false)?;
        let definition = self.store.definition(&lock.paths)?.ok_or_else(|| store::not_defined(name))?;
        self.active_pid(&lock.paths)?;
        let live = self.live(&lock.paths)?;
        let description = Description { format: DESCRIPTION_FORMAT, definition, live };
        let text = toml::to_string(&description)
            .map_err(|e| PluginError::internal(format!("cannot encode the migration description: {e}")))?;
        if text.len() > MAX_DESCRIPTION {
            return Err(PluginError::invalid_state(format!(
                "domain '{name}''s description takes {} bytes, more than a migration carries ({MAX_DESCRIPTION})",
                text.len()
            )));
        }
        Ok(Value::from(text.into_bytes()))
    }

    pub(crate) fn migrate_prepare(&self, name: &str, description: &Value, address: &str) -> Result<Value, PluginError> {
        let address = stream_address(address)?;
        let bytes = description
            .as_bytes()
            .ok_or_else(|| PluginError::invalid_argument("the migration description is not bytes"))?;
        let description = parse_description(bytes)?;
        // Caller data: validated like a definition and a save file's live configuration.
        let limits = self.limits();
        let definition = spec::validate(&description.definition.to_spec(), limits)?;
        let mut live_machine = spec::validate(&description.live.machine.to_spec(), limits)?;
        spec::keep_nic_ids(&mut live_machine, &description.live.machine);
        if definition.name != name || live_machine.name != name {
            return Err(PluginError::invalid_argument(format!(
                "the migration description is of domain '{}', not '{name}'",
                definition.name
            )));
        }
        // The version is this QEMU's, recorded once it runs.
        let live = check_live(
            Live { machine: live_machine, qemu_version: None, ..description.live },
            "the migration description",
        )?;
        let runner = privilege::runner(&self.config)?;
        let accel = qemu::resolve_accel(self.config.accel, &runner)?;
        if accel != live.accel {
            return Err(PluginError::invalid_argument(format!(
                "domain '{name}' runs on {} but this connection runs domains on {accel}",
                live.accel
            )));
        }
        emulator::check_machine_type(live.machine_type.as_deref(), &self.release()?, &self.config.emulator)?;
        check_images_exist(&live.machine, &self.config.images)?;
        let lock = self.store.lock(name, true)?;
        if let Liveness::Alive(_) = self.store.liveness(&lock.paths)? {
            return Err(PluginError::invalid_state(format!("domain '{name}' already runs here")));
        }
        let previous = self.store.definition(&lock.paths)?;
        store::write_toml(&lock.paths.definition, &definition)?;
        self.forget(name);
        let prepared = (|| {
            qemu::launch(&self.store, &lock.paths, &live, StartMode::Incoming, &self.config.emulator, &runner)?;
            events::mark_incoming(&lock.paths, EventKind::Migrated);
            let record = IncomingRecord { previous: previous.clone() };
            store::write_toml(&lock.paths.run.join(INCOMING_RECORD), &record)?;
            let mut monitor = open_fresh(&lock.paths)?;
            let op = Op::new(name, "incoming migration");
            let uri = tcp_uri(SocketAddr::new(address, 0));
            let q = &mut monitor.qmp;
            q.execute(&qmp::migrate_incoming { uri }).map_err(|e| self.qmp_failure(&op, e))?;
            let info: serde_json::Value =
                q.execute_loose(&qmp::query_migrate {}).map_err(|e| self.qmp_failure(&op, e))?;
            listening_port(&info).ok_or_else(|| {
                PluginError::driver_failure(format!("the QEMU receiving domain '{name}' names no port it listens on"))
            })
        })();
        match prepared {
            Ok(port) => Ok(Value::record([
                ("address", Value::string(&address.to_string())),
                ("port", Value::UInt(u64::from(port))),
            ])),
            Err(e) => {
                self.abandon_incoming(&lock.paths, previous);
                Err(e)
            }
        }
    }

    /// Stops a QEMU prepare started and puts the definition back as it was.
    fn abandon_incoming(&self, paths: &DomainPaths, previous: Option<Machine>) {
        self.forget(&paths.name);
        if let Ok(Liveness::Alive(pid)) = self.store.liveness(paths) {
            let _ = qemu::stop(&self.store, paths, pid, None);
        }
        let _ = store::remove_runtime(paths);
        let _ = match previous {
            Some(previous) => store::write_toml(&paths.definition, &previous),
            None => store::remove_domain(paths),
        };
    }

    pub(crate) fn migrate_perform(
        &self,
        name: &str,
        address: &str,
        port: u64,
        ctx: &Context<'_>,
    ) -> Result<Value, PluginError> {
        let address = stream_address(address)?;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| PluginError::invalid_argument(format!("port {port} is not 1-65535")))?;
        let lock = self.store.lock(name, false)?;
        self.store.definition(&lock.paths)?.ok_or_else(|| store::not_defined(name))?;
        let (state, pid) = self.active_pid(&lock.paths)?;
        let record_path = lock.paths.run.join(OUTGOING_RECORD);
        if store::read_toml::<OutgoingRecord>(&record_path)?.is_some() {
            return Err(PluginError::invalid_state(format!(
                "domain '{name}' was already sent; its migration awaits confirmation"
            )));
        }
        let live = self.live(&lock.paths)?;
        store::write_toml(&record_path, &OutgoingRecord { pid, running: state == DomainState::Running })?;
        events::mark_outgoing(&lock.paths, pid, Some(EventKind::Migrated));
        let uri = tcp_uri(SocketAddr::new(address, port));
        let sent = self
            .with_monitor(Op::new(name, "migrate"), |q| {
                set_local_bandwidth(q)?;
                q.execute(&migrate_command(&uri))
            })
            .and_then(|_| self.watch_migration(name, live.machine.memory_mib, ctx));
        if let Err(e) = sent {
            // QEMU resumes a guest that ran once the transfer is cancelled or failed.
            let _ = self.with_monitor(Op::new(name, "migrate_cancel"), |q| q.execute(&qmp::migrate_cancel {}));
            events::mark_outgoing(&lock.paths, pid, None);
            let _ = std::fs::remove_file(&record_path);
            return Err(e);
        }
        Ok(Value::Unit)
    }

    pub(crate) fn migrate_finish(&self, name: &str, succeeded: bool, ctx: &Context<'_>) -> Result<Value, PluginError> {
        let lock = self.store.lock(name, false)?;
        self.store.definition(&lock.paths)?.ok_or_else(|| store::not_defined(name))?;
        let record_path = lock.paths.run.join(INCOMING_RECORD);
        let Some(record) = store::read_toml::<IncomingRecord>(&record_path)? else {
            return Err(PluginError::invalid_state(format!("domain '{name}' is not receiving a migration")));
        };
        if !succeeded {
            self.abandon_incoming(&lock.paths, record.previous);
            return Ok(Value::Unit);
        }
        let live = self.live(&lock.paths)?;
        let received = (|| {
            if !matches!(self.store.liveness(&lock.paths)?, Liveness::Alive(_)) {
                return Err(PluginError::driver_failure(format!("the QEMU receiving domain '{name}' exited")));
            }
            let mut monitor = open_fresh(&lock.paths)?;
            let op = Op::new(name, "incoming migration");
            let q = &mut monitor.qmp;
            wait_incoming(q, live.machine.memory_mib, ctx).map_err(|e| match e {
                Incoming::Qmp(e) => self.qmp_failure(&op, e),
                Incoming::Failed(why) => {
                    PluginError::driver_failure(format!("QEMU could not take domain '{name}''s state: {why}"))
                }
                Incoming::Timeout => PluginError::timeout(format!("domain '{name}''s state did not arrive")),
            })?;
            settle_incoming(q).map_err(|e| self.qmp_failure(&op, e))?;
            let status: serde_json::Value =
                q.execute_loose(&qmp::query_status {}).map_err(|e| self.qmp_failure(&op, e))?;
            match crate::driver::run_state(&status) {
                DomainState::Running | DomainState::Paused => Ok(()),
                other => Err(PluginError::driver_failure(format!(
                    "domain '{name}' is {} after its migration",
                    other.as_str()
                ))),
            }
        })();
        match received {
            Ok(()) => {
                remove_record(&record_path)?;
                Ok(Value::Unit)
            }
            Err(e) => {
                self.abandon_incoming(&lock.paths, record.previous);
                Err(e)
            }
        }
    }

    pub(crate) fn migrate_confirm(&self, name: &str, succeeded: bool) -> Result<Value, PluginError> {
        let lock = self.store.lock(name, false)?;
        self.store.definition(&lock.paths)?.ok_or_else(|| store::not_defined(name))?;
        let record_path = lock.paths.run.join(OUTGOING_RECORD);
        let unsent = || PluginError::invalid_state(format!("domain '{name}' has no completed migration to confirm"));
        let record = store::read_toml::<OutgoingRecord>(&record_path)?.ok_or_else(unsent)?;
        let Liveness::Alive(pid) = self.store.liveness(&lock.paths)? else { return Err(unsent()) };
        let status: serde_json::Value =
            self.with_monitor(Op::new(name, "query-status"), |q| q.execute_loose(&qmp::query_status {}))?;
        let sent = status.get("status").and_then(|s| s.as_str()) == Some("postmigrate");
        if pid != record.pid || !sent {
            return Err(unsent());
        }
        if succeeded {
            // The destination runs it: this QEMU ends, the definition stays (shut off).
            let monitor = self.take_monitor(name);
            qemu::stop(&self.store, &lock.paths, pid, monitor)?;
            return Ok(Value::Unit);
        }
        events::mark_outgoing(&lock.paths, pid, None);
        if record.running {
            self.with_monitor(Op::new(name, "cont"), |q| q.execute(&qmp::cont {}))?;
        }
        remove_record(&record_path)?;
        Ok(Value::Unit)
    }
}

/// Removes a phase's record (gone already is fine).
fn remove_record(path: &std::path::Path) -> Result<(), PluginError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(store::io_failure(path, "remove", &e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_addresses_are_ip_addresses_of_one_host() {
        assert_eq!(stream_address("10.231.0.2").ok(), Some(IpAddr::from([10, 231, 0, 2])));
        assert!(stream_address("::1").is_ok());
        for bad in ["", "host.example", "0.0.0.0", "::", "224.0.0.1", "255.255.255.255", "1.2.3.4:5", "exec:true"] {
            let refused = stream_address(bad).err().map(|e| e.kind);
            assert_eq!(refused, Some(ErrorKind::InvalidArgument), "{bad}");
        }
    }

    #[test]
    fn migration_uris_are_built_from_typed_addresses() {
        assert_eq!(tcp_uri(SocketAddr::new(IpAddr::from([10, 231, 0, 2]), 4444)), "tcp:10.231.0.2:4444");
        assert_eq!(
            tcp_uri(SocketAddr::new("2001:db8::1".parse().unwrap_or(IpAddr::from([0; 16])), 0)),
            "tcp:[2001:db8::1]:0"
        );
    }

    #[test]
    fn the_listening_port_is_read_from_query_migrate() {
        let info = serde_json::json!({"status": "setup", "socket-address": [{"type": "inet", "host": "10.0.0.1", "port": "40123"}]});
        assert_eq!(listening_port(&info), Some(40123));
        assert_eq!(listening_port(&serde_json::json!({"socket-address": [{"port": 7}]})), Some(7));
        assert_eq!(listening_port(&serde_json::json!({"status": "none"})), None);
        assert_eq!(listening_port(&serde_json::json!({"socket-address": [{"port": "x"}]})), None);
    }

    #[test]
    fn descriptions_from_elsewhere_are_refused_clearly() {
        let bad = |bytes: &[u8]| parse_description(bytes).err().map(|e| (e.kind, e.message.to_string()));
        assert!(matches!(bad(b"\xff"), Some((ErrorKind::InvalidArgument, m)) if m.contains("not UTF-8")));
        assert!(matches!(bad(b""), Some((ErrorKind::InvalidArgument, _))));
        let machine = Machine::bare("vm", 64);
        let live = Live::new(machine.clone(), "tcg");
        let mut other = Description { format: 2, definition: machine, live };
        let text = toml::to_string(&other).unwrap_or_default();
        assert!(matches!(bad(text.as_bytes()), Some((ErrorKind::Unsupported, m)) if m.contains("format 2")));
        other.format = DESCRIPTION_FORMAT;
        let text = toml::to_string(&other).unwrap_or_default();
        assert!(parse_description(text.as_bytes()).is_ok());
    }
}
