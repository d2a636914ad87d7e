//! A row packed into one block of memory for its trip from a request thread to the writer.
//!
//! A [`Row`] holds a dozen heap blocks (its texts, its attempts). Sent as it was, each of them
//! was freed by the writer a batch later, on another core, and came back to the request
//! threads' allocator cold: under load the request threads spent 9.5 % of their time in the
//! allocator with the ledger on, 5.6 % with it off. Packed, a row is one block, the request
//! thread frees its own blocks at once as it does without the ledger (6.4 %, packing
//! included), and the writer reads each row from one place.
//!
//! Texts stay bytes on the way (SQLite binds them as they are; they were `String`s).

use std::net::IpAddr;

use serde::Serialize;

use crate::row::{CostSource, Row};

/// One row, packed by [`Packed::new`] and read back by [`Packed::view`].
pub(crate) struct Packed(Vec<u8>);

/// A packed row's columns, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct View<'a> {
    pub ts_ms: i64,
    pub request_id: &'a [u8],
    pub key: Option<&'a [u8]>,
    pub client_ip: Option<IpAddr>,
    pub backend: Option<&'a [u8]>,
    pub model: Option<&'a [u8]>,
    pub model_requested: Option<&'a [u8]>,
    pub model_served: Option<&'a [u8]>,
    pub status: u16,
    pub outcome: &'a [u8],
    pub stream: bool,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub reasoning_tokens: Option<i64>,
    pub cost_nanos: i64,
    pub cost_source: CostSource,
    pub latency_us: i64,
    pub ttfb_us: Option<i64>,
    pub upstream_us: Option<i64>,
    /// Each attempt's route and result, packed ([`View::attempts`]).
    attempts: &'a [u8],
    /// The tags as a JSON object, empty when there are none.
    pub tags: &'a [u8],
    pub rules: Option<&'a [u8]>,
    pub error: Option<&'a [u8]>,
    /// What failed attempts' upstreams billed, packed ([`View::billed_failures`]).
    billed: &'a [u8],
}

const NONE: u32 = u32::MAX;

/// The length written for `len` bytes: `NONE` stands for an absent text, so a text of 4 GiB or
/// more is cut short (none can reach a row: the daemon's bodies are capped far below).
fn packed_len(len: usize) -> u32 {
    u32::try_from(len)
        .ok()
        .filter(|&len| len != NONE)
        .unwrap_or(NONE - 1)
}

struct Packer(Vec<u8>);

impl Packer {
    fn i64(&mut self, n: i64) {
        self.0.extend_from_slice(&n.to_le_bytes());
    }

    fn opt_i64(&mut self, n: Option<i64>) {
        self.0.push(u8::from(n.is_some()));
        self.i64(n.unwrap_or_default());
    }

    fn bytes(&mut self, bytes: &[u8]) {
        let len = packed_len(bytes.len());
        let bytes = bytes.get(..len as usize).unwrap_or(bytes);
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(bytes);
    }

    fn opt_bytes(&mut self, bytes: Option<&[u8]>) {
        match bytes {
            Some(bytes) => self.bytes(bytes),
            None => self.0.extend_from_slice(&NONE.to_le_bytes()),
        }
    }

    /// A length-prefixed part written in place by `write` (no buffer of its own).
    fn part(&mut self, write: impl FnOnce(&mut Packer)) {
        let at = self.0.len();
        self.0.extend_from_slice(&0u32.to_le_bytes());
        write(self);
        let len = packed_len(self.0.len() - at - 4);
        self.0.truncate(at + 4 + len as usize);
        self.0[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }

    fn opt_str(&mut self, text: &Option<String>) {
        self.opt_bytes(text.as_deref().map(str::as_bytes));
    }
}

struct Unpacker<'a>(&'a [u8]);

impl<'a> Unpacker<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn opt_i64(&mut self) -> Option<Option<i64>> {
        let some = self.u8()? == 1;
        let n = self.i64()?;
        Some(some.then_some(n))
    }

    fn opt_bytes(&mut self) -> Option<Option<&'a [u8]>> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?);
        if len == NONE {
            return Some(None);
        }
        self.take(len as usize).map(Some)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        self.opt_bytes()?
    }
}

