//! A test-only plugin whose manifest and behaviour are chosen by `CAPVIRT_FIXTURE_MODE` when
//! it is loaded:
//!
//! - `panic` (default): serves `fixture://`; `domain.info` panics, `domain.list` works,
//!   `host.info` returns a result of the wrong shape;
//! - `rejected`: declares the rejected `domain.monitor-command` (must be refused);
//! - `unknown`: declares a capability the registry does not know (must be ignored);
//! - `major`: built against registry 2.0.0 (must be refused);
//! - `connect-panic`: panics while connecting;
//! - `manifest-panic`: panics while describing itself (must be refused with the panic message).

use capvirt_plugin_api::prelude::*;

pub struct Fixture;

fn mode() -> String {
    std::env::var("CAPVIRT_FIXTURE_MODE").unwrap_or_else(|_| "panic".into())
}

impl Plugin for Fixture {
    fn manifest() -> Manifest {
        let base = |registry: &str| {
            Manifest::new("fixture", "capvirt tests", "0.1.0", registry)
                .scheme("fixture")
                .description("Misbehaving plugin for tests.")
        };
        match mode().as_str() {
            "manifest-panic" => panic!("fixture cannot describe itself"),
            "rejected" => base("1.0.0").capabilities(["domain.list", "domain.monitor-command"]),
            "unknown" => base("1.0.0").capabilities(["domain.list", "domain.teleport"]),
            "major" => base("2.0.0").capabilities(["domain.list"]),
            _ => base("1.0.0").capabilities(["domain.list", "domain.info", "host.info"]),
        }
    }

    fn connect(_uri: &str, _options: &Value) -> Result<Self, PluginError> {
        if mode() == "connect-panic" {
            panic!("fixture refuses to connect");
        }
        Ok(Fixture)
    }

    fn invoke(&self, capability: &str, _args: &Args<'_>, _ctx: &Context<'_>) -> Result<Value, PluginError> {
        match capability {
            "domain.list" => Ok(Value::list(Vec::<Value>::new())),
            "domain.info" => panic!("fixture panics in domain.info"),
            // Declared type is HostInfo; a bare string is malformed.
            "host.info" => Ok(Value::from("not a record")),
            other => Err(PluginError::unsupported(other.to_string())),
        }
    }
}

capvirt_plugin_api::export_plugin!(Fixture);
