//! End-to-end tests of the fakes over real sockets, with a raw HTTP/1.1 client so chunked
//! framing (and its absence) is visible.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{FAKE_API_KEY, FakeOpenAi, FakeOpenRouter, FakeOptions};

/// Upper bound for any single wait, so a broken fake fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(10);

enum Chunk {
    Data(Vec<u8>),
    End,
    Eof,
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body ended properly (Content-Length reached or chunked terminator seen).
    complete: bool,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// SSE events: comments keep their `:`, data events are reduced to their payload.
    fn events(&self) -> Vec<String> {
        sse_events(&self.text())
    }
}

fn sse_events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or(e).to_owned())
        .collect()
}

struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) {
        let body = body
            .map(|b| serde_json::to_vec(b).unwrap())
            .unwrap_or_default();
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\nuser-agent: testkit/1\r\n");
        if let Some(key) = key {
            req.push_str(&format!("authorization: Bearer {key}\r\n"));
        }
        if !body.is_empty() {
            req.push_str("content-type: application/json\r\n");
        }
        req.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(&body);
        self.stream.write_all(&bytes).await.unwrap();
    }

    /// Reads more bytes; false on EOF or a reset connection.
    async fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 8192];
        match tokio::time::timeout(WAIT, self.stream.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
            Err(_) => panic!("timed out waiting for the fake"),
        }
    }

    async fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8(self.buf[..pos].to_vec()).unwrap();
                self.buf.drain(..pos + 2);
                return Some(line);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn read_head(&mut self) -> Option<(u16, Vec<(String, String)>)> {
        let status_line = self.read_line().await?;
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let line = self.read_line().await?;
            if line.is_empty() {
                return Some((status, headers));
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
    }

    async fn read_exact(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    async fn read_chunk(&mut self) -> Chunk {
        let Some(line) = self.read_line().await else {
            return Chunk::Eof;
        };
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
        let Some(mut data) = self.read_exact(size + 2).await else {
            return Chunk::Eof;
        };
        if size == 0 {
            return Chunk::End;
        }
        data.truncate(size);
        Chunk::Data(data)
    }

    async fn read_response(&mut self) -> Option<Response> {
        let (status, headers) = self.read_head().await?;
        let mut resp = Response {
            status,
            headers,
            body: Vec::new(),
            complete: false,
        };
        if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().unwrap();
            if let Some(body) = self.read_exact(len).await {
                resp.body = body;
                resp.complete = true;
            }
            return Some(resp);
        }
        assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
        loop {
            match self.read_chunk().await {
                Chunk::Data(data) => resp.body.extend_from_slice(&data),
                Chunk::End => {
                    resp.complete = true;
                    return Some(resp);
                }
                Chunk::Eof => return Some(resp),
            }
        }
    }

    /// Reads chunks until `events` SSE events (comments included) have arrived.
    async fn read_events(&mut self, events: usize) -> Vec<String> {
        let mut text = String::new();
        loop {
            let got = sse_events(&text);
            if got.len() >= events && text.ends_with("\n\n") {
                return got;
            }
            match self.read_chunk().await {
                Chunk::Data(data) => text.push_str(&String::from_utf8(data).unwrap()),
                _ => panic!("stream ended early: {text}"),
            }
        }
    }
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> Response {
    let mut client = Client::connect(addr).await;
    client.send(method, path, key, body.as_ref()).await;
    client.read_response().await.expect("no response")
}

async fn chat(fake: &FakeOpenRouter, body: Value) -> Response {
    call(
        fake.addr(),
        "POST",
        "/api/v1/chat/completions",
        Some(FAKE_API_KEY),
        Some(body),
    )
    .await
}

fn user(model: &str, text: &str) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": text }] })
}

fn streamed(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body
}

/// Polls an observable condition (not a fixed sleep) until it holds or `WAIT` passes.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn chunk(event: &str) -> Value {
    serde_json::from_str(event).unwrap_or_else(|e| panic!("bad chunk ({e}): {event}"))
}

fn assert_chunk_shape(c: &Value, id: &str) {
    assert_eq!(c["id"], id);
    assert_eq!(c["object"], "chat.completion.chunk");
    assert!(c["created"].is_u64());
    assert!(c["model"].is_string());
    assert!(c["provider"].is_string());
    for choice in c["choices"].as_array().unwrap() {
        assert_eq!(choice["index"], 0);
        assert!(choice["delta"].is_object());
        assert!(choice.get("finish_reason").is_some());
        assert!(choice.get("native_finish_reason").is_some());
    }
}

