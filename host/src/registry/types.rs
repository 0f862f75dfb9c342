//! Compiled value types and the validation every argument goes through.
//!
//! Type expressions from the registry files are resolved once, when the registry is built;
//! validation then walks a [`Ty`] tree without any name lookups.

use std::fmt::{self, Write as _};

use capvirt_plugin_api::{Field, Value};

use super::model::StringFormat;

/// Index of a named type in [`TypeTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TypeId(pub(crate) usize);

/// A resolved type expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Ty {
    Unit,
    Bool,
    Int,
    UInt,
    Float,
    Str,
    Bytes,
    List(Box<Ty>),
    Named(TypeId),
}

/// Bounds that a field or parameter adds to its type (e.g. `memory_mib` 16..=1048576).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Bounds {
    pub min: Option<i64>,
    pub max: Option<u64>,
}

/// A named type.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeDef {
    pub name: String,
    pub doc: String,
    pub body: TypeBody,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TypeBody {
    /// A constrained primitive.
    Scalar {
        base: Ty,
        format: Option<StringFormat>,
        max_len: Option<u64>,
        bounds: Bounds,
    },
    Enum {
        values: Vec<String>,
    },
    Record {
        fields: Vec<FieldDef>,
    },
}

/// A record field or capability parameter, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldDef {
    pub name: String,
    pub ty: Ty,
    /// The type expression as written, for docs and help.
    pub ty_text: String,
    pub required: bool,
    pub default: Option<Value>,
    pub bounds: Bounds,
    pub label: Option<String>,
    pub doc: String,
    /// How the hot path checks this field, precomputed from `ty` and `bounds` once the
    /// registry is built (see [`TypeTable::plan_fields`]).
    pub(crate) quick: Quick,
}

/// A field's check reduced to what a value of the right shape needs, so that checking the
/// usual argument and result records needs neither a type lookup nor a recursive call. A value
/// that does not pass the quick check goes through [`TypeTable::validate`], which decides and
/// words the error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Quick {
    /// Nothing known: always the general check.
    #[default]
    General,
    /// A primitive of exactly this kind, unbounded, with nothing to normalize.
    Bool,
    Str,
    Bytes,
    Float,
    UInt,
    Int,
    /// A named string type of format `name`, at most `max_len` bytes.
    Name {
        max_len: u64,
    },
    /// A named enum.
    Enum(TypeId),
}

impl FieldDef {
    /// The label shown in detail output.
    pub fn display_label(&self) -> String {
        self.label.clone().unwrap_or_else(|| {
            let mut label = self.name.replace('_', " ");
            if let Some(first) = label.get_mut(0..1) {
                first.make_ascii_uppercase();
            }
            label
        })
    }
}

/// All named types of a registry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeTable {
    pub(crate) defs: Vec<TypeDef>,
}

/// Where validation is inside a value (`spec.disks[0].format`), kept on the stack as a chain
/// of segments and rendered only when an error needs it: checking a value allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct ValuePath<'a> {
    segment: Segment<'a>,
    parent: Option<&'a ValuePath<'a>>,
}

#[derive(Debug, Clone, Copy)]
enum Segment<'a> {
    /// The value as a whole, named (`result`) or not (a call's argument record).
    Root(&'a str),
    Field(&'a str),
    Index(usize),
}

impl<'a> ValuePath<'a> {
    /// The top of a value; `""` for a call's argument record (whose fields are arguments).
    pub const fn root(name: &'a str) -> Self {
        ValuePath { segment: Segment::Root(name), parent: None }
    }

    fn field(&'a self, name: &'a str) -> ValuePath<'a> {
        ValuePath { segment: Segment::Field(name), parent: Some(self) }
    }

    fn index(&'a self, index: usize) -> ValuePath<'a> {
        ValuePath { segment: Segment::Index(index), parent: Some(self) }
    }

    /// Whether this is the unnamed top of an argument record.
    fn is_arguments(&self) -> bool {
        matches!(self.segment, Segment::Root(""))
    }

    fn render(&self) -> String {
        let mut chain = vec![self.segment];
        let mut at = self.parent;
        while let Some(node) = at {
            chain.push(node.segment);
            at = node.parent;
        }
        let mut out = String::new();
        for segment in chain.into_iter().rev() {
            match segment {
                Segment::Root(name) => out.push_str(name),
                Segment::Field(name) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(name);
                }
                Segment::Index(i) => {
                    let _ = write!(out, "[{i}]");
                }
            }
        }
        out
    }
}

