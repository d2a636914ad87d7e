//! The OpenAI wire format: the default mapping of every [`Backend`](crate::Backend) phase.
//!
//! Answers are relayed unchanged; these functions only read what the daemon needs (usage,
//! served model, errors) and skip the rest without building a tree.

use std::borrow::Cow;
use std::sync::OnceLock;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use memchr::memmem::Finder;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use crate::backend::{
    Call, EventKind, MapError, MappedEvent, MappedResponse, ModelInfo, Output, PrepareError, Price,
    StreamMapper, UpstreamRequest,
};
use crate::body::JsonObject;
use crate::failure::{Failure, FailureKind};
use crate::sse::SseEvent;
use crate::usage::{Usage, WireUsage, usd_to_nanos};

mod quick;
mod replay;

pub use replay::completion_events;

/// Builds a JSON POST to `url` with the call's body, bearer key, identity and extra headers.
pub fn json_post(url: Uri, call: &Call<'_>) -> Result<UpstreamRequest, PrepareError> {
    let mut headers = json_headers(call, 8 + call.headers.len())?;
    if let Some(key) = call.api_key {
        headers.insert(AUTHORIZATION, bearer(key)?);
    }
    for (name, value) in call.headers {
        headers.insert(name.clone(), value.clone());
    }
    Ok(UpstreamRequest {
        method: Method::POST,
        url,
        headers,
        body: call.body.to_bytes(),
    })
}

/// The headers every JSON POST carries: `Content-Type`, `Accept` (an event stream when the call
/// streams) and the identity's `User-Agent`; room for `capacity` headers in all.
pub fn json_headers(call: &Call<'_>, capacity: usize) -> Result<HeaderMap, PrepareError> {
    let mut headers = HeaderMap::with_capacity(capacity);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        ACCEPT,
        HeaderValue::from_static(if call.stream {
            "text/event-stream"
        } else {
            "application/json"
        }),
    );
    if let Some(ua) = call.identity.user_agent {
        headers.insert(USER_AGENT, header_value(ua, "User-Agent")?);
    }
    Ok(headers)
}

/// Builds a GET with an optional bearer key.
pub fn get(url: Uri, api_key: Option<&str>) -> Result<UpstreamRequest, PrepareError> {
    let mut headers = HeaderMap::new();
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    if let Some(key) = api_key {
        headers.insert(AUTHORIZATION, bearer(key)?);
    }
    Ok(UpstreamRequest {
        method: Method::GET,
        url,
        headers,
        body: Bytes::new(),
    })
}

/// `Bearer <key>`, marked sensitive so that it never shows in debug output.
pub fn bearer(key: &str) -> Result<HeaderValue, PrepareError> {
    let mut value = HeaderValue::try_from(format!("Bearer {key}"))
        .map_err(|_| PrepareError::InvalidHeader("Authorization"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// A header value from text, naming the header on failure.
pub fn header_value(text: &str, name: &'static str) -> Result<HeaderValue, PrepareError> {
    HeaderValue::try_from(text).map_err(|_| PrepareError::InvalidHeader(name))
}

/// Inserts `name: value` when `value` is set.
pub fn insert_opt(
    headers: &mut HeaderMap,
    name: HeaderName,
    value: Option<&str>,
    label: &'static str,
) -> Result<(), PrepareError> {
    if let Some(value) = value {
        headers.insert(name, header_value(value, label)?);
    }
    Ok(())
}

/// The absolute URL of `path` under `base`, parsed (plugins do this once, at build time).
pub fn endpoint(base: &str, path: &str) -> Result<Uri, http::uri::InvalidUri> {
    join_url(base, path).parse()
}

/// Joins a base URL and a path without doubling or dropping the slash. A query on the base
/// (`?api-version=...`, as some OpenAI-compatible servers want) stays a query, after the path,
/// joined with the path's own.
pub fn join_url(base: &str, path: &str) -> String {
    let base = base.split_once('#').map_or(base, |(before, _)| before);
    let (base, base_query) = base.split_once('?').unwrap_or((base, ""));
    let (path, path_query) = path.split_once('?').unwrap_or((path, ""));
    let mut url = format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    );
    let queries: Vec<&str> = [path_query, base_query]
        .into_iter()
        .filter(|q| !q.is_empty())
        .collect();
    if !queries.is_empty() {
        url.push('?');
        url.push_str(&queries.join("&"));
    }
    url
}

/// A chat completion as far as the daemon reads it. `U` is how `usage` is read: in the same
/// pass ([`WireUsage`]) for an answer as upstreams send it, or raw and apart when that fails,
/// so that an odd usage object costs the usage, not the answer.
#[derive(Deserialize)]
struct ResponseView<'a, U> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default = "none")]
    usage: Option<U>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
    #[serde(default, borrow)]
    choices: Option<Vec<ResponseChoice<'a>>>,
}

#[derive(Deserialize)]
struct ResponseChoice<'a> {
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
    #[serde(default, borrow)]
    message: Option<&'a RawValue>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

impl ResponseChoice<'_> {
    /// Whether the provider cut this choice short: OpenRouter's choice-level `error`, or a
    /// `finish_reason` of `"error"` (with the error at the top level, or none at all).
    fn cut(&self) -> bool {
        self.error.is_some_and(|e| e.get() != "null")
            || self.finish_reason.as_deref() == Some("error")
    }
}

