//! Cost reports: requests, errors, tokens, cost and latency per group over a time range.
//!
//! The same [`Report`] backs `GET /admin/usage` and `orproxy report`; it renders as JSON,
//! CSV or an aligned table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use orproxy_plugin::usage::format_usd;
use rusqlite::Connection;
use serde::Serialize;

/// What rows are grouped by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    /// The route's upstream model.
    Model,
    /// The backend.
    Backend,
    /// The proxy key name.
    Key,
    /// The UTC day of arrival (`YYYY-MM-DD`).
    Day,
    /// The value of one rules tag.
    Tag(String),
}

impl GroupBy {
    /// Parses `model|backend|key|day|tag:NAME`.
    pub fn parse(text: &str) -> Result<GroupBy, String> {
        match text {
            "model" => Ok(GroupBy::Model),
            "backend" => Ok(GroupBy::Backend),
            "key" => Ok(GroupBy::Key),
            "day" => Ok(GroupBy::Day),
            _ => match text.strip_prefix("tag:") {
                Some(name) if !name.is_empty() => Ok(GroupBy::Tag(name.to_owned())),
                _ => Err(format!(
                    "group_by `{text}` is not one of model, backend, key, day, tag:NAME"
                )),
            },
        }
    }

    fn name(&self) -> String {
        match self {
            GroupBy::Model => "model".into(),
            GroupBy::Backend => "backend".into(),
            GroupBy::Key => "key".into(),
            GroupBy::Day => "day".into(),
            GroupBy::Tag(name) => format!("tag:{name}"),
        }
    }

    /// The SQL expression of the group column (`?3` is the tag's JSON path).
    fn column(&self) -> &'static str {
        match self {
            GroupBy::Model => "model",
            GroupBy::Backend => "backend",
            GroupBy::Key => "key",
            GroupBy::Day => "strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch')",
            GroupBy::Tag(_) => "CAST(json_extract(tags, ?3) AS TEXT)",
        }
    }
}

/// A report's parameters.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    /// Start, Unix milliseconds (inclusive).
    pub from_ms: i64,
    /// End, Unix milliseconds (exclusive).
    pub to_ms: i64,
    /// Grouping.
    pub group_by: GroupBy,
}

/// One group's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Group {
    /// The group's value; `None` (JSON `null`, an empty CSV field, `(none)` in the table) for
    /// rows that have none (no key, no such tag), kept apart from any value a row may hold.
    pub group: Option<String>,
    /// Requests.
    pub requests: u64,
    /// Requests whose outcome was not `ok`.
    pub errors: u64,
    /// Input tokens.
    pub tokens_in: u64,
    /// Output tokens.
    pub tokens_out: u64,
    /// Cached input tokens.
    pub cached_tokens: u64,
    /// Reasoning tokens.
    pub reasoning_tokens: u64,
    /// Cost in nano-dollars (exact).
    pub cost_nanos: i64,
    /// Cost in USD, nine decimals.
    pub cost_usd: String,
    /// Median latency, milliseconds.
    pub latency_p50_ms: f64,
    /// 95th percentile latency, milliseconds.
    pub latency_p95_ms: f64,
}

/// A whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Start, Unix milliseconds.
    pub from_ms: i64,
    /// End, Unix milliseconds.
    pub to_ms: i64,
    /// Grouping, as given.
    pub group_by: String,
    /// Groups, largest cost first.
    pub groups: Vec<Group>,
    /// Every row of the range together.
    pub total: Group,
}

#[derive(Default)]
struct Acc {
    group: Group,
    latencies: Latencies,
}

impl Acc {
    fn add(&mut self, r: &Fields) {
        let g = &mut self.group;
        // Saturating: upstreams report tokens and costs, and a wrapped sum would be a
        // plausible-looking wrong number.
        g.requests += 1;
        g.errors += u64::from(!r.ok);
        g.tokens_in = g.tokens_in.saturating_add(r.tokens_in);
        g.tokens_out = g.tokens_out.saturating_add(r.tokens_out);
        g.cached_tokens = g.cached_tokens.saturating_add(r.cached);
        g.reasoning_tokens = g.reasoning_tokens.saturating_add(r.reasoning);
        g.cost_nanos = g.cost_nanos.saturating_add(r.cost_nanos);
        self.latencies.add(r.latency_us);
    }

