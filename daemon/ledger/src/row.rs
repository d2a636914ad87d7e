//! One request as stored.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::LazyLock;

use rusqlite::types::{ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, Statement};
use serde::Serialize;

use crate::packed::View;

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

/// Rows one execution of the batch insert takes: each execution opens and closes the table's
/// cursors and resets its registers, and sixteen rows to one took 7 % off a row's cost.
pub(crate) const ROWS_PER_INSERT: usize = 16;

/// Values a row binds, one per column of `requests` but `id`.
const COLUMNS: usize = 24;

/// `INSERT OR ROLLBACK INTO requests (...) VALUES (...), ...` of `rows` rows.
///
/// `OR ROLLBACK`: a statement that may fail after some of its rows would need a statement
/// journal to undo just those (4 % of a row's cost); a failed insert fails the writer's whole
/// transaction anyway, which the writer then tries again.
fn insert_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT OR ROLLBACK INTO requests (ts_ms, request_id, key, client_ip, backend, model, \
         model_requested, model_served, status, outcome, stream, prompt_tokens, \
         completion_tokens, cached_tokens, reasoning_tokens, cost_nanos, cost_source, \
         latency_us, ttfb_us, upstream_us, attempts, tags, rules, error) VALUES ",
    );
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 1..=COLUMNS {
            if column > 1 {
                sql.push_str(", ");
            }
            sql.push('?');
            sql.push_str(&(row * COLUMNS + column).to_string());
        }
        sql.push(')');
    }
    sql
}

/// The batch insert, and the insert of one row (a batch's rest); cached per connection.
static INSERT_MANY: LazyLock<String> = LazyLock::new(|| insert_sql(ROWS_PER_INSERT));
static INSERT_ONE: LazyLock<String> = LazyLock::new(|| insert_sql(1));

/// Inserts `rows` in order, [`ROWS_PER_INSERT`] per execution, inside the transaction the
/// caller holds. `progress` is called after each execution with the rows inserted so far.
///
/// SQLite keeps a statement's bound values from one execution to the next, so a row binds
/// only the values that differ from the row the same place of the statement held before:
/// most of a batch repeats its key, backend, models, outcome and attempts, and binding (a copy
/// of each text) was a third of a row's cost.
pub(crate) fn insert_rows(
    conn: &Connection,
    rows: &[View<'_>],
    mut progress: impl FnMut(usize),
) -> rusqlite::Result<()> {
    let mut json = Vec::new();
    let mut stmt = conn.prepare_cached(&INSERT_MANY)?;
    let chunks = rows.chunks_exact(ROWS_PER_INSERT);
    let rest = chunks.remainder();
    let mut previous: Option<&[View<'_>]> = None;
    let mut inserted = 0;
    for chunk in chunks {
        for (slot, row) in chunk.iter().enumerate() {
            let before = previous.and_then(|p| p.get(slot));
            bind_row(&mut stmt, slot * COLUMNS, row, before, &mut json)?;
        }
        stmt.raw_execute()?;
        previous = Some(chunk);
        inserted += chunk.len();
        progress(inserted);
    }
    let mut stmt = conn.prepare_cached(&INSERT_ONE)?;
    let mut previous = None;
    for row in rest {
        bind_row(&mut stmt, 0, row, previous, &mut json)?;
        stmt.raw_execute()?;
        previous = Some(row);
        inserted += 1;
        progress(inserted);
    }
    Ok(())
}

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

/// Bytes bound as text without a copy on our side (SQLite takes its own).
pub(crate) fn text(bytes: &[u8]) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(ValueRef::Text(bytes))
}

/// Binds `row`'s column `get` to the parameter at `index`, unless `previous` has the same value,
/// which the statement then still holds.
fn bind<'r, T: ToSql + PartialEq>(
    stmt: &mut Statement<'_>,
    index: usize,
    row: &View<'r>,
    previous: Option<&View<'r>>,
    get: impl Fn(&View<'r>) -> T,
) -> rusqlite::Result<()> {
    let value = get(row);
    if previous.is_none_or(|p| get(p) != value) {
        stmt.raw_bind_parameter(index, value)?;
    }
    Ok(())
}

/// A text column, `None` as NULL.
fn opt_text(bytes: Option<&[u8]>) -> Option<ToSqlOutput<'_>> {
    bytes.map(text)
}

