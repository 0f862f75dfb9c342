//! Live migration between hosts: `domain.migrate` whose destination is a remote URI
//! (`qemu+tls://B/session`). The host that serves the source connection runs libvirt's v3
//! phases, each a capability through the dispatch path of the side it runs on (policy and audit
//! here for the source's phases, in the destination's daemon for its own, as the identity this
//! host's client certificate gives it there):
//!
//! 1. `domain.migrate-begin` here: the driver's opaque description of the domain;
//! 2. `domain.migrate-prepare` there: the destination driver defines the domain and waits for
//!    the stream on a TCP port it chooses, on the address this host reaches it at;
//! 3. `domain.migrate-perform` here: the source driver streams to that address and port
//!    (progress relayed to the caller);
//! 4. `domain.migrate-finish` there: the guest runs on the destination (or everything prepare
//!    created is removed);
//! 5. `domain.migrate-confirm` here: the source stops (or resumes when finish failed).
//!
//! No caller text reaches a hypervisor: the stream's address is the one this host resolved the
//! destination's name to, and the port is a number the destination's driver picked.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, ToSocketAddrs},
    sync::Arc,
};

use capvirt_plugin_api::Value;

use crate::{
    caller::Caller,
    driver::{CallObserver, NoObserver},
    error::{CallError, ErrorCategory},
    host::{uri_scheme, LocalConnection},
    remote::{RemoteConnection, RemoteTarget, Transport},
};

/// The capability that may reach another host.
pub(crate) const MIGRATE: &str = "domain.migrate";

/// A phase of a migration between hosts, as errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationPhase {
    /// Checking the destination URI and reaching the destination's daemon.
    Connect,
    Begin,
    Prepare,
    Perform,
    Finish,
    Confirm,
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationPhase::Connect => "connect",
            MigrationPhase::Begin => "begin",
            MigrationPhase::Prepare => "prepare",
            MigrationPhase::Perform => "perform",
            MigrationPhase::Finish => "finish",
            MigrationPhase::Confirm => "confirm",
        })
    }
}

/// The remote destination of a `domain.migrate` call's validated arguments, if it has one.
pub(crate) fn remote_destination(args: &Value) -> Result<Option<(String, String, RemoteTarget)>, CallError> {
    let (Some(domain), Some(dest_uri)) =
        (args.get("domain").and_then(Value::as_str), args.get("dest_uri").and_then(Value::as_str))
    else {
        return Ok(None);
    };
    match RemoteTarget::parse(dest_uri) {
        Ok(Some(target)) => Ok(Some((domain.to_string(), dest_uri.to_string(), target))),
        Ok(None) => Ok(None),
        Err(e) => Err(failure(domain, MigrationPhase::Connect, dest_uri, e.category(), e.to_string())),
    }
}

fn failure(domain: &str, phase: MigrationPhase, host: &str, category: ErrorCategory, message: String) -> CallError {
    CallError::Migration { domain: domain.to_string(), phase, host: host.to_string(), category, message }
}

/// The address the migration stream goes to: the one this host reaches the destination at.
fn stream_address(transport: &Transport) -> Result<IpAddr, String> {
    let (host, port) = match transport {
        // A daemon on this machine.
        Transport::Unix { .. } => return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Transport::Tls { host, port, .. } => (host.as_str(), *port),
        Transport::Ssh(ssh) => (ssh.host.as_str(), ssh.port.unwrap_or(22)),
    };
    let mut addresses = (host, port).to_socket_addrs().map_err(|e| format!("cannot resolve {host}: {e}"))?;
    addresses.next().map(|a| a.ip()).ok_or_else(|| format!("{host} resolves to no address"))
}

