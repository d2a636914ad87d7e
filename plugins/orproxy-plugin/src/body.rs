//! A request body as a flat list of top-level fields whose values stay raw JSON text.
//!
//! The daemon reads and rewrites a handful of top-level fields (`model`, `stream`, sampling
//! parameters) and relays everything else byte for byte, so messages are never parsed into a tree.

use std::fmt;

use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A JSON object whose top-level values are kept as raw, validated JSON text, in their original order.
#[derive(Clone, Default)]
pub struct JsonObject {
    fields: Vec<(String, Box<RawValue>)>,
}

/// Why a body could not be read as a JSON object.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Not JSON at all, or not an object; the message carries serde_json's line and column.
    #[error("request body is not a JSON object: {0}")]
    Syntax(#[from] serde_json::Error),
    /// A known field has a value of the wrong type.
    #[error("field `{field}` must be {expected}")]
    FieldType {
        /// The top-level field name.
        field: &'static str,
        /// What the field must hold, in words.
        expected: &'static str,
    },
}

impl JsonObject {
    /// Parses a JSON object, keeping the last value of a duplicated key (as most JSON readers do).
    pub fn parse(bytes: &[u8]) -> Result<Self, BodyError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// The raw JSON text of a top-level field.
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| &**v)
    }

    /// True when the field exists and is not `null`.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| v.get() != "null")
    }

    /// A string field; `Ok(None)` when absent or `null`.
    pub fn get_str(&self, key: &'static str) -> Result<Option<String>, BodyError> {
        self.typed(key, "a string")
    }

    /// A boolean field; `Ok(None)` when absent or `null`.
    pub fn get_bool(&self, key: &'static str) -> Result<Option<bool>, BodyError> {
        self.typed(key, "a boolean")
    }

    /// An unsigned integer field; `Ok(None)` when absent or `null`.
    pub fn get_u64(&self, key: &'static str) -> Result<Option<u64>, BodyError> {
        self.typed(key, "a non-negative integer")
    }

    fn typed<T: for<'de> Deserialize<'de>>(
        &self,
        field: &'static str,
        expected: &'static str,
    ) -> Result<Option<T>, BodyError> {
        match self.get(field) {
            None => Ok(None),
            Some(raw) => serde_json::from_str::<Option<T>>(raw.get())
                .map_err(|_| BodyError::FieldType { field, expected }),
        }
    }

    /// Sets a field to any serializable value, keeping its position if it already exists.
    pub fn set<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) {
        // Serializing plain values (strings, numbers, maps of them) cannot fail.
        if let Ok(raw) = serde_json::value::to_raw_value(value) {
            self.set_raw(key, raw);
        }
    }

    /// Sets a field to raw JSON text that is already known to be valid.
    pub fn set_raw(&mut self, key: &str, value: Box<RawValue>) {
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((key.to_owned(), value)),
        }
    }

    /// Removes a field, returning its raw value.
    pub fn remove(&mut self, key: &str) -> Option<Box<RawValue>> {
        let at = self.fields.iter().position(|(k, _)| k == key)?;
        Some(self.fields.remove(at).1)
    }

    /// The field names and raw values, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &RawValue)> {
        self.fields.iter().map(|(k, v)| (k.as_str(), &**v))
    }

    /// Serializes the object back to compact JSON.
    pub fn to_bytes(&self) -> Bytes {
        let len = self
            .fields
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>();
        let mut out = Vec::with_capacity(len + 2);
        out.push(b'{');
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            // Keys came from a JSON string and serialize back without error.
            if serde_json::to_writer(&mut out, k).is_err() {
                continue;
            }
            out.push(b':');
            out.extend_from_slice(v.get().as_bytes());
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

impl fmt::Debug for JsonObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.fields.iter().map(|(k, v)| (k, v.get())))
            .finish()
    }
}

impl<'de> Deserialize<'de> for JsonObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;

        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = JsonObject;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonObject, A::Error> {
                let mut object = JsonObject {
                    fields: Vec::with_capacity(map.size_hint().unwrap_or(8)),
                };
                while let Some((key, value)) = map.next_entry::<String, Box<RawValue>>()? {
                    object.set_raw(&key, value);
                }
                Ok(object)
            }
        }

        deserializer.deserialize_map(ObjectVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_order_and_raw_values() {
        let text =
            br#"{"model":"a/b","messages":[{"role":"user","content":"hi \u00e9"}],"x":1.50}"#;
        let body = JsonObject::parse(text).unwrap();
        assert_eq!(&body.to_bytes()[..], &text[..]);
    }

    #[test]
    fn set_replaces_in_place_and_appends_new_fields() {
        let mut body = JsonObject::parse(br#"{"model":"a","stream":true}"#).unwrap();
        body.set("model", "b");
        body.set("temperature", &0.5);
        assert_eq!(
            &body.to_bytes()[..],
            br#"{"model":"b","stream":true,"temperature":0.5}"#
        );
    }

    #[test]
    fn duplicate_keys_keep_the_last_value() {
        let body = JsonObject::parse(br#"{"model":"a","model":"b"}"#).unwrap();
        assert_eq!(body.get_str("model").unwrap().as_deref(), Some("b"));
        assert_eq!(body.iter().count(), 1);
    }

    #[test]
    fn typed_getters_report_the_field() {
        let body = JsonObject::parse(br#"{"model":5,"stream":null}"#).unwrap();
        let err = body.get_str("model").unwrap_err();
        assert_eq!(err.to_string(), "field `model` must be a string");
        assert_eq!(body.get_bool("stream").unwrap(), None);
    }

    #[test]
    fn non_objects_are_rejected_with_a_position() {
        let err = JsonObject::parse(b"[1,2]").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(JsonObject::parse(b"{\"a\":").is_err());
    }
}