#[tokio::test]
async fn non_stream_echo_has_the_real_shape_and_bills_exactly() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let body = json!({
        "model": "openai/gpt-4o",
        "messages": [
            { "role": "system", "content": "be brief" },
            { "role": "user", "content": [{ "type": "text", "text": "hello there" }] },
        ],
        "provider": { "order": ["openai"] }, "transforms": ["middle-out"], "usage": { "include": true },
        "top_k": 3, "session_id": "s1", "plugins": [], "reasoning": { "effort": "low" },
    });
    let resp = chat(&fake, body).await;
    assert_eq!(resp.status, 200);
    assert!(resp.complete);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("access-control-allow-origin"), Some("*"));
    let v = resp.json();
    let id = v["id"].as_str().unwrap();
    assert_eq!(resp.header("x-generation-id"), Some(id));
    let parts: Vec<&str> = id.splitn(3, '-').collect();
    assert_eq!(parts[0], "gen");
    assert_eq!(parts[1], v["created"].to_string());
    assert_eq!(parts[2].len(), 20);
    assert_eq!(v["provider"], "OpenAI");
    assert_eq!(v["model"], "openai/gpt-4o");
    assert_eq!(v["object"], "chat.completion");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["native_finish_reason"], "stop");
    assert!(choice["logprobs"].is_null());
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "echo: hello there");
    assert!(choice["message"]["refusal"].is_null());
    assert!(choice["message"]["reasoning"].is_null());
    // (8 + 11 chars) / 4 -> 5, + 3 per message -> 11; answer has 3 words.
    let usage = &v["usage"];
    assert_eq!(usage["prompt_tokens"], 11);
    assert_eq!(usage["completion_tokens"], 3);
    assert_eq!(usage["total_tokens"], 14);
    assert_eq!(usage["is_byok"], false);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 0);
    // 11 * $2.5/M + 3 * $10/M = $0.0000575
    assert!(resp.text().contains("\"cost\":5.75e-05"), "{}", resp.text());
    let billing = fake.billing();
    assert_eq!(billing.len(), 1);
    assert_eq!(billing[0].id, id);
    assert_eq!(billing[0].cost, "5.75e-05");
    assert_eq!(
        (billing[0].prompt_tokens, billing[0].completion_tokens),
        (11, 3)
    );

    let gen_path = format!("/api/v1/generation?id={id}");
    let generation = call(fake.addr(), "GET", &gen_path, Some(FAKE_API_KEY), None).await;
    assert_eq!(generation.status, 200);
    let data = &generation.json()["data"];
    assert_eq!(data["id"], id);
    assert_eq!(data["tokens_prompt"], 11);
    assert_eq!(data["user_agent"], "testkit/1");

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/api/v1/chat/completions");
    assert_eq!(
        reqs[0].header("Authorization"),
        Some(format!("Bearer {FAKE_API_KEY}").as_str())
    );
    assert_eq!(reqs[0].json()["top_k"], 3);
    assert!(!reqs[0].disconnected);
    assert_eq!(reqs[1].path, gen_path);
}

#[tokio::test]
async fn stream_events_come_in_the_real_order() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let resp = chat(&fake, streamed(user("fake/echo", "a  b c"))).await;
    assert_eq!(resp.status, 200);
    assert!(resp.complete, "stream must end with the chunked terminator");
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    assert_eq!(resp.header("cache-control"), Some("no-cache"));
    let events = resp.events();
    assert_eq!(
        &events[..2],
        [": OPENROUTER PROCESSING", ": OPENROUTER PROCESSING"]
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[2..events.len() - 1]
        .iter()
        .map(|e| chunk(e))
        .collect();
    let id = chunks[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(resp.header("x-generation-id"), Some(id.as_str()));
    for c in &chunks {
        assert_chunk_shape(c, &id);
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({ "role": "assistant", "content": "" })
    );
    let content = &chunks[1..chunks.len() - 2];
    assert_eq!(content.len(), 4);
    let text: String = content
        .iter()
        .map(|c| {
            assert_eq!(c["choices"][0]["delta"]["role"], "assistant");
            assert!(c["choices"][0]["finish_reason"].is_null());
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(text, "echo: a  b c");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["native_finish_reason"], "stop");
    assert_eq!(
        finish["choices"][0]["delta"],
        json!({ "role": "assistant", "content": "" })
    );
    assert!(finish.get("usage").is_none());
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    let billing = fake.billing();
    assert_eq!(billing.len(), 1);
    // The billing text is what went on the wire, byte for byte.
    let wire_cost = format!("\"cost\":{},", billing[0].cost);
    assert!(events[events.len() - 2].contains(&wire_cost), "{wire_cost}");
}

#[tokio::test]
async fn auth_failures_and_public_routes() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let addr = fake.addr();
    let body = user("openai/gpt-4o", "hi");
    let missing = call(
        addr,
        "POST",
        "/api/v1/chat/completions",
        None,
        Some(body.clone()),
    )
    .await;
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.json(),
        json!({ "error": { "message": "No auth credentials found", "code": 401 } })
    );
    let wrong = call(
        addr,
        "POST",
        "/api/v1/chat/completions",
        Some("sk-or-v1-nope"),
        Some(body),
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(
        wrong.json(),
        json!({ "error": { "message": "User not found.", "code": 401 } })
    );
    let key = call(addr, "GET", "/api/v1/key", None, None).await;
    assert_eq!(key.status, 401);

    let models = call(addr, "GET", "/api/v1/models", None, None).await;
    assert_eq!(models.status, 200);
    let models = models.json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for id in [
        "openai/gpt-4o",
        "anthropic/claude-3-5-sonnet",
        "fake/fast",
        "meta-llama/llama-3.3-70b-instruct:free",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    let gpt = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "openai/gpt-4o")
        .unwrap();
    assert_eq!(gpt["pricing"]["prompt"], "0.0000025");
    assert_eq!(gpt["pricing"]["completion"], "0.00001");

    for path in ["/api/v1/key", "/api/v1/auth/key"] {
        let resp = call(addr, "GET", path, Some(FAKE_API_KEY), None).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.json()["data"]["is_free_tier"], false);
    }
    let model = call(
        addr,
        "GET",
        "/api/v1/model/openai/gpt-4o:free",
        Some(FAKE_API_KEY),
        None,
    )
    .await;
    assert_eq!(model.json()["data"]["id"], "openai/gpt-4o");
    let credits = call(addr, "GET", "/api/v1/credits", Some(FAKE_API_KEY), None).await;
    assert_eq!(credits.status, 403);
    assert_eq!(
        credits.json()["error"]["message"],
        "Only management keys can perform this operation"
    );
    let unknown = call(addr, "GET", "/api/v1/nope", Some(FAKE_API_KEY), None).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], 404);
}

