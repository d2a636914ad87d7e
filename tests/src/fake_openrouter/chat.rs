//! `POST /chat/completions` (and the legacy `/completions`): request reading, the choice of
//! behaviour, and the JSON or SSE answer.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, Response};
use memchr::memmem;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::body::{DisconnectGuard, FakeBody, Msg};
use super::errors::{self, ErrorSpec, Quote};
use super::reasoning::{REASONING_PIECES, Reasoning, Thought, check_thinking, signs_thinking};
use super::routes::{self, check_auth, error_response};
use super::scenario::Scenario;
use super::server::{Dialect, GenerationRecord, Shared};
use super::tools::{self, ToolCall, ToolRequest, tool_tokens};
use super::wire::{
    Billed, DONE, FAKE_USER_ID, GenCtx, KEEPALIVE, Reply, provider_for, reasons, split_evenly,
    split_pieces,
};

/// Model used when a request names none (OpenRouter would use the account default).
const DEFAULT_MODEL: &str = "openai/gpt-4o";
/// Interval of the comments `fake/keepalive-MS` sends while "the provider warms up".
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(100);
/// Pause before a deliberate cut, so the events before it reach the socket first.
const ABORT_GRACE: Duration = Duration::from_millis(20);

/// The parts of a chat request the fake acts on; everything else is accepted and ignored.
#[derive(Default)]
pub(crate) struct ChatRequest {
    pub(crate) model: String,
    pub(crate) fallbacks: Vec<String>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) max_tokens: Option<u64>,
    pub(crate) last_user_text: String,
    pub(crate) prompt_chars: u64,
    pub(crate) messages: u64,
    /// Text of the final message when it is a `role: "tool"` result.
    pub(crate) tool_result: Option<String>,
    pub(crate) tools: ToolRequest,
    pub(crate) reasoning: Reasoning,
    /// The schema of `response_format: {"type": "json_schema"}`.
    pub(crate) json_schema: Option<Value>,
}

/// Text of a message `content` (user, tool or any other role): a string, or the `text` of
/// every part joined by one space; non-text parts (images, ...) contribute nothing.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str).or_else(|| p.as_str()))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn bad_request(message: &str) -> ErrorSpec {
    ErrorSpec::new(400, message).openai_code("invalid_request_error")
}

impl ChatRequest {
    pub(crate) fn parse(value: &Value) -> Result<ChatRequest, ErrorSpec> {
        let obj = value
            .as_object()
            .ok_or_else(|| bad_request("Invalid request parameters"))?;
        let fallbacks: Vec<String> = obj
            .get("models")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let model = match obj.get("model") {
            Some(Value::String(m)) => m.clone(),
            None | Some(Value::Null) => fallbacks
                .first()
                .cloned()
                .unwrap_or_else(|| DEFAULT_MODEL.to_owned()),
            Some(_) => return Err(bad_request("Invalid request parameters")),
        };
        let max_tokens = obj
            .get("max_completion_tokens")
            .and_then(Value::as_u64)
            .or_else(|| obj.get("max_tokens").and_then(Value::as_u64));
        let (mut last_user_text, mut prompt_chars, mut messages) = (String::new(), 0u64, 0u64);
        let mut tool_result = None;
        let reasoning = Reasoning::parse(obj);
        if let Some(list) = obj.get("messages") {
            let list = list
                .as_array()
                .ok_or_else(|| bad_request("Invalid request parameters"))?;
            if signs_thinking(&model) {
                check_thinking(list, reasoning != Reasoning::Off)
                    .map_err(|message| bad_request(&message))?;
            }
            for msg in list {
                let text = msg.get("content").map(content_text).unwrap_or_default();
                prompt_chars += text.chars().count() as u64;
                messages += 1;
                let role = msg.get("role").and_then(Value::as_str);
                // Only the final message decides whether this turn answers a tool result.
                tool_result = (role == Some("tool")).then(|| text.clone());
                if role == Some("user") {
                    last_user_text = text;
                }
            }
        } else if let Some(prompt) = obj.get("prompt") {
            last_user_text = content_text(prompt);
            prompt_chars = last_user_text.chars().count() as u64;
            messages = 1;
        } else {
            return Err(bad_request("Either \"messages\" or \"prompt\" is required"));
        }
        Ok(ChatRequest {
            model,
            fallbacks,
            stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
            include_usage: obj
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_tokens,
            last_user_text,
            prompt_chars,
            messages,
            tool_result,
            tools: ToolRequest::parse(obj),
            reasoning,
            json_schema: super::schema::requested(obj),
        })
    }