/// Reads usage, served model, a 200-with-error and an answer cut short from a chat completion.
pub fn map_response(body: &Bytes) -> MappedResponse {
    quick::read(body)
        .or_else(|| read_in_one_pass(body))
        .unwrap_or_else(|| read_usage_apart(body))
}

/// What serde reads of an answer, without the quick reading in front.
#[cfg(test)]
fn read_with_serde(body: &[u8]) -> MappedResponse {
    read_in_one_pass(body).unwrap_or_else(|| read_usage_apart(body))
}

/// An answer as upstreams send it, its usage read in the same pass; `None` when that fails.
fn read_in_one_pass(body: &[u8]) -> Option<MappedResponse> {
    let mut view = serde_json::from_slice::<ResponseView<'_, WireUsage<'_>>>(body).ok()?;
    let usage = view.usage.take().and_then(WireUsage::read);
    Some(read_view(view, usage))
}

/// Any other body: its usage read apart (an unreadable one is no usage), or a failure.
fn read_usage_apart(body: &[u8]) -> MappedResponse {
    match serde_json::from_slice::<ResponseView<'_, &RawValue>>(body) {
        Ok(mut view) => {
            let usage = view.usage.take().and_then(Usage::from_openai_json);
            read_view(view, usage)
        }
        // A success status over a body that is no answer (a proxy's HTML page, a cut body):
        // nothing usable reached us, so it fails over like a 502.
        Err(e) => MappedResponse {
            failure: Some(Failure {
                kind: FailureKind::Server,
                status: 502,
                message: format!("unreadable answer: {e}"),
                retry_after: None,
            }),
            ..MappedResponse::default()
        },
    }
}

/// A missing field's value, for an `Option<U>` whose `U` has no `Default` to derive one from.
fn none<T>() -> Option<T> {
    None
}

/// What [`map_response`] reports of a parsed answer whose usage was read already.
fn read_view<U>(view: ResponseView<'_, U>, usage: Option<Usage>) -> MappedResponse {
    let mut failure = match (view.error, &view.choices) {
        (Some(err), None) if err.get() != "null" => Some(Failure::from_error_object(err)),
        _ => None,
    };
    let mut partial = None;
    if let Some(cut) = view.choices.iter().flatten().find(|c| c.cut()) {
        let error = Some(
            cut.error
                .filter(|e| e.get() != "null")
                .or(view.error.filter(|e| e.get() != "null"))
                .map_or_else(
                    || Failure {
                        kind: FailureKind::Server,
                        status: 502,
                        message: "the upstream ended the answer with finish_reason \"error\""
                            .to_owned(),
                        retry_after: None,
                    },
                    Failure::from_error_object,
                ),
        );
        // Cut short before any content, the answer is only an error in a 200 (and fails over
        // as one, as the same failure does in a stream); after content it is relayed.
        if cut.message.is_some_and(has_content) {
            partial = error;
        } else {
            failure = failure.or(error);
        }
    }
    let answer_bytes = view
        .choices
        .iter()
        .flatten()
        .filter_map(|c| c.message)
        .map(|m| m.get().len())
        .sum();
    MappedResponse {
        body: None,
        usage,
        model: view.model.map(Cow::into_owned),
        failure,
        partial,
        answer_bytes,
    }
}

/// Whether a completion's `message` holds anything: text, tool calls or reasoning.
fn has_content(message: &RawValue) -> bool {
    #[derive(Deserialize)]
    struct Message<'a> {
        #[serde(default, borrow)]
        content: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        reasoning: Option<Cow<'a, str>>,
        #[serde(default)]
        tool_calls: Option<Vec<IgnoredAny>>,
    }
    serde_json::from_str::<Message<'_>>(message.get()).is_ok_and(|m| {
        m.content.is_some_and(|c| !c.is_empty())
            || m.reasoning.is_some_and(|r| !r.is_empty())
            || m.tool_calls.is_some_and(|t| !t.is_empty())
    })
}

/// Whether a stream request asks for the final usage chunk (`stream_options.include_usage`).
pub fn asks_for_usage(body: &JsonObject) -> bool {
    body.get("stream_options")
        .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).ok())
        .is_some_and(|o| o["include_usage"] == serde_json::Value::Bool(true))
}

/// The body with `stream_options.include_usage: true` (other stream options kept), so that a
/// stream reports what it used even when the client did not ask.
pub fn requesting_usage(body: &JsonObject) -> JsonObject {
    let mut options = body
        .get("stream_options")
        .and_then(|raw| {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(raw.get()).ok()
        })
        .unwrap_or_default();
    options.insert("include_usage".into(), serde_json::Value::Bool(true));
    let mut body = body.clone();
    body.set("stream_options", &options);
    body
}

/// Classifies OpenAI chat-completion chunks; relays every event unchanged, except a usage-only
/// chunk the client did not ask for (see [`ChunkMapper::stripping_usage`]).
#[derive(Debug, Default)]
pub struct ChunkMapper {
    content_seen: bool,
    complete: bool,
    model: Option<String>,
    strip_usage: bool,
}

impl ChunkMapper {
    /// A mapper that reads the usage-only chunk but does not relay it (orproxy asked for it on
    /// the client's behalf).
    pub fn stripping_usage() -> Self {
        ChunkMapper {
            strip_usage: true,
            ..ChunkMapper::default()
        }
    }
}