/// Runs the phases; on failure each side is put back as it was (the guest keeps running here,
/// nothing of it stays there), and the error names the phase and the host it failed on.
pub(crate) fn between_hosts(
    source: &LocalConnection,
    caller: &Caller,
    (domain, dest_uri, target): (String, String, RemoteTarget),
    observer: &dyn CallObserver,
) -> Result<Value, CallError> {
    let here = source.uri().to_string();
    let there = target.transport.describe();
    let fail = |phase, host: &str, e: CallError| failure(&domain, phase, host, e.category(), e.to_string());
    let refuse = |host: &str, why: String| failure(&domain, MigrationPhase::Connect, host, ErrorCategory::Usage, why);

    let (ours, theirs) = (uri_scheme(&here).ok(), uri_scheme(&target.uri).ok());
    if ours != theirs {
        return Err(refuse(
            &there,
            format!(
                "{dest_uri} is served by the `{}` driver, not this domain's `{}`",
                theirs.unwrap_or("?"),
                ours.unwrap_or("?")
            ),
        ));
    }
    let address = stream_address(&target.transport).map_err(|why| refuse(&there, why))?;
    let call_here = |id: &str, args: Value, observer: &dyn CallObserver| source.dispatch(caller, id, args, observer);
    let name = || ("domain", Value::string(&domain));

    let description = call_here("domain.migrate-begin", Value::record([name()]), &NoObserver)
        .map_err(|e| fail(MigrationPhase::Begin, &here, e))?;
    let dest = RemoteConnection::connect(&dest_uri, target, false, Arc::clone(source.registry_arc()))
        .map_err(|e| failure(&domain, MigrationPhase::Connect, &there, e.category(), e.to_string()))?;
    let call_there = |id: &str, args: Value, observer: &dyn CallObserver| dest.call(id, args, observer);

    let endpoint = call_there(
        "domain.migrate-prepare",
        Value::record([name(), ("description", description), ("address", Value::string(&address.to_string()))]),
        &NoObserver,
    )
    .map_err(|e| fail(MigrationPhase::Prepare, &there, e))?;
    let finish = |succeeded: bool| {
        call_there("domain.migrate-finish", Value::record([name(), ("succeeded", Value::Bool(succeeded))]), observer)
    };
    let confirm = |succeeded: bool| {
        call_here("domain.migrate-confirm", Value::record([name(), ("succeeded", Value::Bool(succeeded))]), &NoObserver)
    };
    // The stream goes to the address this host resolved, on the port the destination chose.
    let Some(port) = endpoint.get("port").and_then(Value::as_u64).filter(|p| (1..=65535).contains(p)) else {
        let undone = finish(false).err().map(|e| format!("; removing what it prepared failed too: {e}"));
        return Err(failure(
            &domain,
            MigrationPhase::Prepare,
            &there,
            ErrorCategory::Other,
            format!("the destination named no port to send to{}", undone.unwrap_or_default()),
        ));
    };
    let perform_args =
        Value::record([name(), ("address", Value::string(&address.to_string())), ("port", Value::UInt(port))]);
    if let Err(e) = call_here("domain.migrate-perform", perform_args, observer) {
        let mut error = fail(MigrationPhase::Perform, &here, e);
        if let Err(undo) = finish(false) {
            append(&mut error, &format!("; removing the domain from {there} failed too: {undo}"));
        }
        return Err(error);
    }
    if let Err(e) = finish(true) {
        let mut error = fail(MigrationPhase::Finish, &there, e);
        match confirm(false) {
            Ok(_) => append(&mut error, &format!("; domain '{domain}' resumed on this host")),
            Err(undo) => append(&mut error, &format!("; resuming it on this host failed too: {undo}")),
        }
        return Err(error);
    }
    confirm(true).map_err(|e| fail(MigrationPhase::Confirm, &here, e))?;
    Ok(Value::Unit)
}

fn append(error: &mut CallError, text: &str) {
    if let CallError::Migration { message, .. } = error {
        message.push_str(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_remote_destinations_take_the_phases() {
        let args = |uri: &str| Value::record([("domain", Value::from("vm")), ("dest_uri", Value::string(uri))]);
        assert!(matches!(remote_destination(&args("qemu:///session?root=/b")), Ok(None)));
        let remote = remote_destination(&args("qemu+tls://10.0.0.2:16514/session?pkipath=/p")).ok().flatten();
        assert!(matches!(remote, Some((d, _, RemoteTarget { uri, .. })) if d == "vm" && uri == "qemu:///session"));
        let bad = remote_destination(&args("qemu+tls://u@h/session")).err();
        assert!(matches!(&bad, Some(CallError::Migration { phase: MigrationPhase::Connect, .. })), "{bad:?}");
        assert_eq!(bad.map(|e| e.category()), Some(ErrorCategory::Usage));
    }

    #[test]
    fn the_stream_goes_to_the_address_the_destination_is_reached_at() {
        let tls = |host: &str| Transport::Tls {
            host: host.into(),
            port: 16514,
            files: capvirt_rpc::TlsFiles::in_dir(std::path::Path::new("/p"), "client"),
        };
        assert_eq!(stream_address(&tls("10.231.0.2")), Ok(IpAddr::from([10, 231, 0, 2])));
        assert_eq!(stream_address(&tls("::1")), Ok("::1".parse().unwrap_or(IpAddr::from([0; 16]))));
        assert_eq!(stream_address(&Transport::Unix { socket: "/s".into() }), Ok(IpAddr::from([127, 0, 0, 1])));
        assert!(stream_address(&tls("no-such-host.invalid")).is_err());
    }
}