    /// `ceil(chars of all message texts / 4) + 3 per message`: deterministic, roughly
    /// tokenizer-shaped, and easy to recompute in a test.
    pub(crate) fn prompt_tokens(&self) -> u64 {
        self.prompt_chars.div_ceil(4) + 3 * self.messages
    }

    fn quote<'a>(&'a self, model: &'a str) -> Quote<'a> {
        Quote {
            model,
            max_tokens: self.max_tokens,
            prompt_tokens: self.prompt_tokens(),
            user_text: &self.last_user_text,
        }
    }
}

/// Who called, as `/generation` reports it.
#[derive(Clone, Default)]
pub(crate) struct ClientInfo {
    user_agent: Option<String>,
    http_referer: Option<String>,
}

impl ClientInfo {
    pub(crate) fn from_headers(headers: &HeaderMap) -> ClientInfo {
        let get = |name: &str| {
            headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        ClientInfo {
            user_agent: get("user-agent"),
            http_referer: get("http-referer"),
        }
    }
}

fn record(
    ctx: &GenCtx,
    billed: &Billed,
    api_type: &'static str,
    streamed: bool,
    finish_reason: &str,
    client: &ClientInfo,
) -> GenerationRecord {
    GenerationRecord {
        id: ctx.id.clone(),
        model: ctx.model.clone(),
        provider: ctx.provider.clone().unwrap_or_default(),
        created: ctx.created,
        api_type,
        streamed,
        prompt_tokens: billed.usage.prompt_tokens,
        completion_tokens: billed.usage.completion_tokens,
        reasoning_tokens: billed.usage.completion_tokens_details.reasoning_tokens,
        cost_text: billed.cost_text.clone(),
        cost_pico: billed.cost_pico,
        finish_reason: Some(finish_reason.to_owned()),
        user_agent: client.user_agent.clone(),
        http_referer: client.http_referer.clone(),
    }
}

/// The `fake/fast` answers, built once per server so a benchmark request costs almost nothing.
pub(crate) struct FastResponses {
    id: String,
    json: Bytes,
    events: Arc<[Bytes]>,
    json_record: GenerationRecord,
    stream_record: Option<GenerationRecord>,
}

/// Ten words, so a streamed `fake/fast` answer has ten content events.
const FAST_ANSWER: &str = "The quick brown fox jumps over the lazy dog, twice.";
const FAST_PROMPT_TOKENS: u64 = 16;

impl FastResponses {
    pub(crate) fn new(dialect: Dialect) -> FastResponses {
        let created = 1_700_000_000;
        let id = match dialect {
            Dialect::OpenRouter => format!("gen-{created}-FastFastFastFastFast"),
            Dialect::OpenAi => "chatcmpl-FastFastFastFastFastFastFastF".to_owned(),
        };
        let ctx = GenCtx {
            dialect,
            id,
            created,
            model: "fake/fast".to_owned(),
            provider: (dialect == Dialect::OpenRouter).then(|| provider_for("fake/fast")),
            pricing: super::wire::pricing_for("fake/fast"),
        };
        let pieces = split_pieces(FAST_ANSWER);
        let billed = ctx.bill(FAST_PROMPT_TOKENS, pieces.len() as u64, true);
        let json = ctx.completion(
            &Reply::text(FAST_ANSWER),
            "stop",
            Some("stop"),
            None,
            Some(&billed.usage),
        );
        let mut events = Vec::with_capacity(pieces.len() + 4);
        events.push(ctx.preamble());
        events.extend(pieces.iter().map(|p| ctx.content(p)));
        events.push(ctx.finish("stop"));
        // OpenAI only sends usage on request; the fast path does not parse the request, so
        // its OpenAI stream never has a usage chunk.
        let with_usage = dialect == Dialect::OpenRouter;
        if with_usage {
            events.push(ctx.usage_chunk(&billed.usage, false));
        }
        events.push(Bytes::from_static(DONE));
        let client = ClientInfo::default();
        FastResponses {
            json,
            events: events.into(),
            json_record: record(&ctx, &billed, "completions", false, "stop", &client),
            stream_record: with_usage
                .then(|| record(&ctx, &billed, "completions", true, "stop", &client)),
            id: ctx.id,
        }
    }
}

fn serve_fast(shared: &Shared, stream: bool, guard: DisconnectGuard) -> Response<FakeBody> {
    let fast = &shared.fast;
    if shared.opts.record {
        let rec = if stream {
            fast.stream_record.clone()
        } else {
            Some(fast.json_record.clone())
        };
        if let Some(rec) = rec {
            shared.record_generation(rec);
        }
    }
    if stream {
        routes::sse_response(
            shared.dialect,
            FakeBody::frames(Arc::clone(&fast.events), guard),
            &fast.id,
        )
    } else {
        routes::json_response(
            shared.dialect,
            200,
            FakeBody::full(fast.json.clone(), guard),
            &[("x-generation-id", fast.id.clone())],
        )
    }
}

/// Finds `"key"` followed by a colon and returns what follows the colon, whitespace skipped.
fn value_after_key<'a>(body: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let trim = |s: &'a [u8]| {
        let skip = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
        &s[skip..]
    };
    let mut from = 0;
    while let Some(pos) = memmem::find(&body[from..], key) {
        let after = trim(&body[from + pos + key.len()..]);
        if let Some(rest) = after.strip_prefix(b":") {
            return Some(trim(rest));
        }
        from += pos + key.len();
    }
    None
}