/// Binds `row`'s values to the parameters after `offset` of `stmt`, but those equal in
/// `previous`, the row bound there last (whose values the statement still holds). `json` is
/// scratch space for the attempts, kept by the caller from one row to the next.
fn bind_row<'r>(
    stmt: &mut Statement<'_>,
    offset: usize,
    row: &View<'r>,
    previous: Option<&View<'r>>,
    json: &mut Vec<u8>,
) -> rusqlite::Result<()> {
    bind(stmt, offset + 1, row, previous, |r| r.ts_ms)?;
    bind(stmt, offset + 2, row, previous, |r| text(r.request_id))?;
    bind(stmt, offset + 3, row, previous, |r| opt_text(r.key))?;
    if previous.is_none_or(|p| p.client_ip != row.client_ip) {
        let mut v4 = [0; 15];
        let client_ip = match row.client_ip {
            Some(IpAddr::V4(ip)) => Some(text(ipv4_text(ip, &mut v4))),
            Some(IpAddr::V6(ip)) => Some(ToSqlOutput::from(ip.to_string())),
            None => None,
        };
        stmt.raw_bind_parameter(offset + 4, client_ip)?;
    }
    bind(stmt, offset + 5, row, previous, |r| opt_text(r.backend))?;
    bind(stmt, offset + 6, row, previous, |r| opt_text(r.model))?;
    bind(stmt, offset + 7, row, previous, |r| {
        opt_text(r.model_requested)
    })?;
    bind(stmt, offset + 8, row, previous, |r| {
        opt_text(r.model_served)
    })?;
    bind(stmt, offset + 9, row, previous, |r| r.status)?;
    bind(stmt, offset + 10, row, previous, |r| text(r.outcome))?;
    bind(stmt, offset + 11, row, previous, |r| r.stream)?;
    bind(stmt, offset + 12, row, previous, |r| r.prompt_tokens)?;
    bind(stmt, offset + 13, row, previous, |r| r.completion_tokens)?;
    bind(stmt, offset + 14, row, previous, |r| r.cached_tokens)?;
    bind(stmt, offset + 15, row, previous, |r| r.reasoning_tokens)?;
    bind(stmt, offset + 16, row, previous, |r| r.cost_nanos)?;
    bind(stmt, offset + 17, row, previous, |r| r.cost_source.as_str())?;
    bind(stmt, offset + 18, row, previous, |r| r.latency_us)?;
    bind(stmt, offset + 19, row, previous, |r| r.ttfb_us)?;
    bind(stmt, offset + 20, row, previous, |r| r.upstream_us)?;
    if previous.is_none_or(|p| !p.same_attempts(row)) {
        json.clear();
        row.attempts_json(json);
        stmt.raw_bind_parameter(offset + 21, text(json))?;
    }
    bind(stmt, offset + 22, row, previous, |r| {
        (!r.tags.is_empty()).then(|| text(r.tags))
    })?;
    bind(stmt, offset + 23, row, previous, |r| opt_text(r.rules))?;
    bind(stmt, offset + 24, row, previous, |r| opt_text(r.error))?;
    Ok(())
}

impl Row {
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
    use crate::packed::Packed;
    use proptest::prelude::*;
    use rusqlite::types::Value;

