//! The value model every argument and result is expressed in.
//!
//! It is `StableAbi`, so a call crosses the boundary without any text encoding. Records keep
//! their fields in order (small records are faster to scan than to hash). Types are declared by
//! the registry, not here: the host validates arguments against them before a driver sees them.

use std::fmt;

use abi_stable::{
    std_types::{RCowStr, RString, RVec},
    StableAbi,
};

/// Text inside values: borrowed when it is `'static` (field names, enum words), owned
/// otherwise, so that building a typical result allocates only for dynamic strings.
/// Borrowing across the boundary is sound because plugin libraries are never unloaded.
pub type Text = RCowStr<'static>;

/// A dynamically typed, ABI-stable value.
#[repr(C, u8)]
#[derive(StableAbi, Clone, Debug, PartialEq, Default)]
pub enum Value {
    /// No value (a capability without a result, or an absent optional field).
    #[default]
    Unit,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(Text),
    Bytes(RVec<u8>),
    List(RVec<Value>),
    /// Named fields, in declaration order; names are unique.
    Record(RVec<Field>),
}

/// One named field of a [`Value::Record`].
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Field {
    pub name: Text,
    pub value: Value,
}

impl Field {
    pub fn new(name: impl Into<Text>, value: impl Into<Value>) -> Self {
        Field { name: name.into(), value: value.into() }
    }
}

impl Value {
    /// An empty record.
    pub fn record_empty() -> Value {
        Value::Record(RVec::new())
    }

    /// Builds a record from `(name, value)` pairs.
    pub fn record<N, V, I>(fields: I) -> Value
    where
        N: Into<Text>,
        V: Into<Value>,
        I: IntoIterator<Item = (N, V)>,
    {
        Value::Record(fields.into_iter().map(|(n, v)| Field::new(n, v)).collect())
    }

    /// Builds a list.
    pub fn list<V: Into<Value>, I: IntoIterator<Item = V>>(items: I) -> Value {
        Value::List(items.into_iter().map(Into::into).collect())
    }

    /// The field `name` of a record (`None` for other values or a missing field).
    #[inline]
    pub fn get(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Record(fields) => fields.iter().find(|f| same_text(f.name.as_str(), name)).map(|f| &f.value),
            _ => None,
        }
    }

    /// Appends or replaces the field `name` of a record; other values are left untouched.
    pub fn set(&mut self, name: impl Into<Text>, value: impl Into<Value>) {
        if let Value::Record(fields) = self {
            let name = name.into();
            let value = value.into();
            match fields.iter_mut().find(|f| f.name.as_str() == name.as_str()) {
                Some(field) => field.value = value,
                None => fields.push(Field { name, value }),
            }
        }
    }

    /// A string value copied from a borrowed `&str` (use `From` for `'static` or owned text).
    pub fn string(s: &str) -> Value {
        Value::Str(Text::from(s.to_owned()))
    }

    /// The fields of a record.
    pub fn fields(&self) -> Option<&[Field]> {
        match self {
            Value::Record(fields) => Some(fields.as_slice()),
            _ => None,
        }
    }

    /// The text of a string value as it is held: cloning a borrowed (`'static`) `Text` copies
    /// no bytes, so a result that repeats an argument (a domain's name) can reuse it.
    pub fn as_text(&self) -> Option<&Text> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s.as_str()),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// An unsigned integer, also from a non-negative `Int`.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::UInt(n) => Some(*n),
            Value::Int(n) => u64::try_from(*n).ok(),
            _ => None,
        }
    }

    /// A signed integer, also from a `UInt` that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            Value::UInt(n) => i64::try_from(*n).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b.as_slice()),
            _ => None,
        }
    }

    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(items) => Some(items.as_slice()),
            _ => None,
        }
    }

    pub fn is_unit(&self) -> bool {
        matches!(self, Value::Unit)
    }

    /// The name of this value's kind, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::Unit => "nothing",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::UInt(_) => "an unsigned integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "a list",
            Value::Record(_) => "a record",
        }
    }
}

impl fmt::Display for Value {
    /// A compact, human-readable rendering (not a serialization format).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Unit => Ok(()),
            Value::Bool(b) => write!(f, "{}", if *b { "yes" } else { "no" }),
            Value::Int(n) => write!(f, "{n}"),
            Value::UInt(n) => write!(f, "{n}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => f.write_str(s),
            Value::Bytes(b) => write!(f, "<{} bytes>", b.len()),
            Value::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                Ok(())
            }
            Value::Record(fields) => {
                f.write_str("{")?;
                for (i, field) in fields.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{}: {}", field.name, field.value)?;
                }
                f.write_str("}")
            }
        }
    }
}