/// Cheap check for `"model": "fake/fast"` that avoids parsing the JSON; returns `stream`.
/// A key inside a JSON string is always escaped (`\"model\"`), so it cannot match.
fn fast_scan(body: &[u8]) -> Option<bool> {
    let model = value_after_key(body, b"\"model\"")?;
    if !model.starts_with(b"\"fake/fast\"") {
        return None;
    }
    Some(value_after_key(body, b"\"stream\"").is_some_and(|v| v.starts_with(b"true")))
}

/// The error a model answers with before producing output, if its behaviour is one of those.
pub(crate) fn upfront_error(
    shared: &Shared,
    scenario: &Scenario,
    q: &Quote<'_>,
) -> Option<ErrorSpec> {
    match scenario {
        Scenario::Status { code, retry_after } => {
            Some(errors::status_error(*code, *retry_after, q))
        }
        Scenario::ContextLength => Some(errors::context_length(q)),
        Scenario::ContentPolicy => Some(errors::content_policy(q)),
        Scenario::BadModel | Scenario::Unknown => Some(errors::invalid_model(q.model)),
        Scenario::FailFirst(n) => (shared.next_attempt(q.model) <= *n).then(errors::unavailable),
        _ => None,
    }
}

/// Walks `model` then the `models` fallbacks and returns the first one that does not fail
/// upfront, as OpenRouter does; the served `model` in the answer is the one chosen.
fn select_model(shared: &Shared, req: &ChatRequest) -> Result<(String, Scenario), ErrorSpec> {
    let mut candidates: Vec<&str> = vec![req.model.as_str()];
    for m in &req.fallbacks {
        if !candidates.contains(&m.as_str()) {
            candidates.push(m);
        }
    }
    let last = candidates.len() - 1;
    for (i, model) in candidates.iter().enumerate() {
        let scenario = Scenario::parse(model);
        match upfront_error(shared, &scenario, &req.quote(model)) {
            None => return Ok(((*model).to_owned(), scenario)),
            Some(spec) if i == last || !spec.allows_fallback() => return Err(spec),
            Some(_) => {}
        }
    }
    Err(errors::unavailable())
}

