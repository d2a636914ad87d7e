//! One request as stored.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Statement, params};
use serde::Serialize;

/// Where a row's cost comes from (SPEC §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CostSource {
    /// The upstream reported it (OpenRouter's `usage.cost`).
    Upstream,
    /// Computed from the token counts and a known price.
    Pricing,
    /// An answer whose upstream reported no usage (complete, or cut short after content): the
    /// estimated prompt and the tokens relayed, priced.
    Estimate,
    /// No cost known (no answer, or no price); its amount is always zero.
    None,
}

impl CostSource {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            CostSource::Upstream => "upstream",
            CostSource::Pricing => "pricing",
            CostSource::Estimate => "estimate",
            CostSource::None => "none",
        }
    }
}

/// One upstream attempt and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    /// `backend:model`.
    pub route: String,
    /// `ok`, or why it failed.
    pub result: String,
}

/// Everything stored about one request (columns of `requests`).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Arrival, Unix milliseconds.
    pub ts_ms: i64,
    /// orproxy's request id.
    pub request_id: String,
    /// Proxy key name.
    pub key: Option<String>,
    /// Client address (written as text by the writer, off the request path).
    pub client_ip: Option<IpAddr>,
    /// Backend that served, or was last tried.
    pub backend: Option<String>,
    /// Upstream model of that route.
    pub model: Option<String>,
    /// `model` as the client sent it.
    pub model_requested: Option<String>,
    /// Model the upstream says served.
    pub model_served: Option<String>,
    /// Status sent to the client.
    pub status: u16,
    /// `ok`, `upstream_error`, ... (SPEC §9).
    pub outcome: &'static str,
    /// The client asked for a stream.
    pub stream: bool,
    /// Input tokens (cached included).
    pub prompt_tokens: Option<u64>,
    /// Output tokens (reasoning included).
    pub completion_tokens: Option<u64>,
    /// Cached input tokens.
    pub cached_tokens: Option<u64>,
    /// Reasoning tokens.
    pub reasoning_tokens: Option<u64>,
    /// Nano-dollars.
    pub cost_nanos: i64,
    /// Where the cost comes from.
    pub cost_source: CostSource,
    /// Arrival to last byte, microseconds.
    pub latency_us: i64,
    /// Arrival to when the client could read the answer's first content (a stream's first
    /// event that is no keep-alive, else the response head), microseconds.
    pub ttfb_us: Option<i64>,
    /// Time spent waiting on upstreams, microseconds.
    pub upstream_us: Option<i64>,
    /// Every attempt, in order.
    pub attempts: Vec<Attempt>,
    /// Tags set by rules.
    pub tags: BTreeMap<String, serde_json::Value>,
    /// Rules trace.
    pub rules: Option<String>,
    /// Short reason for a failure.
    pub error: Option<String>,
    /// `(backend, model, nano-dollars)` that failed attempts' upstreams billed, part of
    /// `cost_nanos`: kept in `spend_days` under the target that billed them (not a column).
    pub billed_failures: Vec<(String, String, i64)>,
}

/// The insert every row goes through (cached per connection).
pub(crate) const INSERT: &str = "INSERT INTO requests (
    ts_ms, request_id, key, client_ip, backend, model, model_requested, model_served, status,
    outcome, stream, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens,
    cost_nanos, cost_source, latency_us, ttfb_us, upstream_us, attempts, tags, rules, error
) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
    ?20, ?21, ?22, ?23, ?24)";

/// `ip` in dotted decimal, as `Display` writes it, without the formatting machinery (which
/// took 1,300 of the writer's 17,000 instructions per row).
fn ipv4_text(ip: Ipv4Addr, out: &mut [u8; 15]) -> &[u8] {
    let mut n = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            out[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            out[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        out[n] = b'0' + octet % 10;
        n += 1;
    }
    &out[..n]
}

fn int(n: Option<u64>) -> Option<i64> {
    n.map(|n| i64::try_from(n).unwrap_or(i64::MAX))
}

impl Row {
    /// Inserts the row through `stmt` ([`INSERT`]); `json` is scratch space for its JSON
    /// columns, kept by the caller from one row to the next.
    pub(crate) fn insert(
        &self,
        stmt: &mut Statement<'_>,
        json: &mut Vec<u8>,
    ) -> rusqlite::Result<()> {
        json.clear();
        if serde_json::to_writer(&mut *json, &self.attempts).is_err() {
            json.clear();
            json.extend_from_slice(b"[]");
        }
        let attempts_end = json.len();
        if !self.tags.is_empty() && serde_json::to_writer(&mut *json, &self.tags).is_err() {
            json.truncate(attempts_end);
        }
        let (attempts, tags) = json.split_at(attempts_end);
        let text = |bytes| ToSqlOutput::Borrowed(ValueRef::Text(bytes));
        let mut v4 = [0; 15];
        let client_ip = match self.client_ip {
            Some(IpAddr::V4(ip)) => Some(text(ipv4_text(ip, &mut v4))),
            Some(IpAddr::V6(ip)) => Some(ToSqlOutput::from(ip.to_string())),
            None => None,
        };
        stmt.execute(params![
            self.ts_ms,
            self.request_id,
            self.key,
            client_ip,
            self.backend,
            self.model,
            self.model_requested,
            self.model_served,
            self.status,
            self.outcome,
            self.stream,
            int(self.prompt_tokens),
            int(self.completion_tokens),
            int(self.cached_tokens),
            int(self.reasoning_tokens),
            self.cost_nanos,
            self.cost_source.as_str(),
            self.latency_us,
            self.ttfb_us,
            self.upstream_us,
            text(attempts),
            (!tags.is_empty()).then(|| text(tags)),
            self.rules,
            self.error,
        ])?;
        Ok(())
    }

    /// A minimal row, for tests and benchmarks.
    pub fn example(request_id: &str, ts_ms: i64, cost_nanos: i64) -> Row {
        Row {
            ts_ms,
            request_id: request_id.to_owned(),
            key: Some("team-a".into()),
            client_ip: Some(IpAddr::from([127, 0, 0, 1])),
            backend: Some("openrouter".into()),
            model: Some("openai/gpt-4o-mini".into()),
            model_requested: Some("gpt-4o-mini".into()),
            model_served: Some("openai/gpt-4o-mini-2024-07-18".into()),
            status: 200,
            outcome: "ok",
            stream: false,
            prompt_tokens: Some(12),
            completion_tokens: Some(34),
            cached_tokens: None,
            reasoning_tokens: None,
            cost_nanos,
            cost_source: CostSource::Upstream,
            latency_us: 1_500,
            ttfb_us: Some(1_400),
            upstream_us: Some(1_300),
            attempts: vec![Attempt {
                route: "openrouter:openai/gpt-4o-mini".into(),
                result: "ok".into(),
            }],
            tags: BTreeMap::new(),
            rules: None,
            error: None,
            billed_failures: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn an_ipv4_address_is_written_as_display_writes_it(bits: u32) {
            let ip = Ipv4Addr::from(bits);
            let mut out = [0; 15];
            let display = ip.to_string();
            prop_assert_eq!(ipv4_text(ip, &mut out), display.as_bytes());
        }
    }

    #[test]
    fn ipv4_edges_are_written_as_display_writes_them() {
        for ip in [
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [10, 0, 100, 9],
            [1, 22, 199, 200],
        ] {
            let ip = Ipv4Addr::from(ip);
            let mut out = [0; 15];
            assert_eq!(ipv4_text(ip, &mut out), ip.to_string().as_bytes());
        }
    }
}
