//! Opening plugin files. The only module that touches dynamic loading.
//!
//! Loading a shared object runs its initializers, and the dynamic loader maps its segments
//! without checking them against the file's size: a truncated file makes the first touch of a
//! missing page kill the process with SIGBUS. So before a file reaches the dynamic loader it
//! must pass, in order:
//!
//! 1. [`open_plugin_file`]: a regular file (not a directory, FIFO or device), owned by root or
//!    the invoking user (real uid) and not writable by group or others, in a directory that
//!    satisfies the same rule (OpenSSH's `StrictModes`);
//! 2. [`check_elf_image`]: the whole ELF image, read with the `object` crate: class, byte order
//!    and machine of this host, a shared object (`ET_DYN`), the program header table and every
//!    segment's file range inside the file, a well-formed `PT_DYNAMIC`, and the section header
//!    table and every section's file range inside the file.
//!
//! 3. when the host config pins the file, its SHA-256 ([`sha256_of`]): a changed file is refused
//!    before any of its code runs.
//!
//! abi_stable then checks the plugin's ABI (version and the layout of every type reachable
//! from the root module) before any plugin function is called. Libraries are never unloaded:
//! references into them (manifest strings, vtables) stay valid for the process lifetime.

use std::{
    fs::{self, File, Metadata},
    io::{self, Read, Seek, SeekFrom},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
};

use abi_stable::library::{lib_header_from_path, LibraryError, RootModule};
use capvirt_plugin_api::{Manifest, PluginModuleRef, ABI_VERSION};
use object::{
    elf,
    read::elf::{FileHeader, ProgramHeader, SectionHeader, Sym},
    Endianness, ReadCache, ReadRef,
};
use sha2::{Digest, Sha256};

/// A plugin whose ABI checked out, with its self-reported manifest (not yet checked against
/// the registry).
pub(crate) struct RawPlugin {
    pub module: PluginModuleRef,
    pub manifest: Manifest,
}

/// Why a file was not loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub reason: String,
    /// Refused only because its SHA-256 differs from its pin (`capvirt plugins --pin` may re-pin it).
    pub pin_mismatch: bool,
    /// The verdict follows from the file's bytes alone (a bad ELF image, no root module, an
    /// ABI mismatch), so the same file always gets it; ownership, pins and `dlopen` failures
    /// (a missing dependency) depend on more than the file.
    pub from_content: bool,
}

impl Refusal {
    /// A refusal that depends on more than the file's bytes.
    fn circumstantial(reason: String) -> Self {
        Refusal { reason, pin_mismatch: false, from_content: false }
    }

    fn from_content(reason: String) -> Self {
        Refusal { reason, pin_mismatch: false, from_content: true }
    }
}

/// Loads the plugin at `path`, or says why it is not a usable plugin. With a `pin`
/// (`sha256:<hex>`), the file must have that SHA-256.
pub(crate) fn load(path: &Path, pin: Option<&str>) -> Result<RawPlugin, Refusal> {
    let file = open_plugin_file(path).map_err(Refusal::circumstantial)?;
    check_elf_image(&ReadCache::new(&file)).map_err(Refusal::from_content)?;
    if let Some(pin) = pin {
        let actual = sha256_of(&file).map_err(|e| Refusal::circumstantial(format!("cannot read: {e}")))?;
        if actual != pin {
            let reason = format!("its SHA-256 changed since it was pinned (pinned {pin}, now {actual})");
            return Err(Refusal { reason, pin_mismatch: true, from_content: false });
        }
    }
    let header = lib_header_from_path(path).map_err(library_refusal)?;
    let module = header.init_root_module::<PluginModuleRef>().map_err(library_refusal)?;
    // The SDK wraps the manifest function in catch_unwind, so this call cannot unwind into us.
    let manifest = (module.manifest())();
    Ok(RawPlugin { module, manifest })
}