pub(crate) async fn chat_completions(
    shared: Arc<Shared>,
    parts: &Parts,
    body: Bytes,
    guard: DisconnectGuard,
) -> io::Result<Response<FakeBody>> {
    if let Err(spec) = check_auth(&shared, &parts.headers) {
        return Ok(error_response(shared.dialect, &spec, guard));
    }
    if let Some(stream) = fast_scan(&body) {
        return Ok(serve_fast(&shared, stream, guard));
    }
    let req = match serde_json::from_slice::<Value>(&body) {
        Ok(value) => ChatRequest::parse(&value),
        Err(_) => Err(bad_request("Invalid JSON in request body")),
    };
    let req = match req {
        Ok(req) => req,
        Err(spec) => return Ok(error_response(shared.dialect, &spec, guard)),
    };
    let (model, scenario) = match select_model(&shared, &req) {
        Ok(chosen) => chosen,
        Err(spec) => return Ok(error_response(shared.dialect, &spec, guard)),
    };
    let client = ClientInfo::from_headers(&parts.headers);
    serve(shared, req, model, scenario, client, guard).await
}

/// What a generation produces: content deltas or tool calls, optionally after reasoning.
struct Answer {
    /// Content deltas; empty for a tool-call answer.
    pieces: Vec<String>,
    tool_calls: Vec<ToolCall>,
    thought: Option<Thought>,
    finish: &'static str,
}

impl Answer {
    fn text(pieces: Vec<String>, finish: &'static str) -> Answer {
        Answer {
            pieces,
            tool_calls: Vec::new(),
            thought: None,
            finish,
        }
    }

    /// Tool calls come with `content: ""` and `finish_reason: "tool_calls"`; `max_tokens`
    /// does not cut them.
    fn tool_calls(calls: Vec<ToolCall>) -> Answer {
        Answer {
            tool_calls: calls,
            ..Answer::text(Vec::new(), "tool_calls")
        }
    }

    fn reasoning_tokens(&self) -> u64 {
        self.thought.as_ref().map_or(0, Thought::tokens)
    }

    /// Words of the text, plus the tool calls' tokens, plus the reasoning words (OpenRouter
    /// counts and prices reasoning as completion tokens).
    fn completion_tokens(&self) -> u64 {
        self.pieces.len() as u64 + tool_tokens(&self.tool_calls) + self.reasoning_tokens()
    }

    fn shown_reasoning(&self) -> Option<&str> {
        self.thought.as_ref().and_then(Thought::visible)
    }

    /// The non-streaming `message` of this answer with `content` as its (possibly cut) text.
    fn reply<'a>(&'a self, content: &'a str) -> Reply<'a> {
        Reply {
            content,
            reasoning: self.shown_reasoning(),
            tool_calls: &self.tool_calls,
        }
    }

    fn bill(&self, ctx: &GenCtx, prompt_tokens: u64, charge: bool) -> Billed {
        ctx.bill(prompt_tokens, self.completion_tokens(), charge)
            .with_reasoning(self.reasoning_tokens())
    }
}

fn truncate(pieces: Vec<String>, max_tokens: Option<u64>) -> Answer {
    match max_tokens {
        Some(max) if pieces.len() as u64 > max => {
            Answer::text(pieces.into_iter().take(max as usize).collect(), "length")
        }
        _ => Answer::text(pieces, "stop"),
    }
}

fn owned_pieces(text: &str) -> Vec<String> {
    split_pieces(text).into_iter().map(str::to_owned).collect()
}

fn answer_for(scenario: &Scenario, req: &ChatRequest, ctx: &GenCtx) -> Answer {
    let echo = || owned_pieces(&format!("echo: {}", req.last_user_text));
    match scenario {
        Scenario::Events(n) => {
            let words: Vec<String> = (1..=*n).map(|i| format!("w{i}")).collect();
            truncate(owned_pieces(&words.join(" ")), req.max_tokens)
        }
        Scenario::MidstreamError(n)
        | Scenario::BilledError(n)
        | Scenario::CutAfter(n)
        | Scenario::StallAfter(n) => {
            let mut pieces = echo();
            while pieces.len() < *n {
                pieces.push(format!(" w{}", pieces.len() + 1));
            }
            pieces.truncate(*n);
            Answer::text(pieces, "stop")
        }
        _ => conversation(scenario, req, ctx),
    }
}