    /// A row whose every column takes one of a few values, picked by `pick`, so that a sequence
    /// of them repeats some values from one row to the next and changes others.
    fn varied(pick: &[u8; 12]) -> Row {
        let mut row = Row::example(&format!("req-{}", pick[0]), i64::from(pick[1] % 3), 7);
        let bit = |byte: u8, k: u8| byte >> k & 1 == 1;
        let text = |n: u8, name: &str| match n % 4 {
            0 => None,
            1 => Some(name.to_owned()),
            2 => Some(format!("{name}-2")),
            _ => Some(String::new()),
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

    /// Every row of `requests`, every column, after inserting `rows` in one call of
    /// [`insert_rows`] (`together`), or one call per row (each bound whole).
    fn stored(rows: &[Row], together: bool) -> Vec<Vec<Value>> {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::migrate(&mut conn).unwrap();
        let packed: Vec<Packed> = rows.iter().map(Packed::new).collect();
        let views: Vec<View<'_>> = packed.iter().map(|p| p.view().unwrap()).collect();
        let mut calls = 0;
        if together {
            insert_rows(&conn, &views, |_| calls += 1).unwrap();
        } else {
            for view in views.chunks(1) {
                insert_rows(&conn, view, |_| calls += 1).unwrap();
            }
        }
        let executions = if together {
            rows.len() / ROWS_PER_INSERT + rows.len() % ROWS_PER_INSERT
        } else {
            rows.len()
        };
        assert_eq!(calls, executions);
        let mut select = conn.prepare("SELECT * FROM requests ORDER BY id").unwrap();
        let columns = select.column_count();
        select
            .query_map([], |r| (0..columns).map(|i| r.get(i)).collect())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// What `requests` should hold for `rows`, from the rows themselves.
    fn expected(rows: &[Row]) -> Vec<Vec<Value>> {
        let int = |n: Option<u64>| match n {
            Some(n) => Value::Integer(i64::try_from(n).unwrap_or(i64::MAX)),
            None => Value::Null,
        };
        let opt = |n: Option<i64>| n.map_or(Value::Null, Value::Integer);
        let text = |t: &Option<String>| t.clone().map_or(Value::Null, Value::Text);
        rows.iter()
            .zip(1..)
            .map(|(r, id)| {
                vec![
                    Value::Integer(id),
                    Value::Integer(r.ts_ms),
                    Value::Text(r.request_id.clone()),
                    text(&r.key),
                    text(&r.client_ip.map(|ip| ip.to_string())),
                    text(&r.backend),
                    text(&r.model),
                    text(&r.model_requested),
                    text(&r.model_served),
                    Value::Integer(r.status.into()),
                    Value::Text(r.outcome.into()),
                    Value::Integer(r.stream.into()),
                    int(r.prompt_tokens),
                    int(r.completion_tokens),
                    int(r.cached_tokens),
                    int(r.reasoning_tokens),
                    Value::Integer(r.cost_nanos),
                    Value::Text(r.cost_source.as_str().into()),
                    Value::Integer(r.latency_us),
                    opt(r.ttfb_us),
                    opt(r.upstream_us),
                    Value::Text(serde_json::to_string(&r.attempts).unwrap()),
                    text(&(!r.tags.is_empty()).then(|| serde_json::to_string(&r.tags).unwrap())),
                    text(&r.rules),
                    text(&r.error),
                ]
            })
            .collect()
    }

    #[test]
    fn a_batch_failing_halfway_leaves_nothing_and_the_next_one_is_stored_whole() {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::migrate(&mut conn).unwrap();
        // Stands for any failure inside a many-row statement: a second row with the same id.
        conn.execute_batch("CREATE UNIQUE INDEX unique_id ON requests (request_id)")
            .unwrap();
        let rows = |prefix: &str, n: usize| -> Vec<Row> {
            (0..n)
                .map(|i| Row::example(&format!("{prefix}-{i}"), i as i64, 1))
                .collect()
        };
        let insert = |conn: &mut Connection, rows: &[Row]| {
            let packed: Vec<Packed> = rows.iter().map(Packed::new).collect();
            let views: Vec<View<'_>> = packed.iter().map(|p| p.view().unwrap()).collect();
            let tx = conn.transaction().unwrap();
            insert_rows(&tx, &views, |_| ())?;
            tx.commit()
        };
        let mut failing = rows("a", 40);
        failing[21].request_id = failing[20].request_id.clone();
        assert!(insert(&mut conn, &failing).is_err());
        let next = rows("b", 37);
        insert(&mut conn, &next).unwrap();
        let stored: Vec<String> = conn
            .prepare("SELECT request_id FROM requests ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let expected: Vec<String> = next.iter().map(|r| r.request_id.clone()).collect();
        assert_eq!(stored, expected);
    }

    proptest! {
        /// Rows packed, bound only where they differ from the row before them in the same
        /// place of the statement, many per execution, are stored as they were.
        #[test]
        fn rows_bound_against_the_previous_are_stored_whole(
            picks in proptest::collection::vec(any::<[u8; 12]>(), 1..80),
        ) {
            let rows: Vec<Row> = picks.iter().map(varied).collect();
            let together = stored(&rows, true);
            prop_assert_eq!(&together, &expected(&rows));
            prop_assert_eq!(together, stored(&rows, false));
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