#[tokio::test]
async fn rate_limit_429_mirrors_headers_in_metadata() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let resp = chat(&fake, user("fake/status-429-retry-7", "hi")).await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.header("retry-after"), Some("7"));
    assert_eq!(resp.header("x-ratelimit-limit"), Some("50"));
    assert_eq!(resp.header("x-ratelimit-remaining"), Some("0"));
    let reset: u64 = resp.header("x-ratelimit-reset").unwrap().parse().unwrap();
    assert!(
        reset > 1_700_000_000_000,
        "reset must be epoch milliseconds"
    );
    let v = resp.json();
    assert_eq!(v["error"]["code"], 429);
    let mirrored = &v["error"]["metadata"]["headers"];
    assert_eq!(mirrored["X-RateLimit-Limit"], "50");
    assert_eq!(mirrored["X-RateLimit-Reset"], reset.to_string());
    assert!(v["user_id"].as_str().unwrap().starts_with("user_"));

    let default = chat(&fake, user("fake/status-429", "hi")).await;
    assert_eq!(default.header("retry-after"), Some("1"));
    let none = chat(&fake, user("fake/status-429-noretry", "hi")).await;
    assert_eq!(none.status, 429);
    assert_eq!(none.header("retry-after"), None);
    assert!(fake.billing().is_empty());
}

#[tokio::test]
async fn error_scenarios_use_openrouter_bodies() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let r402 = chat(
        &fake,
        json!({ "model": "fake/status-402", "max_tokens": 1000, "messages": [] }),
    )
    .await;
    assert_eq!(r402.status, 402);
    let v = r402.json();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("You requested up to 1000 tokens")
    );
    assert!(v["error"]["metadata"]["provider_name"].is_null());
    assert!(v["user_id"].is_string());
    let r404 = chat(&fake, user("fake/status-404", "x")).await;
    assert_eq!(
        r404.json()["error"]["message"],
        "No endpoints found for fake/status-404."
    );
    let r502 = chat(&fake, user("fake/status-502", "x")).await;
    let v = r502.json();
    assert_eq!(v["error"]["message"], "Provider returned error");
    assert!(v["error"]["metadata"]["raw"].is_string());
    assert!(v["error"]["metadata"]["provider_name"].is_string());
    let r503 = chat(&fake, user("fake/status-503", "x")).await;
    assert_eq!(r503.status, 503);
    let ctx = chat(&fake, user("fake/context-length", "x")).await;
    assert_eq!(ctx.status, 400);
    assert_eq!(
        ctx.json()["error"]["metadata"]["error_type"],
        "context_length_exceeded"
    );
    let policy = chat(&fake, user("fake/content-policy", "x")).await;
    assert_eq!(
        policy.json()["error"]["metadata"]["error_type"],
        "content_policy_violation"
    );
    for model in ["fake/bad-model", "fake/whatever"] {
        let bad = chat(&fake, user(model, "x")).await;
        assert_eq!(bad.status, 400);
        assert_eq!(
            bad.json()["error"]["message"],
            format!("{model} is not a valid model ID")
        );
    }
    let ok200 = chat(&fake, user("fake/200-error", "x")).await;
    assert_eq!(ok200.status, 200);
    assert_eq!(ok200.json()["error"]["code"], 502);
    assert!(ok200.json().get("choices").is_none());
}

#[tokio::test]
async fn fail_first_then_success_and_models_fallback() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let statuses = [
        chat(&fake, user("fake/fail-first-2", "x")).await.status,
        chat(&fake, user("fake/fail-first-2", "x")).await.status,
        chat(&fake, user("fake/fail-first-2", "x")).await.status,
    ];
    assert_eq!(statuses, [503, 503, 200]);

    let mut body = user("fake/status-502", "x");
    body["models"] = json!(["fake/status-502", "openai/gpt-4o-mini"]);
    let resp = chat(&fake, body).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["model"], "openai/gpt-4o-mini");
    assert_eq!(fake.billing().last().unwrap().model, "openai/gpt-4o-mini");

    let mut body = user("fake/status-402", "x");
    body["models"] = json!(["openai/gpt-4o-mini"]);
    assert_eq!(
        chat(&fake, body).await.status,
        402,
        "credit errors do not fall back"
    );
}