/// The answer of every behaviour that talks back: tool calls when function tools are
/// offered, the tool's result echoed when one came back, the user's text otherwise, with
/// reasoning before any of them when asked for.
fn conversation(scenario: &Scenario, req: &ChatRequest, ctx: &GenCtx) -> Answer {
    let text = |text: String| truncate(owned_pieces(&text), req.max_tokens);
    let mut answer = match &req.tool_result {
        Some(result) => text(format!("tool said: {result}")),
        None => {
            let wanted = if *scenario == Scenario::TwoTools {
                2
            } else {
                1
            };
            let calls = req.tools.calls(&req.last_user_text, wanted);
            if let (true, Some(schema)) = (calls.is_empty(), &req.json_schema) {
                text(super::schema::instance(schema, &req.last_user_text).to_string())
            } else if calls.is_empty() {
                text(format!("echo: {}", req.last_user_text))
            } else {
                Answer::tool_calls(calls)
            }
        }
    };
    // OpenAI's chat completions never return reasoning text, and OpenRouter ignores
    // `reasoning` for models that do not support it.
    if ctx.dialect == Dialect::OpenRouter && reasons(&ctx.model) {
        answer.thought = req.reasoning.thought(&req.last_user_text);
    }
    answer
}

fn midstream_error() -> Value {
    json!({ "code": 502, "message": "Provider returned error" })
}

fn error_200_body() -> Bytes {
    let body = json!({
        "error": { "code": 502, "message": "Provider returned error" },
        "user_id": FAKE_USER_ID,
    });
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

async fn serve(
    shared: Arc<Shared>,
    req: ChatRequest,
    model: String,
    scenario: Scenario,
    client: ClientInfo,
    mut guard: DisconnectGuard,
) -> io::Result<Response<FakeBody>> {
    match scenario {
        Scenario::Hang => {
            // The guard lives in this future, which hyper drops when the client leaves.
            let _guard = guard;
            let never: Infallible = std::future::pending().await;
            match never {}
        }
        Scenario::Reset => {
            guard.finish();
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "fake/reset closes the connection without a response",
            ));
        }
        Scenario::Fast => return Ok(serve_fast(&shared, req.stream, guard)),
        Scenario::FirstByte(delay) => tokio::time::sleep(delay).await,
        Scenario::Slow(delay) | Scenario::Keepalive(delay) if !req.stream => {
            tokio::time::sleep(delay).await;
        }
        _ => {}
    }
    let ctx = GenCtx::new(shared.dialect, &model);
    let answer = answer_for(&scenario, &req, &ctx);
    if req.stream && scenario != Scenario::IgnoreStream {
        return Ok(start_stream(
            shared, ctx, &req, scenario, answer, client, guard,
        ));
    }
    let dialect = shared.dialect;
    let gen_header = || match dialect {
        Dialect::OpenRouter => vec![("x-generation-id", ctx.id.clone())],
        Dialect::OpenAi => Vec::new(),
    };
    let content = answer.pieces.concat();
    let reply = answer.reply(&content);
    let prompt_tokens = req.prompt_tokens();
    let response = match scenario {
        Scenario::Error200 => {
            routes::json_response(dialect, 200, FakeBody::full(error_200_body(), guard), &[])
        }
        Scenario::Malformed => routes::json_response(
            dialect,
            200,
            FakeBody::full(Bytes::from_static(b"{not json"), guard),
            &gen_header(),
        ),
        Scenario::MidstreamError(_) | Scenario::BilledError(_) => {
            let charge = matches!(scenario, Scenario::BilledError(_));
            let billed = answer.bill(&ctx, prompt_tokens, charge);
            let error = json!({
                "code": 502,
                "message": "Provider returned error",
                "metadata": { "error_type": "provider_unavailable" },
            });
            let body = ctx.completion(&reply, "error", None, Some(&error), Some(&billed.usage));
            shared.record_generation(record(
                &ctx,
                &billed,
                "completions",
                false,
                "error",
                &client,
            ));
            routes::json_response(dialect, 200, FakeBody::full(body, guard), &gen_header())
        }
        Scenario::CutAfter(_) | Scenario::StallAfter(_) => {
            let billed = answer.bill(&ctx, prompt_tokens, true);
            let body = ctx.completion(&reply, "stop", Some("stop"), None, Some(&billed.usage));
            let half = body.slice(..body.len() / 2);
            let (tx, rx) = mpsc::channel(4);
            let stall = matches!(scenario, Scenario::StallAfter(_));
            tokio::spawn(async move {
                let em = Emitter { tx, delay: None };
                if em.send(half).await.is_some() {
                    if stall {
                        em.stall().await;
                    } else {
                        em.abort().await;
                    }
                }
            });
            routes::json_response(dialect, 200, FakeBody::channel(rx, guard), &gen_header())
        }
        // Nothing reported, so nothing on the fake's bill either.
        Scenario::NoUsage => {
            let body = ctx.completion(&reply, answer.finish, Some(answer.finish), None, None);
            routes::json_response(dialect, 200, FakeBody::full(body, guard), &gen_header())
        }
        _ => {
            let billed = answer.bill(&ctx, prompt_tokens, true);
            let body = ctx.completion(
                &reply,
                answer.finish,
                Some(answer.finish),
                None,
                Some(&billed.usage),
            );
            shared.record_generation(record(
                &ctx,
                &billed,
                "completions",
                false,
                answer.finish,
                &client,
            ));
            routes::json_response(dialect, 200, FakeBody::full(body, guard), &gen_header())
        }
    };
    Ok(response)
}

