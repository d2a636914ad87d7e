//! Request routing, bearer auth, response headers, and the small non-chat endpoints.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::body::{DisconnectGuard, FakeBody};
use super::chat::{self, upfront_error};
use super::errors::{ErrorSpec, Quote};
use super::scenario::Scenario;
use super::server::{Dialect, GenerationRecord, Shared};
use super::wire::{
    self, CATALOG, CatalogModel, FAKE_USER_ID, PICO_PER_USD, format_usd, raw_number, unix_secs,
};

pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> io::Result<Response<FakeBody>> {
    let (parts, incoming) = req.into_parts();
    let body = incoming
        .collect()
        .await
        .map_err(io::Error::other)?
        .to_bytes();
    let index = shared.record_request(&parts, &body);
    let guard = DisconnectGuard::new(Arc::clone(&shared), index);
    let dialect = shared.dialect;
    let route = parts
        .uri
        .path()
        .strip_prefix(dialect.base_path())
        .unwrap_or("");
    let or = dialect == Dialect::OpenRouter;
    let method = &parts.method;
    let known = if *method == Method::POST {
        match route {
            "/chat/completions" => {
                return chat::chat_completions(shared, &parts, body, guard).await;
            }
            "/completions" if or => {
                return chat::legacy_completions(shared, &parts, body, guard).await;
            }
            "/embeddings" => return Ok(authed(&shared, &parts, guard, |s| embeddings(s, &body))),
            _ => false,
        }
    } else if *method == Method::GET {
        match route {
            // The only endpoint OpenRouter serves without a key.
            "/models" if or => return Ok(json_ok(dialect, models(), guard)),
            "/models" => return Ok(authed(&shared, &parts, guard, |_| Ok(openai_models()))),
            "/key" | "/auth/key" if or => {
                return Ok(authed(&shared, &parts, guard, |s| {
                    Ok(key_info(s, bearer(&parts.headers).unwrap_or_default()))
                }));
            }
            "/credits" if or => {
                return Ok(authed(&shared, &parts, guard, |_| {
                    Err(ErrorSpec::new(
                        403,
                        "Only management keys can perform this operation",
                    ))
                }));
            }
            "/generation" if or => {
                return Ok(authed(&shared, &parts, guard, |s| {
                    generation(s, parts.uri.query().unwrap_or(""))
                }));
            }
            _ if or && route.starts_with("/model/") => {
                let id = &route["/model/".len()..];
                return Ok(authed(&shared, &parts, guard, |_| model_detail(id)));
            }
            _ => false,
        }
    } else {
        matches!(
            route,
            "/chat/completions" | "/models" | "/embeddings" | "/key" | "/credits"
        )
    };
    let spec = if known {
        ErrorSpec::new(405, "Method Not Allowed")
    } else {
        ErrorSpec::new(404, "Not Found")
    };
    Ok(error_response(dialect, &spec, guard))
}

/// The bearer key of a request, if it has a non-empty one.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// Checks the bearer key against [`crate::FakeOptions::api_keys`] (empty list: any key).
pub(crate) fn check_auth(shared: &Shared, headers: &HeaderMap) -> Result<(), ErrorSpec> {
    let keys = &shared.opts.api_keys;
    match (shared.dialect, bearer(headers)) {
        (Dialect::OpenAi, _) if keys.is_empty() => Ok(()),
        (_, Some(key)) if keys.is_empty() || keys.iter().any(|k| k == key) => Ok(()),
        (Dialect::OpenRouter, None) => Err(ErrorSpec::new(401, "No auth credentials found")),
        (Dialect::OpenRouter, Some(_)) => Err(ErrorSpec::new(401, "User not found.")),
        (Dialect::OpenAi, None) => Err(ErrorSpec::new(
            401,
            "You didn't provide an API key. You need to provide your API key in an \
             Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )),
        (Dialect::OpenAi, Some(key)) => Err(ErrorSpec::new(
            401,
            format!(
                "Incorrect API key provided: {}. You can find your API key at \
                 https://platform.openai.com/account/api-keys.",
                mask_key(key)
            ),
        )
        .openai_code("invalid_api_key")),
    }
}

fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 14 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..11].iter().collect();
    let tail: String = chars[chars.len() - 3..].iter().collect();
    format!("{head}...{tail}")
}

