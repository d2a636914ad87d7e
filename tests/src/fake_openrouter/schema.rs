//! `response_format: {"type": "json_schema", ...}`: the answer is a JSON value matching the
//! schema, as a model under OpenRouter's structured outputs returns it.

use serde_json::{Map, Value, json};

/// How deep `$ref`s and nesting are followed before answering `null`, so a recursive schema
/// still gets a finite answer.
const MAX_DEPTH: usize = 16;

/// The request's JSON schema, when `response_format` asks for one.
pub(crate) fn requested(body: &Map<String, Value>) -> Option<Value> {
    let format = body.get("response_format")?;
    if format.get("type").and_then(Value::as_str) != Some("json_schema") {
        return None;
    }
    format
        .get("json_schema")
        .and_then(|spec| spec.get("schema"))
        .filter(|schema| schema.is_object())
        .cloned()
}

/// A value that `schema` accepts: every property of an object (so `required` holds), the
/// first of an `enum` or `anyOf`, `text` for strings, 1 for numbers, one item for arrays.
pub(crate) fn instance(schema: &Value, text: &str) -> Value {
    build(schema, schema, text, 0)
}

fn build(root: &Value, schema: &Value, text: &str, depth: usize) -> Value {
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
        let pointer = target.trim_start_matches('#');
        return match root.pointer(pointer) {
            Some(found) => build(root, found, text, depth + 1),
            None => Value::Null,
        };
    }
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    if let Some(first) = schema.get("enum").and_then(|e| e.get(0)) {
        return first.clone();
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(first) = schema.get(key).and_then(|list| list.get(0)) {
            return build(root, first, text, depth + 1);
        }
    }
    let kind = match schema.get("type") {
        Some(Value::Array(kinds)) => kinds.first().and_then(Value::as_str),
        Some(kind) => kind.as_str(),
        None => None,
    };
    match kind {
        Some("string") => Value::from(text),
        Some("integer") => json!(1),
        Some("number") => json!(1.5),
        Some("boolean") => json!(true),
        Some("null") => Value::Null,
        Some("array") => {
            let item = schema.get("items").unwrap_or(&Value::Null);
            json!([build(root, item, text, depth + 1)])
        }
        _ => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let object = properties
                .into_iter()
                .flatten()
                .map(|(name, property)| (name.clone(), build(root, property, text, depth + 1)))
                .collect::<Map<_, _>>();
            Value::Object(object)
        }
    }
}
