//! What a rule script sees of a request, and the handle through which it changes it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rhai::{Dynamic, Engine, Map};
use serde::Serialize;
use serde_json::Value;

/// The routing facts and decisions a script can read and change.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RouteRequest {
    /// The upstream model of the first attempt (a full selector when set by a script).
    pub model: String,
    /// The backend of the first attempt.
    pub backend: String,
    /// Body parameters merged with URI parameters (everything but `model`, `messages`,
    /// `stream` and tool definitions).
    pub params: BTreeMap<String, Value>,
    /// Extra outbound headers.
    pub headers: BTreeMap<String, String>,
    /// The remaining selectors of the failover chain, in order.
    pub failover: Vec<String>,
    /// Free-form tags stored with the request's usage row.
    pub tags: BTreeMap<String, Value>,
    /// The proxy key's name (read-only).
    pub key: String,
    /// An estimate of the prompt's tokens (read-only).
    pub prompt_tokens: i64,
    /// `max_tokens` / `max_completion_tokens`, 0 when absent (read-only).
    pub max_tokens: i64,
    /// Whether the client asked for a stream (read-only).
    pub stream: bool,
    /// How many messages the request has (read-only).
    pub messages: i64,
    /// The client's IP address (read-only).
    pub client_ip: String,
    /// Set by `req.reject(status, message)`.
    pub rejection: Option<Rejection>,
}

/// A rule's refusal of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// The HTTP status (403 unless the rule chose another 4xx).
    pub status: u16,
    /// The message given to the client.
    pub message: String,
}

/// The `req` object scripts receive: clones share one request, so assignments through any of
/// them are seen by the daemon without returning anything.
#[derive(Debug, Clone)]
pub struct RequestHandle(Arc<Mutex<Shared>>);

/// The request and, for the script running now, each field's value before its first write.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The request.
    pub(crate) request: RouteRequest,
    /// `(field, value before the running script first wrote it)`, in first-write order.
    pub(crate) written: Vec<(&'static str, Snapshot)>,
}

impl Shared {
    /// Notes a field's value before the running script's first write to it: scripts that only
    /// read cost no copies.
    fn before_write(&mut self, field: &'static str) {
        if !self.written.iter().any(|(f, _)| *f == field) {
            let value = self.request.snapshot(field);
            self.written.push((field, value));
        }
    }
}

/// A copy of one writable field, compared with the field after the script ran. It serializes as
/// the field's JSON, so the trace costs no conversion unless someone reads it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Snapshot {
    /// `model` or `backend`.
    Text(String),
    /// `params` or `tags`.
    Json(BTreeMap<String, Value>),
    /// `headers`.
    Strings(BTreeMap<String, String>),
    /// `failover`.
    List(Vec<String>),
    /// `rejection`.
    Rejection(Option<Rejection>),
}

impl RouteRequest {
    /// A copy of a writable field (for the change trace).
    pub(crate) fn snapshot(&self, field: &str) -> Snapshot {
        match field {
            "model" => Snapshot::Text(self.model.clone()),
            "backend" => Snapshot::Text(self.backend.clone()),
            "params" => Snapshot::Json(self.params.clone()),
            "headers" => Snapshot::Strings(self.headers.clone()),
            "failover" => Snapshot::List(self.failover.clone()),
            "tags" => Snapshot::Json(self.tags.clone()),
            _ => Snapshot::Rejection(self.rejection.clone()),
        }
    }
}

impl RequestHandle {
    /// Wraps a request for scripts.
    pub fn new(request: RouteRequest) -> Self {
        RequestHandle(Arc::new(Mutex::new(Shared {
            request,
            written: Vec::new(),
        })))
    }

    /// The shared state.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared> {
        // Scripts run one at a time per request; a poisoned lock only means a panic elsewhere.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The request as the scripts left it. Scripts hold no handle once their hook returned, so
    /// this is normally a move, not a copy.
    pub(crate) fn into_request(self) -> RouteRequest {
        match Arc::try_unwrap(self.0) {
            Ok(shared) => {
                shared
                    .into_inner()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .request
            }
            Err(shared) => RequestHandle(shared).lock().request.clone(),
        }
    }

    fn read<T>(&self, f: impl FnOnce(&RouteRequest) -> T) -> T {
        f(&self.lock().request)
    }

    fn write(&self, field: &'static str, f: impl FnOnce(&mut RouteRequest)) {
        let mut shared = self.lock();
        shared.before_write(field);
        f(&mut shared.request);
    }
}

// Direct conversions between JSON and Rhai values: Rhai's serde bridge takes every value through
// serde's data model, and a request pays for a conversion on every map a script reads or writes.

fn json_to_dynamic(value: &Value) -> Dynamic {
    match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Dynamic::from(rhai::ImmutableString::from(s.as_str())),
        Value::Array(items) => Dynamic::from_array(items.iter().map(json_to_dynamic).collect()),
        Value::Object(fields) => Dynamic::from_map(
            fields
                .iter()
                .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
                .collect(),
        ),
    }
}