fn authed(
    shared: &Shared,
    parts: &http::request::Parts,
    guard: DisconnectGuard,
    answer: impl FnOnce(&Shared) -> Result<Bytes, ErrorSpec>,
) -> Response<FakeBody> {
    match check_auth(shared, &parts.headers).and_then(|()| answer(shared)) {
        Ok(body) => json_ok(shared.dialect, body, guard),
        Err(spec) => error_response(shared.dialect, &spec, guard),
    }
}

fn set_header(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(name), Ok(value)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        headers.insert(name, value);
    }
}

fn base_response(
    dialect: Dialect,
    status: u16,
    content_type: &'static str,
    body: FakeBody,
) -> Response<FakeBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    headers.insert(
        http::header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    if dialect == Dialect::OpenRouter {
        headers.insert(
            http::header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("X-Generation-Id,cf-ray"),
        );
    }
    resp
}

/// A JSON answer with the real upstream's headers plus `extra`.
pub(crate) fn json_response(
    dialect: Dialect,
    status: u16,
    body: FakeBody,
    extra: &[(&'static str, String)],
) -> Response<FakeBody> {
    let mut resp = base_response(dialect, status, "application/json", body);
    for (name, value) in extra {
        set_header(resp.headers_mut(), name, value);
    }
    resp
}

fn json_ok(dialect: Dialect, body: Bytes, guard: DisconnectGuard) -> Response<FakeBody> {
    json_response(dialect, 200, FakeBody::full(body, guard), &[])
}

/// An SSE answer (`text/event-stream`, `cache-control: no-cache`).
pub(crate) fn sse_response(
    dialect: Dialect,
    body: FakeBody,
    generation_id: &str,
) -> Response<FakeBody> {
    let mut resp = base_response(dialect, 200, "text/event-stream", body);
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    if dialect == Dialect::OpenRouter {
        set_header(headers, "x-generation-id", generation_id);
    }
    resp
}

pub(crate) fn error_response(
    dialect: Dialect,
    spec: &ErrorSpec,
    guard: DisconnectGuard,
) -> Response<FakeBody> {
    json_response(
        dialect,
        spec.status,
        FakeBody::full(spec.body(dialect), guard),
        &spec.headers,
    )
}

fn to_bytes(value: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

fn models() -> Bytes {
    let data: Vec<Value> = CATALOG
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "canonical_slug": m.id,
                "hugging_face_id": null,
                "name": m.name,
                "created": m.created,
                "description": "Model served by orproxy-testkit's fake OpenRouter.",
                "context_length": m.context_length,
                "architecture": {
                    "modality": "text->text",
                    "input_modalities": ["text"],
                    "output_modalities": ["text"],
                    "tokenizer": "Other",
                    "instruct_type": null,
                },
                "pricing": {
                    "prompt": format_usd(u128::from(m.pricing.prompt), false),
                    "completion": format_usd(u128::from(m.pricing.completion), false),
                    "request": "0",
                    "image": "0",
                },
                "top_provider": {
                    "context_length": m.context_length,
                    "max_completion_tokens": m.max_completion_tokens,
                    "is_moderated": false,
                },
                "per_request_limits": null,
                "supported_parameters": supported_parameters(m),
                "default_parameters": null,
                "supported_voices": null,
                "knowledge_cutoff": null,
                "expiration_date": null,
                "links": { "details": format!("/api/v1/models/{}/endpoints", m.id) },
            })
        })
        .collect();
    let total = data.len();
    to_bytes(&json!({ "data": data, "total_count": total, "links": { "next": null } }))
}

/// Every catalog model calls tools; only some honour `reasoning`.
fn supported_parameters(model: &CatalogModel) -> Vec<&'static str> {
    let mut params = vec![
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "stream",
        "tools",
        "tool_choice",
    ];
    if model.reasoning {
        params.extend(["reasoning", "include_reasoning"]);
    }
    params
}