/// A stream chunk as far as the daemon reads it; `U` as in [`ResponseView`].
#[derive(Deserialize)]
struct ChunkView<'a, U> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    choices: Option<Vec<ChoiceView<'a>>>,
    #[serde(default = "none")]
    usage: Option<U>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(default, borrow)]
    delta: Option<DeltaView<'a>>,
    #[serde(default)]
    finish_reason: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct DeltaView<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    refusal: Option<Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
    #[serde(default)]
    function_call: Option<IgnoredAny>,
}

impl DeltaView<'_> {
    fn has_content(&self) -> bool {
        let text = |s: &Option<Cow<'_, str>>| s.as_deref().is_some_and(|s| !s.is_empty());
        text(&self.content)
            || text(&self.reasoning)
            || text(&self.reasoning_content)
            || text(&self.refusal)
            || self.tool_calls.is_some()
            || self.function_call.is_some()
    }
}

impl ChunkMapper {
    /// Classifies one event's data payload.
    fn classify(&mut self, data: &[u8]) -> (EventKind, Option<Usage>) {
        if data == b"[DONE]" {
            return (EventKind::Done, None);
        }
        // Once content flows, only usage and error chunks matter: skip parsing everything else.
        if self.content_seen && !has_non_null_field(data, &needles().usage) && !has_field(data) {
            if has_non_null_field(data, &needles().finish_reason) {
                self.complete = true;
            }
            return (EventKind::Content, None);
        }
        match quick::read_chunk(data).map_or_else(|| chunk_with_serde(data), |c| Some(c.into())) {
            Some(facts) => self.read_chunk(facts),
            None => (EventKind::Unknown, None),
        }
    }

    /// Classifies a chunk from what was read of it.
    fn read_chunk(&mut self, chunk: ChunkFacts<'_>) -> (EventKind, Option<Usage>) {
        if self.model.is_none() {
            self.model = chunk.model.map(Cow::into_owned);
        }
        let usage = chunk.usage;
        // An error chunk may report what the stream used so far: keep it for the bill.
        if let Some(err) = chunk.error.filter(|e| e.get() != "null") {
            return (EventKind::Failed(Failure::from_error_object(err)), usage);
        }
        self.complete |= chunk.finished || usage.is_some();
        let kind = if chunk.finished || chunk.content {
            self.content_seen = true;
            EventKind::Content
        } else if usage.is_some() || (chunk.reported && !chunk.any_choice) {
            // A chunk of nothing but a usage that cannot be read is still the usage chunk:
            // kept from a client that did not ask for it, like a readable one.
            EventKind::Usage
        } else {
            EventKind::Preamble
        };
        (kind, usage)
    }
}

/// A chunk read by serde: its usage in the same pass, or apart when that fails; `None` when it
/// is no chunk at all.
fn chunk_with_serde(data: &[u8]) -> Option<ChunkFacts<'_>> {
    match serde_json::from_slice::<ChunkView<'_, WireUsage<'_>>>(data) {
        Ok(chunk) => Some(ChunkFacts::of(chunk, WireUsage::read)),
        Err(_) => serde_json::from_slice::<ChunkView<'_, &RawValue>>(data)
            .ok()
            .map(|chunk| ChunkFacts::of(chunk, Usage::from_openai_json)),
    }
}

/// What [`ChunkMapper`] reads of a chunk, whichever way it was read.
#[derive(Debug)]
struct ChunkFacts<'a> {
    model: Option<Cow<'a, str>>,
    error: Option<&'a RawValue>,
    /// A choice has a `finish_reason`.
    finished: bool,
    /// A choice's delta carries content.
    content: bool,
    /// `choices` holds at least one choice.
    any_choice: bool,
    /// The chunk carries a `usage` that is not `null`, readable or not.
    reported: bool,
    usage: Option<Usage>,
}

impl<'a> From<quick::Chunk<'a>> for ChunkFacts<'a> {
    fn from(chunk: quick::Chunk<'a>) -> Self {
        ChunkFacts {
            model: chunk.model.map(Cow::Borrowed),
            // The quick reading leaves error chunks to serde.
            error: None,
            finished: chunk.finished,
            content: chunk.content,
            any_choice: chunk.any_choice,
            reported: chunk.usage.is_some(),
            usage: chunk.usage.and_then(WireUsage::read),
        }
    }
}

impl<'a> ChunkFacts<'a> {
    /// The facts of a chunk serde parsed, its usage read by `read_usage`.
    fn of<U>(mut chunk: ChunkView<'a, U>, read_usage: impl FnOnce(U) -> Option<Usage>) -> Self {
        let usage = chunk.usage.take();
        let reported = usage.is_some();
        let choices = || chunk.choices.iter().flatten();
        ChunkFacts {
            finished: choices().any(|c| c.finish_reason.is_some()),
            content: choices().any(|c| c.delta.as_ref().is_some_and(DeltaView::has_content)),
            any_choice: choices().next().is_some(),
            model: chunk.model,
            error: chunk.error,
            reported,
            usage: usage.and_then(read_usage),
        }
    }
}

/// Searchers built once: building one per event costs more than the search itself.
struct Needles {
    error: Finder<'static>,
    usage: Finder<'static>,
    finish_reason: Finder<'static>,
}

fn needles() -> &'static Needles {
    static NEEDLES: OnceLock<Needles> = OnceLock::new();
    NEEDLES.get_or_init(|| Needles {
        error: Finder::new(b"\"error\":"),
        usage: Finder::new(b"\"usage\":"),
        finish_reason: Finder::new(b"\"finish_reason\":"),
    })
}

