//! Conversions between [`Value`] and the text formats at the edges (TOML files, JSON output).
//! Never used on the dispatch path itself.

use base64::Engine as _;
use capvirt_plugin_api::{Field, Value};

/// [`Value`] to JSON. Bytes become base64 strings.
pub fn value_to_json(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Value::Unit => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(n) => J::from(*n),
        Value::UInt(n) => J::from(*n),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::Str(s) => J::String(s.to_string()),
        Value::Bytes(b) => J::String(base64::engine::general_purpose::STANDARD.encode(b.as_slice())),
        Value::List(items) => J::Array(items.iter().map(value_to_json).collect()),
        Value::Record(fields) => {
            J::Object(fields.iter().map(|f| (f.name.to_string(), value_to_json(&f.value))).collect())
        }
    }
}

/// JSON to [`Value`] (for `--arg key=<json>` and later remote protocols).
pub fn json_to_value(value: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match value {
        J::Null => Value::Unit,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        J::String(s) => Value::string(s),
        J::Array(items) => Value::List(items.iter().map(json_to_value).collect()),
        J::Object(map) => Value::Record(map.iter().map(|(k, v)| Field::new(k.clone(), json_to_value(v))).collect()),
    }
}
