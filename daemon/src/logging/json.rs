//! JSON log lines, written straight into the line's buffer.
//!
//! The lines tracing-subscriber's `json().flatten_event(true)` formatter writes (timestamp,
//! level, the event's fields in order, target; no spans, which the daemon does not use), at a
//! fraction of its cost: it serializes each field through serde_json into an adaptor that
//! checks every piece as UTF-8 again, which made a request's line a third of the request's
//! instructions.

use std::fmt::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::budget::civil_from_days;

/// The event formatter of `--log-format json`.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Events forwarded from the `log` crate (rustls) carry their real target in fields.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut time = [0; TIMESTAMP_LEN];
        writer.write_str("{\"timestamp\":\"")?;
        writer.write_str(timestamp(SystemTime::now(), &mut time))?;
        writer.write_str("\",\"level\":\"")?;
        writer.write_str(meta.level().as_str())?;
        writer.write_str("\"")?;
        let mut fields = Fields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        string(&mut writer, meta.target())?;
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`, as serde_json would write it.
struct Fields<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self
                .out
                .write_str(",\"")
                .and_then(|()| Escaped(&mut *self.out).write_str(field.name()))
                .and_then(|()| self.out.write_str("\":"))
                .and_then(|()| value(self.out));
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |out| string(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |out| {
            out.write_str("\"")?;
            write!(Escaped(&mut *out), "{value:?}")?;
            out.write_str("\"")
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |out| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, |out| {
            // serde_json writes what JSON cannot hold as null.
            if value.is_finite() {
                out.write_str(zmij::Buffer::new().format_finite(value))
            } else {
                out.write_str("null")
            }
        });
    }
}

/// `text` as a JSON string.
fn string(out: &mut Writer<'_>, text: &str) -> fmt::Result {
    out.write_str("\"")?;
    Escaped(&mut *out).write_str(text)?;
    out.write_str("\"")
}

/// Escapes what passes through it as the inside of a JSON string, as serde_json does:
/// quote, backslash and control characters; nothing else.
struct Escaped<'a, W: Write>(&'a mut W);

/// Whether a byte must be escaped inside a JSON string.
const ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

impl<W: Write> Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let bytes = text.as_bytes();
        let mut start = 0;
        // Most text has nothing to escape: one write for all of it.
        while let Some(found) = bytes[start..].iter().position(|&b| ESCAPE[usize::from(b)]) {
            let at = start + found;
            // Every byte escaped is ASCII, so the slices end on character boundaries.
            self.0.write_str(&text[start..at])?;
            let byte = bytes[at];
            let mut code = [b'\\', b'u', b'0', b'0', 0, 0];
            let escape: &[u8] = match byte {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x08 => b"\\b",
                0x0c => b"\\f",
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    code[4] = HEX[usize::from(byte >> 4)];
                    code[5] = HEX[usize::from(byte & 0xf)];
                    &code
                }
            };
            self.0
                .write_str(std::str::from_utf8(escape).map_err(|_| fmt::Error)?)?;
            start = at + 1;
        }
        self.0.write_str(&text[start..])
    }
}

/// `2026-11-25T09:40:27.440467Z`.
const TIMESTAMP_LEN: usize = 27;

/// `now` in UTC with microseconds, as tracing-subscriber's default timer writes it.
fn timestamp(now: SystemTime, out: &mut [u8; TIMESTAMP_LEN]) -> &str {
    let micros = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let secs = micros.div_euclid(1_000_000);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let of_day = secs.rem_euclid(86_400);
    let fields: [(usize, i64, usize); 7] = [
        (0, year.clamp(0, 9999), 4),
        (5, i64::from(month), 2),
        (8, i64::from(day), 2),
        (11, of_day / 3600, 2),
        (14, of_day / 60 % 60, 2),
        (17, of_day % 60, 2),
        (20, micros.rem_euclid(1_000_000), 6),
    ];
    *out = *b"0000-00-00T00:00:00.000000Z";
    for (at, mut value, width) in fields {
        for slot in out[at..at + width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    std::str::from_utf8(out).unwrap_or("1970-01-01T00:00:00.000000Z")
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    /// The lines `emit` logs through [`JsonLines`].
    fn lines(emit: impl FnOnce()) -> String {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&out);
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(move || SharedBuffer(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = out.lock().expect("no test thread panicked").clone();
        String::from_utf8(bytes).expect("log lines are UTF-8")
    }

    struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .expect("no test thread panicked")
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_holds_time_level_fields_in_order_and_target() {
        let text = lines(|| {
            tracing::info!(
                target: "orproxy::request",
                message = "Request finished.",
                request_id = %"req-1",
                model = "anthropic/claude-3-5-sonnet",
                status = 200u16,
                offset = -3i64,
                stream = false,
                latency_ms = 0.125,
                nothing = f64::NAN,
                absent = None::<u64>,
                odd = "tab\there \"quoted\"",
                debug = ?vec!["a"],
            );
            tracing::warn!(reason = 1, "Plain message {}.", "formatted");
        });
        let mut lines = text.lines();
        let first = lines.next().expect("two lines");
        let rest = first
            .strip_prefix("{\"timestamp\":\"")
            .expect("the line starts with its timestamp");
        assert_eq!(rest.find('"'), Some(TIMESTAMP_LEN), "{first}");
        assert_eq!(
            &rest[TIMESTAMP_LEN..],
            "\",\"level\":\"INFO\",\"message\":\"Request finished.\",\"request_id\":\"req-1\",\
             \"model\":\"anthropic/claude-3-5-sonnet\",\"status\":200,\"offset\":-3,\
             \"stream\":false,\"latency_ms\":0.125,\"nothing\":null,\
             \"odd\":\"tab\\there \\\"quoted\\\"\",\"debug\":\"[\\\"a\\\"]\",\
             \"target\":\"orproxy::request\"}"
        );
        let second: serde_json::Value =
            serde_json::from_str(lines.next().expect("two lines")).expect("a JSON line");
        assert_eq!(second["level"], "WARN");
        assert_eq!(second["message"], "Plain message formatted.");
        assert_eq!(second["reason"], 1);
        assert!(lines.next().is_none());
    }

    fn escaped(text: &str) -> String {
        let mut out = String::new();
        Escaped(&mut out)
            .write_str(text)
            .expect("a String takes any text");
        out
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for text in [
            "plain",
            "",
            "quote \" and backslash \\",
            "line\nfeed\r\ttab\u{8}\u{c}",
            "\u{0}\u{1}\u{1f} control",
            "ünïcödé \u{7f} and 🦀",
            "\"\"\\",
        ] {
            let json = serde_json::to_string(text).expect("a string serializes");
            assert_eq!(format!("\"{}\"", escaped(text)), json, "{text:?}");
        }
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        let at = |secs: u64, micros: u64| {
            let mut out = [0; TIMESTAMP_LEN];
            let time = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros);
            timestamp(time, &mut out).to_owned()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(1_764_063_627, 440_467), "2025-11-25T09:40:27.440467Z");
        // A leap day, the last second of a year, and a year past 2100 (not a leap year).
        assert_eq!(at(951_782_400, 1), "2000-02-29T00:00:00.000001Z");
        assert_eq!(at(1_798_761_599, 999_999), "2026-12-31T23:59:59.999999Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
    }
}
