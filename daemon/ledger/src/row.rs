//! One request as stored.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use rusqlite::Statement;
use rusqlite::types::{ToSql, ToSqlOutput, ValueRef};
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

/// Bytes bound as text without a copy on our side (SQLite takes its own).
fn text(bytes: &[u8]) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(ValueRef::Text(bytes))
}

/// Binds `row`'s column `get` to the parameter at `index`, unless `previous` has the same value,
/// which the statement then still holds.
fn bind<'r, T: ToSql + PartialEq>(
    stmt: &mut Statement<'_>,
    index: usize,
    row: &'r Row,
    previous: Option<&'r Row>,
    get: impl Fn(&'r Row) -> T,
) -> rusqlite::Result<()> {
    let value = get(row);
    if previous.is_none_or(|p| get(p) != value) {
        stmt.raw_bind_parameter(index, value)?;
    }
    Ok(())
}

impl Row {
    /// Inserts the row through `stmt` ([`INSERT`]). `previous` is the row `stmt` inserted last,
    /// its values still bound (SQLite keeps them from one execution to the next): only the
    /// values that differ are bound again. Most of a batch repeats its key, backend, models,
    /// outcome and attempts, and binding (a copy of each text) was a third of a row's cost.
    /// `json` is scratch space for the JSON columns, kept by the caller from one row to the next.
    pub(crate) fn insert(
        &self,
        stmt: &mut Statement<'_>,
        json: &mut Vec<u8>,
        previous: Option<&Row>,
    ) -> rusqlite::Result<()> {
        bind(stmt, 1, self, previous, |r| r.ts_ms)?;
        bind(stmt, 2, self, previous, |r| &r.request_id)?;
        bind(stmt, 3, self, previous, |r| r.key.as_deref())?;
        if previous.is_none_or(|r| r.client_ip != self.client_ip) {
            let mut v4 = [0; 15];
            let client_ip = match self.client_ip {
                Some(IpAddr::V4(ip)) => Some(text(ipv4_text(ip, &mut v4))),
                Some(IpAddr::V6(ip)) => Some(ToSqlOutput::from(ip.to_string())),
                None => None,
            };
            stmt.raw_bind_parameter(4, client_ip)?;
        }
        bind(stmt, 5, self, previous, |r| r.backend.as_deref())?;
        bind(stmt, 6, self, previous, |r| r.model.as_deref())?;
        bind(stmt, 7, self, previous, |r| r.model_requested.as_deref())?;
        bind(stmt, 8, self, previous, |r| r.model_served.as_deref())?;
        bind(stmt, 9, self, previous, |r| r.status)?;
        bind(stmt, 10, self, previous, |r| r.outcome)?;
        bind(stmt, 11, self, previous, |r| r.stream)?;
        bind(stmt, 12, self, previous, |r| int(r.prompt_tokens))?;
        bind(stmt, 13, self, previous, |r| int(r.completion_tokens))?;
        bind(stmt, 14, self, previous, |r| int(r.cached_tokens))?;
        bind(stmt, 15, self, previous, |r| int(r.reasoning_tokens))?;
        bind(stmt, 16, self, previous, |r| r.cost_nanos)?;
        bind(stmt, 17, self, previous, |r| r.cost_source.as_str())?;
        bind(stmt, 18, self, previous, |r| r.latency_us)?;
        bind(stmt, 19, self, previous, |r| r.ttfb_us)?;
        bind(stmt, 20, self, previous, |r| r.upstream_us)?;
        if previous.is_none_or(|r| r.attempts != self.attempts) {
            json.clear();
            if serde_json::to_writer(&mut *json, &self.attempts).is_err() {
                json.clear();
                json.extend_from_slice(b"[]");
            }
            stmt.raw_bind_parameter(21, text(json))?;
        }
        if previous.is_none_or(|r| r.tags != self.tags) {
            json.clear();
            if !self.tags.is_empty() && serde_json::to_writer(&mut *json, &self.tags).is_err() {
                json.clear();
            }
            stmt.raw_bind_parameter(22, (!json.is_empty()).then(|| text(json)))?;
        }
        bind(stmt, 23, self, previous, |r| r.rules.as_deref())?;
        bind(stmt, 24, self, previous, |r| r.error.as_deref())?;
        stmt.raw_execute()?;
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

    /// A row whose every column takes one of a few values, picked by `pick`, so that a sequence
    /// of them repeats some values from one row to the next and changes others.
    fn varied(pick: &[u8; 12]) -> Row {
        let mut row = Row::example(&format!("req-{}", pick[0]), i64::from(pick[1] % 3), 7);
        let bit = |byte: u8, k: u8| byte >> k & 1 == 1;
        let text = |n: u8, name: &str| match n % 3 {
            0 => None,
            1 => Some(name.to_owned()),
            _ => Some(format!("{name}-2")),
        };
        row.key = text(pick[2], "team");
        row.client_ip = match pick[3] % 4 {
            0 => None,
            1 => Some(IpAddr::from([10, 0, 0, 1])),
            2 => Some(IpAddr::from([10, 0, 0, 2])),
            _ => Some("::1".parse().unwrap()),
        };
        row.backend = text(pick[4], "openrouter");
        row.model = text(pick[5], "m");
        row.model_requested = text(pick[5] / 3, "asked");
        row.model_served = text(pick[5] / 9, "served");
        row.status = [200, 502, 499][usize::from(pick[6] % 3)];
        row.outcome = ["ok", "upstream_error"][usize::from(pick[6] % 2)];
        row.stream = pick[6] % 4 < 2;
        row.prompt_tokens = bit(pick[7], 0).then_some(u64::from(pick[7] % 3));
        row.completion_tokens = bit(pick[7], 1).then_some(5);
        row.cached_tokens = bit(pick[7], 2).then_some(u64::MAX);
        row.reasoning_tokens = bit(pick[7], 3).then_some(1);
        row.cost_nanos = i64::from(pick[8] % 2);
        row.cost_source = [CostSource::Upstream, CostSource::Estimate, CostSource::None]
            [usize::from(pick[8] % 3)];
        row.latency_us = i64::from(pick[9] % 2);
        row.ttfb_us = bit(pick[9], 1).then_some(3);
        row.upstream_us = bit(pick[9], 2).then_some(4);
        if bit(pick[10], 0) {
            row.attempts.push(Attempt {
                route: "b:m".into(),
                result: "timeout".into(),
            });
        }
        if bit(pick[10], 1) {
            row.tags
                .insert("team".into(), serde_json::json!(pick[10] % 3));
        }
        row.rules = text(pick[11], "rule");
        row.error = text(pick[11] / 3, "error");
        row
    }

    /// Every row of `requests`, every column.
    fn stored(rows: &[Row], remember: bool) -> Vec<Vec<rusqlite::types::Value>> {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        crate::migrate(&mut conn).unwrap();
        let mut stmt = conn.prepare(INSERT).unwrap();
        let mut previous = None;
        for row in rows {
            row.insert(&mut stmt, &mut Vec::new(), previous).unwrap();
            previous = remember.then_some(row);
        }
        drop(stmt);
        let mut select = conn.prepare("SELECT * FROM requests ORDER BY id").unwrap();
        let columns = select.column_count();
        select
            .query_map([], |r| (0..columns).map(|i| r.get(i)).collect())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    proptest! {
        /// Binding only what changed stores what binding every value stores.
        #[test]
        fn rows_bound_against_the_previous_are_stored_whole(
            picks in proptest::collection::vec(any::<[u8; 12]>(), 1..40),
        ) {
            let rows: Vec<Row> = picks.iter().map(varied).collect();
            prop_assert_eq!(stored(&rows, true), stored(&rows, false));
        }

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
