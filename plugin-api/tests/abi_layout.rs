//! The frozen boundary's layout, as abi_stable checks it when a host loads a plugin, against the
//! snapshot committed in `abi-layout.txt`. Within a major version of capvirt-plugin-api the
//! layout must not change (a 1.x host loads every 1.y plugin); a change fails this test until
//! the major version is bumped, and only then may the snapshot be rewritten:
//!
//! ```sh
//! CAPVIRT_ABI_SNAPSHOT=update cargo test -p capvirt-plugin-api --test abi_layout
//! ```

use std::{
    collections::{BTreeSet, HashSet},
    fmt::Write as _,
    path::PathBuf,
};

use abi_stable::{type_layout::TypeLayout, StableAbi};
use capvirt_plugin_api::{CallContext_TO, DriverBox, ErrorKind, Manifest, PluginError, PluginModuleRef, Value};

/// The roots of the boundary: everything reachable from them is part of the snapshot.
fn roots() -> Vec<(&'static str, &'static TypeLayout)> {
    vec![
        ("PluginModule (PluginModuleRef, the root module)", <PluginModuleRef as StableAbi>::LAYOUT),
        ("Manifest", <Manifest as StableAbi>::LAYOUT),
        ("Value", <Value as StableAbi>::LAYOUT),
        ("PluginError", <PluginError as StableAbi>::LAYOUT),
        ("ErrorKind", <ErrorKind as StableAbi>::LAYOUT),
        ("Driver (DriverBox)", <DriverBox as StableAbi>::LAYOUT),
        (
            "CallContext (CallContext_TO)",
            <CallContext_TO<'static, abi_stable::sabi_types::RRef<'static, ()>> as StableAbi>::LAYOUT,
        ),
    ]
}

/// A version as abi_stable compares it (`VersionNumber::is_loosely_compatible`): the major for
/// 1.0 and later, `0.minor` before. Patch and minor releases leave the snapshot unchanged.
fn compatibility(version: &str) -> String {
    let mut parts = version.split('.');
    match (parts.next(), parts.next()) {
        (Some("0"), Some(minor)) => format!("0.{minor}"),
        (Some(major), _) => major.to_string(),
        _ => version.to_string(),
    }
}

/// abi_stable's own rendering of one layout, minus what its check ignores: source lines and
/// module paths; package versions reduced to what must match.
fn normalize(rendered: &str) -> String {
    let mut out = String::new();
    for line in rendered.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("line:") {
            continue;
        }
        let mut line = line.trim_end().to_string();
        while let Some(start) = line.find("version:'") {
            let value_start = start + "version:'".len();
            let Some(len) = line[value_start..].find('\'') else { break };
            let reduced = compatibility(&line[value_start..value_start + len]);
            line.replace_range(start..value_start + len + 1, &format!("compatible-version:<{reduced}>"));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Every layout reachable from the roots, rendered and normalized, sorted by full type name
/// (generic instantiations that print alike, e.g. `RVec` of different elements, each kept).
fn boundary() -> String {
    let mut visited: HashSet<*const TypeLayout> = HashSet::new();
    let mut rendered: BTreeSet<(String, String)> = BTreeSet::new();
    let mut pending: Vec<&'static TypeLayout> = roots().into_iter().map(|(_, l)| l).collect();
    while let Some(layout) = pending.pop() {
        if !visited.insert(layout as *const TypeLayout) {
            continue;
        }
        let key = format!(
            "{} ({}) size {} align {}",
            layout.full_type(),
            layout.package(),
            layout.size(),
            layout.alignment()
        );
        rendered.insert((key, normalize(&layout.to_string())));
        pending.extend(layout.shared_vars().type_layouts().iter().map(|get| get()));
    }
    let mut text = String::new();
    for (name, layout) in roots() {
        let _ = writeln!(text, "root {name}: {}", layout.full_type());
    }
    for (key, layout) in &rendered {
        let _ = write!(text, "\n=== {key}\n{layout}");
    }
    text
}

fn snapshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("abi-layout.txt")
}

const HEADER: &str = "# capvirt-plugin-api ABI layout snapshot (plugin-api/tests/abi_layout.rs), taken at major ";

#[test]
fn the_frozen_boundary_keeps_its_layout_within_a_major_version() {
    let major = compatibility(env!("CARGO_PKG_VERSION"));
    let current = boundary();
    let stored = std::fs::read_to_string(snapshot_path()).unwrap_or_default();
    let (stored_major, stored_layout) = stored
        .strip_prefix(HEADER)
        .and_then(|rest| rest.split_once('\n'))
        .map_or(("none", ""), |(major, layout)| (major.trim(), layout));
    let update = std::env::var("CAPVIRT_ABI_SNAPSHOT").is_ok_and(|v| v == "update");

    if stored_major == major && stored_layout == current {
        return;
    }
    if stored_major == major {
        // Same major, different layout: 1.x hosts would refuse these plugins (or the reverse).
        let first_difference =
            stored_layout.lines().zip(current.lines()).enumerate().find(|(_, (a, b))| a != b).map_or_else(
                || "one snapshot is a prefix of the other".to_string(),
                |(i, (a, b))| format!("line {}: snapshot `{}`, now `{}`", i + 2, a.trim(), b.trim()),
            );
        panic!(
            "the plugin ABI layout changed while capvirt-plugin-api stays at major {major} ({first_difference}). \
             Plugins built against {major}.x would be refused (see plugin-api/GUIDE.md, \"Compatibility\"): \
             undo the change, or bump the major version and then update the snapshot with \
             CAPVIRT_ABI_SNAPSHOT=update"
        );
    }
    if update {
        std::fs::write(snapshot_path(), format!("{HEADER}{major}\n{current}"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", snapshot_path().display()));
        return;
    }
    panic!(
        "the snapshot {} was taken at major {stored_major}, capvirt-plugin-api is at major {major}: \
         rewrite it with CAPVIRT_ABI_SNAPSHOT=update cargo test -p capvirt-plugin-api --test abi_layout",
        snapshot_path().display()
    );
}

#[test]
fn versions_reduce_to_what_abi_stable_requires_to_match() {
    assert_eq!(compatibility("1.4.2"), "1");
    assert_eq!(compatibility("0.11.3"), "0.11");
    let line = "    package:'capvirt-plugin-api' version:'1.3.0'Tag:";
    assert_eq!(normalize(line), "    package:'capvirt-plugin-api' compatible-version:<1>Tag:\n");
    assert_eq!(normalize("a\n    line:18 mod:x\nb"), "a\nb\n");
}
