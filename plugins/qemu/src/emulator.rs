//! Which QEMU a connection drives, and which QEMU versions the driver supports.
//!
//! The emulator is `qemu-system-x86_64` on `PATH`, or the absolute path given with the
//! connection's `emulator=PATH` parameter (libvirt's `<emulator>`), so that one machine can
//! drive two QEMU builds. An unpacked QEMU (`dpkg-deb -x`) needs no `-L`: QEMU finds its
//! firmware and modules relative to its own executable.
//!
//! The version is asked with `-version` (a few milliseconds, no machine created) when a
//! connection first needs it: to start a domain (older QEMUs are refused, options chosen by
//! version) and for `host.info`. A running domain's own version comes from QMP
//! `query-version` of its QEMU, recorded when it starts (see [`crate::spec::Live`]).

use std::{
    fmt,
    io::Read,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use capvirt_plugin_api::PluginError;

/// The emulator looked up on `PATH` when the connection names none.
pub const DEFAULT_EMULATOR: &str = "qemu-system-x86_64";
/// The oldest QEMU the driver supports (Debian 12's).
pub const MINIMUM: Version = Version { major: 7, minor: 2, micro: 0 };
/// Bound on `qemu-system-x86_64 -version`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most of `-version`'s output read (it prints two short lines).
const PROBE_OUTPUT_LIMIT: u64 = 4096;

/// A QEMU release number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl Version {
    /// Parses `MAJOR.MINOR.MICRO` (a missing micro is 0).
    pub fn parse(text: &str) -> Option<Version> {
        let mut parts = text.split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next()??;
        let micro = match parts.next() {
            Some(micro) => micro?,
            None => 0,
        };
        parts.next().is_none().then_some(Version { major, minor, micro })
    }
}

/// An emulator's version with its distributor's package string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub version: Version,
    /// E.g. `Debian 1:7.2+dfsg-7+deb12u18+b3`; empty for a plain upstream build.
    pub package: String,
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.package.trim() {
            "" => write!(f, "{}", self.version),
            package => write!(f, "{} ({package})", self.version),
        }
    }
}

impl Release {
    /// Reads `-version`'s first line: `QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)`.
    pub fn from_version_output(text: &str) -> Option<Release> {
        let rest = text.lines().next()?.trim().strip_prefix("QEMU emulator version ")?;
        let (number, package) = match rest.split_once(' ') {
            Some((number, package)) => (number, package.trim()),
            None => (rest, ""),
        };
        let package = package.strip_prefix('(').and_then(|p| p.strip_suffix(')')).unwrap_or(package);
        Some(Release { version: Version::parse(number)?, package: package.to_string() })
    }
}

/// The emulator of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emulator {
    /// An absolute path, or [`DEFAULT_EMULATOR`] to look up on `PATH`.
    program: PathBuf,
    /// Whether the connection named it (`emulator=PATH`).
    explicit: bool,
}

impl Default for Emulator {
    fn default() -> Self {
        Emulator { program: PathBuf::from(DEFAULT_EMULATOR), explicit: false }
    }
}

impl fmt::Display for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.program.display())
    }
}

impl Emulator {
    /// The emulator at `path`, as named by a connection URI: it must be an absolute path to an
    /// executable regular file; for a privileged connection (`trusted_owner_only`) also owned
    /// by root and writable by nobody else, since every domain of that host runs it.
    pub fn at(path: &Path, trusted_owner_only: bool) -> Result<Emulator, PluginError> {
        let refuse = |why: &str| PluginError::invalid_argument(format!("emulator {}: {why}", path.display()));
        if !path.is_absolute() {
            return Err(refuse("must be an absolute path"));
        }
        let metadata = std::fs::metadata(path).map_err(|e| refuse(&e.to_string()))?;
        if !metadata.is_file() {
            return Err(refuse("not a regular file"));
        }
        if metadata.permissions().mode() & 0o111 == 0 {
            return Err(refuse("not executable"));
        }
        if trusted_owner_only && (metadata.uid() != 0 || metadata.mode() & 0o022 != 0) {
            return Err(refuse("must be owned by root and not writable by group or others for qemu:///system"));
        }
        Ok(Emulator { program: path.to_path_buf(), explicit: true })
    }

    /// What to execute.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The name QEMU prints before its own error messages (the executable's file name).
    pub fn message_prefix(&self) -> String {
        self.program.file_name().map_or_else(|| DEFAULT_EMULATOR.to_string(), |n| n.to_string_lossy().into_owned())
    }

    /// Runs `-version` and checks the answer is a supported QEMU.
    pub fn probe(&self) -> Result<Release, PluginError> {
        let output = self.version_output()?;
        let release = Release::from_version_output(&output).ok_or_else(|| {
            let first = output.lines().next().unwrap_or("").chars().take(120).collect::<String>();
            PluginError::invalid_argument(format!(
                "{self} is not a QEMU emulator: `-version` printed {first:?}, not \"QEMU emulator version …\""
            ))
        })?;
        if release.version < MINIMUM {
            return Err(PluginError::unsupported(format!(
                "{self} is QEMU {}; the qemu driver supports QEMU {MINIMUM} or newer",
                release.version
            )));
        }
        Ok(release)
    }

