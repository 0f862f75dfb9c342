//! Turning command-line text into typed [`Value`]s, guided by the registry's declared types.
//! Anything that does not parse is reported with the parameter's name and expected type;
//! the registry validation then checks ranges, formats and enum values.

use std::{fs::File, io::Read, path::Path};

use capvirt_plugin_api::Value;

use super::CliError;
use capvirt_host::registry::{Ty, TypeBody, TypeTable};

/// The subcommand `argv` names when that is plain: the first word after global options this
/// scan knows (`-c URI`, `--connect=URI`, `-r`, `--plugin-dir DIR`…). `None` for anything else
/// (help, version, `--`, an unknown or bundled option, no command), which then gets clap's full
/// treatment.
pub fn prescan_subcommand(argv: &[std::ffi::OsString]) -> Option<&str> {
    const WITH_VALUE: [&str; 8] =
        ["-c", "--connect", "--plugin-dir", "-o", "--output", "--registry", "--enable", "--isolate-timeout"];
    const FLAGS: [&str; 3] = ["-r", "--readonly", "--isolate"];
    let mut words = argv.iter().skip(1);
    while let Some(word) = words.next() {
        let word = word.to_str()?;
        if !word.starts_with('-') {
            return Some(word);
        }
        if FLAGS.contains(&word) {
            continue;
        }
        if WITH_VALUE.contains(&word) || word == "--audit-log" {
            words.next()?;
            continue;
        }
        let attached = WITH_VALUE.iter().chain(&["--audit-log"]).any(|option| {
            if option.starts_with("--") {
                word.strip_prefix(option).is_some_and(|rest| rest.starts_with('='))
            } else {
                word.len() > 2 && word.starts_with(option)
            }
        });
        if !attached {
            return None;
        }
    }
    None
}

/// Parses `text` as a value of type `ty` for parameter `name`.
///
/// Scalars are written plainly (`42`, `true`, `running`); records and lists as TOML inline
/// values (`{ kind = "usb-tablet", id = "t0" }`, `[1, 2]`) or `@FILE` to read a TOML file.
pub fn parse_value(types: &TypeTable, ty: &Ty, name: &str, text: &str) -> Result<Value, CliError> {
    let bad = |expected: &str| {
        CliError::usage(format!("argument `{name}`: expected {expected}, got {:?}", truncated(text, ECHO_LIMIT)))
    };
    match types.base(ty) {
        Ty::Unit => Ok(Value::Unit),
        Ty::Bool => match text {
            "true" | "yes" | "1" | "on" => Ok(Value::Bool(true)),
            "false" | "no" | "0" | "off" => Ok(Value::Bool(false)),
            _ => Err(bad("true or false")),
        },
        Ty::UInt => text.parse::<u64>().map(Value::UInt).map_err(|_| bad("an unsigned integer")),
        Ty::Int => text.parse::<i64>().map(Value::Int).map_err(|_| bad("an integer")),
        Ty::Float => text.parse::<f64>().map(Value::Float).map_err(|_| bad("a number")),
        Ty::Str => Ok(Value::string(text)),
        Ty::Bytes => match text.strip_prefix('@') {
            Some(path) => read_capped(name, Path::new(path), MAX_BYTES_FILE).map(Value::from),
            None => Ok(Value::from(text.as_bytes().to_vec())),
        },
        Ty::Named(id) if matches!(types.get(*id).body, TypeBody::Enum { .. }) => Ok(Value::string(text)),
        Ty::Named(_) | Ty::List(_) => match text.strip_prefix('@') {
            Some(path) => read_toml_file(name, Path::new(path)),
            None => parse_inline_toml(name, text),
        },
    }
}

/// Largest TOML argument file (a domain or device spec is a few hundred bytes).
pub const MAX_TOML_FILE: u64 = 1 << 20;
/// Largest `@FILE` argument of a bytes parameter.
pub const MAX_BYTES_FILE: u64 = 16 << 20;
/// Most characters of an argument echoed back in an error.
const ECHO_LIMIT: usize = 64;

/// Reads a TOML file as a record value (`define FILE`, `attach-device D FILE`).
pub fn read_toml_file(name: &str, path: &Path) -> Result<Value, CliError> {
    let bytes = read_capped(name, path, MAX_TOML_FILE)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| CliError::usage(format!("argument `{name}`: {} is not UTF-8 text", path.display())))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        CliError::usage(format!("argument `{name}`: {} is not valid TOML: {}", path.display(), toml_error(&text, &e)))
    })?;
    Ok(Value::from_toml(&toml::Value::Table(table)))
}

/// Reads at most `cap` bytes of `path` (a device such as `/dev/zero` is cut there, not read
/// without end); a longer file is refused whole.
fn read_capped(name: &str, path: &Path, cap: u64) -> Result<Vec<u8>, CliError> {
    let cannot = |e: std::io::Error| CliError::usage(format!("argument `{name}`: cannot read {}: {e}", path.display()));
    let mut bytes = Vec::new();
    File::open(path).and_then(|file| file.take(cap + 1).read_to_end(&mut bytes)).map_err(cannot)?;
    if bytes.len() as u64 > cap {
        return Err(CliError::usage(format!(
            "argument `{name}`: {} is larger than the {} KiB allowed for an argument file",
            path.display(),
            cap >> 10
        )));
    }
    Ok(bytes)
}

fn parse_inline_toml(name: &str, text: &str) -> Result<Value, CliError> {
    let source = format!("value = {text}");
    let doc: toml::Table = toml::from_str(&source)
        .map_err(|e| CliError::usage(format!("argument `{name}`: not a TOML value: {}", toml_error(&source, &e))))?;
    Ok(doc.get("value").map(Value::from_toml).unwrap_or(Value::Unit))
}

/// A TOML error as its position and message only: the offending text, which the parser's
/// own rendering quotes, never reaches an error message.
fn toml_error(source: &str, error: &toml::de::Error) -> String {
    let message = error.message().split_whitespace().collect::<Vec<_>>().join(" ");
    match error.span() {
        Some(span) => {
            let before = source.get(..span.start).unwrap_or(source);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {}", truncated(&message, 200))
        }
        None => truncated(&message, 200),
    }
}

fn truncated(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(words: &[&str]) -> Option<String> {
        let argv: Vec<std::ffi::OsString> = words.iter().map(Into::into).collect();
        prescan_subcommand(&argv).map(str::to_string)
    }

    #[test]
    fn prescan_finds_the_plain_subcommand_only() {
        assert_eq!(scan(&["capvirt", "list"]).as_deref(), Some("list"));
        assert_eq!(scan(&["capvirt", "-c", "test:///default", "list", "--all"]).as_deref(), Some("list"));
        assert_eq!(scan(&["capvirt", "--connect=test:///default", "-r", "dominfo", "x"]).as_deref(), Some("dominfo"));
        assert_eq!(scan(&["capvirt", "-ctest:///default", "-ojson", "list"]).as_deref(), Some("list"));
        assert_eq!(
            scan(&["capvirt", "--plugin-dir", "/p", "--audit-log", "/a", "suspend", "x"]).as_deref(),
            Some("suspend")
        );
        // Unsure: clap decides with the whole tree.
        for words in [
            &["capvirt"][..],
            &["capvirt", "--help"],
            &["capvirt", "-V"],
            &["capvirt", "-rc", "test:///default", "list"],
            &["capvirt", "--", "list"],
            &["capvirt", "-c"],
            &["capvirt", "--connectx", "list"],
        ] {
            assert_eq!(scan(words), None, "{words:?}");
        }
    }
}
