//! The crate map's invariants (ARCHITECTURE.md), checked on the dependency graph cargo
//! resolves: a library user, the daemon and isolated drivers link neither the CLI's nor the
//! maintainer tools' dependencies.

use std::{process::Command, time::Duration};

/// Crates only the CLI (`capvirt-cli`) and the maintainer tools (`capvirt-maint`) may use.
const CLI_AND_MAINTAINER_ONLY: &[&str] = &["clap", "indicatif", "toml_edit", "pulldown-cmark"];

/// The normal (non-dev, non-build) dependencies of `package`, one crate name per line.
fn dependencies(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut tree = Command::new(cargo);
    tree.current_dir(capvirt_tests::workspace_root()).args([
        "tree",
        "--offline",
        "--quiet",
        "-e",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
        "-p",
        package,
    ]);
    let out = capvirt_tests::output_within(tree, Duration::from_secs(120));
    assert!(out.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(String::from))
        .collect()
}

#[test]
fn the_library_and_the_daemon_link_no_cli_or_maintainer_dependency() {
    for package in ["capvirt-host", "capvirt-daemon", "capvirt-rpc", "capvirt-plugin-api"] {
        let linked = dependencies(package);
        assert!(linked.iter().any(|c| c == package), "{package}: cargo tree listed {linked:?}");
        let forbidden: Vec<&&str> = CLI_AND_MAINTAINER_ONLY.iter().filter(|c| linked.iter().any(|l| l == *c)).collect();
        assert!(forbidden.is_empty(), "{package} links {forbidden:?}");
    }
    // The check can fail: the CLI does link clap.
    assert!(dependencies("capvirt-cli").iter().any(|c| c == "clap"));
}

#[test]
fn plugin_api_depends_on_no_other_workspace_crate() {
    let linked = dependencies("capvirt-plugin-api");
    let workspace: Vec<&String> =
        linked.iter().filter(|c| c.starts_with("capvirt-") && *c != "capvirt-plugin-api").collect();
    assert!(workspace.is_empty(), "plugin-api links {workspace:?}");
}
