//! Arguments and messages as the audit log keeps them: bounded in size, secrets removed.
//! A record stays far below [`super::MAX_LINE`] whatever the caller sends.

use std::borrow::Cow;

use capvirt_plugin_api::Value;
use serde_json::Value as J;

/// Longest string kept, in bytes; longer ones are cut with a note of what was dropped.
pub const MAX_STRING: usize = 256;
/// Most list items kept.
pub const MAX_ITEMS: usize = 32;
/// Deepest nesting kept.
pub const MAX_DEPTH: usize = 8;
/// Longest serialized argument record; a larger one is kept as its cut JSON text.
pub const MAX_ARGS: usize = 4096;
/// Longest error message, capability id or URI kept.
pub const MAX_TEXT: usize = 1024;

/// What a secret is recorded as.
pub const REDACTED: &str = "[redacted]";

/// Whether a field name suggests a secret (`password`, `api_key`, `auth_token`…).
pub fn is_secret_name(name: &str) -> bool {
    const WORDS: [&str; 8] = ["password", "passwd", "passphrase", "secret", "token", "key", "credential", "private"];
    let name = name.to_ascii_lowercase();
    WORDS.iter().any(|word| name.contains(word))
}

/// The arguments as recorded, and the secret strings found (to scrub them from messages).
pub struct Redacted {
    pub json: J,
    pub secrets: Vec<String>,
}

/// Bounds and redacts an argument record (or any value a caller sent).
pub fn args(value: &Value) -> Redacted {
    let mut secrets = Vec::new();
    let json = walk(value, 0, &mut secrets);
    let text = json.to_string();
    let json = if text.len() > MAX_ARGS { J::String(cut(&text, MAX_ARGS).into_owned()) } else { json };
    Redacted { json, secrets }
}

fn walk(value: &Value, depth: usize, secrets: &mut Vec<String>) -> J {
    if depth > MAX_DEPTH {
        return J::String("[nested too deep]".into());
    }
    match value {
        Value::Unit => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(n) => J::from(*n),
        Value::UInt(n) => J::from(*n),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::Str(s) => J::String(cut(s, MAX_STRING).into_owned()),
        // File contents and streams: their size only.
        Value::Bytes(b) => J::String(format!("[{} bytes]", b.len())),
        Value::List(items) => {
            let mut out: Vec<J> = items.iter().take(MAX_ITEMS).map(|v| walk(v, depth + 1, secrets)).collect();
            if items.len() > MAX_ITEMS {
                out.push(J::String(format!("[{} more items]", items.len() - MAX_ITEMS)));
            }
            J::Array(out)
        }
        Value::Record(fields) => J::Object(
            fields
                .iter()
                .take(MAX_ITEMS)
                .map(|f| {
                    let value = if is_secret_name(&f.name) {
                        collect_strings(&f.value, secrets);
                        J::String(REDACTED.into())
                    } else {
                        walk(&f.value, depth + 1, secrets)
                    };
                    (cut(&f.name, MAX_STRING).into_owned(), value)
                })
                .collect(),
        ),
    }
}

fn collect_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Str(s) if !s.is_empty() => out.push(s.to_string()),
        Value::List(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Record(fields) => fields.iter().for_each(|f| collect_strings(&f.value, out)),
        _ => {}
    }
}

/// A message as recorded: secrets replaced, cut to [`MAX_TEXT`].
pub fn message(text: &str, secrets: &[String]) -> String {
    let mut text = cut(text, MAX_TEXT.saturating_mul(4)).into_owned();
    for secret in secrets {
        text = text.replace(secret.as_str(), REDACTED);
    }
    cut(&text, MAX_TEXT).into_owned()
}

/// `text` cut to at most `max` bytes (at a character boundary), noting how much was dropped.
pub fn cut(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…[{} more bytes]", &text[..end], text.len() - end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use capvirt_plugin_api::Field;

    #[test]
    fn secrets_are_redacted_at_any_depth_and_scrubbed_from_messages() {
        let spec = Value::record([("name", Value::from("vm")), ("vnc_password", Value::from("hunter2"))]);
        let args = Value::record([("spec", spec), ("api_key", Value::from("k-123")), ("domain", Value::from("vm"))]);
        let redacted = super::args(&args);
        assert_eq!(
            redacted.json,
            serde_json::json!({"spec": {"name": "vm", "vnc_password": "[redacted]"}, "api_key": "[redacted]", "domain": "vm"})
        );
        assert_eq!(
            message("bad value \"hunter2\" for k-123", &redacted.secrets),
            "bad value \"[redacted]\" for [redacted]"
        );
    }

    #[test]
    fn everything_is_bounded() {
        let long = "é".repeat(1000);
        let many = Value::List((0..100).map(Value::UInt).collect());
        let args = Value::Record(
            [
                Field::new("s", Value::string(&long)),
                Field::new("l", many),
                Field::new("b", Value::Bytes(vec![0u8; 9].into())),
            ]
            .into_iter()
            .collect(),
        );
        let json = super::args(&args).json;
        let s = json["s"].as_str().unwrap_or_default();
        assert!(s.len() < MAX_STRING + 32 && s.ends_with("…[1744 more bytes]"), "{s}");
        assert_eq!(json["l"].as_array().map(Vec::len), Some(MAX_ITEMS + 1));
        assert_eq!(json["b"], "[9 bytes]");
        let huge = Value::Record((0..32).map(|i| Field::new(format!("f{i}"), Value::string(&long))).collect());
        let cut = super::args(&huge).json;
        assert!(cut.as_str().is_some_and(|t| t.len() < MAX_ARGS + 32), "{cut}");
        assert!(message(&"x".repeat(10_000), &[]).len() < MAX_TEXT + 32);
    }
}