/// A top-level `"error":` key (quotes inside content are escaped, so they never match).
fn has_field(data: &[u8]) -> bool {
    needles().error.find(data).is_some()
}

/// The key followed by something other than `null` (OpenAI sends `"usage":null` on every chunk).
fn has_non_null_field(data: &[u8], key: &Finder<'_>) -> bool {
    key.find_iter(data).any(|at| {
        let rest = &data[at + key.needle().len()..];
        let value = rest.iter().position(|b| !b.is_ascii_whitespace());
        value.is_some_and(|i| rest[i] != b'n')
    })
}

impl StreamMapper for ChunkMapper {
    fn map(&mut self, event: SseEvent) -> MappedEvent {
        let (kind, usage) = if event.is_comment() {
            (EventKind::KeepAlive, None)
        } else {
            match event.data() {
                Some(data) => self.classify(&data),
                None => (EventKind::Unknown, None),
            }
        };
        let out = if self.strip_usage && kind == EventKind::Usage {
            Output::Nothing
        } else {
            Output::One(event.raw().clone())
        };
        MappedEvent { kind, usage, out }
    }

    fn is_complete(&self) -> bool {
        self.complete
    }

    fn served_model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

#[derive(Deserialize)]
struct ModelList<'a> {
    #[serde(borrow)]
    data: Vec<ModelEntry<'a>>,
}

#[derive(Deserialize)]
struct ModelEntry<'a> {
    id: String,
    #[serde(default, borrow)]
    pricing: Option<WirePricing<'a>>,
    #[serde(default)]
    top_provider: Option<TopProvider>,
}

#[derive(Deserialize)]
struct TopProvider {
    #[serde(default)]
    max_completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct WirePricing<'a> {
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    completion: Option<&'a RawValue>,
    #[serde(default, borrow)]
    request: Option<&'a RawValue>,
    #[serde(default, borrow)]
    input_cache_read: Option<&'a RawValue>,
    #[serde(default, borrow)]
    input_cache_write: Option<&'a RawValue>,
    #[serde(default, borrow)]
    input_cache_write_1h: Option<&'a RawValue>,
}

/// Reads an OpenAI (or OpenRouter, with `pricing` in USD per token) model list.
pub fn map_models(body: &[u8]) -> Result<Vec<ModelInfo>, MapError> {
    let list: ModelList<'_> = serde_json::from_slice(body).map_err(|e| MapError(e.to_string()))?;
    Ok(list
        .data
        .into_iter()
        .map(|m| ModelInfo {
            price: m.pricing.and_then(|p| {
                let per_mtok =
                    |raw: Option<&RawValue>| raw.and_then(|r| per_token_to_per_mtok(r.get()));
                Price {
                    prompt_per_mtok: per_mtok(p.prompt)?,
                    completion_per_mtok: per_mtok(p.completion)?,
                    cached_prompt_per_mtok: per_mtok(p.input_cache_read),
                    cache_write_prompt_per_mtok: per_mtok(p.input_cache_write),
                    cache_write_1h_prompt_per_mtok: per_mtok(p.input_cache_write_1h),
                    request: p.request.and_then(|r| usd_to_nanos(r.get())).unwrap_or(0),
                }
                .chargeable()
            }),
            max_output_tokens: m.top_provider.and_then(|t| t.max_completion_tokens),
            id: m.id,
        })
        .collect())
}

