//! Source positions for findings: a key path (`params[1].name`) resolved against the TOML
//! text with `toml_edit`'s spans, reported as 1-based line and column.
//!
//! Resolution is lazy: a clean file is never parsed a second time.

use std::{fmt, ops::Range};

use toml_edit::{ImDocument, Item, Table, Value};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// Where in a file a finding points: the whole file, or a key path in it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    /// The file as a whole (reported at 1:1).
    pub fn root() -> Self {
        KeyPath(Vec::new())
    }

    pub fn key(mut self, key: &str) -> Self {
        self.0.push(Seg::Key(key.to_string()));
        self
    }

    pub fn index(mut self, index: usize) -> Self {
        self.0.push(Seg::Index(index));
        self
    }
}

/// `KeyPath` from `"params", 1, "name"`-style segments.
impl<const N: usize> From<[&str; N]> for KeyPath {
    fn from(keys: [&str; N]) -> Self {
        KeyPath(keys.iter().map(|k| Seg::Key((*k).to_string())).collect())
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    pub const START: Position = Position { line: 1, column: 1 };

    /// The position of byte `offset` in `text` (clamped to the text).
    pub fn at(text: &str, offset: usize) -> Position {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Position { line: before.matches('\n').count() + 1, column: before[line_start..].chars().count() + 1 }
    }
}

/// Resolves key paths in one file's text.
pub struct Locator<'t> {
    text: &'t str,
    doc: Option<ImDocument<&'t str>>,
}

impl<'t> Locator<'t> {
    pub fn new(text: &'t str) -> Self {
        Locator { text, doc: ImDocument::parse(text).ok() }
    }

    /// The position of the deepest part of `path` found in the file (the file start when
    /// nothing matches, e.g. for a missing key).
    pub fn locate(&self, path: &KeyPath) -> Position {
        self.span(path).map_or(Position::START, |span| Position::at(self.text, span.start))
    }

    fn span(&self, path: &KeyPath) -> Option<Range<usize>> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Item(doc.as_item());
        let mut best = None;
        for seg in &path.0 {
            let Some(next) = node.child(seg) else { break };
            if let Some(span) = next.span() {
                best = Some(span);
            }
            node = next;
        }
        best
    }
}

/// A step in the document: items, tables of an array of tables, and values inside arrays
/// or inline tables are different types in `toml_edit`.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn child(self, seg: &Seg) -> Option<Node<'a>> {
        match (self, seg) {
            (Node::Item(Item::Table(t)) | Node::Table(t), Seg::Key(k)) => t.get(k).map(Node::Item),
            (Node::Item(Item::Value(v)) | Node::Value(v), Seg::Key(k)) => {
                v.as_inline_table().and_then(|t| t.get(k)).map(Node::Value)
            }
            (Node::Item(Item::ArrayOfTables(a)), Seg::Index(i)) => a.get(*i).map(Node::Table),
            (Node::Item(Item::Value(v)) | Node::Value(v), Seg::Index(i)) => {
                v.as_array().and_then(|a| a.get(*i)).map(Node::Value)
            }
            _ => None,
        }
    }

    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(item) => item_span(item),
            Node::Table(t) => table_span(t),
            Node::Value(v) => v.span(),
        }
    }
}

/// An item's span; implicit tables (`[mapping]` above `[mapping.qemu]`) have none of their
/// own, so the first child that has one stands in.
fn item_span(item: &Item) -> Option<Range<usize>> {
    match item {
        Item::None => None,
        Item::Value(v) => v.span(),
        Item::Table(t) => table_span(t),
        Item::ArrayOfTables(a) => a.iter().find_map(table_span),
    }
}

fn table_span(table: &Table) -> Option<Range<usize>> {
    table.span().or_else(|| table.iter().find_map(|(key, _)| table.get(key).and_then(item_span)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str =
        "id = \"a.b\"\n# note\n[[params]]\nname = \"x\"\n\n[[params]]\nname = \"é\"\n[mapping.qemu]\nnote = \"n\"\n";

    #[test]
    fn positions_are_one_based_in_characters() {
        assert_eq!(Position::at("ab\ncd", 0), Position { line: 1, column: 1 });
        assert_eq!(Position::at("ab\ncd", 4), Position { line: 2, column: 2 });
        assert_eq!(Position::at("é\nx", 1), Position { line: 1, column: 1 }, "clamped to a char boundary");
        assert_eq!(Position::at("ab", 99), Position { line: 1, column: 3 });
    }

    #[test]
    fn key_paths_resolve_to_values_and_tables() {
        let locator = Locator::new(TEXT);
        assert_eq!(locator.locate(&KeyPath::from(["id"])), Position { line: 1, column: 6 });
        assert_eq!(
            locator.locate(&KeyPath::root().key("params").index(1).key("name")),
            Position { line: 7, column: 8 }
        );
        assert_eq!(locator.locate(&KeyPath::root().key("params").index(1)), Position { line: 6, column: 1 });
        assert_eq!(locator.locate(&KeyPath::from(["mapping"])), Position { line: 8, column: 1 });
        assert_eq!(locator.locate(&KeyPath::from(["mapping", "qemu", "note"])), Position { line: 9, column: 8 });
        // Missing keys fall back to the deepest part found.
        assert_eq!(locator.locate(&KeyPath::root().key("params").index(0).key("doc")), Position { line: 3, column: 1 });
        assert_eq!(locator.locate(&KeyPath::from(["nope"])), Position::START);
    }
}