/// `sha256:<lowercase hex>` of a whole file, read from its start.
pub(crate) fn sha256_of(mut file: &File) -> io::Result<String> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(format!("sha256:{}", hasher.finalize().iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

// ---------------------------------------------------------------------------------------------
// File type, ownership and permissions

/// Opens `path` if it is a regular file that only root or the invoking user can change.
fn open_plugin_file(path: &Path) -> Result<File, String> {
    // Checked before opening: opening a FIFO would block.
    let before = fs::metadata(path).map_err(|e| format!("cannot open: {e}"))?;
    if before.is_dir() {
        return Err("is a directory, not a plugin file".into());
    }
    if !before.is_file() {
        return Err("not a regular file".into());
    }
    let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    // The checks below are on the opened file itself (fstat), not on the name.
    let meta = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    check_owner_and_mode(&meta, "file", path)?;
    check_directory(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
    let is_link = fs::symlink_metadata(path).map(|m| m.file_type().is_symlink()).unwrap_or(false);
    if is_link {
        // A link's target lives in a directory of its own, which must be as safe.
        let target = fs::canonicalize(path).map_err(|e| format!("cannot resolve link: {e}"))?;
        if let Some(dir) = target.parent() {
            check_directory(dir)?;
        }
    }
    Ok(file)
}

fn check_directory(dir: &Path) -> Result<(), String> {
    let meta = fs::metadata(dir).map_err(|e| format!("cannot inspect directory {}: {e}", dir.display()))?;
    check_owner_and_mode(&meta, "directory", dir)
}

/// The `StrictModes` rule: owned by root or the real uid, not writable by group or others;
/// as Debian's OpenSSH allows, a group holding no one but the owner (a user private group, the
/// default where umask is 002) may write.
fn check_owner_and_mode(meta: &Metadata, what: &str, path: &Path) -> Result<(), String> {
    let me = rustix::process::getuid().as_raw();
    ownership_problem(meta.uid(), meta.gid(), meta.permissions().mode(), me, is_private_group)
        .map_or(Ok(()), |problem| Err(format!("{what} {} {problem}", path.display())))
}

/// Whether group `gid` holds no user but `owner`: no other user has it as primary group and
/// `/etc/group` lists no other member. Unknown groups are not private.
fn is_private_group(gid: u32, owner: u32) -> bool {
    let (Ok(passwd), Ok(group)) = (fs::read_to_string("/etc/passwd"), fs::read_to_string("/etc/group")) else {
        return false;
    };
    let mut owner_name = None;
    for fields in passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()) {
        let (Some(name), Some(uid), Some(primary)) = (fields.first(), fields.get(2), fields.get(3)) else { continue };
        let (uid, primary) = (uid.parse::<u32>().ok(), primary.parse::<u32>().ok());
        if uid == Some(owner) {
            owner_name = Some(*name);
        } else if primary == Some(gid) {
            return false;
        }
    }
    let Some(owner_name) = owner_name else { return false };
    group.lines().map(|l| l.split(':').collect::<Vec<_>>()).any(|fields| {
        fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(gid)
            && fields.get(3).is_none_or(|members| members.split(',').all(|m| m.is_empty() || m == owner_name))
    })
}

/// Why a file or directory with this owner, group and mode is unsafe for user `me`, if it is.
fn ownership_problem(
    owner: u32,
    group: u32,
    mode: u32,
    me: u32,
    private_group: impl Fn(u32, u32) -> bool,
) -> Option<String> {
    if owner != 0 && owner != me {
        return Some(format!("is owned by uid {owner}, not by root or the invoking user (uid {me})"));
    }
    let group_writable = mode & 0o020 != 0 && !private_group(group, owner);
    let writable_by = match (group_writable, mode & 0o002 != 0) {
        (true, true) => "group and others",
        (true, false) => "group",
        (false, true) => "others",
        (false, false) => return None,
    };
    Some(format!("is writable by {writable_by} (mode {:04o}; `chmod go-w` it)", mode & 0o7777))
}

// ---------------------------------------------------------------------------------------------
// The ELF image

/// `e_ident`: its length, and the offsets of the class and byte-order bytes.
const IDENT_LEN: u64 = 16;
const EI_CLASS: usize = 4;
const EI_DATA: usize = 5;

#[cfg(target_pointer_width = "64")]
type HostElf = elf::FileHeader64<Endianness>;
#[cfg(target_pointer_width = "64")]
const HOST_CLASS: (u8, &str) = (elf::ELFCLASS64, "64-bit");
#[cfg(target_pointer_width = "32")]
type HostElf = elf::FileHeader32<Endianness>;
#[cfg(target_pointer_width = "32")]
const HOST_CLASS: (u8, &str) = (elf::ELFCLASS32, "32-bit");

#[cfg(target_endian = "little")]
const HOST_DATA: u8 = elf::ELFDATA2LSB;
#[cfg(target_endian = "big")]
const HOST_DATA: u8 = elf::ELFDATA2MSB;

#[cfg(target_arch = "x86_64")]
const HOST_MACHINE: Option<u16> = Some(elf::EM_X86_64);
#[cfg(target_arch = "aarch64")]
const HOST_MACHINE: Option<u16> = Some(elf::EM_AARCH64);
#[cfg(target_arch = "riscv64")]
const HOST_MACHINE: Option<u16> = Some(elf::EM_RISCV);
#[cfg(target_arch = "powerpc64")]
const HOST_MACHINE: Option<u16> = Some(elf::EM_PPC64);
#[cfg(target_arch = "s390x")]
const HOST_MACHINE: Option<u16> = Some(elf::EM_S390);
/// On other architectures the machine is left to the dynamic loader.
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64",
    target_arch = "powerpc64",
    target_arch = "s390x"
)))]
const HOST_MACHINE: Option<u16> = None;