#[tokio::test]
async fn midstream_error_matches_the_real_capture() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let resp = chat(
        &fake,
        streamed(user("fake/midstream-error", "one two three four")),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert!(resp.complete);
    let events = resp.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let data: Vec<Value> = events
        .iter()
        .filter(|e| !e.starts_with(':') && *e != "[DONE]")
        .map(|e| chunk(e))
        .collect();
    // preamble + 3 content events + error chunk
    assert_eq!(data.len(), 5);
    let err = &data[4];
    assert_eq!(err["error"]["code"], 502);
    assert!(err["error"]["message"].is_string());
    assert!(err["choices"][0]["finish_reason"].is_null());
    assert_eq!(err["usage"]["completion_tokens"], 3);
    assert_eq!(err["usage"]["cost"], 0);
    assert_eq!(fake.billing()[0].cost, "0");

    let whole = chat(&fake, user("fake/midstream-error-after-2", "x")).await;
    let v = whole.json();
    assert_eq!(v["choices"][0]["finish_reason"], "error");
    assert_eq!(v["choices"][0]["error"]["code"], 502);
    assert_eq!(v["choices"][0]["message"]["content"], "echo: x");
}

#[tokio::test]
async fn cut_after_leaves_the_chunked_body_unterminated() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let resp = chat(&fake, streamed(user("fake/cut-after-2", "a b c d"))).await;
    assert_eq!(resp.status, 200);
    assert!(
        !resp.complete,
        "a cut stream must not end with the chunked terminator"
    );
    let events = resp.events();
    assert!(!events.iter().any(|e| e == "[DONE]"));
    let data: Vec<Value> = events
        .iter()
        .filter(|e| !e.starts_with(':'))
        .map(|e| chunk(e))
        .collect();
    assert_eq!(data.len(), 3, "preamble and two content events");
    assert!(data.iter().all(|c| c.get("usage").is_none()));

    let whole = chat(&fake, user("fake/cut-after-1", "x")).await;
    assert_eq!(whole.status, 200);
    assert!(!whole.complete);
    assert!(serde_json::from_slice::<Value>(&whole.body).is_err());
    assert!(fake.billing().is_empty());
    assert!(
        fake.requests().iter().all(|r| !r.disconnected),
        "the fake's own cut is not a client disconnect"
    );
}

#[tokio::test]
async fn client_disconnects_are_recorded() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let mut client = Client::connect(fake.addr()).await;
    let body = streamed(user("fake/stall-after-2", "x"));
    client
        .send(
            "POST",
            "/api/v1/chat/completions",
            Some(FAKE_API_KEY),
            Some(&body),
        )
        .await;
    client.read_head().await.unwrap();
    // 2 keep-alives + preamble + 2 content events, then the fake goes silent.
    let events = client.read_events(5).await;
    assert_eq!(chunk(&events[4])["choices"][0]["delta"]["content"], " x");
    assert!(!fake.requests()[0].disconnected);
    drop(client);
    wait_until("stall disconnect recorded", || {
        fake.requests()[0].disconnected
    })
    .await;

    let mut client = Client::connect(fake.addr()).await;
    client
        .send(
            "POST",
            "/api/v1/chat/completions",
            Some(FAKE_API_KEY),
            Some(&user("fake/hang", "x")),
        )
        .await;
    wait_until("hang request recorded", || fake.requests().len() == 2).await;
    drop(client);
    wait_until("hang disconnect recorded", || {
        fake.requests()[1].disconnected
    })
    .await;
    assert!(fake.billing().is_empty());

    // Hanging up right after [DONE] is a complete response, not a disconnect; the flag is
    // already final once [DONE] can be read.
    let mut client = Client::connect(fake.addr()).await;
    let body = streamed(user("fake/echo", "x"));
    client
        .send(
            "POST",
            "/api/v1/chat/completions",
            Some(FAKE_API_KEY),
            Some(&body),
        )
        .await;
    client.read_head().await.unwrap();
    let events = client.read_events(8).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    drop(client);
    assert!(!fake.requests()[2].disconnected);
}

#[tokio::test]
async fn keep_alive_reuses_one_connection() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let mut client = Client::connect(fake.addr()).await;
    for text in ["one", "two", "three"] {
        client
            .send(
                "POST",
                "/api/v1/chat/completions",
                Some(FAKE_API_KEY),
                Some(&streamed(user("fake/echo", text))),
            )
            .await;
        let resp = client.read_response().await.unwrap();
        assert!(resp.complete);
        assert!(resp.text().contains(&format!("\" {text}\"")));
    }
    assert_eq!(fake.connections(), 1);
    assert_eq!(fake.requests().len(), 3);
}

#[tokio::test]
async fn reset_closes_without_a_response() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let mut client = Client::connect(fake.addr()).await;
    client
        .send(
            "POST",
            "/api/v1/chat/completions",
            Some(FAKE_API_KEY),
            Some(&user("fake/reset", "x")),
        )
        .await;
    assert!(client.read_head().await.is_none());
}