fn int(n: Option<u64>) -> Option<i64> {
    n.map(|n| i64::try_from(n).unwrap_or(i64::MAX))
}

const COST_SOURCES: [CostSource; 4] = [
    CostSource::Upstream,
    CostSource::Pricing,
    CostSource::Estimate,
    CostSource::None,
];

impl Packed {
    /// Packs `row`: its texts copied into one block, its tags written as JSON.
    pub(crate) fn new(row: &Row) -> Packed {
        let texts = [
            Some(&row.request_id),
            row.key.as_ref(),
            row.backend.as_ref(),
            row.model.as_ref(),
            row.model_requested.as_ref(),
            row.model_served.as_ref(),
            row.rules.as_ref(),
            row.error.as_ref(),
        ];
        let attempts: usize = row
            .attempts
            .iter()
            .map(|a| a.route.len() + a.result.len() + 8)
            .sum();
        let size = 192 + attempts + texts.iter().flatten().map(|t| t.len()).sum::<usize>();
        let mut w = Packer(Vec::with_capacity(size));
        w.i64(row.ts_ms);
        w.bytes(row.request_id.as_bytes());
        w.opt_str(&row.key);
        match row.client_ip {
            None => w.0.push(0),
            Some(IpAddr::V4(ip)) => {
                w.0.push(4);
                w.0.extend_from_slice(&ip.octets());
            }
            Some(IpAddr::V6(ip)) => {
                w.0.push(6);
                w.0.extend_from_slice(&ip.octets());
            }
        }
        w.opt_str(&row.backend);
        w.opt_str(&row.model);
        w.opt_str(&row.model_requested);
        w.opt_str(&row.model_served);
        w.i64(i64::from(row.status));
        w.bytes(row.outcome.as_bytes());
        w.0.push(u8::from(row.stream));
        w.opt_i64(int(row.prompt_tokens));
        w.opt_i64(int(row.completion_tokens));
        w.opt_i64(int(row.cached_tokens));
        w.opt_i64(int(row.reasoning_tokens));
        w.i64(row.cost_nanos);
        let source = COST_SOURCES.iter().position(|s| *s == row.cost_source);
        w.0.push(source.unwrap_or(3) as u8);
        w.i64(row.latency_us);
        w.opt_i64(row.ttfb_us);
        w.opt_i64(row.upstream_us);
        w.part(|w| {
            for attempt in &row.attempts {
                w.bytes(attempt.route.as_bytes());
                w.bytes(attempt.result.as_bytes());
            }
        });
        w.part(|w| {
            let start = w.0.len();
            if !row.tags.is_empty() && serde_json::to_writer(&mut w.0, &row.tags).is_err() {
                w.0.truncate(start);
            }
        });
        w.opt_str(&row.rules);
        w.opt_str(&row.error);
        w.part(|w| {
            for (backend, model, nanos) in &row.billed_failures {
                w.bytes(backend.as_bytes());
                w.bytes(model.as_bytes());
                w.i64(*nanos);
            }
        });
        Packed(w.0)
    }

    /// The row's columns; `None` only if the block was not made by [`Packed::new`].
    pub(crate) fn view(&self) -> Option<View<'_>> {
        let mut r = Unpacker(&self.0);
        Some(View {
            ts_ms: r.i64()?,
            request_id: r.bytes()?,
            key: r.opt_bytes()?,
            client_ip: match r.u8()? {
                4 => Some(IpAddr::from(<[u8; 4]>::try_from(r.take(4)?).ok()?)),
                6 => Some(IpAddr::from(<[u8; 16]>::try_from(r.take(16)?).ok()?)),
                _ => None,
            },
            backend: r.opt_bytes()?,
            model: r.opt_bytes()?,
            model_requested: r.opt_bytes()?,
            model_served: r.opt_bytes()?,
            status: u16::try_from(r.i64()?).ok()?,
            outcome: r.bytes()?,
            stream: r.u8()? == 1,
            prompt_tokens: r.opt_i64()?,
            completion_tokens: r.opt_i64()?,
            cached_tokens: r.opt_i64()?,
            reasoning_tokens: r.opt_i64()?,
            cost_nanos: r.i64()?,
            cost_source: *COST_SOURCES.get(usize::from(r.u8()?))?,
            latency_us: r.i64()?,
            ttfb_us: r.opt_i64()?,
            upstream_us: r.opt_i64()?,
            attempts: r.bytes()?,
            tags: r.bytes()?,
            rules: r.opt_bytes()?,
            error: r.opt_bytes()?,
            billed: r.bytes()?,
        })
    }
}