fn machine_name(machine: u16) -> String {
    match machine {
        elf::EM_X86_64 => "x86-64".into(),
        elf::EM_386 => "i386".into(),
        elf::EM_AARCH64 => "aarch64".into(),
        elf::EM_ARM => "arm".into(),
        elf::EM_RISCV => "riscv".into(),
        elf::EM_PPC64 => "ppc64".into(),
        elf::EM_S390 => "s390".into(),
        other => format!("machine {other}"),
    }
}

fn segment_type_name(p_type: u32) -> String {
    match p_type {
        elf::PT_LOAD => "loadable segment".into(),
        elf::PT_DYNAMIC => "dynamic segment".into(),
        elf::PT_INTERP => "interpreter segment".into(),
        elf::PT_NOTE => "note segment".into(),
        elf::PT_TLS => "TLS segment".into(),
        elf::PT_PHDR => "program header segment".into(),
        other => format!("segment of type {other:#x}"),
    }
}

/// An ELF word (u32 or u64 depending on the class) as u64.
fn word(value: impl Into<u64>) -> u64 {
    value.into()
}

/// `offset + size` when the range `[offset, offset + size)` lies inside a file of `len` bytes.
fn range_end_within(offset: u64, size: u64, len: u64) -> Option<u64> {
    offset.checked_add(size).filter(|end| *end <= len)
}

/// Checks that `data` is a complete ELF shared object this host's dynamic loader can map
/// without reading past the end of the file. Errors say what is wrong in one line.
pub(crate) fn check_elf_image<'d, R: ReadRef<'d>>(data: R) -> Result<(), String> {
    let len = data.len().map_err(|()| "cannot read the file".to_string())?;
    if len == 0 {
        return Err("empty file, not a shared library".into());
    }
    let ident = data
        .read_bytes_at(0, IDENT_LEN)
        .ok()
        .filter(|ident| ident.starts_with(&elf::ELFMAG))
        .ok_or_else(|| "not a shared library (no ELF header)".to_string())?;
    let (class, class_name) = HOST_CLASS;
    if ident[EI_CLASS] != class {
        return Err(format!("ELF class {} is not this host's {class_name}", ident[EI_CLASS]));
    }
    if ident[EI_DATA] != HOST_DATA {
        return Err("ELF byte order is not this host's".into());
    }
    let header = HostElf::parse(data).map_err(|_| format!("truncated or unsupported ELF header ({len} bytes)"))?;
    let endian = header.endian().map_err(|_| "unsupported ELF byte order".to_string())?;
    let e_type = header.e_type(endian);
    if e_type != elf::ET_DYN {
        return Err(format!("ELF file is not a shared object (e_type {e_type})"));
    }
    let machine = header.e_machine(endian);
    if let Some(host_machine) = HOST_MACHINE.filter(|m| *m != machine) {
        return Err(format!("built for {}, this host is {}", machine_name(machine), machine_name(host_machine)));
    }
    let truncated = |what: String, offset: u64, size: u64| {
        format!(
            "{what} (bytes {offset}..{}) lies outside the file ({len} bytes): truncated or corrupt",
            offset.saturating_add(size)
        )
    };

    let segments = header
        .program_headers(endian, data)
        .map_err(|_| format!("program header table lies outside the file ({len} bytes): truncated or corrupt"))?;
    if segments.is_empty() {
        return Err("no program headers: not a loadable shared object".into());
    }
    let mut dynamic = false;
    for (index, segment) in segments.iter().enumerate() {
        let (offset, size) = segment.file_range(endian);
        let p_type = segment.p_type(endian);
        if range_end_within(offset, size, len).is_none() {
            return Err(truncated(format!("{} {index}", segment_type_name(p_type)), offset, size));
        }
        if p_type == elf::PT_LOAD && size > word(segment.p_memsz(endian)) {
            return Err(format!("loadable segment {index} is larger in the file than in memory: corrupt"));
        }
        if p_type == elf::PT_DYNAMIC {
            segment
                .dynamic(endian, data)
                .map_err(|_| format!("dynamic segment {index} is malformed: truncated or corrupt"))?;
            dynamic = true;
        }
    }
    if !dynamic {
        return Err("no dynamic segment (PT_DYNAMIC): not a shared library".into());
    }

    let sections = header
        .section_headers(endian, data)
        .map_err(|_| format!("section header table lies outside the file ({len} bytes): truncated or corrupt"))?;
    for (index, section) in sections.iter().enumerate() {
        if let Some((offset, size)) = section.file_range(endian) {
            if range_end_within(offset, size, len).is_none() {
                return Err(truncated(format!("section {index}"), offset, size));
            }
        }
    }
    Ok(())
}