fn model_detail(id: &str) -> Result<Bytes, ErrorSpec> {
    let model = wire::lookup(id)
        .ok_or_else(|| ErrorSpec::new(404, format!("Model {id} not found")).with_user_id())?;
    let Ok(Value::Object(list)) = serde_json::from_slice::<Value>(&models()) else {
        return Err(ErrorSpec::new(500, "Internal Server Error"));
    };
    let entry = list
        .get("data")
        .and_then(Value::as_array)
        .and_then(|d| d.iter().find(|m| m["id"] == model.id))
        .cloned()
        .unwrap_or(Value::Null);
    Ok(to_bytes(&json!({ "data": entry })))
}

fn openai_models() -> Bytes {
    let data: Vec<Value> = [
        ("gpt-4o", "system"),
        ("gpt-4o-mini", "system"),
        ("text-embedding-3-small", "system"),
        ("fake/echo", "orproxy-testkit"),
        ("fake/fast", "orproxy-testkit"),
    ]
    .iter()
    .map(|(id, owner)| json!({ "id": id, "object": "model", "created": 1_700_000_000, "owned_by": owner }))
    .collect();
    to_bytes(&json!({ "object": "list", "data": data }))
}

fn usd(pico: u128) -> f64 {
    pico as f64 / PICO_PER_USD as f64
}

fn key_info(shared: &Shared, key: &str) -> Bytes {
    let spent = usd(shared.spent_pico());
    to_bytes(&json!({
        "data": {
            "label": mask_key(key),
            "limit": null,
            "limit_remaining": null,
            "limit_reset": null,
            "include_byok_in_limit": false,
            "usage": spent,
            "usage_daily": spent,
            "usage_weekly": spent,
            "usage_monthly": spent,
            "byok_usage": 0,
            "byok_usage_daily": 0,
            "byok_usage_weekly": 0,
            "byok_usage_monthly": 0,
            "is_free_tier": false,
            "is_management_key": false,
            "is_provisioning_key": false,
            "creator_user_id": FAKE_USER_ID,
            "expires_at": null,
            "rate_limit": {
                "requests": -1,
                "interval": "10s",
                "note": "This field is deprecated and safe to ignore.",
            },
        }
    }))
}

/// `YYYY-MM-DDTHH:MM:SS+00:00` without a date crate (days-from-civil inverse, Hinnant).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn generation_json(g: &GenerationRecord) -> Value {
    let cost = usd(g.cost_pico);
    // Two halves: one json! call this long exceeds the macro recursion limit.
    let mut data = json!({
            "id": g.id,
            "upstream_id": null,
            "created_at": rfc3339(g.created),
            "model": g.model,
            "provider_name": g.provider,
            "api_type": g.api_type,
            "streamed": g.streamed,
            "cancelled": false,
            "is_byok": false,
            "total_cost": cost,
            "usage": cost,
            "upstream_inference_cost": null,
            "cache_discount": null,
            "latency": 0,
            "generation_time": 0,
            "moderation_latency": null,
            "tokens_prompt": g.prompt_tokens,
            "tokens_completion": g.completion_tokens,
    });
    let rest = json!({
            "native_tokens_prompt": g.prompt_tokens,
            "native_tokens_completion": g.completion_tokens,
            "native_tokens_completion_images": 0,
            "native_tokens_reasoning": g.reasoning_tokens,
            "native_tokens_cached": 0,
            "num_media_prompt": 0,
            "num_input_audio_prompt": 0,
            "num_media_completion": 0,
            "num_search_results": 0,
            "num_fetches": 0,
            "finish_reason": g.finish_reason,
            "native_finish_reason": g.finish_reason,
            "origin": "",
            "http_referer": g.http_referer,
            "user_agent": g.user_agent,
            "app_id": null,
            "external_user": null,
            "preset_id": null,
            "router": null,
            "service_tier": null,
            "session_id": null,
            "data_region": "global",
            "provider_responses": null,
    });
    if let (Value::Object(data), Value::Object(rest)) = (&mut data, rest) {
        data.extend(rest);
    }
    json!({ "data": data })
}