#[tokio::test]
async fn stream_anomalies() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let no_done = chat(&fake, streamed(user("fake/no-done", "x"))).await;
    assert!(no_done.complete);
    let events = no_done.events();
    assert!(chunk(events.last().unwrap())["usage"].is_object());
    assert!(!events.iter().any(|e| e == "[DONE]"));

    let variant = chat(&fake, streamed(user("fake/usage-variant", "x"))).await;
    let events = variant.events();
    let usage = chunk(&events[events.len() - 2]);
    assert_eq!(
        usage["choices"][0]["delta"],
        json!({ "role": "assistant", "content": "" })
    );
    assert!(usage["choices"][0]["finish_reason"].is_null());
    assert!(usage["usage"]["cost"].is_number());

    let billed = fake.billing().len();
    let mut asked = streamed(user("fake/no-usage", "x y"));
    asked["stream_options"] = json!({ "include_usage": true });
    let no_usage = chat(&fake, asked).await;
    assert!(no_usage.complete);
    let events = no_usage.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(
        chunk(&events[events.len() - 2])["choices"][0]["finish_reason"],
        "stop"
    );
    assert!(
        events.iter().all(|e| !e.contains("\"usage\"")),
        "{events:?}"
    );
    let plain = chat(&fake, user("fake/no-usage", "x y")).await;
    let body = plain.json();
    assert_eq!(body["choices"][0]["message"]["content"], "echo: x y");
    assert!(body.get("usage").is_none(), "{body}");
    assert_eq!(
        fake.billing().len(),
        billed,
        "nothing reported, nothing billed"
    );

    let malformed = chat(&fake, streamed(user("fake/malformed", "x y"))).await;
    let events = malformed.events();
    assert!(events.iter().any(|e| e == "{not json"));
    assert_eq!(events.last().unwrap(), "[DONE]");

    let n = chat(&fake, streamed(user("fake/events-5", "x"))).await;
    let text: String = n
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "w1 w2 w3 w4 w5");

    let keepalive = chat(&fake, streamed(user("fake/keepalive-250", "x"))).await;
    let comments = keepalive
        .events()
        .iter()
        .take_while(|e| e.starts_with(':'))
        .count();
    assert!(
        comments >= 3,
        "{comments} keep-alives in 250 ms at 100 ms intervals"
    );
}

#[tokio::test]
async fn max_tokens_truncates_with_length() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let mut body = user("fake/echo", "hello big world");
    body["max_tokens"] = json!(2);
    let v = chat(&fake, body).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hello");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn fast_path_serves_precomputed_answers_without_recording() {
    let opts = FakeOptions {
        record: false,
        ..FakeOptions::default()
    };
    let fake = FakeOpenRouter::start_with(opts).await.unwrap();
    let stream = chat(&fake, streamed(user("fake/fast", "x"))).await;
    assert!(stream.complete);
    let events = stream.events();
    assert!(
        !events[0].starts_with(':'),
        "fast streams have no keep-alives"
    );
    // preamble + 10 words + finish + usage + [DONE]
    assert_eq!(events.len(), 14);
    let whole = chat(&fake, user("fake/fast", "x")).await.json();
    assert_eq!(
        whole["choices"][0]["message"]["content"],
        "The quick brown fox jumps over the lazy dog, twice."
    );
    assert!(fake.requests().is_empty());
    assert!(fake.billing().is_empty());
}

#[tokio::test]
async fn other_endpoints() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let addr = fake.addr();
    let legacy = call(
        addr,
        "POST",
        "/api/v1/completions",
        Some(FAKE_API_KEY),
        Some(json!({ "model": "openai/gpt-4o", "prompt": "hi" })),
    )
    .await;
    let v = legacy.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "echo: hi");
    let emb = call(
        addr,
        "POST",
        "/api/v1/embeddings",
        Some(FAKE_API_KEY),
        Some(json!({ "input": ["a", "b"] })),
    )
    .await;
    let v = emb.json();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert!(v["usage"]["cost"].is_number());
    assert_eq!(fake.billing().len(), 2);
}

#[tokio::test]
async fn openai_dialect() {
    let fake = FakeOpenAi::start().await.unwrap();
    assert!(fake.base_url().ends_with("/v1"));
    let addr = fake.addr();
    let models = call(addr, "GET", "/v1/models", None, None).await.json();
    assert_eq!(models["object"], "list");
    assert!(models["data"][0]["owned_by"].is_string());

    let mut body = streamed(user("gpt-4o", "hi"));
    body["stream_options"] = json!({ "include_usage": true });
    let resp = call(addr, "POST", "/v1/chat/completions", None, Some(body)).await;
    assert!(resp.complete);
    let events = resp.events();
    assert!(!events[0].starts_with(':'));
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| chunk(e))
        .collect();
    assert!(chunks[0]["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(chunks.iter().all(|c| c.get("provider").is_none()));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"].get("cost").is_none());
    assert_eq!(fake.billing()[0].cost, "");

    let plain = call(
        addr,
        "POST",
        "/v1/chat/completions",
        None,
        Some(streamed(user("gpt-4o", "hi"))),
    )
    .await;
    assert!(plain.events().iter().all(|e| !e.contains("\"usage\"")));
    let bad = call(
        addr,
        "POST",
        "/v1/chat/completions",
        None,
        Some(user("fake/status-429", "hi")),
    )
    .await;
    assert_eq!(bad.status, 429);
    assert_eq!(bad.json()["error"]["code"], "rate_limit_exceeded");

    let keyed = FakeOpenAi::start_with(FakeOptions {
        api_keys: vec!["sk-test".into()],
        ..FakeOpenAi::default_options()
    })
    .await
    .unwrap();
    let denied = call(
        keyed.addr(),
        "POST",
        "/v1/chat/completions",
        Some("sk-wrong"),
        Some(user("gpt-4o", "hi")),
    )
    .await;
    assert_eq!(denied.status, 401);
    assert_eq!(denied.json()["error"]["code"], "invalid_api_key");
}