/// Whether the regular file at `path` is an ELF shared object of this host that exports
/// abi_stable's root-module loader, i.e. a plugin in all but its name. Read with `object`,
/// nothing is loaded; `None` when it cannot tell (unreadable, no section headers).
pub(crate) fn exports_root_module(path: &Path) -> Option<bool> {
    // Checked before opening: opening a FIFO would block.
    if !fs::metadata(path).ok()?.is_file() {
        return Some(false);
    }
    let file = File::open(path).ok()?;
    let data = &ReadCache::new(&file);
    if check_elf_image(data).is_err() {
        return Some(false);
    }
    let header = HostElf::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let sections = header.sections(endian, data).ok()?;
    if sections.is_empty() {
        return None;
    }
    let symbols = sections.symbols(endian, data, elf::SHT_DYNSYM).ok()?;
    let wanted = abi_stable::library::ROOT_MODULE_LOADER_NAME.as_bytes();
    Some(symbols.iter().any(|symbol| {
        !symbol.is_undefined(endian) && symbol.name(endian, symbols.strings()).is_ok_and(|name| name == wanted)
    }))
}

// ---------------------------------------------------------------------------------------------
// abi_stable's verdicts

/// abi_stable's verdicts on the plugin's own symbols and layouts follow from its bytes; a
/// failing `dlopen` (a missing dependency) does not.
fn library_refusal(error: LibraryError) -> Refusal {
    let from_content = matches!(
        error,
        LibraryError::GetSymbolError { .. }
            | LibraryError::AbiInstability(_)
            | LibraryError::IncompatibleVersionNumber { .. }
    );
    Refusal { reason: describe_library_error(error), pin_mismatch: false, from_content }
}

