//! Turning command-line text into typed [`Value`]s, guided by the registry's declared types.
//! Anything that does not parse is reported with the parameter's name and expected type;
//! the registry validation then checks ranges, formats and enum values.

use std::{fs, path::Path};

use capvirt_plugin_api::Value;

use super::CliError;
use crate::registry::{Ty, TypeBody, TypeTable};

/// Parses `text` as a value of type `ty` for parameter `name`.
///
/// Scalars are written plainly (`42`, `true`, `running`); records and lists as TOML inline
/// values (`{ kind = "usb-tablet", id = "t0" }`, `[1, 2]`) or `@FILE` to read a TOML file.
pub fn parse_value(types: &TypeTable, ty: &Ty, name: &str, text: &str) -> Result<Value, CliError> {
    let bad = |expected: &str| CliError::usage(format!("argument `{name}`: expected {expected}, got {text:?}"));
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
            Some(path) => fs::read(path)
                .map(Value::from)
                .map_err(|e| CliError::usage(format!("argument `{name}`: cannot read {path}: {e}"))),
            None => Ok(Value::from(text.as_bytes().to_vec())),
        },
        Ty::Named(id) if matches!(types.get(*id).body, TypeBody::Enum { .. }) => Ok(Value::string(text)),
        Ty::Named(_) | Ty::List(_) => match text.strip_prefix('@') {
            Some(path) => read_toml_file(name, Path::new(path)),
            None => parse_inline_toml(name, text),
        },
    }
}

/// Reads a TOML file as a record value (`define FILE`, `attach-device D FILE`).
pub fn read_toml_file(name: &str, path: &Path) -> Result<Value, CliError> {
    let text = fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("argument `{name}`: cannot read {}: {e}", path.display())))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        CliError::usage(format!(
            "argument `{name}`: {} is not valid TOML: {}",
            path.display(),
            one_line(&e.to_string())
        ))
    })?;
    Ok(Value::from_toml(&toml::Value::Table(table)))
}

fn parse_inline_toml(name: &str, text: &str) -> Result<Value, CliError> {
    let doc: toml::Table = toml::from_str(&format!("value = {text}"))
        .map_err(|e| CliError::usage(format!("argument `{name}`: not a TOML value: {}", one_line(&e.to_string()))))?;
    Ok(doc.get("value").map(Value::from_toml).unwrap_or(Value::Unit))
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