    fn finish(self, name: Option<String>) -> Group {
        let mut g = self.group;
        g.group = name;
        g.cost_usd = format_usd(g.cost_nanos);
        g.latency_p50_ms = self.latencies.percentile(50);
        g.latency_p95_ms = self.latencies.percentile(95);
        g
    }
}

struct Fields {
    ok: bool,
    tokens_in: u64,
    tokens_out: u64,
    cached: u64,
    reasoning: u64,
    cost_nanos: i64,
    latency_us: i64,
}

/// Latencies counted by their value rounded down to three significant digits: a report over
/// millions of rows keeps at most a few thousand counters per group instead of every value.
#[derive(Default)]
struct Latencies {
    counts: BTreeMap<i64, u64>,
    n: u64,
}

impl Latencies {
    fn add(&mut self, us: i64) {
        *self.counts.entry(three_digits(us)).or_default() += 1;
        self.n += 1;
    }

    /// Nearest-rank percentile, in milliseconds (to three significant digits, rounded down).
    fn percentile(&self, p: u64) -> f64 {
        let rank = (p * self.n).div_ceil(100).max(1);
        let mut seen = 0;
        for (&us, &count) in &self.counts {
            seen += count;
            if seen >= rank {
                return us as f64 / 1000.0;
            }
        }
        0.0
    }
}

/// `us` rounded down to three significant digits (1234 → 1230, 999 → 999).
fn three_digits(us: i64) -> i64 {
    let mut unit = 1;
    while us / unit >= 1000 {
        unit *= 10;
    }
    us / unit * unit
}