/// Why a value does not fit its declared type. `path` names the offending part
/// (`spec.disks[0].format`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "`{}`: {}", self.path, self.message)
        }
    }
}

impl TypeTable {
    pub fn get(&self, id: TypeId) -> &TypeDef {
        &self.defs[id.0]
    }

    pub fn lookup(&self, name: &str) -> Option<TypeId> {
        self.defs.iter().position(|d| d.name == name).map(TypeId)
    }

    pub fn iter(&self) -> impl Iterator<Item = &TypeDef> {
        self.defs.iter()
    }

    /// Resolves a type expression (`uint`, `DomainSpec`, `list<DiskSpec>`).
    pub fn parse_expr(&self, text: &str) -> Result<Ty, String> {
        let text = text.trim();
        if let Some(inner) = text.strip_prefix("list<").and_then(|rest| rest.strip_suffix('>')) {
            return Ok(Ty::List(Box::new(self.parse_expr(inner)?)));
        }
        Ok(match text {
            "unit" => Ty::Unit,
            "bool" => Ty::Bool,
            "int" => Ty::Int,
            "uint" => Ty::UInt,
            "float" => Ty::Float,
            "string" => Ty::Str,
            "bytes" => Ty::Bytes,
            name => Ty::Named(self.lookup(name).ok_or_else(|| format!("unknown type `{name}`"))?),
        })
    }

    /// Checks `value` against `ty` (with extra `bounds`), normalizing in place: integers are
    /// converted to the declared signedness and absent optional record fields get their default.
    pub fn validate(
        &self,
        ty: &Ty,
        bounds: Bounds,
        value: &mut Value,
        path: &ValuePath<'_>,
    ) -> Result<(), ValidationError> {
        match (ty, &mut *value) {
            (Ty::Unit, Value::Unit) => Ok(()),
            (Ty::Bool, Value::Bool(_)) => Ok(()),
            (Ty::Float, Value::Float(_)) => Ok(()),
            (Ty::Float, Value::Int(n)) => {
                *value = Value::Float(*n as f64);
                Ok(())
            }
            (Ty::Float, Value::UInt(n)) => {
                *value = Value::Float(*n as f64);
                Ok(())
            }
            (Ty::Int, Value::Int(n)) => check_int_bounds(i128::from(*n), bounds, path),
            (Ty::Int, Value::UInt(n)) => {
                let n = *n;
                let signed =
                    i64::try_from(n).map_err(|_| error(path, format!("{n} is out of range for an integer")))?;
                *value = Value::Int(signed);
                check_int_bounds(i128::from(n), bounds, path)
            }
            (Ty::UInt, Value::UInt(n)) => check_int_bounds(i128::from(*n), bounds, path),
            (Ty::UInt, Value::Int(n)) => {
                let n = *n;
                let unsigned = u64::try_from(n).map_err(|_| error(path, format!("must not be negative, got {n}")))?;
                *value = Value::UInt(unsigned);
                check_int_bounds(i128::from(n), bounds, path)
            }
            (Ty::Str, Value::Str(_)) => Ok(()),
            (Ty::Bytes, Value::Bytes(_)) => Ok(()),
            (Ty::List(item), Value::List(items)) => {
                for (i, item_value) in items.iter_mut().enumerate() {
                    self.validate(item, Bounds::default(), item_value, &path.index(i))?;
                }
                Ok(())
            }
            (Ty::Named(id), _) => self.validate_named(*id, bounds, value, path),
            (ty, value) => Err(error(path, format!("expected {}, got {}", self.describe(ty), value.kind_name()))),
        }
    }