/// A script's value as JSON; values JSON cannot hold (NaN, a request handle) become `null`.
fn dynamic_to_json(value: &Dynamic) -> Value {
    if value.is_unit() {
        Value::Null
    } else if let Ok(b) = value.as_bool() {
        Value::Bool(b)
    } else if let Ok(i) = value.as_int() {
        Value::from(i)
    } else if let Ok(f) = value.as_float() {
        serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
    } else if let Ok(c) = value.as_char() {
        Value::String(c.to_string())
    } else if let Some(s) = value.read_lock::<rhai::ImmutableString>() {
        Value::String(s.to_string())
    } else if let Some(items) = value.read_lock::<rhai::Array>() {
        Value::Array(items.iter().map(dynamic_to_json).collect())
    } else if let Some(fields) = value.read_lock::<Map>() {
        Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.to_string(), dynamic_to_json(v)))
                .collect(),
        )
    } else if let Some(bytes) = value.read_lock::<rhai::Blob>() {
        Value::Array(bytes.iter().map(|b| Value::from(*b)).collect())
    } else {
        Value::Null
    }
}

fn to_map(values: &BTreeMap<String, Value>) -> Map {
    values
        .iter()
        .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
        .collect()
}

fn json_map(map: Map) -> BTreeMap<String, Value> {
    map.into_iter()
        .map(|(k, v)| (k.to_string(), dynamic_to_json(&v)))
        .collect()
}

/// `map` as JSON, keeping the request's own value for each entry the script left as it was:
/// Rhai has no unsigned or big integers, and a round trip would turn 12345678901234567890
/// into a float the upstream never asked for.
fn json_map_keeping(map: Map, before: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    map.into_iter()
        .map(|(k, v)| {
            let value = dynamic_to_json(&v);
            let value = match before.get(k.as_str()) {
                Some(original) if dynamic_to_json(&json_to_dynamic(original)) == value => {
                    original.clone()
                }
                _ => value,
            };
            (k.to_string(), value)
        })
        .collect()
}

fn string_map(map: Map) -> BTreeMap<String, String> {
    map.into_iter()
        .map(|(k, v)| {
            let text = if v.is_string() {
                v.into_string().unwrap_or_default()
            } else {
                v.to_string()
            };
            (k.to_string(), text)
        })
        .collect()
}

/// Registers the `Request` type, its properties and `reject`.
pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<RequestHandle>("Request");
    engine.register_get_set(
        "model",
        |r: &mut RequestHandle| r.read(|q| q.model.clone()),
        |r: &mut RequestHandle, v: String| r.write("model", |q| q.model = v),
    );
    engine.register_get_set(
        "backend",
        |r: &mut RequestHandle| r.read(|q| q.backend.clone()),
        |r: &mut RequestHandle, v: String| r.write("backend", |q| q.backend = v),
    );
    engine.register_get_set(
        "params",
        |r: &mut RequestHandle| r.read(|q| to_map(&q.params)),
        |r: &mut RequestHandle, v: Map| {
            r.write("params", |q| q.params = json_map_keeping(v, &q.params));
        },
    );
    engine.register_get_set(
        "headers",
        |r: &mut RequestHandle| {
            r.read(|q| {
                q.headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().into(),
                            Dynamic::from(rhai::ImmutableString::from(v.as_str())),
                        )
                    })
                    .collect::<Map>()
            })
        },
        |r: &mut RequestHandle, v: Map| r.write("headers", |q| q.headers = string_map(v)),
    );
    engine.register_get_set(
        "tags",
        |r: &mut RequestHandle| r.read(|q| to_map(&q.tags)),
        |r: &mut RequestHandle, v: Map| r.write("tags", |q| q.tags = json_map(v)),
    );
    engine.register_get_set(
        "failover",
        |r: &mut RequestHandle| {
            r.read(|q| {
                q.failover
                    .iter()
                    .map(|s| Dynamic::from(s.clone()))
                    .collect::<rhai::Array>()
            })
        },
        |r: &mut RequestHandle, v: rhai::Array| -> Result<(), Box<rhai::EvalAltResult>> {
            // A number or `()` here is a mistake in the script, not a selector to route to.
            let mut list = Vec::with_capacity(v.len());
            for (i, d) in v.into_iter().enumerate() {
                let type_name = d.type_name();
                match d.into_string() {
                    Ok(s) => list.push(s),
                    Err(_) => {
                        return Err(format!(
                            "req.failover takes selector strings; element {i} is {type_name}"
                        )
                        .into());
                    }
                }
            }
            r.write("failover", |q| q.failover = list);
            Ok(())
        },
    );
    engine.register_get("key", |r: &mut RequestHandle| r.read(|q| q.key.clone()));
    engine.register_get("prompt_tokens", |r: &mut RequestHandle| {
        r.read(|q| q.prompt_tokens)
    });
    engine.register_get("max_tokens", |r: &mut RequestHandle| {
        r.read(|q| q.max_tokens)
    });
    engine.register_get("stream", |r: &mut RequestHandle| r.read(|q| q.stream));
    engine.register_get("messages", |r: &mut RequestHandle| r.read(|q| q.messages));
    engine.register_get("client_ip", |r: &mut RequestHandle| {
        r.read(|q| q.client_ip.clone())
    });
    engine.register_fn(
        "reject",
        |r: &mut RequestHandle, status: i64, message: &str| {
            let status = u16::try_from(status)
                .ok()
                .filter(|s| (400..=599).contains(s))
                .unwrap_or(403);
            let rejection = Rejection {
                status,
                message: message.to_owned(),
            };
            r.write("rejection", |q| q.rejection = Some(rejection));
        },
    );
    engine.register_fn("reject", |r: &mut RequestHandle, message: &str| {
        let rejection = Rejection {
            status: 403,
            message: message.to_owned(),
        };
        r.write("rejection", |q| q.rejection = Some(rejection));
    });
}