#[tokio::test]
async fn dropping_the_fake_closes_open_streams() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let mut client = Client::connect(fake.addr()).await;
    client
        .send(
            "POST",
            "/api/v1/chat/completions",
            Some(FAKE_API_KEY),
            Some(&streamed(user("fake/stall-after-1", "x"))),
        )
        .await;
    client.read_head().await.unwrap();
    client.read_events(4).await;
    drop(fake);
    assert!(matches!(client.read_chunk().await, Chunk::Eof));
}

// --- Tool calls and reasoning ---------------------------------------------------------

/// The JSON data events of a stream, without keep-alive comments and `[DONE]`.
fn data_chunks(resp: &Response) -> Vec<Value> {
    resp.events()
        .iter()
        .filter(|e| !e.starts_with(':') && *e != "[DONE]")
        .map(|e| chunk(e))
        .collect()
}

/// `body` offering OpenAI function tools with the given names.
fn with_tools(mut body: Value, names: &[&str]) -> Value {
    body["tools"] = names
        .iter()
        .map(|name| {
            json!({
                "type": "function",
                "function": {
                    "name": name,
                    "description": "a test tool",
                    "parameters": { "type": "object", "properties": { "q": { "type": "string" } } },
                },
            })
        })
        .collect();
    body
}

/// The concatenated `delta.content` of a stream's chunks.
fn streamed_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// Usage as sent must match the billing log and `/generation`, and be priced at the rate of
/// `fake/...` models ($1/M prompt, $2/M completion). `raw` is the text that carried it.
async fn assert_billed(fake: &FakeOpenRouter, id: &str, usage: &Value, raw: &str) {
    let entry = fake
        .billing()
        .into_iter()
        .find(|b| b.id == id)
        .expect("generation is billed");
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        (entry.prompt_tokens, entry.completion_tokens),
        (prompt, completion)
    );
    assert_eq!(usage["total_tokens"], prompt + completion);
    assert!(raw.contains(&format!("\"cost\":{},", entry.cost)), "{raw}");
    let expected = (prompt + 2 * completion) as f64 / 1e6;
    assert!((usage["cost"].as_f64().unwrap() - expected).abs() < 1e-15);
    let path = format!("/api/v1/generation?id={id}");
    let generation = call(fake.addr(), "GET", &path, Some(FAKE_API_KEY), None).await;
    let data = &generation.json()["data"];
    assert_eq!(data["tokens_completion"], completion);
    assert_eq!(
        data["native_tokens_reasoning"],
        usage["completion_tokens_details"]["reasoning_tokens"]
    );
}

#[tokio::test]
async fn tool_call_non_stream_has_the_openrouter_shape() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let body = with_tools(
        json!({
            "model": "fake/echo",
            "messages": [{ "role": "user", "content": [{ "type": "text", "text": "find cats" }] }],
        }),
        &["search", "fetch"],
    );
    let resp = chat(&fake, body.clone()).await;
    assert_eq!(resp.status, 200);
    let v = resp.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["native_finish_reason"], "tool_calls");
    let message = &choice["message"];
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["content"], "");
    let calls = message["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    let id = calls[0]["id"].as_str().unwrap();
    let suffix = id.strip_prefix("call_").unwrap();
    assert!(!suffix.is_empty() && suffix.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(
        calls[0],
        json!({
            "id": id, "index": 0, "type": "function",
            "function": { "name": "search", "arguments": r#"{"q":"find cats"}"# },
        })
    );
    // 9 chars -> 3 + 3 prompt tokens; 17 argument characters -> ceil(17 / 4) = 5.
    let usage = &v["usage"];
    assert_eq!(usage["prompt_tokens"], 6);
    assert_eq!(usage["completion_tokens"], 5);
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 0);
    // 6 * $1/M + 5 * $2/M
    assert_eq!(fake.billing()[0].cost, "1.6e-05");
    assert_billed(&fake, v["id"].as_str().unwrap(), usage, &resp.text()).await;

    let mut named = body.clone();
    named["tool_choice"] = json!({ "type": "function", "function": { "name": "fetch" } });
    let v = chat(&fake, named).await.json();
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "fetch");
    assert_ne!(call["id"], id, "every call gets a fresh id");

    let mut none = body;
    none["tool_choice"] = json!("none");
    let v = chat(&fake, none).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["message"]["content"], "echo: find cats");
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
}

