//! Every unknown key of a file, not only the first.
//!
//! serde stops at the first error, so a file with three misspelled keys would take three
//! rounds of `orproxy check` to fix. This walks the YAML tree against the JSON Schema of
//! [`ConfigFile`] (derived from the same types, so the two cannot drift apart) and reports
//! every key the schema does not allow, at the key's own place.

use std::sync::OnceLock;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_saphyr::Spanned;

use super::{ConfigFile, Diagnostic};

/// serde aliases of config keys, as `(alias, name)`: JSON Schema has no notion of them.
const ALIASES: &[(&str, &str)] = &[("ledger", "database")];

/// A YAML node, reduced to what the walk needs: mappings (keys with their places) and
/// sequences.
enum Node {
    Map(Vec<(Spanned<Key>, Node)>),
    Seq(Vec<Node>),
    Scalar,
}

/// A mapping key as text (YAML allows numbers and booleans as keys too).
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a scalar key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Key, E> {
                Ok(Key("null".to_owned()))
            }
        }
        d.deserialize_any(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NodeVisitor;
        impl<'de> Visitor<'de> for NodeVisitor {
            type Value = Node;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<Spanned<Key>, Node>()? {
                    entries.push(entry);
                }
                Ok(Node::Map(entries))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Node>()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_none<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
        }
        d.deserialize_any(NodeVisitor)
    }
}

fn schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| schemars::schema_for!(ConfigFile).to_value())
}

/// Every key of `text` that the config schema does not allow; none when the text is not
/// YAML (the parse error says why).
pub(super) fn unknown(name: &str, text: &str) -> Vec<Diagnostic> {
    let Ok(node) = serde_saphyr::from_str::<Node>(text) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    walk(&node, schema(), name, &mut found);
    found
}

/// Follows a `$ref` to its definition.
fn resolve(schema: &Value) -> &Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => reference
            .strip_prefix("#/")
            .map(|path| format!("/{path}"))
            .and_then(|pointer| schema_pointer(&pointer))
            .unwrap_or(schema),
        None => schema,
    }
}

fn schema_pointer(pointer: &str) -> Option<&'static Value> {
    schema().pointer(pointer)
}

/// The alternative of `schema` (itself, or one of its `anyOf`/`oneOf`) that describes `kind`
/// (`object` or `array`).
fn alternative<'a>(schema: &'a Value, kind: &str) -> Option<&'a Value> {
    let schema = resolve(schema);
    let has_kind = |s: &Value| match s.get("type") {
        Some(Value::String(t)) => t == kind,
        Some(Value::Array(ts)) => ts.iter().any(|t| t == kind),
        _ => false,
    };
    if has_kind(schema) {
        return Some(schema);
    }
    ["anyOf", "oneOf"]
        .iter()
        .filter_map(|k| schema.get(*k).and_then(Value::as_array))
        .flatten()
        .map(resolve)
        .find(|s| has_kind(s))
}

fn walk(node: &Node, schema: &Value, file: &str, found: &mut Vec<Diagnostic>) {
    match node {
        Node::Scalar => {}
        Node::Seq(items) => {
            if let Some(each) = alternative(schema, "array").and_then(|s| s.get("items")) {
                for item in items {
                    walk(item, each, file, found);
                }
            }
        }
        Node::Map(entries) => {
            let Some(object) = alternative(schema, "object") else {
                return;
            };
            let properties = object.get("properties").and_then(Value::as_object);
            let property = |name: &str| properties.and_then(|p| p.get(name));
            for (key, value) in entries {
                let name = key.value.0.as_str();
                let canonical = ALIASES
                    .iter()
                    .find(|(alias, _)| *alias == name)
                    .map_or(name, |(_, canonical)| canonical);
                if let Some(sub) = property(name).or_else(|| property(canonical)) {
                    walk(value, sub, file, found);
                    continue;
                }
                match object.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        let expected: Vec<&str> = properties
                            .map(|p| p.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        found.push(Diagnostic::at(
                            file,
                            key.referenced,
                            format!(
                                "unknown field `{name}`, expected one of {}",
                                expected.join(", ")
                            ),
                        ));
                    }
                    Some(sub @ Value::Object(_)) => walk(value, sub, file, found),
                    _ => {}
                }
            }
        }
    }
}