    fn validate_named(
        &self,
        id: TypeId,
        bounds: Bounds,
        value: &mut Value,
        path: &ValuePath<'_>,
    ) -> Result<(), ValidationError> {
        let def = self.get(id);
        match &def.body {
            TypeBody::Scalar { base, format, max_len, bounds: own } => {
                let merged = Bounds { min: bounds.min.or(own.min), max: bounds.max.or(own.max) };
                if !trivially_valid(base, merged, value) {
                    self.validate(base, merged, value, path)?;
                }
                if let Value::Str(s) = value {
                    if let Some(max) = max_len {
                        if s.len() as u64 > *max {
                            return Err(error(path, format!("{} longer than {max} bytes", def.name)));
                        }
                    }
                    if let Some(format) = format {
                        check_format(*format, s.as_str())
                            .map_err(|why| error(path, format!("invalid {}: {why}", def.name)))?;
                    }
                }
                if let (Value::Bytes(b), Some(max)) = (&*value, max_len) {
                    if b.len() as u64 > *max {
                        return Err(error(path, format!("{} longer than {max} bytes", def.name)));
                    }
                }
                Ok(())
            }
            TypeBody::Enum { values } => match value {
                Value::Str(s) if values.iter().any(|v| same_text(v, s.as_str())) => Ok(()),
                Value::Str(s) => {
                    Err(error(path, format!("expected one of {}; got {:?}", values.join(", "), s.as_str())))
                }
                other => Err(error(path, format!("expected one of {}; got {}", values.join(", "), other.kind_name()))),
            },
            TypeBody::Record { fields } => self.validate_record(&def.name, fields, value, path),
        }
    }

    /// Checks a record against its fields: unknown fields and missing required fields are
    /// refused, defaults are filled in.
    pub fn validate_record(
        &self,
        what: &str,
        fields: &[FieldDef],
        value: &mut Value,
        path: &ValuePath<'_>,
    ) -> Result<(), ValidationError> {
        let Value::Record(given) = value else {
            return Err(error(path, format!("expected {what} (a record), got {}", value.kind_name())));
        };
        if self.validate_fields_in_order(fields, given, path)? {
            return Ok(());
        }
        // At the top level the record's fields are a call's arguments.
        let noun = if path.is_arguments() { "argument" } else { "field" };
        // Every given field must be declared and appear once.
        for (i, field) in given.iter().enumerate() {
            if !fields.iter().any(|f| f.name == field.name) {
                let known: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
                let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
                return Err(error(path, format!("unknown {noun} `{}` (expected: {known})", field.name)));
            }
            if given[..i].iter().any(|earlier| earlier.name == field.name) {
                return Err(error(path, format!("{noun} `{}` given twice", field.name)));
            }
        }
        for decl in fields {
            let position = given.iter().position(|f| f.name.as_str() == decl.name);
            match position {
                Some(i) if !given[i].value.is_unit() || decl.ty == Ty::Unit => {
                    self.validate(&decl.ty, decl.bounds, &mut given[i].value, &path.field(&decl.name))?;
                }
                _ if decl.required => {
                    return Err(error(&path.field(&decl.name), format!("missing required {noun} ({})", decl.ty_text)));
                }
                Some(i) => {
                    if let Some(default) = &decl.default {
                        given[i].value = default.clone();
                    }
                }
                None => {
                    if let Some(default) = &decl.default {
                        given.push(Field::new(decl.name.clone(), default.clone()));
                    }
                }
            }
        }
        Ok(())
    }