/// Sends events to the body, stopping as soon as the client is gone.
struct Emitter {
    tx: mpsc::Sender<Msg>,
    delay: Option<Duration>,
}

impl Emitter {
    async fn send(&self, bytes: Bytes) -> Option<()> {
        if let Some(delay) = self.delay {
            self.pause(delay).await?;
        }
        self.tx.send(Msg::Data(bytes)).await.ok()
    }

    /// Sends the final event of a complete response.
    async fn send_last(&self, bytes: Bytes) -> Option<()> {
        if let Some(delay) = self.delay {
            self.pause(delay).await?;
        }
        self.tx.send(Msg::Last(bytes)).await.ok()
    }

    async fn pause(&self, delay: Duration) -> Option<()> {
        tokio::select! {
            () = tokio::time::sleep(delay) => Some(()),
            () = self.tx.closed() => None,
        }
    }

    async fn abort(&self) {
        if self.pause(ABORT_GRACE).await.is_some() {
            let _ = self.tx.send(Msg::Abort).await;
        }
    }

    /// Holds the body open without sending anything until the client leaves.
    async fn stall(&self) {
        self.tx.closed().await;
    }
}

enum KeepAlives {
    Count(usize),
    For(Duration),
}

enum Tail {
    Finish {
        usage: bool,
        repeat_choice: bool,
        done: bool,
    },
    /// The in-band error chunk; `charge: false` is OpenRouter's zero-completion insurance.
    MidstreamError {
        charge: bool,
    },
    Cut,
    Stall,
    Error200,
}

struct StreamJob {
    shared: Arc<Shared>,
    ctx: GenCtx,
    keepalives: KeepAlives,
    answer: Answer,
    malformed: bool,
    tail: Tail,
    prompt_tokens: u64,
    client: ClientInfo,
}