fn describe_library_error(error: LibraryError) -> String {
    match error {
        LibraryError::GetSymbolError { .. } => {
            format!("not a capvirt plugin: it does not export {} root module", PluginModuleRef::NAME)
        }
        LibraryError::AbiInstability(details) => crate::abi_report::describe(&details.to_string()),
        LibraryError::IncompatibleVersionNumber { expected_version, actual_version, .. } => {
            format!(
                "plugin built against capvirt-plugin-api {actual_version}, incompatible with this host's \
                 {expected_version}: rebuild it against capvirt-plugin-api {ABI_VERSION}"
            )
        }
        other => one_line(&other.to_string()),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ELF shared object of this host: the test executable (a position-independent
    /// executable is `ET_DYN` with a dynamic segment, like a plugin).
    fn real_image() -> Vec<u8> {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
        fs::read(&exe).unwrap_or_else(|e| panic!("read {}: {e}", exe.display()))
    }

    fn check(bytes: &[u8]) -> Result<(), String> {
        check_elf_image(bytes)
    }

    /// Writes a little-endian u16 at `offset` of a copy of `image`.
    fn patched(image: &[u8], offset: usize, value: u16) -> Vec<u8> {
        let mut copy = image.to_vec();
        copy[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
        copy
    }

    #[test]
    fn a_complete_shared_object_passes() {
        assert_eq!(check(&real_image()), Ok(()));
    }

    #[test]
    fn truncated_images_are_refused_at_every_length() {
        let image = real_image();
        let len = image.len();
        let mut lengths = vec![1, 4, 16, 63, 64, 65, 200, 1_000, 4_096, 20_000, 100_000, 400_000, 1_000_000];
        lengths.extend([len / 2, len - 4096, len - 100, len - 8, len - 1]);
        for cut in lengths.into_iter().filter(|cut| *cut < len) {
            let err = check(&image[..cut]).expect_err("a truncated image must be refused");
            assert!(
                err.contains("truncated") || err.contains("outside the file") || err.contains("no ELF header"),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn wrong_kinds_of_elf_files_are_refused_with_the_reason() {
        let image = real_image();
        assert_eq!(check(b""), Err("empty file, not a shared library".into()));
        assert_eq!(check(b"#!/bin/sh\necho hi\n"), Err("not a shared library (no ELF header)".into()));
        // e_type at 16: ET_EXEC.
        let exec = patched(&image, 16, elf::ET_EXEC);
        assert_eq!(check(&exec), Err("ELF file is not a shared object (e_type 2)".into()));
        // e_machine at 18: aarch64 on x86-64 (or x86-64 elsewhere).
        let other = if HOST_MACHINE == Some(elf::EM_X86_64) { elf::EM_AARCH64 } else { elf::EM_X86_64 };
        let foreign = patched(&image, 18, other);
        if let Some(host) = HOST_MACHINE {
            let err = check(&foreign).expect_err("foreign machine");
            assert_eq!(err, format!("built for {}, this host is {}", machine_name(other), machine_name(host)));
        }
        // The other class.
        let mut class = image.clone();
        class[EI_CLASS] = if HOST_CLASS.0 == elf::ELFCLASS64 { elf::ELFCLASS32 } else { elf::ELFCLASS64 };
        assert!(check(&class).expect_err("class").contains("is not this host's"));
    }

    #[test]
    fn segments_past_the_end_are_refused() {
        let image = real_image();
        let endian = Endianness::default();
        let header = HostElf::parse(image.as_slice()).unwrap_or_else(|e| panic!("{e}"));
        let phoff = word(header.e_phoff(endian));
        let segments = header.program_headers(endian, image.as_slice()).unwrap_or_else(|e| panic!("{e}"));
        let (index, _) = segments
            .iter()
            .enumerate()
            .find(|(_, s)| s.p_type(endian) == elf::PT_LOAD)
            .unwrap_or_else(|| panic!("no PT_LOAD"));
        // p_filesz is at offset 32 of a 64-bit program header (16 of a 32-bit one).
        let (entry, filesz_at, width) = if HOST_CLASS.0 == elf::ELFCLASS64 { (56, 32, 8) } else { (32, 16, 4) };
        let at = usize::try_from(phoff).unwrap_or(usize::MAX) + index * entry + filesz_at;
        let mut copy = image.clone();
        copy[at..at + width].iter_mut().for_each(|b| *b = 0xff);
        let err = check(&copy).expect_err("segment past the end");
        assert!(err.starts_with(&format!("loadable segment {index} (bytes ")), "{err}");
    }

    #[test]
    fn no_dynamic_segment_or_a_section_table_past_the_end_is_refused() {
        let image = real_image();
        let endian = Endianness::default();
        let header = HostElf::parse(image.as_slice()).unwrap_or_else(|e| panic!("{e}"));
        let phoff = usize::try_from(word(header.e_phoff(endian))).unwrap_or(usize::MAX);
        let entry = usize::from(header.e_phentsize(endian));
        let segments = header.program_headers(endian, image.as_slice()).unwrap_or_else(|e| panic!("{e}"));
        // p_type (the first 4 bytes of a program header) of PT_DYNAMIC becomes PT_NULL.
        let mut copy = image.clone();
        for (index, _) in segments.iter().enumerate().filter(|(_, s)| s.p_type(endian) == elf::PT_DYNAMIC) {
            copy[phoff + index * entry..][..4].copy_from_slice(&elf::PT_NULL.to_le_bytes());
        }
        assert_eq!(check(&copy), Err("no dynamic segment (PT_DYNAMIC): not a shared library".into()));
        // e_shoff: just before the end of the file.
        let (at, width) = if HOST_CLASS.0 == elf::ELFCLASS64 { (40, 8) } else { (32, 4) };
        let mut copy = image.clone();
        let near_end = (image.len() as u64 - 10).to_le_bytes();
        copy[at..at + width].copy_from_slice(&near_end[..width]);
        let err = check(&copy).expect_err("section table past the end");
        assert!(err.starts_with("section header table lies outside the file"), "{err}");
    }

    #[test]
    fn sha256_of_a_file() {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
        let file = File::open(&exe).unwrap_or_else(|e| panic!("{e}"));
        let digest = sha256_of(&file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sha256_of(&file).ok(), Some(digest.clone()), "reads from the start every time");
        let hex = digest.strip_prefix("sha256:").unwrap_or_default();
        assert!(hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{digest}");
        let empty = tempfile_in_target(b"");
        assert_eq!(
            sha256_of(&File::open(&empty).unwrap_or_else(|e| panic!("{e}"))).ok().as_deref(),
            Some("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
        let _ = fs::remove_file(empty);
    }

    /// A file with `bytes` next to the test executable (the host crate has no tempfile dependency).
    fn tempfile_in_target(bytes: &[u8]) -> std::path::PathBuf {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
        let path = exe.with_extension(format!("sha-test-{}", std::process::id()));
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("{e}"));
        path
    }

    #[test]
    fn only_libraries_exporting_the_root_module_look_like_plugins() {
        // The test executable is a valid shared object but exports no root module.
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(exports_root_module(&exe), Some(false));
        assert_eq!(exports_root_module(Path::new("/nonexistent/libx.so")), None);
        assert_eq!(exports_root_module(Path::new("/")), Some(false));
    }

    #[test]
    fn strict_modes() {
        let shared = |_, _| false;
        assert_eq!(ownership_problem(1000, 1000, 0o100755, 1000, shared), None);
        assert_eq!(ownership_problem(0, 0, 0o100755, 1000, shared), None);
        assert_eq!(ownership_problem(0, 0, 0o40755, 0, shared), None);
        assert_eq!(
            ownership_problem(1001, 1001, 0o100644, 1000, shared),
            Some("is owned by uid 1001, not by root or the invoking user (uid 1000)".into())
        );
        assert_eq!(
            ownership_problem(1000, 100, 0o100664, 1000, shared),
            Some("is writable by group (mode 0664; `chmod go-w` it)".into())
        );
        // A user private group (umask 002 systems) may write; others still may not.
        let private = |gid, owner| gid == 1000 && owner == 1000;
        assert_eq!(ownership_problem(1000, 1000, 0o40775, 1000, private), None);
        assert_eq!(
            ownership_problem(1000, 1000, 0o40777, 1000, private),
            Some("is writable by others (mode 0777; `chmod go-w` it)".into())
        );
        assert_eq!(
            ownership_problem(0, 0, 0o41777, 1000, shared),
            Some("is writable by group and others (mode 1777; `chmod go-w` it)".into())
        );
        assert_eq!(
            ownership_problem(1000, 1000, 0o100646, 1000, shared),
            Some("is writable by others (mode 0646; `chmod go-w` it)".into())
        );
    }

    #[test]
    fn private_groups_hold_only_their_owner() {
        // root's group on this machine: gid 0, primary group of root only (as on Debian).
        let root_private = is_private_group(0, 0);
        let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
        let others_in_root_group =
            passwd.lines().filter(|l| l.split(':').nth(3) == Some("0") && l.split(':').nth(2) != Some("0")).count();
        assert_eq!(root_private, others_in_root_group == 0 && fs::read_to_string("/etc/group").is_ok());
        // A gid nobody has is not private.
        assert!(!is_private_group(4_000_000_000, 0));
    }
}