    /// The common case, checked in one pass: the given fields are a subsequence of the declared
    /// ones, in declaration order (as every typed builder writes them), with every required field
    /// present and set. Returns `Ok(false)` when the record is not of that shape, leaving it to
    /// the general check (which words the precise error); a field that is there but invalid is
    /// reported at once.
    fn validate_fields_in_order(
        &self,
        fields: &[FieldDef],
        given: &mut [Field],
        path: &ValuePath<'_>,
    ) -> Result<bool, ValidationError> {
        let mut next = 0;
        for decl in fields {
            match given.get_mut(next) {
                Some(field) if same_text(field.name.as_str(), &decl.name) => {
                    // A quick pass is never a unit value, so the unit test waits for a miss.
                    if !self.quick_valid(decl.quick, &field.value) {
                        if field.value.is_unit() && decl.ty != Ty::Unit {
                            return Ok(false);
                        }
                        self.validate(&decl.ty, decl.bounds, &mut field.value, &path.field(&decl.name))?;
                    }
                    next += 1;
                }
                // Absent optional fields without a default need nothing; defaults need a push.
                _ if !decl.required && decl.default.is_none() => {}
                _ => return Ok(false),
            }
        }
        Ok(next == given.len())
    }

    /// Whether `value` is a record whose fields all pass their quick checks as given: the shape
    /// [`Self::validate_fields_in_order`] accepts, with every value of the usual kind. Decided
    /// without a path, an error or a change to the value, so the usual argument and result
    /// records cost one pass over their fields; `false` leaves the decision (and the wording of
    /// any error) to [`Self::validate_record`].
    #[inline]
    pub(crate) fn record_passes_quick(&self, fields: &[FieldDef], value: &Value) -> bool {
        let Value::Record(given) = value else { return false };
        let mut next = 0;
        for decl in fields {
            match given.get(next) {
                Some(field) if same_text(field.name.as_str(), &decl.name) => {
                    if !self.quick_valid(decl.quick, &field.value) {
                        return false;
                    }
                    next += 1;
                }
                _ if !decl.required && decl.default.is_none() => {}
                _ => return false,
            }
        }
        next == given.len()
    }

    /// Whether `value` passes `quick` as is (`false` leaves the decision to the general check).
    #[inline(always)]
    fn quick_valid(&self, quick: Quick, value: &Value) -> bool {
        match (quick, value) {
            (Quick::Bool, Value::Bool(_))
            | (Quick::Str, Value::Str(_))
            | (Quick::Bytes, Value::Bytes(_))
            | (Quick::Float, Value::Float(_))
            | (Quick::UInt, Value::UInt(_))
            | (Quick::Int, Value::Int(_)) => true,
            (Quick::Name { max_len }, Value::Str(s)) => s.len() as u64 <= max_len && is_name(s.as_bytes()),
            (Quick::Enum(id), Value::Str(s)) => match &self.get(id).body {
                TypeBody::Enum { values } => values.iter().any(|v| same_text(v, s.as_str())),
                _ => false,
            },
            _ => false,
        }
    }

    /// The quick check for a field of type `ty` with `bounds` (every body must be known).
    pub(crate) fn quick_for(&self, ty: &Ty, bounds: Bounds) -> Quick {
        let unbounded = bounds.min.is_none() && bounds.max.is_none();
        match ty {
            Ty::Bool => Quick::Bool,
            Ty::Str => Quick::Str,
            Ty::Bytes => Quick::Bytes,
            Ty::Float => Quick::Float,
            Ty::UInt if unbounded => Quick::UInt,
            Ty::Int if unbounded => Quick::Int,
            Ty::Named(id) => match &self.get(*id).body {
                TypeBody::Enum { .. } => Quick::Enum(*id),
                TypeBody::Scalar { base: Ty::Str, format: Some(StringFormat::Name), max_len, bounds: own }
                    if unbounded && own.min.is_none() && own.max.is_none() =>
                {
                    Quick::Name { max_len: max_len.unwrap_or(u64::MAX) }
                }
                TypeBody::Scalar { base, format: None, max_len: None, bounds: own }
                    if unbounded && own.min.is_none() && own.max.is_none() =>
                {
                    self.quick_for(base, Bounds::default())
                }
                _ => Quick::General,
            },
            _ => Quick::General,
        }
    }

