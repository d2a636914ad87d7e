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
pub struct RequestHandle(Arc<Mutex<RouteRequest>>);

impl RequestHandle {
    /// Wraps a request for scripts.
    pub fn new(request: RouteRequest) -> Self {
        RequestHandle(Arc::new(Mutex::new(request)))
    }

    /// The request as it is now.
    pub fn lock(&self) -> MutexGuard<'_, RouteRequest> {
        // Scripts run one at a time per request; a poisoned lock only means a panic elsewhere.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The request as it is now, copied out.
    pub fn snapshot(&self) -> RouteRequest {
        self.lock().clone()
    }
}

fn to_map<V: Serialize>(values: &BTreeMap<String, V>) -> Map {
    values
        .iter()
        .map(|(k, v)| {
            (
                k.into(),
                rhai::serde::to_dynamic(v).unwrap_or(Dynamic::UNIT),
            )
        })
        .collect()
}

fn json_map(map: Map) -> BTreeMap<String, Value> {
    map.into_iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                rhai::serde::from_dynamic::<Value>(&v).unwrap_or(Value::Null),
            )
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
        |r: &mut RequestHandle| r.lock().model.clone(),
        |r: &mut RequestHandle, v: String| r.lock().model = v,
    );
    engine.register_get_set(
        "backend",
        |r: &mut RequestHandle| r.lock().backend.clone(),
        |r: &mut RequestHandle, v: String| r.lock().backend = v,
    );
    engine.register_get_set(
        "params",
        |r: &mut RequestHandle| to_map(&r.lock().params),
        |r: &mut RequestHandle, v: Map| r.lock().params = json_map(v),
    );
    engine.register_get_set(
        "headers",
        |r: &mut RequestHandle| to_map(&r.lock().headers),
        |r: &mut RequestHandle, v: Map| r.lock().headers = string_map(v),
    );
    engine.register_get_set(
        "tags",
        |r: &mut RequestHandle| to_map(&r.lock().tags),
        |r: &mut RequestHandle, v: Map| r.lock().tags = json_map(v),
    );
    engine.register_get_set(
        "failover",
        |r: &mut RequestHandle| {
            r.lock()
                .failover
                .iter()
                .map(|s| Dynamic::from(s.clone()))
                .collect::<rhai::Array>()
        },
        |r: &mut RequestHandle, v: rhai::Array| {
            r.lock().failover = v
                .into_iter()
                .map(|d| {
                    if d.is_string() {
                        d.into_string().unwrap_or_default()
                    } else {
                        d.to_string()
                    }
                })
                .collect();
        },
    );
    engine.register_get("key", |r: &mut RequestHandle| r.lock().key.clone());
    engine.register_get("prompt_tokens", |r: &mut RequestHandle| {
        r.lock().prompt_tokens
    });
    engine.register_get("max_tokens", |r: &mut RequestHandle| r.lock().max_tokens);
    engine.register_get("stream", |r: &mut RequestHandle| r.lock().stream);
    engine.register_get("messages", |r: &mut RequestHandle| r.lock().messages);
    engine.register_get("client_ip", |r: &mut RequestHandle| {
        r.lock().client_ip.clone()
    });
    engine.register_fn(
        "reject",
        |r: &mut RequestHandle, status: i64, message: &str| {
            let status = u16::try_from(status)
                .ok()
                .filter(|s| (400..=599).contains(s))
                .unwrap_or(403);
            r.lock().rejection = Some(Rejection {
                status,
                message: message.to_owned(),
            });
        },
    );
    engine.register_fn("reject", |r: &mut RequestHandle, message: &str| {
        r.lock().rejection = Some(Rejection {
            status: 403,
            message: message.to_owned(),
        });
    });
}
