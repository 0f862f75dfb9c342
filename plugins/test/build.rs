//! Links the plugin with packed relative relocations (`DT_RELR`), as the host binary is
//! (`host/build.rs`): every `capvirt` command that uses the test driver `dlopen`s it, and its
//! ~3,500 relative relocations shrink from 80 KB of `RELA` entries to a few hundred bytes.
//! Only where the C library supports it (glibc 2.36 and later), so older systems link as before.

use std::{env, process::Command};

fn main() {
    println!("cargo:rerun-if-env-changed=CAPVIRT_NO_RELR");
    let same_machine = env::var("HOST").ok() == env::var("TARGET").ok();
    let linux_gnu = env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if !same_machine || !linux_gnu || env::var_os("CAPVIRT_NO_RELR").is_some() {
        return;
    }
    let glibc = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| {
            let version = text.trim().strip_prefix("glibc ")?.to_string();
            let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next()??))
        });
    if glibc.is_some_and(|version| version >= (2, 36)) {
        println!("cargo:rustc-link-arg-cdylib=-Wl,-z,pack-relative-relocs");
    }
}