#[tokio::test]
async fn streamed_tool_call_pieces_reassemble() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let body = streamed(with_tools(user("fake/echo", "hello world"), &["search"]));
    let resp = chat(&fake, body).await;
    assert!(resp.complete);
    let events = resp.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = data_chunks(&resp);
    let id = chunks[0]["id"].as_str().unwrap().to_owned();
    for c in &chunks {
        assert_chunk_shape(c, &id);
    }
    // preamble, head, 3 argument pieces, finish, usage
    assert_eq!(chunks.len(), 7);
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({ "role": "assistant", "content": "" })
    );
    let head = &chunks[1]["choices"][0]["delta"];
    let call_id = head["tool_calls"][0]["id"].as_str().unwrap();
    assert!(call_id.starts_with("call_"));
    assert_eq!(
        *head,
        json!({
            "role": "assistant", "content": null,
            "tool_calls": [{
                "index": 0, "id": call_id, "type": "function",
                "function": { "name": "search", "arguments": "" },
            }],
        })
    );
    let mut arguments = String::new();
    for c in &chunks[2..5] {
        assert!(c["choices"][0]["finish_reason"].is_null());
        let delta = &c["choices"][0]["delta"];
        let piece = delta["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap();
        assert!(!piece.is_empty());
        assert_eq!(
            *delta,
            json!({
                "role": "assistant", "content": null,
                "tool_calls": [{ "index": 0, "function": { "arguments": piece } }],
            })
        );
        arguments.push_str(piece);
    }
    assert_eq!(arguments, r#"{"q":"hello world"}"#);
    let finish = &chunks[5]["choices"][0];
    assert_eq!(finish["finish_reason"], "tool_calls");
    assert_eq!(finish["native_finish_reason"], "tool_calls");
    assert_eq!(
        finish["delta"],
        json!({ "role": "assistant", "content": "" })
    );
    let usage = &chunks[6];
    assert_eq!(usage["choices"], json!([]));
    // 19 argument characters -> 5 tokens.
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_billed(&fake, &id, &usage["usage"], &events[events.len() - 2]).await;
}

#[tokio::test]
async fn two_tools_stream_interleaved_by_index() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let body = with_tools(user("fake/two-tools", "ab"), &["first", "second", "third"]);
    let whole = chat(&fake, body.clone()).await.json();
    assert_eq!(whole["choices"][0]["finish_reason"], "tool_calls");
    let calls = whole["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap();
    let summary: Vec<(u64, &str, &str)> = calls
        .iter()
        .map(|c| {
            let f = &c["function"];
            (
                c["index"].as_u64().unwrap(),
                f["name"].as_str().unwrap(),
                f["arguments"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (0, "first", r#"{"q":"ab"}"#),
            (1, "second", r#"{"q":"ab"}"#)
        ]
    );
    assert_ne!(calls[0]["id"], calls[1]["id"]);
    // 2 x 10 argument characters -> ceil(20 / 4) = 5.
    assert_eq!(whole["usage"]["completion_tokens"], 5);

    let resp = chat(&fake, streamed(body)).await;
    let chunks = data_chunks(&resp);
    let fragments: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
        .map(|calls| {
            assert_eq!(calls.as_array().unwrap().len(), 1, "one fragment per chunk");
            &calls[0]
        })
        .collect();
    let order: Vec<u64> = fragments
        .iter()
        .map(|f| f["index"].as_u64().unwrap())
        .collect();
    assert_eq!(order, [0, 1, 0, 1, 0, 1, 0, 1]);
    assert_eq!(fragments[0]["function"]["name"], "first");
    assert_eq!(fragments[1]["function"]["name"], "second");
    let mut arguments = [String::new(), String::new()];
    for f in &fragments[2..] {
        assert!(f.get("id").is_none() && f["function"].get("name").is_none());
        let index = usize::try_from(f["index"].as_u64().unwrap()).unwrap();
        arguments[index].push_str(f["function"]["arguments"].as_str().unwrap());
    }
    assert_eq!(arguments, [r#"{"q":"ab"}"#, r#"{"q":"ab"}"#]);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    let usage = &chunks[chunks.len() - 1]["usage"];
    assert_eq!(usage["completion_tokens"], 5);
    let id = chunks[0]["id"].as_str().unwrap();
    let events = resp.events();
    assert_billed(&fake, id, usage, &events[events.len() - 2]).await;

    // With a single tool there is nothing to call in parallel.
    let single = chat(&fake, with_tools(user("fake/two-tools", "ab"), &["only"])).await;
    let calls = &single.json()["choices"][0]["message"]["tool_calls"];
    assert_eq!(calls.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn tool_result_is_answered_with_text() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let mut body = with_tools(
        json!({
            "model": "fake/echo",
            "messages": [
                { "role": "user", "content": "weather in Paris?" },
                { "role": "assistant", "content": null, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": { "name": "weather", "arguments": r#"{"q":"weather in Paris?"}"# },
                }] },
                { "role": "tool", "tool_call_id": "call_1", "content": "sunny" },
            ],
        }),
        &["weather"],
    );
    let resp = chat(&fake, body.clone()).await;
    let v = resp.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["native_finish_reason"], "stop");
    assert_eq!(choice["message"]["content"], "tool said: sunny");
    assert!(choice["message"].get("tool_calls").is_none());
    // 17 + 0 + 5 chars -> 6, + 3 per message -> 15; three words.
    assert_eq!(v["usage"]["prompt_tokens"], 15);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_billed(&fake, v["id"].as_str().unwrap(), &v["usage"], &resp.text()).await;

    body["messages"][2]["content"] = json!([
        { "type": "text", "text": "sunny" },
        { "type": "text", "text": "and warm" },
    ]);
    let chunks = data_chunks(&chat(&fake, streamed(body.clone())).await);
    assert_eq!(streamed_text(&chunks), "tool said: sunny and warm");
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );

    // Only the final message counts: a new user turn gets a tool call again.
    let messages = body["messages"].as_array_mut().unwrap();
    messages.push(json!({ "role": "assistant", "content": "It is sunny." }));
    messages.push(json!({ "role": "user", "content": "and Rome?" }));
    let v = chat(&fake, body).await.json();
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["arguments"], r#"{"q":"and Rome?"}"#);
}

#[tokio::test]
async fn reasoning_non_stream_is_returned_counted_and_billed() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let mut body = user("fake/echo", "hello there");
    body["reasoning"] = json!({ "effort": "high" });
    let resp = chat(&fake, body.clone()).await;
    let v = resp.json();
    let message = &v["choices"][0]["message"];
    assert_eq!(message["content"], "echo: hello there");
    assert_eq!(message["reasoning"], "Thinking about: hello there");
    assert_eq!(
        message["reasoning_details"],
        json!([{
            "type": "reasoning.text", "text": "Thinking about: hello there",
            "format": "unknown", "index": 0,
        }])
    );
    let usage = &v["usage"];
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 4);
    // Three answer words plus four reasoning words.
    assert_eq!(usage["completion_tokens"], 7);
    // 6 * $1/M + 7 * $2/M
    assert!(resp.text().contains("\"cost\":2e-05,"), "{}", resp.text());
    assert_billed(&fake, v["id"].as_str().unwrap(), usage, &resp.text()).await;

    // `exclude`: the model still reasons and bills it, but the text stays out.
    body["reasoning"] = json!({ "effort": "high", "exclude": true });
    let v = chat(&fake, body.clone()).await.json();
    let message = &v["choices"][0]["message"];
    assert!(message["reasoning"].is_null());
    assert!(message.get("reasoning_details").is_none());
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        4
    );
    assert_eq!(v["usage"]["completion_tokens"], 7);

    for off in [
        json!({ "exclude": true }),
        json!({ "effort": "high", "enabled": false }),
    ] {
        body["reasoning"] = off;
        let v = chat(&fake, body.clone()).await.json();
        assert!(v["choices"][0]["message"]["reasoning"].is_null());
        assert_eq!(v["usage"]["completion_tokens"], 3);
    }

    // The top-level shorthand on a catalog model that reasons.
    let mut gemini = user("google/gemini-2.5-flash", "x");
    gemini["reasoning_effort"] = json!("low");
    let v = chat(&fake, gemini).await.json();
    assert_eq!(v["choices"][0]["message"]["reasoning"], "Thinking about: x");
}

#[tokio::test]
async fn reasoning_streams_before_the_answer() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let mut body = streamed(user("fake/echo", "hi"));
    body["reasoning"] = json!({ "max_tokens": 100 });
    let resp = chat(&fake, body).await;
    assert!(resp.complete);
    let chunks = data_chunks(&resp);
    let id = chunks[0]["id"].as_str().unwrap().to_owned();
    // preamble, 2 reasoning pieces, 2 content pieces, finish, usage
    assert_eq!(chunks.len(), 7);
    let mut reasoning = String::new();
    for c in &chunks[1..3] {
        assert_chunk_shape(c, &id);
        let delta = &c["choices"][0]["delta"];
        let piece = delta["reasoning"].as_str().unwrap();
        assert_eq!(
            *delta,
            json!({
                "role": "assistant", "content": "", "reasoning": piece,
                "reasoning_details": [{ "type": "reasoning.text", "text": piece, "format": "unknown", "index": 0 }],
            })
        );
        reasoning.push_str(piece);
    }
    assert_eq!(reasoning, "Thinking about: hi");
    assert!(
        chunks[3..]
            .iter()
            .all(|c| c["choices"][0]["delta"].get("reasoning").is_none())
    );
    assert_eq!(streamed_text(&chunks[3..5]), "echo: hi");
    let usage = &chunks[6]["usage"];
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 3);
    assert_eq!(usage["completion_tokens"], 2 + 3);
    let events = resp.events();
    assert_billed(&fake, &id, usage, &events[events.len() - 2]).await;

    // Reasoning comes before tool calls too.
    let mut both = streamed(with_tools(user("fake/echo", "hi"), &["search"]));
    both["reasoning_effort"] = json!("medium");
    let chunks = data_chunks(&chat(&fake, both).await);
    assert!(chunks[1]["choices"][0]["delta"]["reasoning"].is_string());
    assert!(chunks[2]["choices"][0]["delta"]["reasoning"].is_string());
    assert_eq!(
        chunks[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"],
        "search"
    );
    // `{"q":"hi"}` is 10 characters -> 3 tokens, plus 3 reasoning words.
    assert_eq!(chunks[chunks.len() - 1]["usage"]["completion_tokens"], 6);
}