    fn version_output(&self) -> Result<String, PluginError> {
        let mut child = Command::new(&self.program)
            .arg("-version")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match (e.kind(), self.explicit) {
                (std::io::ErrorKind::NotFound, false) => PluginError::unsupported(format!(
                    "{DEFAULT_EMULATOR} is not installed (PATH has none); install QEMU (Debian: qemu-system-x86) \
                     or name one with emulator=PATH"
                )),
                _ => PluginError::invalid_argument(format!("cannot run emulator {self}: {e}")),
            })?;
        // Read on a thread: a program that never exits and never closes stdout must not hang us.
        let stdout = child.stdout.take();
        let reader = thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(stdout) = stdout {
                let _ = stdout.take(PROBE_OUTPUT_LIMIT).read_to_end(&mut text);
            }
            text
        });
        let deadline = Instant::now() + PROBE_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
                _ => break None,
            }
        };
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(PluginError::invalid_argument(format!(
                "{self} is not a QEMU emulator: `-version` did not finish within {} s",
                PROBE_TIMEOUT.as_secs()
            )));
        };
        let text = reader.join().unwrap_or_default();
        if !status.success() {
            return Err(PluginError::invalid_argument(format!(
                "{self} is not a QEMU emulator: `-version` failed ({status})"
            )));
        }
        Ok(String::from_utf8_lossy(&text).into_owned())
    }
}

/// Whether `name` is a versioned q35 machine type (`pc-q35-7.2`), the only machine types a
/// live configuration read from a file may name.
pub fn is_q35_machine_type(name: &str) -> bool {
    let number = |part: Option<&str>| part.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let Some(release) = name.strip_prefix("pc-q35-") else { return false };
    let mut parts = release.split('.');
    number(parts.next()) && number(parts.next()) && parts.next().is_none()
}

/// Refuses to recreate `machine_type` (recorded by the QEMU that saved or sends the state) on
/// `release` when that QEMU is older than the machine: QEMU keeps the machine types of older
/// releases, never of newer ones.
pub fn check_machine_type(
    machine_type: Option<&str>,
    release: &Release,
    emulator: &Emulator,
) -> Result<(), PluginError> {
    let Some(machine_type) = machine_type else { return Ok(()) };
    let needed = machine_type.strip_prefix("pc-q35-").and_then(Version::parse);
    match needed {
        Some(needed) if (needed.major, needed.minor) > (release.version.major, release.version.minor) => {
            Err(PluginError::unsupported(format!(
                "the domain's state comes from QEMU {}.{} (machine {machine_type}); {emulator} is QEMU {}, which cannot \
                 run it: use QEMU {}.{} or newer",
                needed.major, needed.minor, release.version, needed.major, needed.minor
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_version_lines_of_debian_and_upstream_builds() {
        let debian = Release::from_version_output(
            "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright (c) 2003-2022 Fabrice Bellard",
        );
        assert_eq!(
            debian,
            Some(Release {
                version: Version { major: 7, minor: 2, micro: 22 },
                package: "Debian 1:7.2+dfsg-7+deb12u18+b3".into()
            })
        );
        let upstream = Release::from_version_output("QEMU emulator version 10.0.2\n");
        assert_eq!(upstream.map(|r| r.to_string()), Some("10.0.2".to_string()));
        for bad in
            ["", "-version\n", "QEMU emulator version ten", "qemu-img version 10.0.2", "QEMU emulator version 1.2.3.4"]
        {
            assert_eq!(Release::from_version_output(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn versions_order_numerically() {
        let v = |s| Version::parse(s).unwrap_or_else(|| panic!("{s}"));
        assert!(v("10.0.2") > v("7.2.22"));
        assert!(v("7.1.9") < MINIMUM);
        assert!(v("7.2") >= MINIMUM);
    }

    #[test]
    fn only_versioned_q35_machine_types_are_accepted() {
        assert!(is_q35_machine_type("pc-q35-7.2"));
        assert!(is_q35_machine_type("pc-q35-10.0"));
        for bad in ["q35", "pc-i440fx-7.2", "pc-q35-7.2,accel=kvm", "pc-q35-", "pc-q35-7", "pc-q35-7.2.0"] {
            assert!(!is_q35_machine_type(bad), "{bad}");
        }
    }

    #[test]
    fn machines_of_newer_qemus_are_refused_with_both_versions() {
        let release = |text: &str| Release::from_version_output(text).unwrap_or_else(|| panic!("{text}"));
        let old = release("QEMU emulator version 7.2.22 (Debian)");
        let new = release("QEMU emulator version 10.0.2");
        let emulator = Emulator::default();
        assert!(check_machine_type(Some("pc-q35-7.2"), &new, &emulator).is_ok());
        assert!(check_machine_type(Some("pc-q35-7.2"), &old, &emulator).is_ok());
        assert!(check_machine_type(None, &old, &emulator).is_ok());
        let refused = check_machine_type(Some("pc-q35-10.0"), &old, &emulator).err().map(|e| e.message.to_string());
        let refused = refused.unwrap_or_default();
        assert!(refused.contains("QEMU 10.0") && refused.contains("QEMU 7.2.22"), "{refused}");
    }

    #[test]
    fn emulator_paths_must_be_absolute_executable_files() {
        assert!(Emulator::at(Path::new("qemu-system-x86_64"), false).is_err());
        assert!(Emulator::at(Path::new("/"), false).is_err());
        assert!(Emulator::at(Path::new("/etc/passwd"), false).is_err());
        assert!(Emulator::at(Path::new("/nonexistent/qemu"), false).is_err());
        assert!(Emulator::at(Path::new("/bin/sh"), false).is_ok());
    }

    #[test]
    fn a_program_that_is_not_qemu_is_refused_by_name() {
        let Ok(emulator) = Emulator::at(Path::new("/bin/echo"), false) else { return };
        let error = emulator.probe().err().map(|e| e.message.to_string()).unwrap_or_default();
        assert!(error.contains("/bin/echo is not a QEMU emulator"), "{error}");
    }
}