fn start_stream(
    shared: Arc<Shared>,
    ctx: GenCtx,
    req: &ChatRequest,
    scenario: Scenario,
    answer: Answer,
    client: ClientInfo,
    guard: DisconnectGuard,
) -> Response<FakeBody> {
    let keepalives = match scenario {
        Scenario::Keepalive(d) => KeepAlives::For(d),
        _ => KeepAlives::Count(shared.opts.keepalives),
    };
    let usage = shared.dialect == Dialect::OpenRouter || req.include_usage;
    let tail = match scenario {
        Scenario::MidstreamError(_) => Tail::MidstreamError { charge: false },
        Scenario::BilledError(_) => Tail::MidstreamError { charge: true },
        Scenario::CutAfter(_) => Tail::Cut,
        Scenario::StallAfter(_) => Tail::Stall,
        Scenario::Error200 => Tail::Error200,
        _ => Tail::Finish {
            usage: usage && scenario != Scenario::NoUsage,
            repeat_choice: scenario == Scenario::UsageVariant,
            done: scenario != Scenario::NoDone,
        },
    };
    let delay = match scenario {
        Scenario::Slow(d) => Some(d),
        _ => None,
    };
    let (tx, rx) = mpsc::channel(16);
    let id = ctx.id.clone();
    let dialect = shared.dialect;
    let job = StreamJob {
        shared,
        ctx,
        keepalives,
        answer,
        malformed: scenario == Scenario::Malformed,
        tail,
        prompt_tokens: req.prompt_tokens(),
        client,
    };
    tokio::spawn(async move {
        run_stream(job, Emitter { tx, delay }).await;
    });
    routes::sse_response(dialect, FakeBody::channel(rx, guard), &id)
}

/// Every delta of an answer in stream order: reasoning pieces, then content pieces or
/// tool-call fragments.
fn delta_events<'a>(ctx: &'a GenCtx, answer: &'a Answer) -> impl Iterator<Item = Bytes> + 'a {
    let reasoning = answer
        .shown_reasoning()
        .map(|text| split_evenly(text, REASONING_PIECES))
        .unwrap_or_default()
        .into_iter()
        .map(move |piece| ctx.reasoning(piece));
    // A Claude model's block ends with its signature, in a detail of its own.
    let signed = answer
        .shown_reasoning()
        .filter(|_| signs_thinking(&ctx.model))
        .map(|text| ctx.reasoning_signature(text));
    let content = answer.pieces.iter().map(move |piece| ctx.content(piece));
    let calls = tools::stream_order(&answer.tool_calls)
        .into_iter()
        .map(move |fragment| ctx.tool_call(fragment));
    reasoning.chain(signed).chain(content).chain(calls)
}

async fn run_stream(job: StreamJob, em: Emitter) -> Option<()> {
    let keepalive = || Bytes::from_static(KEEPALIVE);
    match job.keepalives {
        KeepAlives::Count(n) => {
            for _ in 0..n {
                em.send(keepalive()).await?;
            }
        }
        KeepAlives::For(total) => {
            let deadline = Instant::now() + total;
            loop {
                em.send(keepalive()).await?;
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                em.pause((deadline - now).min(KEEPALIVE_INTERVAL)).await?;
            }
        }
    }
    let ctx = &job.ctx;
    if let Tail::Error200 = job.tail {
        let mut event = b"data: ".to_vec();
        event.extend_from_slice(&error_200_body());
        event.extend_from_slice(b"\n\n");
        em.send(Bytes::from(event)).await?;
        return em.send_last(Bytes::from_static(DONE)).await;
    }
    em.send(ctx.preamble()).await?;
    for (i, event) in delta_events(ctx, &job.answer).enumerate() {
        em.send(event).await?;
        if job.malformed && i == 0 {
            em.send(Bytes::from_static(b"data: {not json\n\n")).await?;
        }
    }
    match job.tail {
        Tail::Cut => em.abort().await,
        Tail::Stall => em.stall().await,
        Tail::Error200 => {}
        Tail::MidstreamError { charge } => {
            let billed = job.answer.bill(ctx, job.prompt_tokens, charge);
            em.send(ctx.error_chunk(&midstream_error(), &billed.usage))
                .await?;
            job.shared.record_generation(record(
                ctx,
                &billed,
                "completions",
                true,
                "error",
                &job.client,
            ));
            em.send(Bytes::from_static(DONE)).await?;
        }
        Tail::Finish {
            usage,
            repeat_choice,
            done,
        } => {
            let finish = ctx.finish(job.answer.finish);
            if !usage && !done {
                return em.send_last(finish).await;
            }
            em.send(finish).await?;
            if usage {
                let billed = job.answer.bill(ctx, job.prompt_tokens, true);
                let chunk = ctx.usage_chunk(&billed.usage, repeat_choice);
                if done {
                    em.send(chunk).await?;
                } else {
                    em.send_last(chunk).await?;
                }
                job.shared.record_generation(record(
                    ctx,
                    &billed,
                    "completions",
                    true,
                    job.answer.finish,
                    &job.client,
                ));
            }
            if done {
                em.send_last(Bytes::from_static(DONE)).await?;
            }
        }
    }
    Some(())
}

