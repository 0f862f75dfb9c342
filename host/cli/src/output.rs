//! Rendering results: tables and `Label: value` details for people, JSON for scripts.
//! Shapes come from the registry's declared result types, not from per-command code.

use std::io::{self, Write};

use capvirt_plugin_api::Value;

use capvirt_host::{
    convert::value_to_json,
    registry::{FieldDef, Ty, TypeTable},
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
}

/// Writes `text` to stdout, ignoring a closed pipe (`capvirt list | head`).
pub fn print(text: &str) {
    let mut out = io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Writes raw bytes to stdout (`screenshot DOMAIN -`), ignoring a closed pipe.
pub fn print_bytes(bytes: &[u8]) {
    let mut out = io::stdout().lock();
    let _ = out.write_all(bytes);
    let _ = out.flush();
}

/// JSON rendering (pretty, one document, trailing newline).
pub fn json(value: &Value) -> String {
    let mut s = serde_json::to_string_pretty(&value_to_json(value)).unwrap_or_else(|_| "null".into());
    s.push('\n');
    s
}

pub fn json_value(value: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into());
    s.push('\n');
    s
}

/// Human rendering of `value` of declared type `ty`.
pub fn human(types: &TypeTable, ty: &Ty, value: &Value) -> String {
    match value {
        Value::Unit => String::new(),
        Value::List(items) => match ty {
            Ty::List(item_ty) => match types.record_fields(item_ty) {
                Some(fields) => record_table(fields, items),
                None => items.iter().map(|i| format!("{i}\n")).collect(),
            },
            _ => items.iter().map(|i| format!("{i}\n")).collect(),
        },
        Value::Record(_) => match types.record_fields(ty) {
            Some(fields) => details(fields, value),
            None => format!("{value}\n"),
        },
        other => format!("{other}\n"),
    }
}

/// `Label:   value` lines, virsh `dominfo` style. Bytes fields are summarized.
pub fn details(fields: &[FieldDef], value: &Value) -> String {
    let rows: Vec<(String, String)> = fields
        .iter()
        .filter_map(|f| {
            value.get(&f.name).filter(|v| !v.is_unit()).map(|v| (format!("{}:", f.display_label()), v.to_string()))
        })
        .collect();
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    rows.iter().map(|(label, v)| format!("{label:<width$} {v}\n")).collect()
}

/// A table with one column per scalar field, virsh `list` style.
pub fn record_table(fields: &[FieldDef], rows: &[Value]) -> String {
    let columns: Vec<&FieldDef> = fields.iter().filter(|f| !matches!(f.ty, Ty::List(_))).collect();
    let header: Vec<String> = columns.iter().map(|f| f.display_label()).collect();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| columns.iter().map(|f| row.get(&f.name).map(ToString::to_string).unwrap_or_default()).collect())
        .collect();
    table(&header, &cells)
}

/// Aligned columns under a header and a rule.
pub fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::from(" ");
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(header);
    let total: usize = widths.iter().sum::<usize>() + 3 * widths.len().saturating_sub(1) + 2;
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for row in rows {
        out.push_str(&line(row));
    }
    out.push('\n');
    out
}