/// One attempt as the `attempts` column holds it.
#[derive(Serialize)]
struct AttemptJson<'a> {
    route: &'a str,
    result: &'a str,
}

impl<'a> View<'a> {
    /// Each attempt's route and result, in order.
    pub(crate) fn attempts(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + use<'a> {
        let mut r = Unpacker(self.attempts);
        std::iter::from_fn(move || Some((r.bytes()?, r.bytes()?)))
    }

    /// Whether the attempts are those of `other` (packed the same way).
    pub(crate) fn same_attempts(&self, other: &View<'_>) -> bool {
        self.attempts == other.attempts
    }

    /// Writes the attempts as the `attempts` column holds them: `[{"route", "result"}, ...]`.
    pub(crate) fn attempts_json(&self, out: &mut Vec<u8>) {
        let attempts: Vec<AttemptJson<'_>> = self
            .attempts()
            .map(|(route, result)| AttemptJson {
                route: std::str::from_utf8(route).unwrap_or_default(),
                result: std::str::from_utf8(result).unwrap_or_default(),
            })
            .collect();
        if serde_json::to_writer(&mut *out, &attempts).is_err() {
            out.clear();
            out.extend_from_slice(b"[]");
        }
    }

    /// `(backend, model, nano-dollars)` that failed attempts' upstreams billed.
    pub(crate) fn billed_failures(
        &self,
    ) -> impl Iterator<Item = (&'a [u8], &'a [u8], i64)> + use<'a> {
        let mut r = Unpacker(self.billed);
        std::iter::from_fn(move || Some((r.bytes()?, r.bytes()?, r.i64()?)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::row::Attempt;

    #[test]
    fn a_packed_row_reads_back_whole() {
        let mut row = Row::example("req-1", 42, 7);
        row.client_ip = Some("2001:db8::1".parse().unwrap());
        row.cached_tokens = Some(u64::MAX);
        row.attempts.insert(
            0,
            Attempt {
                route: "a:\"b\"".into(),
                result: "timeout".into(),
            },
        );
        row.tags.insert("team".into(), serde_json::json!("x"));
        row.rules = Some("r:model".into());
        row.billed_failures = vec![("a".into(), "b".into(), 5)];
        let packed = Packed::new(&row);
        let view = packed.view().unwrap();
        assert_eq!(view.ts_ms, 42);
        assert_eq!(view.request_id, b"req-1");
        assert_eq!(view.key, Some(&b"team-a"[..]));
        assert_eq!(view.client_ip, row.client_ip);
        assert_eq!(
            view.model_served,
            Some(row.model_served.as_deref().unwrap().as_bytes())
        );
        assert_eq!(view.status, 200);
        assert_eq!(view.outcome, b"ok");
        assert_eq!(view.cached_tokens, Some(i64::MAX));
        assert_eq!(view.reasoning_tokens, None);
        assert_eq!(view.cost_nanos, 7);
        assert_eq!(view.cost_source, CostSource::Upstream);
        assert_eq!(view.ttfb_us, Some(1_400));
        assert_eq!(view.tags, br#"{"team":"x"}"#);
        assert_eq!(view.rules, Some(&b"r:model"[..]));
        assert_eq!(view.error, None);
        let mut json = Vec::new();
        view.attempts_json(&mut json);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&json).unwrap(),
            serde_json::to_value(&row.attempts).unwrap()
        );
        let billed: Vec<_> = view.billed_failures().collect();
        assert_eq!(billed, [(&b"a"[..], &b"b"[..], 5)]);
    }

    #[test]
    fn a_truncated_block_is_refused() {
        let packed = Packed::new(&Row::example("r", 1, 1));
        for len in 0..packed.0.len() {
            assert_eq!(Packed(packed.0[..len].to_vec()).view(), None, "{len}");
        }
    }
}
