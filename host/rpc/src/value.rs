//! [`Value`] ↔ the wire's `Value` message, losslessly (signed vs unsigned integers, bytes,
//! record field order).

use capvirt_plugin_api::{Field, Value};

use crate::proto::{self, value::Kind};

/// A wire value that is not a [`Value`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A `Value` message with none of its kinds set (at the given path).
    #[error("a value at {path} has no kind")]
    MissingKind { path: String },
}

/// The wire form of `value`.
pub fn to_wire(value: &Value) -> proto::Value {
    let kind = match value {
        Value::Unit => Kind::Unit(proto::Unit {}),
        Value::Bool(b) => Kind::Bool(*b),
        Value::Int(n) => Kind::Int(*n),
        Value::UInt(n) => Kind::Uint(*n),
        Value::Float(f) => Kind::Float(*f),
        Value::Str(s) => Kind::Str(s.as_str().to_owned()),
        Value::Bytes(b) => Kind::Bytes(b.as_slice().to_vec()),
        Value::List(items) => Kind::List(proto::ValueList { items: items.iter().map(to_wire).collect() }),
        Value::Record(fields) => Kind::Record(proto::Record {
            fields: fields
                .iter()
                .map(|f| proto::Field { name: f.name.as_str().to_owned(), value: Some(to_wire(&f.value)) })
                .collect(),
        }),
    };
    proto::Value { kind: Some(kind) }
}

/// The [`Value`] a wire value carries.
pub fn from_wire(value: proto::Value) -> Result<Value, ValueError> {
    convert(value, &mut String::from("value"))
}

/// An optional wire value; absent is [`Value::Unit`] (proto3's default for "no arguments").
pub fn from_wire_opt(value: Option<proto::Value>) -> Result<Value, ValueError> {
    value.map_or(Ok(Value::Unit), from_wire)
}

fn convert(value: proto::Value, path: &mut String) -> Result<Value, ValueError> {
    let Some(kind) = value.kind else {
        return Err(ValueError::MissingKind { path: path.clone() });
    };
    Ok(match kind {
        Kind::Unit(_) => Value::Unit,
        Kind::Bool(b) => Value::Bool(b),
        Kind::Int(n) => Value::Int(n),
        Kind::Uint(n) => Value::UInt(n),
        Kind::Float(f) => Value::Float(f),
        Kind::Str(s) => Value::from(s),
        Kind::Bytes(b) => Value::from(b),
        Kind::List(list) => {
            let mut items = Vec::with_capacity(list.items.len());
            for (i, item) in list.items.into_iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                items.push(convert(item, path)?);
                path.truncate(len);
            }
            Value::from(items)
        }
        Kind::Record(record) => {
            let mut fields = Vec::with_capacity(record.fields.len());
            for field in record.fields {
                let len = path.len();
                path.push('.');
                path.push_str(&field.name);
                let value = match field.value {
                    Some(v) => convert(v, path)?,
                    None => Value::Unit,
                };
                path.truncate(len);
                fields.push(Field::new(field.name, value));
            }
            Value::Record(fields.into())
        }
    })
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn every_variant() -> Value {
        Value::record([
            ("unit", Value::Unit),
            ("bool", Value::Bool(true)),
            ("int", Value::Int(-42)),
            ("int_positive", Value::Int(7)),
            ("uint", Value::UInt(u64::MAX)),
            ("float", Value::Float(-1.5e300)),
            ("str", Value::from("héllo")),
            ("bytes", Value::from(vec![0u8, 255, 10])),
            ("list", Value::list([Value::Int(1), Value::UInt(1), Value::from("x")])),
            ("zeta", Value::record([("b", 1u64), ("a", 2u64)])),
            ("alpha", Value::record_empty()),
        ])
    }

    /// Through the wire bytes, not only the message structs.
    fn round_trip(value: &Value) -> Value {
        let bytes = to_wire(value).encode_to_vec();
        let decoded = proto::Value::decode(bytes.as_slice()).expect("decodes");
        from_wire(decoded).expect("converts")
    }

    #[test]
    fn every_variant_survives_the_wire() {
        let value = every_variant();
        assert_eq!(round_trip(&value), value);
        for field in value.fields().expect("a record") {
            assert_eq!(round_trip(&field.value), field.value, "field {}", field.name);
        }
    }

    #[test]
    fn record_field_order_is_kept() {
        let value = Value::record([("z", 1u64), ("a", 2u64), ("m", 3u64)]);
        let names: Vec<String> =
            round_trip(&value).fields().expect("a record").iter().map(|f| f.name.to_string()).collect();
        assert_eq!(names, ["z", "a", "m"]);
    }

    #[test]
    fn signed_and_unsigned_integers_stay_apart() {
        assert_eq!(round_trip(&Value::Int(5)), Value::Int(5));
        assert_eq!(round_trip(&Value::UInt(5)), Value::UInt(5));
        assert_ne!(round_trip(&Value::Int(5)), Value::UInt(5));
        assert_eq!(round_trip(&Value::Int(i64::MIN)), Value::Int(i64::MIN));
    }

    #[test]
    fn bytes_stay_bytes_and_unit_stays_unit() {
        assert_eq!(round_trip(&Value::from(b"abc".to_vec())), Value::from(b"abc".to_vec()));
        assert_ne!(round_trip(&Value::from(b"abc".to_vec())), Value::from("abc"));
        assert_eq!(round_trip(&Value::Unit), Value::Unit);
        assert_eq!(from_wire_opt(None), Ok(Value::Unit));
    }

    #[test]
    fn a_value_without_kind_is_refused_with_its_path() {
        let wire = proto::Value {
            kind: Some(Kind::Record(proto::Record {
                fields: vec![proto::Field {
                    name: "spec".into(),
                    value: Some(proto::Value {
                        kind: Some(Kind::List(proto::ValueList { items: vec![proto::Value { kind: None }] })),
                    }),
                }],
            })),
        };
        assert_eq!(from_wire(wire), Err(ValueError::MissingKind { path: "value.spec[0]".into() }));
    }
}