/// Builds the report of `query` from the database, one row at a time.
pub fn usage(conn: &Connection, query: &UsageQuery) -> rusqlite::Result<Report> {
    let sql = format!(
        "SELECT {}, outcome = 'ok', coalesce(prompt_tokens, 0), coalesce(completion_tokens, 0),
         coalesce(cached_tokens, 0), coalesce(reasoning_tokens, 0), cost_nanos, latency_us
         FROM requests WHERE ts_ms >= ?1 AND ts_ms < ?2",
        query.group_by.column()
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = match &query.group_by {
        GroupBy::Tag(name) => {
            let tag_path = format!("$.\"{}\"", name.replace('"', "\\\""));
            stmt.query(rusqlite::params![query.from_ms, query.to_ms, tag_path])?
        }
        _ => stmt.query(rusqlite::params![query.from_ms, query.to_ms])?,
    };
    let mut groups: BTreeMap<Option<String>, Acc> = BTreeMap::new();
    let mut total = Acc::default();
    while let Some(r) = rows.next()? {
        let n = |i: usize| -> rusqlite::Result<u64> {
            Ok(u64::try_from(r.get::<_, i64>(i)?).unwrap_or(0))
        };
        let fields = Fields {
            ok: r.get(1)?,
            tokens_in: n(2)?,
            tokens_out: n(3)?,
            cached: n(4)?,
            reasoning: n(5)?,
            cost_nanos: r.get(6)?,
            latency_us: r.get(7)?,
        };
        let name = r.get_ref(0)?.as_str_or_null()?;
        let key = name.map(str::to_owned);
        groups.entry(key).or_default().add(&fields);
        total.add(&fields);
    }
    let mut groups: Vec<Group> = groups
        .into_iter()
        .map(|(name, acc)| acc.finish(name))
        .collect();
    if query.group_by != GroupBy::Day {
        groups.sort_by(|a, b| b.cost_nanos.cmp(&a.cost_nanos).then(a.group.cmp(&b.group)));
    }
    Ok(Report {
        from_ms: query.from_ms,
        to_ms: query.to_ms,
        group_by: query.group_by.name(),
        groups,
        total: total.finish(Some("total".to_owned())),
    })
}

const HEADER: [&str; 10] = [
    "group",
    "requests",
    "errors",
    "tokens_in",
    "tokens_out",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "latency_p50_ms",
    "latency_p95_ms",
];

fn cells(g: &Group) -> [String; 10] {
    [
        g.group.clone().unwrap_or_default(),
        g.requests.to_string(),
        g.errors.to_string(),
        g.tokens_in.to_string(),
        g.tokens_out.to_string(),
        g.cached_tokens.to_string(),
        g.reasoning_tokens.to_string(),
        g.cost_usd.clone(),
        format!("{:.3}", g.latency_p50_ms),
        format!("{:.3}", g.latency_p95_ms),
    ]
}

impl Report {
    /// RFC 4180 CSV: a header line, one line per group, then the total.
    pub fn to_csv(&self) -> String {
        let mut out = HEADER.join(",");
        out.push_str("\r\n");
        for g in self.groups.iter().chain(std::iter::once(&self.total)) {
            let mut line = cells(g);
            line[0] = csv_text(&line[0]);
            let line: Vec<String> = line.iter().map(|c| csv_field(c)).collect();
            out.push_str(&line.join(","));
            out.push_str("\r\n");
        }
        out
    }

    /// An aligned text table for a terminal. Control characters in group names (model names,
    /// keys and tags come from clients and rules) are escaped, so that none reaches the terminal.
    pub fn to_table(&self) -> String {
        let mut header: Vec<String> = HEADER.iter().map(|h| (*h).to_owned()).collect();
        header[0] = printable(&self.group_by);
        let body: Vec<[String; 10]> = self
            .groups
            .iter()
            .chain(std::iter::once(&self.total))
            .map(|g| {
                let mut line = cells(g);
                line[0] = g
                    .group
                    .as_deref()
                    .map_or_else(|| "(none)".to_owned(), printable);
                line
            })
            .collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for line in &body {
            for (w, cell) in widths.iter_mut().zip(line) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut write_line = |cells: &[String]| {
            for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                if i == 0 {
                    let _ = write!(out, "{cell:<w$}");
                } else {
                    let _ = write!(out, "  {cell:>w$}");
                }
            }
            out.push('\n');
        };
        write_line(&header);
        let total = body.len() - 1;
        for (i, line) in body.iter().enumerate() {
            if i == total {
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                write_line(&rule);
            }
            write_line(line);
        }
        out
    }
}

/// `text` with every control character (C0, DEL, C1) written as a Rust escape (`\u{1b}`).
fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A group name as a spreadsheet shows it as text: a name starting with `=`, `+`, `-`, `@`
/// or a tab or carriage return would be read as a formula (names come from clients and rules),
/// so it gets a leading `'`, as OWASP recommends.
fn csv_text(text: &str) -> String {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_owned()
    }
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::row::Row;

    fn db(rows: &[Row]) -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::migrate(&mut conn).unwrap();
        let packed: Vec<_> = rows.iter().map(crate::packed::Packed::new).collect();
        let views: Vec<_> = packed.iter().map(|p| p.view().unwrap()).collect();
        crate::row::insert_rows(&conn, &views, |_| ()).unwrap();
        conn
    }

    /// The report of every row, grouped by `group_by`.
    fn all_time(conn: &Connection, group_by: GroupBy) -> Report {
        let query = UsageQuery {
            from_ms: 0,
            to_ms: i64::MAX,
            group_by,
        };
        usage(conn, &query).unwrap()
    }

    fn row(id: &str, ts_ms: i64, model: &str, cost: i64, latency_us: i64, ok: bool) -> Row {
        let mut r = Row::example(id, ts_ms, cost);
        r.model = Some(model.into());
        r.latency_us = latency_us;
        if !ok {
            r.outcome = "upstream_error";
        }
        r
    }

    #[test]
    fn latencies_are_kept_to_three_significant_digits() {
        for (us, kept) in [
            (0, 0),
            (999, 999),
            (1000, 1000),
            (1234, 1230),
            (98_765, 98_700),
            (1_234_567, 1_230_000),
        ] {
            assert_eq!(three_digits(us), kept, "{us}");
        }
        let mut latencies = Latencies::default();
        (1..=1000).for_each(|us| latencies.add(us));
        assert_eq!(latencies.percentile(50), 0.5);
        assert_eq!(latencies.percentile(95), 0.95);
        let mut latencies = Latencies::default();
        (1..=2000).for_each(|i| latencies.add(1_000 + i * 7));
        // The 1000th value is 8000 µs, the 1900th 14,300 µs: both kept exactly.
        assert_eq!(latencies.percentile(50), 8.0);
        assert_eq!(latencies.percentile(95), 14.3);
        assert!(latencies.counts.len() < 2000);
    }

    #[test]
    fn groups_sum_exactly_and_percentiles_are_nearest_rank() {
        let mut rows: Vec<Row> = (1..=100)
            .map(|i| {
                row(
                    &format!("a{i}"),
                    1000 + i,
                    "a",
                    1_000_000_001,
                    i * 1000,
                    i % 10 != 0,
                )
            })
            .collect();
        rows.push(row("b1", 1000, "b", 5, 7000, true));
        rows.push(row("late", 10_000, "a", 99, 1, true));
        let conn = db(&rows);
        let report = usage(
            &conn,
            &UsageQuery {
                from_ms: 0,
                to_ms: 10_000,
                group_by: GroupBy::Model,
            },
        )
        .unwrap();
        assert_eq!(report.groups.len(), 2);
        let a = &report.groups[0];
        assert_eq!(
            (a.group.as_deref(), a.requests, a.errors),
            (Some("a"), 100, 10)
        );
        assert_eq!(a.cost_nanos, 100_000_000_100);
        assert_eq!(a.cost_usd, "100.000000100");
        assert_eq!((a.latency_p50_ms, a.latency_p95_ms), (50.0, 95.0));
        assert_eq!(report.total.requests, 101);
        assert_eq!(report.total.cost_nanos, 100_000_000_105);
    }

    #[test]
    fn tags_and_days_group_and_render() {
        let mut tagged = row("t1", 86_400_000 * 2, "a", 10, 1000, true);
        tagged
            .tags
            .insert("team".into(), serde_json::json!("search, web"));
        let conn = db(&[tagged, row("t2", 0, "a", 20, 1000, true)]);
        let by_tag = all_time(&conn, GroupBy::parse("tag:team").unwrap());
        let names: Vec<Option<&str>> = by_tag.groups.iter().map(|g| g.group.as_deref()).collect();
        assert_eq!(names, [None, Some("search, web")]);
        let csv = by_tag.to_csv();
        assert!(csv.contains("\"search, web\",1,0,"), "{csv}");
        // Rows without the tag: an empty field, apart from any tag value.
        assert!(csv.contains("\r\n,1,0,"), "{csv}");
        assert!(
            by_tag.to_table().contains("\n(none) "),
            "{}",
            by_tag.to_table()
        );
        assert_eq!(
            serde_json::to_value(&by_tag.groups[0]).unwrap()["group"],
            serde_json::Value::Null
        );
        let by_day = all_time(&conn, GroupBy::Day);
        let days: Vec<&str> = by_day
            .groups
            .iter()
            .filter_map(|g| g.group.as_deref())
            .collect();
        assert_eq!(days, ["1970-01-01", "1970-01-03"]);
        let table = by_day.to_table();
        assert!(table.starts_with("day "), "{table}");
        assert!(
            table.lines().last().unwrap().starts_with("total"),
            "{table}"
        );
    }

    #[test]
    fn csv_group_names_are_never_formulas() {
        let conn = db(&[row("f", 1, "=HYPERLINK(\"x\")", 1, 1000, true)]);
        let report = all_time(&conn, GroupBy::Model);
        let csv = report.to_csv();
        assert!(csv.contains("\r\n\"'=HYPERLINK(\"\"x\"\")\",1,"), "{csv}");
    }

    #[test]
    fn the_table_escapes_control_characters() {
        let hostile = "evil\u{1b}[2J\u{7}\ttab\u{7f}\u{9b}31m\nline";
        let conn = db(&[row("h", 1, hostile, 1, 1000, true)]);
        let report = all_time(&conn, GroupBy::Model);
        let table = report.to_table();
        assert!(
            !table.chars().any(|c| c.is_control() && c != '\n'),
            "{table:?}"
        );
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(
            table.contains(r"evil\u{1b}[2J\u{7}\u{9}tab\u{7f}\u{9b}31m\u{a}line"),
            "{table}"
        );
        // The columns still line up on the escaped text.
        let widths: Vec<usize> = table.lines().map(|l| l.chars().count()).collect();
        assert!(widths.iter().all(|w| *w == widths[0]), "{table}");
        // CSV and JSON carry the name as it is (quoted, or JSON-escaped).
        assert!(report.to_csv().contains(hostile));
    }

    #[test]
    fn bad_group_by_is_named() {
        assert!(GroupBy::parse("tag:").unwrap_err().contains("tag:NAME"));
        assert!(GroupBy::parse("colour").unwrap_err().contains("`colour`"));
    }
}