    /// Sets the quick check of every record field, once every body is known.
    pub(crate) fn plan_fields(&mut self) {
        let quick: Vec<Vec<Quick>> = self
            .defs
            .iter()
            .map(|def| match &def.body {
                TypeBody::Record { fields } => fields.iter().map(|f| self.quick_for(&f.ty, f.bounds)).collect(),
                _ => Vec::new(),
            })
            .collect();
        for (def, quick) in self.defs.iter_mut().zip(quick) {
            if let TypeBody::Record { fields } = &mut def.body {
                for (field, quick) in fields.iter_mut().zip(quick) {
                    field.quick = quick;
                }
            }
        }
    }

    /// Removes, at every depth, the record fields `ty` does not declare: a result from a plugin
    /// built for a newer registry minor may carry optional fields added in that minor. Nothing
    /// else changes; the result is checked as usual afterwards.
    pub(crate) fn drop_unknown_fields(&self, ty: &Ty, value: &mut Value) {
        match (ty, value) {
            (Ty::List(item), Value::List(items)) => {
                for item_value in items.iter_mut() {
                    self.drop_unknown_fields(item, item_value);
                }
            }
            (Ty::Named(id), Value::Record(given)) => {
                if let TypeBody::Record { fields } = &self.get(*id).body {
                    given.retain(|field| fields.iter().any(|decl| decl.name == field.name.as_str()));
                    for field in given.iter_mut() {
                        if let Some(decl) = fields.iter().find(|decl| decl.name == field.name.as_str()) {
                            self.drop_unknown_fields(&decl.ty, &mut field.value);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// The fields of `ty` when it is a record type: results are checked against them directly.
    #[inline]
    pub(crate) fn record_of(&self, ty: &Ty) -> Option<(&str, &[FieldDef])> {
        match ty {
            Ty::Named(id) => match &self.get(*id).body {
                TypeBody::Record { fields } => Some((&self.get(*id).name, fields)),
                _ => None,
            },
            _ => None,
        }
    }

    /// A short human description of a type, for messages and help.
    pub fn describe(&self, ty: &Ty) -> String {
        match ty {
            Ty::Unit => "nothing".into(),
            Ty::Bool => "a boolean".into(),
            Ty::Int => "an integer".into(),
            Ty::UInt => "an unsigned integer".into(),
            Ty::Float => "a number".into(),
            Ty::Str => "a string".into(),
            Ty::Bytes => "bytes".into(),
            Ty::List(item) => format!("a list of {}", self.type_name(item)),
            Ty::Named(id) => {
                let def = self.get(*id);
                match &def.body {
                    TypeBody::Scalar { base, .. } => {
                        format!("{} ({})", def.name, self.describe(base))
                    }
                    TypeBody::Enum { values } => format!("one of {}", values.join(", ")),
                    TypeBody::Record { .. } => format!("a {} record", def.name),
                }
            }
        }
    }

    /// The type expression naming `ty`.
    pub fn type_name(&self, ty: &Ty) -> String {
        match ty {
            Ty::Unit => "unit".into(),
            Ty::Bool => "bool".into(),
            Ty::Int => "int".into(),
            Ty::UInt => "uint".into(),
            Ty::Float => "float".into(),
            Ty::Str => "string".into(),
            Ty::Bytes => "bytes".into(),
            Ty::List(item) => format!("list<{}>", self.type_name(item)),
            Ty::Named(id) => self.get(*id).name.clone(),
        }
    }

    /// Follows named scalars down to their primitive (records and enums stay named).
    pub fn base<'a>(&'a self, ty: &'a Ty) -> &'a Ty {
        match ty {
            Ty::Named(id) => match &self.get(*id).body {
                TypeBody::Scalar { base, .. } => self.base(base),
                _ => ty,
            },
            _ => ty,
        }
    }

    /// The fields of a record type, if `ty` is one.
    pub fn record_fields(&self, ty: &Ty) -> Option<&[FieldDef]> {
        match ty {
            Ty::Named(id) => match &self.get(*id).body {
                TypeBody::Record { fields } => Some(fields),
                _ => None,
            },
            _ => None,
        }
    }
}

fn error(path: &ValuePath<'_>, message: String) -> ValidationError {
    ValidationError { path: path.render(), message }
}

/// Whether `value` is valid for `ty` by its kind alone: a primitive of exactly that kind
/// with no bounds to check and nothing to normalize (most result fields), so the general
/// [`TypeTable::validate`] call can be skipped.
#[inline(always)]
fn trivially_valid(ty: &Ty, bounds: Bounds, value: &Value) -> bool {
    let unbounded = bounds.min.is_none() && bounds.max.is_none();
    match (ty, value) {
        (Ty::Bool, Value::Bool(_)) | (Ty::Str, Value::Str(_)) | (Ty::Bytes, Value::Bytes(_)) => true,
        (Ty::Float, Value::Float(_)) => true,
        (Ty::UInt, Value::UInt(_)) | (Ty::Int, Value::Int(_)) => unbounded,
        _ => false,
    }
}

/// `a == b` for the short texts of the hot path (field names, enum words), inline; shared
/// with the SDK.
pub(crate) use capvirt_plugin_api::same_text;

fn check_int_bounds(n: i128, bounds: Bounds, path: &ValuePath<'_>) -> Result<(), ValidationError> {
    if let Some(min) = bounds.min {
        if n < i128::from(min) {
            return Err(error(path, format!("{n} is below the minimum {min}")));
        }
    }
    if let Some(max) = bounds.max {
        if n > i128::from(max) {
            return Err(error(path, format!("{n} is above the maximum {max}")));
        }
    }
    Ok(())
}

/// The bytes a `name` may contain: ASCII letters, digits, `.`, `_` and `-`.
const NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-';
        b += 1;
    }
    table
};

/// Whether `bytes` is a valid `name` (see [`check_format`], which words why one is not).
#[inline]
fn is_name(bytes: &[u8]) -> bool {
    let Some(first) = bytes.first() else { return false };
    let mut ok = first.is_ascii_alphanumeric();
    let mut previous = 0u8;
    for &b in bytes {
        ok &= NAME_BYTES[usize::from(b)] & !(b == b'.' && previous == b'.');
        previous = b;
    }
    ok
}

/// Checks a string against a declared format; the error says what is wrong.
pub fn check_format(format: StringFormat, s: &str) -> Result<(), String> {
    match format {
        StringFormat::Name => {
            // One pass over the bytes (every name is checked on every call that carries one,
            // and in every result); the messages are worded on the error path only.
            let bytes = s.as_bytes();
            match bytes.first() {
                None => return Err("must not be empty".into()),
                Some(first) if !first.is_ascii_alphanumeric() => {
                    return Err(format!("{s:?} must start with a letter or digit"));
                }
                Some(_) => {}
            }
            let mut previous_dot = false;
            let mut double_dot = false;
            for &b in bytes {
                let dot = b == b'.';
                if !NAME_BYTES[usize::from(b)] {
                    let bad = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
                    let bad = bad.unwrap_or(char::REPLACEMENT_CHARACTER);
                    return Err(format!("{s:?} contains {bad:?}; only letters, digits, '.', '_' and '-' are allowed"));
                }
                double_dot |= dot && previous_dot;
                previous_dot = dot;
            }
            if double_dot {
                return Err(format!("{s:?} contains '..'"));
            }
            Ok(())
        }
        StringFormat::Path => {
            if s.is_empty() {
                return Err("must not be empty".into());
            }
            if s.chars().any(char::is_control) {
                return Err("contains a control character".into());
            }
            Ok(())
        }
        StringFormat::Uri => {
            let Some((scheme, rest)) = s.split_once("://") else {
                return Err(format!("{s:?} is not of the form scheme://…"));
            };
            let scheme_ok = scheme.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                && scheme.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'));
            if !scheme_ok {
                return Err(format!("{s:?} has an invalid scheme"));
            }
            if rest.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(format!("{s:?} contains whitespace or control characters"));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_is_equality() {
        let words = [
            "",
            "a",
            "ab",
            "ba",
            "abc",
            "abd",
            "acc",
            "xbc",
            "name",
            "namf",
            "nbme",
            "state",
            "statf",
            "vcpus",
            "running",
            "shut off",
            "memory_kib",
            "cpu_time_ns",
            "max_memory_kib",
        ];
        let long = "hypervisor_version_and_more";
        for a in words.iter().chain([&long]) {
            for b in words.iter().chain([&long]) {
                assert_eq!(same_text(a, b), a == b, "{a:?} {b:?}");
            }
        }
        assert!(!same_text("memory_kib", "memory_kiB") && !same_text("Memory_kib", "memory_kib"));
        assert!(!same_text("hypervisor_version_and_more", "hypervisor_version_and_mork"));
        // A difference at any one position of any length is seen.
        let base = "abcdefghijklmnopqrstu";
        for n in 0..=base.len() {
            let a = &base[..n];
            assert!(same_text(a, a));
            for i in 0..n {
                let mut b = a.as_bytes().to_vec();
                b[i] = b'_';
                let b = String::from_utf8(b).unwrap_or_default();
                assert!(!same_text(a, &b), "{a:?} {b:?}");
            }
        }
    }

    /// A value the quick check passes is one the general check passes unchanged, for every
    /// field and parameter of the embedded registry.
    #[test]
    fn quick_checks_never_pass_what_the_general_check_refuses() {
        let registry = crate::registry::Registry::embedded().unwrap_or_else(|e| panic!("{e}"));
        let types = &registry.types;
        let samples = [
            Value::Bool(true),
            Value::Int(-1),
            Value::Int(5),
            Value::UInt(5),
            Value::UInt(u64::MAX),
            Value::Float(0.5),
            Value::from("test"),
            Value::from("bad/name"),
            Value::from("a..b"),
            Value::from(""),
            Value::from("running"),
            Value::from("qcow2"),
            Value::from("x".repeat(300)),
            Value::Bytes(vec![1u8, 2].into()),
        ];
        let record_fields = types.iter().filter_map(|def| match &def.body {
            TypeBody::Record { fields } => Some(fields.as_slice()),
            _ => None,
        });
        let params = registry.capabilities().iter().map(|cap| cap.params.as_slice());
        let mut quick_fields = 0;
        for field in record_fields.chain(params).flatten() {
            assert_eq!(field.quick, types.quick_for(&field.ty, field.bounds), "{}", field.name);
            quick_fields += usize::from(field.quick != Quick::General);
            for sample in &samples {
                if types.quick_valid(field.quick, sample) {
                    let mut value = sample.clone();
                    let checked = types.validate(&field.ty, field.bounds, &mut value, &ValuePath::root(&field.name));
                    assert!(checked.is_ok(), "{}: quick passed {sample:?}, general said {checked:?}", field.name);
                    assert_eq!(&value, sample, "{}", field.name);
                }
            }
        }
        assert!(quick_fields > 20, "only {quick_fields} fields have a quick check");
    }

    #[test]
    fn name_format_refuses_paths_and_control_characters() {
        for bad in ["", "../etc", "a/b", "a..b", ".hidden", "a\nb", "a b", "-x"] {
            assert!(check_format(StringFormat::Name, bad).is_err(), "{bad:?} accepted");
        }
        for good in ["vm1", "web-01.example", "A_b"] {
            assert!(check_format(StringFormat::Name, good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn uri_format() {
        assert!(check_format(StringFormat::Uri, "test:///default").is_ok());
        assert!(check_format(StringFormat::Uri, "qemu:///session?root=/tmp/x").is_ok());
        assert!(check_format(StringFormat::Uri, "nope").is_err());
        assert!(check_format(StringFormat::Uri, "Qemu:///x").is_err());
        assert!(check_format(StringFormat::Uri, "qemu:///a b").is_err());
    }
}