fn generation(shared: &Shared, query: &str) -> Result<Bytes, ErrorSpec> {
    let id = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("id="))
        .filter(|id| !id.is_empty())
        .ok_or_else(|| ErrorSpec::new(400, "Invalid request parameters"))?;
    let record = shared
        .generation(id)
        .ok_or_else(|| ErrorSpec::new(404, format!("Generation {id} not found")))?;
    Ok(to_bytes(&generation_json(&record)))
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cost: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_byok: Option<bool>,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: Vec<f32>,
}

#[derive(Serialize)]
struct Embeddings<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    object: &'static str,
    model: &'a str,
    data: Vec<Embedding>,
    usage: EmbeddingUsage,
}

/// Eight numbers in [-1, 1] derived from an FNV-1a hash, so equal inputs embed equally.
fn fake_vector(text: &str) -> Vec<f32> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (0..8)
        .map(|k| {
            let bits = (hash.rotate_left(k * 8) & 0xffff) as f32;
            bits / 32_767.5 - 1.0
        })
        .collect()
}

/// Embedding price: $0.02 per million tokens, like text-embedding-3-small.
const EMBEDDING_PICO_PER_TOKEN: u128 = 20_000;

fn embeddings(shared: &Shared, body: &Bytes) -> Result<Bytes, ErrorSpec> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| ErrorSpec::new(400, "Invalid JSON in request body"))?;
    let default_model = match shared.dialect {
        Dialect::OpenRouter => "openai/text-embedding-3-small",
        Dialect::OpenAi => "text-embedding-3-small",
    };
    let model = value
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(default_model);
    let inputs: Vec<String> = match value.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        _ => return Err(ErrorSpec::new(400, "Input is required")),
    };
    let tokens: u64 = inputs
        .iter()
        .map(|t| (t.chars().count() as u64).div_ceil(4).max(1))
        .sum();
    let scenario = Scenario::parse(model);
    let quote = Quote {
        model,
        max_tokens: None,
        prompt_tokens: tokens,
        user_text: inputs.first().map_or("", String::as_str),
    };
    if let Some(spec) = upfront_error(shared, &scenario, &quote) {
        return Err(spec);
    }
    let or = shared.dialect == Dialect::OpenRouter;
    let created = unix_secs();
    let id = or.then(|| format!("embd-{created}-{}", wire::random_alnum(20)));
    let cost_pico = u128::from(tokens) * EMBEDDING_PICO_PER_TOKEN;
    let cost_text = format_usd(cost_pico, true);
    let body = Embeddings {
        id: id.as_deref(),
        object: "list",
        model,
        data: inputs
            .iter()
            .enumerate()
            .map(|(index, text)| Embedding {
                object: "embedding",
                index,
                embedding: fake_vector(text),
            })
            .collect(),
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
            cost: or.then(|| raw_number(&cost_text)),
            is_byok: or.then_some(false),
        },
    };
    if let Some(id) = &id {
        shared.record_generation(GenerationRecord {
            id: id.clone(),
            model: model.to_owned(),
            provider: wire::provider_for(model),
            created,
            api_type: "embeddings",
            streamed: false,
            prompt_tokens: tokens,
            completion_tokens: 0,
            reasoning_tokens: 0,
            cost_text,
            cost_pico,
            finish_reason: None,
            user_agent: None,
            http_referer: None,
        });
    }
    Ok(Bytes::from(serde_json::to_vec(&body).unwrap_or_default()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dates_format() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00+00:00");
        assert_eq!(rfc3339(1_770_044_198), "2026-02-02T14:56:38+00:00");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00+00:00");
    }

    #[test]
    fn keys_are_masked() {
        assert_eq!(mask_key("sk-or-v1-abcdef0123456789"), "sk-or-v1-ab...789");
        assert_eq!(mask_key("short"), "*****");
    }
}