/// Legacy `POST /completions`: echo of `prompt`, non-streaming only.
pub(crate) async fn legacy_completions(
    shared: Arc<Shared>,
    parts: &Parts,
    body: Bytes,
    guard: DisconnectGuard,
) -> io::Result<Response<FakeBody>> {
    if let Err(spec) = check_auth(&shared, &parts.headers) {
        return Ok(error_response(shared.dialect, &spec, guard));
    }
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        let spec = bad_request("Invalid JSON in request body");
        return Ok(error_response(shared.dialect, &spec, guard));
    };
    let Some(prompt) = value.get("prompt") else {
        let spec = bad_request("\"prompt\" is required");
        return Ok(error_response(shared.dialect, &spec, guard));
    };
    let prompt = content_text(prompt);
    let model = value
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_MODEL)
        .to_owned();
    let req = ChatRequest {
        model: model.clone(),
        max_tokens: value.get("max_tokens").and_then(Value::as_u64),
        prompt_chars: prompt.chars().count() as u64,
        last_user_text: prompt,
        messages: 1,
        ..ChatRequest::default()
    };
    let scenario = Scenario::parse(&model);
    if let Some(spec) = upfront_error(&shared, &scenario, &req.quote(&model)) {
        return Ok(error_response(shared.dialect, &spec, guard));
    }
    let ctx = GenCtx::new(shared.dialect, &model);
    let answer = truncate(
        owned_pieces(&format!("echo: {}", req.last_user_text)),
        req.max_tokens,
    );
    let text = answer.pieces.concat();
    let billed = ctx.bill(req.prompt_tokens(), answer.pieces.len() as u64, true);
    let body = ctx.text_completion(&text, answer.finish, &billed.usage);
    let client = ClientInfo::from_headers(&parts.headers);
    shared.record_generation(record(
        &ctx,
        &billed,
        "completions",
        false,
        answer.finish,
        &client,
    ));
    Ok(routes::json_response(
        shared.dialect,
        200,
        FakeBody::full(body, guard),
        &[("x-generation-id", ctx.id.clone())],
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fast_scan_reads_model_and_stream() {
        assert_eq!(
            fast_scan(br#"{"model":"fake/fast","messages":[],"stream":true}"#),
            Some(true)
        );
        assert_eq!(
            fast_scan(br#"{ "model" : "fake/fast", "stream_options": {}}"#),
            Some(false)
        );
        assert_eq!(
            fast_scan(br#"{"messages":[{"content":"\"model\":\"fake/fast\""}],"model":"x/y"}"#),
            None
        );
        assert_eq!(fast_scan(br#"{"model":"fake/fast-not"}"#), None);
    }

    #[test]
    fn prompt_tokens_follow_the_documented_rule() {
        let value = json!({
            "model": "fake/echo",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "x"}}]},
            ],
        });
        let req = ChatRequest::parse(&value).unwrap();
        assert_eq!(req.last_user_text, "hello");
        // 8 + 5 chars -> ceil(13 / 4) = 4, plus 3 per message.
        assert_eq!(req.prompt_tokens(), 4 + 6);
    }
}