/// USD per token (decimal text, possibly quoted) to nano-dollars per million tokens, exactly.
pub fn per_token_to_per_mtok(text: &str) -> Option<i64> {
    let text = text.trim().trim_matches('"');
    let scaled = match text.find(['e', 'E']) {
        Some(at) => {
            let exp: i32 = text[at + 1..].parse().ok()?;
            format!("{}e{}", &text[..at], exp.checked_add(6)?)
        }
        None => format!("{text}e6"),
    };
    usd_to_nanos(&scaled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_all(stream: &[&str]) -> Vec<EventKind> {
        let mut mapper = ChunkMapper::default();
        stream
            .iter()
            .map(|s| mapper.map(SseEvent::new(Bytes::from(s.to_string()))).kind)
            .collect()
    }

    fn pick(values: &'static [&'static str]) -> proptest::sample::Select<&'static str> {
        proptest::sample::select(values)
    }

    proptest::proptest! {
        /// Whatever the usage object holds, reading it in one pass finds what reading it apart
        /// finds, or leaves the answer to that slower reading.
        #[test]
        fn one_pass_reads_what_reading_usage_apart_reads(
            prompt in pick(&["absent", "16", "0", "-1", "null", r#""16""#, "1e2"]),
            cost in pick(&["absent", "3.6e-05", r#""0.1""#, "null", "[]", "-1", "1e300"]),
            details in pick(&["absent", "null", "{}", r#"{"cached_tokens":3,"audio_tokens":0}"#,
                r#"{"cached_tokens":null}"#, r#"{"cached_tokens":"x"}"#]),
            reasoning in pick(&["absent", "null", r#"{"reasoning_tokens":7}"#, "7"]),
            usage_itself in pick(&["object", "object", "object", "null", "absent", r#""text""#]),
        ) {
            let fields: Vec<String> = [
                ("total_tokens", "18"),
                ("prompt_tokens", prompt),
                ("cost", cost),
                ("prompt_tokens_details", details),
                ("completion_tokens_details", reasoning),
            ]
            .into_iter()
            .filter(|(_, v)| *v != "absent")
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
            let usage = match usage_itself {
                "object" => format!(",\"usage\":{{\"completion_tokens\":2,{}}}", fields.join(",")),
                "absent" => String::new(),
                other => format!(",\"usage\":{other}"),
            };
            let body = format!(
                r#"{{"model":"m","choices":[{{"message":{{"content":"hi"}},"finish_reason":"stop"}}]{usage}}}"#
            );
            let apart = format!("{:?}", read_usage_apart(body.as_bytes()));
            if let Some(one_pass) = read_in_one_pass(body.as_bytes()) {
                proptest::prop_assert_eq!(format!("{one_pass:?}"), apart, "{}", body);
            }
        }
    }

    /// An OpenRouter answer as the fake sends it, for the quick reading's tests.
    const ANSWER: &str = r#"{"id":"gen-1","provider":"P","model":"fake/fast","object":"chat.completion","created":1700000000,"choices":[{"index":0,"logprobs":null,"finish_reason":"stop","native_finish_reason":"stop","message":{"role":"assistant","content":"The \"quick\" fox\n\u00e9.","refusal":null,"reasoning":null}}],"usage":{"prompt_tokens":16,"completion_tokens":10,"total_tokens":26,"cost":3.6e-05,"is_byok":false,"prompt_tokens_details":{"cached_tokens":0,"cache_write_tokens":0,"audio_tokens":0,"video_tokens":0},"cost_details":{"upstream_inference_cost":3.6e-05,"upstream_inference_prompt_cost":1.6e-05},"completion_tokens_details":{"reasoning_tokens":0,"image_tokens":0,"audio_tokens":0}}}"#;

    /// The fields given, joined as an object's members.
    fn members(fields: impl IntoIterator<Item = Option<String>>) -> String {
        fields.into_iter().flatten().collect::<Vec<_>>().join(",")
    }

    /// The quick reading's verdict on `body` is serde's, or it leaves `body` to serde.
    fn quick_agrees(body: &[u8]) -> Result<(), proptest::test_runner::TestCaseError> {
        if let Some(quick) = quick::read(body) {
            proptest::prop_assert_eq!(
                format!("{quick:?}"),
                format!("{:?}", read_with_serde(body)),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        Ok(())
    }

    #[test]
    fn an_ordinary_answer_takes_the_quick_reading() {
        let quick = quick::read(ANSWER.as_bytes()).expect("read quickly");
        assert_eq!(
            format!("{quick:?}"),
            format!("{:?}", read_with_serde(ANSWER.as_bytes()))
        );
        assert!(quick.usage.is_some());
    }

    proptest::proptest! {
        // The parts make millions of combinations: sample many (each takes microseconds).
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Answers assembled from ordinary and odd parts: whatever the quick reading reads,
        /// serde reads the same.
        #[test]
        fn the_quick_reading_reads_what_serde_reads(
            model in pick(&["absent", r#""m""#, "null", r#""a\u0062""#, "7", r#""é""#]),
            finish in pick(&["absent", r#""stop""#, "null", r#""error""#, "1"]),
            message in pick(&["absent", "null", r#"{"content":"hi"}"#, r#""text""#, "[1,{}]",
                r#"{"content":"","tool_calls":[{"id":"c"}]}"#]),
            choice_error in pick(&["absent", "null", r#"{"message":"cut"}"#]),
            choices in pick(&["one", "two", "none", "null", "[]", r#""x""#, "[1]"]),
            count in pick(&["16", "0", "null", "-1", "1.5", "1e2", r#""16""#,
                "18446744073709551616", "{}"]),
            cost in pick(&["absent", "3.6e-05", "0", "null", "-1", r#""0.1""#, "1e300", "[]"]),
            details in pick(&["absent", "null", "{}", r#"{"cached_tokens":3}"#, "[2]", "5",
                r#"{"cached_tokens":1,"cached_tokens":2}"#, r#"{"reasoning_tokens":4}"#]),
            usage_itself in pick(&["object", "object", "null", "absent", "[]", r#""u""#]),
            error in pick(&["absent", "absent", "null", r#"{"code":502,"message":"x"}"#]),
            extra in pick(&["", r#","x":{"a":[true,false,null,-0.5e+3]}"#, r#","usage2":1"#,
                r#","model":"again""#, r#","choices":null"#]),
            space in pick(&["", " ", "\n\t "]),
        ) {
            let field = |k: &str, v: &str| (v != "absent").then(|| format!("\"{k}\":{space}{v}"));
            let choice = members([
                field("finish_reason", finish),
                field("message", message),
                field("error", choice_error),
                field("index", "0"),
            ]);
            let choice = format!("{{{choice}}}");
            let choices = match choices {
                "one" => format!("[{choice}]"),
                "two" => format!("[{choice},{space}{choice}]"),
                "none" => "absent".to_owned(),
                other => other.to_owned(),
            };
            let usage = members([
                field("prompt_tokens", count),
                field("completion_tokens", "2"),
                field("total_tokens", "18"),
                field("cost", cost),
                field("prompt_tokens_details", details),
                field("completion_tokens_details", details),
            ]);
            let usage = match usage_itself {
                "object" => format!("{{{usage}}}"),
                other => other.to_owned(),
            };
            let fields = members([
                field("model", model),
                field("choices", &choices),
                field("usage", &usage),
                field("error", error),
            ]);
            let body = format!("{space}{{{fields}{extra}}}{space}");
            quick_agrees(body.as_bytes())?;
        }
    }

    /// An ordinary answer damaged anywhere, in every way tried (a byte dropped, replaced or
    /// added, the answer cut): the quick reading never accepts what serde refuses, nor reads
    /// it differently.
    #[test]
    fn a_damaged_answer_is_never_read_differently() {
        for body in damaged(ANSWER.as_bytes()) {
            if let Err(e) = quick_agrees(&body) {
                panic!("{e}");
            }
        }
    }

    /// `text` damaged at every byte in every way tried: cut there, that byte dropped, replaced
    /// or preceded by one of the bytes JSON's grammar turns on.
    fn damaged(text: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
        const BYTES: &[&str] = &[
            "\"", "\\", "{", "}", "[", "]", ",", ":", "0", "-", "+", "e", ".", "n", " ", "\u{1}",
            "\u{1f}", "\u{e9}",
        ];
        (0..text.len()).flat_map(move |at| {
            let (before, from) = text.split_at(at);
            let mut variants = vec![before.to_vec(), [before, &from[1..]].concat()];
            for byte in BYTES {
                variants.push([before, byte.as_bytes(), &from[1..]].concat());
                variants.push([before, byte.as_bytes(), from].concat());
            }
            variants
        })
    }

    /// A content chunk and a usage chunk as the fake sends them.
    const CHUNKS: [&str; 2] = [
        r#"{"id":"gen-1","object":"chat.completion.chunk","created":1700000000,"model":"fake/fast","provider":"P","choices":[{"index":0,"delta":{"content":"The","role":"assistant"},"finish_reason":null,"native_finish_reason":null}]}"#,
        r#"{"id":"gen-1","object":"chat.completion.chunk","created":1700000000,"model":"fake/fast","provider":"P","choices":[],"usage":{"prompt_tokens":16,"completion_tokens":10,"total_tokens":26,"cost":3.6e-05,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens_details":{"reasoning_tokens":1}}}"#,
    ];

    /// The quick reading of a chunk finds what serde finds, or leaves the chunk to serde.
    fn quick_chunk_agrees(data: &[u8]) -> Result<(), proptest::test_runner::TestCaseError> {
        if let Some(quick) = quick::read_chunk(data) {
            proptest::prop_assert_eq!(
                format!("{:?}", Some(ChunkFacts::from(quick))),
                format!("{:?}", chunk_with_serde(data)),
                "{}",
                String::from_utf8_lossy(data)
            );
        }
        Ok(())
    }

    #[test]
    fn ordinary_chunks_take_the_quick_reading() {
        for chunk in CHUNKS {
            let quick = quick::read_chunk(chunk.as_bytes()).expect("read quickly");
            assert_eq!(
                format!("{:?}", Some(ChunkFacts::from(quick))),
                format!("{:?}", chunk_with_serde(chunk.as_bytes()))
            );
        }
    }

    /// Chunks damaged anywhere, in every way tried: never read differently.
    #[test]
    fn a_damaged_chunk_is_never_read_differently() {
        for data in CHUNKS.iter().flat_map(|chunk| damaged(chunk.as_bytes())) {
            if let Err(e) = quick_chunk_agrees(&data) {
                panic!("{e}");
            }
        }
    }

    proptest::proptest! {
        // The parts make millions of combinations: sample many (each takes microseconds).
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Chunks assembled from ordinary and odd parts: whatever the quick reading reads,
        /// serde reads the same.
        #[test]
        fn the_quick_chunk_reading_reads_what_serde_reads(
            model in pick(&["absent", r#""m""#, "null", r#""a\u0062""#, "3"]),
            content in pick(&["absent", r#""""#, r#""hi""#, "null", r#""\n""#, "[]", r#""é""#]),
            reasoning in pick(&["absent", r#""""#, r#""think""#, "null"]),
            tool_calls in pick(&["absent", "null", "[]", r#"[{"id":"c"}]"#]),
            delta in pick(&["object", "object", "null", "absent", r#""d""#]),
            finish in pick(&["absent", "null", r#""stop""#, "1", "{}"]),
            choices in pick(&["one", "two", "[]", "null", "absent", "[1]"]),
            usage in pick(&["absent", "null", r#"{"prompt_tokens":3,"completion_tokens":4}"#,
                r#"{"prompt_tokens":"3"}"#, "[]", r#"{"cost":0.5}"#]),
            error in pick(&["absent", "absent", "null", r#"{"message":"x"}"#]),
            extra in pick(&["", r#","role":"assistant""#, r#","content":"again""#]),
        ) {
            let field = |k: &str, v: &str| (v != "absent").then(|| format!("\"{k}\":{v}"));
            let delta_fields = members([
                field("content", content),
                field("reasoning", reasoning),
                field("tool_calls", tool_calls),
            ]);
            let delta = match delta {
                "object" => format!("{{{delta_fields}{extra}}}"),
                other => other.to_owned(),
            };
            let choice = members([field("delta", &delta), field("finish_reason", finish)]);
            let choice = format!("{{\"index\":0,{choice}}}");
            let choices = match choices {
                "one" => format!("[{choice}]"),
                "two" => format!("[{choice},{choice}]"),
                other => other.to_owned(),
            };
            let fields = members([
                field("model", model),
                field("choices", &choices),
                field("usage", usage),
                field("error", error),
            ]);
            let data = format!("{{{fields}}}");
            quick_chunk_agrees(data.as_bytes())?;
        }
    }

    #[test]
    fn an_unreadable_usage_chunk_is_kept_from_a_client_that_did_not_ask() {
        for usage in [r#""lots""#, "[1,2]", "{}", r#"{"prompt_tokens":"x"}"#] {
            let mut mapper = ChunkMapper::stripping_usage();
            let content = r#"data: {"choices":[{"delta":{"content":"hi"}}]}"#;
            assert_eq!(
                mapper.map(SseEvent::new(Bytes::from(content))).kind,
                EventKind::Content
            );
            let event = format!(r#"data: {{"choices":[],"usage":{usage}}}"#);
            let mapped = mapper.map(SseEvent::new(Bytes::from(event)));
            assert_eq!(
                (mapped.kind, mapped.usage),
                (EventKind::Usage, None),
                "{usage}"
            );
            assert!(matches!(mapped.out, Output::Nothing), "{usage}");
        }
    }

    #[test]
    fn an_unreadable_usage_costs_the_usage_not_the_answer() {
        let body = br#"{"model":"m","choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":"many"}}"#;
        let mapped = map_response(&Bytes::from_static(body));
        assert!(mapped.failure.is_none(), "{:?}", mapped.failure);
        assert_eq!((mapped.usage, mapped.model.as_deref()), (None, Some("m")));
        assert_eq!(mapped.answer_bytes, r#"{"content":"hi"}"#.len());
        let mut mapper = ChunkMapper::default();
        let event = r#"data: {"model":"m","choices":[{"delta":{"content":"hi"}}],"usage":{"prompt_tokens":-1}}"#;
        let mapped = mapper.map(SseEvent::new(Bytes::from(event)));
        assert_eq!((mapped.kind, mapped.usage), (EventKind::Content, None));
        assert_eq!(mapper.served_model(), Some("m"));
    }

    #[test]
    fn a_success_status_over_a_body_that_is_no_answer_fails_like_a_502() {
        for body in [&b"{not json"[..], b"<html>gateway</html>", b""] {
            let failure = map_response(&Bytes::copy_from_slice(body)).failure.unwrap();
            assert_eq!((failure.kind, failure.status), (FailureKind::Server, 502));
            assert!(
                failure.message.starts_with("unreadable answer"),
                "{failure:?}"
            );
        }
    }

    #[test]
    fn a_non_stream_answer_cut_short_is_partial_not_failed() {
        // OPENROUTER.md: provider failure after partial output, HTTP 200.
        let body = Bytes::from_static(
            br#"{"id":"gen-1","model":"m","choices":[{"message":{"role":"assistant","content":"partial output..."},"finish_reason":"error","error":{"code":502,"message":"provider went away","metadata":{"error_type":"provider_unavailable"}}}],"usage":{"prompt_tokens":3,"completion_tokens":2,"cost":0.00001}}"#,
        );
        let mapped = map_response(&body);
        assert!(mapped.failure.is_none());
        assert_eq!(mapped.partial.unwrap().message, "provider went away");
        assert_eq!(mapped.usage.unwrap().completion_tokens, 2);
        let whole = Bytes::from_static(
            br#"{"choices":[{"message":{"content":"ok"},"finish_reason":"stop","error":null}]}"#,
        );
        assert!(map_response(&whole).partial.is_none());
        // Cut short before any content: an error in a 200, not an answer.
        let empty = Bytes::from_static(
            br#"{"id":"gen-1","model":"m","choices":[{"message":{"role":"assistant","content":""},"finish_reason":"error","error":{"code":502,"message":"provider went away"}}]}"#,
        );
        let mapped = map_response(&empty);
        assert!(mapped.partial.is_none());
        let failure = mapped.failure.unwrap();
        assert_eq!((failure.kind, failure.status), (FailureKind::Server, 502));
        // The error at the top level (as in OpenRouter's error chunks), or none at all.
        let top = Bytes::from_static(
            br#"{"choices":[{"message":{"role":"assistant","content":"partial"},"finish_reason":"error"}],"error":{"code":502,"message":"provider died"}}"#,
        );
        assert_eq!(map_response(&top).partial.unwrap().message, "provider died");
        let bare = Bytes::from_static(
            br#"{"choices":[{"message":{"role":"assistant","content":"partial"},"finish_reason":"error"}]}"#,
        );
        assert_eq!(map_response(&bare).partial.unwrap().status, 502);
    }

    #[test]
    fn usage_is_requested_for_the_client_and_its_chunk_kept_from_it() {
        let body =
            JsonObject::parse(br#"{"model":"m","stream":true,"stream_options":{"x":1}}"#).unwrap();
        assert!(!asks_for_usage(&body));
        let asked = requesting_usage(&body);
        assert!(asks_for_usage(&asked));
        assert_eq!(
            asked.get("stream_options").unwrap().get(),
            r#"{"include_usage":true,"x":1}"#
        );
        let usage_chunk =
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n";
        let mut mapper = ChunkMapper::stripping_usage();
        let mapped = mapper.map(SseEvent::new(Bytes::from(usage_chunk)));
        assert_eq!(mapped.kind, EventKind::Usage);
        assert_eq!(mapped.usage.unwrap().completion_tokens, 2);
        assert!(matches!(mapped.out, Output::Nothing));
        let mapped = ChunkMapper::default().map(SseEvent::new(Bytes::from(usage_chunk)));
        assert!(matches!(mapped.out, Output::One(_)));
    }

    #[test]
    fn openrouter_stream_is_classified() {
        let kinds = map_all(&[
            ": OPENROUTER PROCESSING\n\n",
            "data: {\"id\":\"gen-1\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"gen-1\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"gen-1\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"id\":\"gen-1\",\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"cost\":0.000837}}\n\n",
            "data: [DONE]\n\n",
        ]);
        assert_eq!(
            kinds,
            vec![
                EventKind::KeepAlive,
                EventKind::Preamble,
                EventKind::Content,
                EventKind::Content,
                EventKind::Usage,
                EventKind::Done
            ]
        );
    }

    #[test]
    fn usage_and_model_are_extracted() {
        let mut mapper = ChunkMapper::default();
        let ev = mapper.map(SseEvent::new(Bytes::from_static(
            b"data: {\"model\":\"openai/gpt-5-mini-2025-08-07\",\"choices\":[],\"usage\":{\"prompt_tokens\":254,\"completion_tokens\":5,\"cost\":0.000837}}\n\n",
        )));
        let usage = ev.usage.unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (254, 5));
        assert_eq!(usage.cost_nanos, Some(837_000));
        assert_eq!(mapper.served_model(), Some("openai/gpt-5-mini-2025-08-07"));
        assert!(matches!(ev.out, Output::One(_)));
    }

    #[test]
    fn midstream_errors_are_failures_even_with_choices() {
        let kinds = map_all(&[
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
            "data: {\"id\":\"gen-1\",\"error\":{\"code\":400,\"message\":\"Token limit reached\"},\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":{\"prompt_tokens\":43,\"completion_tokens\":10,\"cost\":0}}\n\n",
        ]);
        assert!(matches!(&kinds[1], EventKind::Failed(f) if f.status == 400));
    }

    #[test]
    fn openai_null_usage_on_every_chunk_is_not_usage() {
        let kinds = map_all(&[
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n",
        ]);
        assert_eq!(
            kinds,
            vec![EventKind::Content, EventKind::Content, EventKind::Usage]
        );
    }

    #[test]
    fn tool_calls_and_reasoning_count_as_content() {
        let kinds = map_all(&[
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"f\"}}]}}]}\n\n",
        ]);
        assert_eq!(kinds, vec![EventKind::Content]);
        let kinds = map_all(&["data: {\"choices\":[{\"delta\":{\"reasoning\":\"hmm\"}}]}\n\n"]);
        assert_eq!(kinds, vec![EventKind::Content]);
    }

    #[test]
    fn malformed_data_is_unknown() {
        assert_eq!(map_all(&["data: {not json\n\n"]), vec![EventKind::Unknown]);
    }

    #[test]
    fn responses_reveal_usage_model_and_hidden_errors() {
        let ok = map_response(&Bytes::from_static(
            br#"{"id":"gen-1","model":"m-served","choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":1,"completion_tokens":2,"cost":1.5e-06}}"#,
        ));
        assert_eq!(ok.model.as_deref(), Some("m-served"));
        assert_eq!(ok.usage.unwrap().cost_nanos, Some(1500));
        assert!(ok.failure.is_none());
        let hidden = map_response(&Bytes::from_static(
            br#"{"error":{"code":502,"message":"Provider returned error"},"user_id":"u"}"#,
        ));
        assert_eq!(hidden.failure.unwrap().status, 502);
    }

    #[test]
    fn model_lists_read_prices_exactly() {
        let models = map_models(
            br#"{"data":[{"id":"openai/gpt-4","pricing":{"prompt":"0.00003","completion":"0.00006","request":"0"}},{"id":"plain"}]}"#,
        )
        .unwrap();
        assert_eq!(models[0].price.unwrap().prompt_per_mtok, 30_000_000_000);
        assert_eq!(models[0].price.unwrap().completion_per_mtok, 60_000_000_000);
        assert_eq!(models[1].price, None);
        assert_eq!(per_token_to_per_mtok("\"0.000000075\""), Some(75_000_000));
        // OpenRouter's "-1" (a router priced by the model it picks) is no price at all.
        let models = map_models(
            br#"{"data":[{"id":"openrouter/auto","pricing":{"prompt":"-1","completion":"-1"}},{"id":"r","pricing":{"prompt":"0.000001","completion":"0.000002","request":"-1"}},{"id":"c","pricing":{"prompt":"0.000001","completion":"0.000002","input_cache_read":"-1","input_cache_write":"0.00000125","input_cache_write_1h":"0.000002"}}]}"#,
        )
        .unwrap();
        assert_eq!(models[0].price, None);
        assert_eq!(models[1].price, None);
        let cached = models[2].price.unwrap();
        assert_eq!(
            (
                cached.prompt_per_mtok,
                cached.cached_prompt_per_mtok,
                cached.cache_write_prompt_per_mtok,
                cached.cache_write_1h_prompt_per_mtok
            ),
            (
                1_000_000_000,
                None,
                Some(1_250_000_000),
                Some(2_000_000_000)
            )
        );
        assert_eq!(per_token_to_per_mtok("7.5e-8"), Some(75_000_000));
    }

    #[test]
    fn urls_join_cleanly() {
        assert_eq!(
            join_url("http://h/api/v1/", "/chat/completions"),
            "http://h/api/v1/chat/completions"
        );
        assert_eq!(join_url("http://h/v1", "models"), "http://h/v1/models");
        assert_eq!(
            join_url(
                "http://h/openai/v1/?api-version=2024-10-21",
                "chat/completions"
            ),
            "http://h/openai/v1/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            join_url("http://h/?k=1#frag", "v1/models?limit=1000"),
            "http://h/v1/models?limit=1000&k=1"
        );
    }
}