/// String equality for the short field and argument names looked up on every call: compared
/// inline in a word or two instead of a call to `memcmp` (~90 instructions per field). The
/// SDK's record lookups and the host's argument and result checks both use it.
#[inline(always)]
pub fn same_text(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        // Two overlapping words cover 8..=16 bytes, two overlapping half words 4..=7 (fixed-size
        // chunks: the length is known, so these are plain loads without bounds checks).
        8..=16 => a.first_chunk::<8>() == b.first_chunk::<8>() && a.last_chunk::<8>() == b.last_chunk::<8>(),
        4..=7 => a.first_chunk::<4>() == b.first_chunk::<4>() && a.last_chunk::<4>() == b.last_chunk::<4>(),
        // First, middle and last byte cover 1..=3.
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        0 => true,
        _ => a == b,
    }
}

macro_rules! value_from {
    ($($ty:ty => $variant:ident via $conv:expr),* $(,)?) => {
        $(impl From<$ty> for Value {
            fn from(v: $ty) -> Value { Value::$variant($conv(v)) }
        })*
    };
}

value_from! {
    bool => Bool via |v| v,
    i64 => Int via |v| v,
    i32 => Int via i64::from,
    u64 => UInt via |v| v,
    u32 => UInt via u64::from,
    f64 => Float via |v| v,
    &'static str => Str via Text::from,
    String => Str via Text::from,
    RString => Str via Text::from,
    Text => Str via |v| v,
    Vec<u8> => Bytes via RVec::from,
}

#[cfg(feature = "toml")]
impl Value {
    /// Converts TOML to a value. Integers become `Int` (validation converts them to the
    /// declared type); datetimes become strings.
    pub fn from_toml(value: &toml::Value) -> Value {
        match value {
            toml::Value::String(s) => Value::string(s),
            toml::Value::Integer(n) => Value::Int(*n),
            toml::Value::Float(f) => Value::Float(*f),
            toml::Value::Boolean(b) => Value::Bool(*b),
            toml::Value::Datetime(d) => Value::from(d.to_string()),
            toml::Value::Array(items) => Value::List(items.iter().map(Value::from_toml).collect()),
            toml::Value::Table(table) => {
                Value::Record(table.iter().map(|(k, v)| Field::new(k.clone(), Value::from_toml(v))).collect())
            }
        }
    }

    /// Converts a value to TOML. `Unit` record fields are left out; bytes become integer arrays;
    /// unsigned integers above `i64::MAX` saturate (TOML integers are signed 64-bit).
    pub fn to_toml(&self) -> toml::Value {
        match self {
            Value::Unit => toml::Value::String(String::new()),
            Value::Bool(b) => toml::Value::Boolean(*b),
            Value::Int(n) => toml::Value::Integer(*n),
            Value::UInt(n) => toml::Value::Integer(i64::try_from(*n).unwrap_or(i64::MAX)),
            Value::Float(f) => toml::Value::Float(*f),
            Value::Str(s) => toml::Value::String(s.to_string()),
            Value::Bytes(b) => toml::Value::Array(b.iter().map(|x| toml::Value::Integer(i64::from(*x))).collect()),
            Value::List(items) => toml::Value::Array(items.iter().map(Value::to_toml).collect()),
            Value::Record(fields) => toml::Value::Table(
                fields.iter().filter(|f| !f.value.is_unit()).map(|f| (f.name.to_string(), f.value.to_toml())).collect(),
            ),
        }
    }
}

impl From<()> for Value {
    fn from(_: ()) -> Value {
        Value::Unit
    }
}

impl From<Vec<Value>> for Value {
    fn from(items: Vec<Value>) -> Value {
        Value::List(RVec::from(items))
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Unit, Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_get_and_set() {
        let mut v = Value::record([("name", Value::from("vm1")), ("vcpus", Value::from(2u64))]);
        assert_eq!(v.get("name").and_then(Value::as_str), Some("vm1"));
        v.set("vcpus", 4u64);
        v.set("memory_kib", 1024u64);
        assert_eq!(v.get("vcpus").and_then(Value::as_u64), Some(4));
        assert_eq!(v.fields().map(<[Field]>::len), Some(3));
        assert_eq!(v.get("missing"), None);
    }

    #[test]
    fn same_text_is_equality() {
        let words = ["", "a", "ab", "ba", "abc", "abd", "name", "nama", "domain", "domaim", "memory_kib", "memory_kia"];
        let long = ["max_memory_kib_x", "max_memory_kib_y", "hypervisor_version", "hypervisor_versiom"];
        for a in words.iter().chain(&long) {
            for b in words.iter().chain(&long) {
                assert_eq!(same_text(a, b), a == b, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn integer_views_convert_only_when_lossless() {
        assert_eq!(Value::Int(-1).as_u64(), None);
        assert_eq!(Value::Int(7).as_u64(), Some(7));
        assert_eq!(Value::UInt(u64::MAX).as_i64(), None);
    }
}