#[tokio::test]
async fn openai_dialect_tool_calls_and_no_reasoning_text() {
    let fake = FakeOpenAi::start().await.unwrap();
    let mut body = with_tools(user("gpt-4o", "hi"), &["search"]);
    body["reasoning_effort"] = json!("high");
    let v = call(
        fake.addr(),
        "POST",
        "/v1/chat/completions",
        None,
        Some(body.clone()),
    )
    .await
    .json();
    let message = &v["choices"][0]["message"];
    assert!(
        message["content"].is_null(),
        "OpenAI sends null content with tool calls"
    );
    assert!(message.get("reasoning").is_none());
    let call0 = &message["tool_calls"][0];
    assert!(call0.get("index").is_none());
    assert_eq!(call0["function"]["arguments"], r#"{"q":"hi"}"#);
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );

    let resp = call(
        fake.addr(),
        "POST",
        "/v1/chat/completions",
        None,
        Some(streamed(body)),
    )
    .await;
    let chunks = data_chunks(&resp);
    let fragments: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["delta"])
        .filter(|d| d.get("tool_calls").is_some())
        .collect();
    assert_eq!(fragments.len(), 4);
    assert!(
        fragments.iter().all(|d| d.as_object().unwrap().len() == 1),
        "{fragments:?}"
    );
}
