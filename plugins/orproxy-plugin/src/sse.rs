//! Server-sent events: cutting a byte stream into events without copying them.
//!
//! The relay forwards each event's raw bytes unchanged; plugins look at [`SseEvent`] views to
//! classify them. An event ends at a blank line (`\n\n` or `\r\n\r\n`).

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

/// One complete event: its raw bytes (terminator included) and accessors over its lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    raw: Bytes,
}

impl SseEvent {
    /// Wraps raw event bytes (as cut by [`SseFramer`], or built by a plugin).
    pub fn new(raw: Bytes) -> Self {
        SseEvent { raw }
    }

    /// The event exactly as received, terminator included.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    fn lines(&self) -> impl Iterator<Item = &[u8]> {
        self.raw
            .split(|b| *b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .filter(|line| !line.is_empty())
    }

    /// True when every line is a comment (`: OPENROUTER PROCESSING`): a keep-alive.
    pub fn is_comment(&self) -> bool {
        // Nearly every event is one `data:` line: its first byte settles it.
        if self.raw.first() == Some(&b'd') {
            return false;
        }
        self.lines().all(|line| line.first() == Some(&b':'))
    }

    /// The payload of the common one-line event `data: ...\n\n`, without scanning lines.
    fn single_data_line(&self) -> Option<&[u8]> {
        let body = self.raw.strip_prefix(b"data:")?;
        let body = body.strip_suffix(b"\n\n")?;
        if memchr::memchr(b'\n', body).is_some() || body.last() == Some(&b'\r') {
            return None;
        }
        Some(body.strip_prefix(b" ").unwrap_or(body))
    }

    /// The `event:` field, if any (Anthropic streams name their events).
    pub fn event_name(&self) -> Option<&str> {
        self.lines()
            .find_map(|line| line.strip_prefix(b"event:"))
            .and_then(|v| std::str::from_utf8(trim_space(v)).ok())
    }

    /// The data payload: `data:` lines joined by `\n`; `None` for events without data.
    pub fn data(&self) -> Option<Cow<'_, [u8]>> {
        if let Some(payload) = self.single_data_line() {
            return Some(Cow::Borrowed(payload));
        }
        let mut data: Option<Cow<'_, [u8]>> = None;
        for line in self.lines() {
            let Some(value) = line.strip_prefix(b"data:") else {
                continue;
            };
            let value = value.strip_prefix(b" ").unwrap_or(value);
            data = Some(match data {
                None => Cow::Borrowed(value),
                Some(prev) => {
                    let mut joined = prev.into_owned();
                    joined.push(b'\n');
                    joined.extend_from_slice(value);
                    Cow::Owned(joined)
                }
            });
        }
        data
    }

    /// True for the OpenAI terminator `data: [DONE]`.
    pub fn is_done(&self) -> bool {
        self.data().is_some_and(|d| d.as_ref() == b"[DONE]")
    }
}

fn trim_space(v: &[u8]) -> &[u8] {
    v.strip_prefix(b" ").unwrap_or(v)
}

/// Builds a `data: ...\n\n` event from a payload.
pub fn data_event(payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Cuts a stream of byte chunks into complete events.
#[derive(Debug, Default)]
pub struct SseFramer {
    buf: BytesMut,
    /// Bytes of `buf` already searched for a terminator, so no byte is scanned twice.
    scanned: usize,
}

impl SseFramer {
    /// Creates an empty framer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes received but not yet part of a complete event.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next complete event, if one has arrived.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        // A terminator may straddle the previous scan boundary: back up by up to 3 bytes.
        let mut from = self.scanned.saturating_sub(3);
        while let Some(rel) = memchr::memchr(b'\n', &self.buf[from..]) {
            let nl = from + rel;
            let rest = &self.buf[nl + 1..];
            let end = if rest.first() == Some(&b'\n') {
                Some(nl + 2)
            } else if rest.starts_with(b"\r\n") {
                Some(nl + 3)
            } else {
                None
            };
            if let Some(end) = end {
                self.scanned = 0;
                return Some(SseEvent::new(self.buf.split_to(end).freeze()));
            }
            from = nl + 1;
        }
        self.scanned = self.buf.len();
        None
    }

    /// Takes whatever is left after the stream ended (an event without its blank line).
    pub fn finish(&mut self) -> Option<SseEvent> {
        let rest = self.buf.split().freeze();
        self.scanned = 0;
        (!rest.iter().all(u8::is_ascii_whitespace)).then(|| SseEvent::new(rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cut(chunks: &[&[u8]]) -> Vec<Bytes> {
        let mut framer = SseFramer::new();
        let mut out = Vec::new();
        for chunk in chunks {
            framer.push(chunk);
            while let Some(ev) = framer.next_event() {
                out.push(ev.raw().clone());
            }
        }
        out
    }

    #[test]
    fn events_are_cut_at_blank_lines_whatever_the_chunking() {
        let stream: &[u8] = b": OPENROUTER PROCESSING\n\ndata: {\"a\":1}\n\ndata: [DONE]\n\n";
        let whole = cut(&[stream]);
        assert_eq!(whole.len(), 3);
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(cut(&bytewise), whole);
        assert_eq!(&whole[1][..], b"data: {\"a\":1}\n\n");
    }

    #[test]
    fn crlf_terminators_are_understood() {
        let got = cut(&[b"data: x\r\n\r\ndata: y\r\n", b"\r\n"]);
        assert_eq!(got.len(), 2);
        assert_eq!(
            SseEvent::new(got[1].clone()).data().as_deref(),
            Some(&b"y"[..])
        );
    }

    #[test]
    fn views_classify_events() {
        let keepalive = SseEvent::new(Bytes::from_static(b": OPENROUTER PROCESSING\n\n"));
        assert!(keepalive.is_comment());
        assert_eq!(keepalive.data(), None);
        let named = SseEvent::new(Bytes::from_static(b"event: ping\ndata: {}\n\n"));
        assert_eq!(named.event_name(), Some("ping"));
        assert!(!named.is_comment());
        let multi = SseEvent::new(Bytes::from_static(b"data: a\ndata: b\n\n"));
        assert_eq!(multi.data().as_deref(), Some(&b"a\nb"[..]));
        assert!(SseEvent::new(Bytes::from_static(b"data: [DONE]\n\n")).is_done());
    }

    #[test]
    fn finish_returns_a_trailing_partial_event() {
        let mut framer = SseFramer::new();
        framer.push(b"data: {\"a\":1}\n\ndata: {\"b\"");
        assert!(framer.next_event().is_some());
        assert!(framer.next_event().is_none());
        assert_eq!(&framer.finish().unwrap().raw()[..], b"data: {\"b\"");
        assert!(framer.finish().is_none());
    }

    proptest! {
        #[test]
        fn chunking_never_changes_the_events(
            payloads in proptest::collection::vec("[a-z{}\":, ]{0,20}", 1..8),
            cuts in proptest::collection::vec(1usize..7, 1..40),
        ) {
            let stream: Vec<u8> = payloads.iter().flat_map(|p| format!("data: {p}\n\n").into_bytes()).collect();
            let mut chunks = Vec::new();
            let mut at = 0;
            for c in cuts.iter().cycle() {
                if at >= stream.len() { break; }
                let end = (at + c).min(stream.len());
                chunks.push(&stream[at..end]);
                at = end;
            }
            let got = cut(&chunks);
            prop_assert_eq!(got.len(), payloads.len());
            let joined: Vec<u8> = got.iter().flat_map(|b| b.to_vec()).collect();
            prop_assert_eq!(joined, stream);
        }
    }
}
