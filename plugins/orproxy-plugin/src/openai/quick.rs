//! Answers and stream chunks as upstreams send them on success, read in one pass over their
//! bytes.
//!
//! Reading an answer through serde cost a non-stream call a sixth of orproxy's instructions,
//! most of it matching keys and parsing values the daemon never reads. These readers check the
//! whole text against JSON's grammar as serde_json does, and read only what the daemon uses:
//! the served `model`, the `usage`, and of each choice its `message` size and `finish_reason`
//! (answers) or whether its `delta` carries content (chunks). Anything they do not expect (an
//! escape in a key or a text they read, an `error`, a count that is not a plain integer, a key
//! twice) makes them give up, and serde reads the text as before: the property tests in
//! `openai.rs` hold the two readings equal.

use crate::backend::MappedResponse;
use crate::usage::WireUsage;

/// Deeper than this, serde reads the answer (serde_json's own limit is 128).
const MAX_DEPTH: usize = 100;

/// What [`super::map_response`] reports for an ordinary answer; `None` leaves it to serde.
pub(super) fn read(body: &[u8]) -> Option<MappedResponse> {
    let mut model = Slot::default();
    let mut usage = Slot::default();
    let mut answer_bytes = Slot::default();
    top_level(body, |scan, key| match key {
        b"model" => model.fill(scan.text_or_null()?.map(str::to_owned)),
        b"usage" => usage.fill(scan.usage()?),
        b"choices" => answer_bytes.fill(scan.choices()?),
        _ => scan.skip(1),
    })?;
    Some(MappedResponse {
        usage: usage.0.flatten().and_then(WireUsage::read),
        model: model.0.flatten(),
        answer_bytes: answer_bytes.0.unwrap_or(0),
        ..MappedResponse::default()
    })
}

/// What [`super::ChunkMapper`] reads of a stream chunk.
pub(super) struct Chunk<'a> {
    pub model: Option<&'a str>,
    /// `Some` when the chunk carries a `usage` that is not `null`.
    pub usage: Option<WireUsage<'a>>,
    /// A choice has a `finish_reason` that is not `null`.
    pub finished: bool,
    /// A choice's `delta` carries text, reasoning, a refusal or a tool call.
    pub content: bool,
    /// `choices` holds at least one choice.
    pub any_choice: bool,
}

/// A stream chunk's data as OpenAI-compatible upstreams send it; `None` leaves it to serde.
pub(super) fn read_chunk(data: &[u8]) -> Option<Chunk<'_>> {
    let mut model = Slot::default();
    let mut usage = Slot::default();
    let mut choices = Slot::default();
    top_level(data, |scan, key| match key {
        b"model" => model.fill(scan.text_or_null()?),
        b"usage" => usage.fill(scan.usage()?),
        b"choices" => choices.fill(scan.chunk_choices()?),
        _ => scan.skip(1),
    })?;
    let (finished, content, any_choice) = choices.0.unwrap_or_default();
    Some(Chunk {
        model: model.0.flatten(),
        usage: usage.0.flatten(),
        finished,
        content,
        any_choice,
    })
}

/// `bytes` as one object and nothing after it, each key handed to `field`. An `error` key gives
/// up: an error in a 200, an answer cut short or an error chunk is read by serde.
fn top_level<'a>(
    bytes: &'a [u8],
    mut field: impl FnMut(&mut Scan<'a>, &[u8]) -> Option<()>,
) -> Option<()> {
    let mut scan = Scan { bytes, at: 0 };
    scan.object(|scan, key| match key {
        b"error" => None,
        _ => field(scan, key),
    })?;
    scan.peek().is_none().then_some(())
}

/// Marks `bit` seen; `None` when it was already: serde refuses a struct's field given twice,
/// and a usage key given twice is left to it.
fn once(seen: &mut u8, bit: u8) -> Option<()> {
    (*seen & bit == 0).then(|| *seen |= bit)
}

/// A field read at most once: serde refuses a struct's field given twice.
struct Slot<T>(Option<T>);

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot(None)
    }
}

impl<T> Slot<T> {
    fn fill(&mut self, value: T) -> Option<()> {
        match self.0 {
            Some(_) => None,
            None => {
                self.0 = Some(value);
                Some(())
            }
        }
    }
}

/// What a string held besides plain text: an escape, or bytes of a multi-byte character
/// (`high`, every byte seen or-ed together, possibly with a few past the string's end).
#[derive(Default)]
struct Text {
    escaped: bool,
    high: u64,
}

const LOW_BITS: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// The high bit of the first byte of `word` (little-endian) that is a quote, a backslash or a
/// control byte, set; later bits may be set falsely, so only the lowest counts.
fn special_bytes(word: u64) -> u64 {
    let control = word.wrapping_sub(LOW_BITS * 0x20) & !word;
    let quotes = word ^ (LOW_BITS * u64::from(b'"'));
    let quote = quotes.wrapping_sub(LOW_BITS) & !quotes;
    let backslashes = word ^ (LOW_BITS * u64::from(b'\\'));
    let backslash = backslashes.wrapping_sub(LOW_BITS) & !backslashes;
    (control | quote | backslash) & HIGH_BITS
}

struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    /// The next byte that is not whitespace, not consumed.
    #[inline]
    fn peek(&mut self) -> Option<u8> {
        while let Some(&byte) = self.bytes.get(self.at) {
            if !matches!(byte, b' ' | b'\n' | b'\r' | b'\t') {
                return Some(byte);
            }
            self.at += 1;
        }
        None
    }

    #[inline]
    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// An object, each key handed to `field`, which must consume the value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let key = self.key()?;
            self.eat(b':')?;
            field(self, key)?;
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// An array, each element handed to `element`, which must consume it.
    fn array(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        if self.eat(b']').is_some() {
            return Some(());
        }
        loop {
            element(self)?;
            match self.peek()? {
                b',' => self.at += 1,
                b']' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A string's bytes between its quotes, escapes as written, and what they hold.
    #[inline]
    fn string(&mut self) -> Option<(&'a [u8], Text)> {
        self.eat(b'"')?;
        let start = self.at;
        let mut text = Text::default();
        loop {
            // Eight bytes at a time up to the next quote, backslash or control byte, as
            // serde_json skips strings; most of an answer is text.
            while let Some(word) = self.bytes.get(self.at..self.at + 8) {
                let word = u64::from_le_bytes(word.try_into().ok()?);
                text.high |= word;
                let stop = special_bytes(word);
                if stop != 0 {
                    self.at += stop.trailing_zeros() as usize / 8;
                    break;
                }
                self.at += 8;
            }
            let byte = *self.bytes.get(self.at)?;
            self.at += 1;
            match byte {
                b'"' => return Some((&self.bytes[start..self.at - 1], text)),
                b'\\' => {
                    text.escaped = true;
                    self.escape()?;
                }
                0..=0x1f => return None,
                _ => text.high |= u64::from(byte),
            }
        }
    }

    /// The rest of an escape after its backslash; which code point it names is not checked,
    /// as serde_json does not check it in the strings it skips.
    fn escape(&mut self) -> Option<()> {
        let byte = *self.bytes.get(self.at)?;
        self.at += 1;
        match byte {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(()),
            b'u' => {
                let hex = self.bytes.get(self.at..self.at + 4)?;
                self.at += 4;
                hex.iter().all(u8::is_ascii_hexdigit).then_some(())
            }
            _ => None,
        }
    }

    /// A key without escapes, checked as UTF-8 as serde checks the keys it reads (ASCII needs
    /// no check).
    #[inline]
    fn key(&mut self) -> Option<&'a [u8]> {
        match self.string()? {
            (_, Text { escaped: true, .. }) => None,
            (bytes, Text { high, .. }) if high & HIGH_BITS == 0 => Some(bytes),
            (bytes, _) => std::str::from_utf8(bytes).ok().map(str::as_bytes),
        }
    }

    /// A string without escapes, checked as UTF-8.
    fn plain_text(&mut self) -> Option<&'a str> {
        match self.string()? {
            (bytes, Text { escaped: false, .. }) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }

    /// Whether the next value is `null`, consumed if it is.
    fn null(&mut self) -> Option<bool> {
        match self.peek()? {
            b'n' => self.literal(b"null").map(|()| true),
            _ => Some(false),
        }
    }

    /// A string without escapes, or `null`.
    fn text_or_null(&mut self) -> Option<Option<&'a str>> {
        if self.null()? {
            return Some(None);
        }
        self.plain_text().map(Some)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.at + word.len();
        (self.bytes.get(self.at..end)? == word).then(|| self.at = end)
    }

    /// A number's text, checked against JSON's grammar.
    fn number(&mut self) -> Option<&'a [u8]> {
        self.peek()?;
        let start = self.at;
        if self.bytes.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        match *self.bytes.get(self.at)? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            self.bytes.get(self.at)?.is_ascii_digit().then_some(())?;
            self.digits();
        }
        if matches!(self.bytes.get(self.at), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.bytes.get(self.at), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.bytes.get(self.at)?.is_ascii_digit().then_some(())?;
            self.digits();
        }
        Some(&self.bytes[start..self.at])
    }

    fn digits(&mut self) {
        while self.bytes.get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
    }

    /// Any value, checked and passed over; `depth` is how deep it sits.
    fn skip(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(|scan, _| scan.skip(depth + 1)),
            b'[' => self.array(|scan| scan.skip(depth + 1)),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number().map(drop),
        }
    }

    /// A token count: a plain non-negative integer, or `null`. Other forms (`1e2`, `"16"`, a
    /// negative) are read leniently by serde.
    fn count(&mut self) -> Option<Option<u64>> {
        if self.null()? {
            return Some(None);
        }
        self.number()?
            .iter()
            .try_fold(0u64, |n, &digit| {
                let digit = digit.is_ascii_digit().then(|| u64::from(digit - b'0'))?;
                n.checked_mul(10)?.checked_add(digit)
            })
            .map(Some)
    }

    /// The `usage` object, or `null`.
    fn usage(&mut self) -> Option<Option<WireUsage<'a>>> {
        if self.null()? {
            return Some(None);
        }
        let mut wire = WireUsage::default();
        let mut seen = 0u8;
        self.object(|scan, key| {
            let bit = match key {
                b"prompt_tokens" => {
                    wire.prompt_tokens = scan.count()?;
                    1
                }
                b"completion_tokens" => {
                    wire.completion_tokens = scan.count()?;
                    2
                }
                b"cost" => {
                    wire.cost = match scan.null()? {
                        true => None,
                        // The grammar's text is ASCII.
                        false => Some(std::str::from_utf8(scan.number()?).ok()?),
                    };
                    4
                }
                b"prompt_tokens_details" => {
                    let [cached, cache_write, _] = scan.details()?;
                    wire.cached_tokens = cached;
                    wire.cache_write_tokens = cache_write;
                    8
                }
                b"completion_tokens_details" => {
                    wire.reasoning_tokens = scan.details()?[2];
                    16
                }
                _ => return scan.skip(3),
            };
            once(&mut seen, bit)
        })?;
        Some(Some(wire))
    }

    /// `cached_tokens`, `cache_write_tokens` and `reasoning_tokens` of a details object; none
    /// of them for a value that is not an object, as serde reads it.
    fn details(&mut self) -> Option<[Option<u64>; 3]> {
        let mut counts = [None; 3];
        if self.peek()? != b'{' {
            self.skip(3)?;
            return Some(counts);
        }
        let mut seen = 0u8;
        self.object(|scan, key| {
            let slot = match key {
                b"cached_tokens" => 0,
                b"cache_write_tokens" => 1,
                b"reasoning_tokens" => 2,
                _ => return scan.skip(4),
            };
            once(&mut seen, 1 << slot)?;
            counts[slot] = scan.count()?;
            Some(())
        })?;
        Some(counts)
    }

    /// A chunk's `choices`, or `null`: whether one finished, whether one carries content, and
    /// whether there is any.
    fn chunk_choices(&mut self) -> Option<(bool, bool, bool)> {
        let mut seen = (false, false, false);
        if self.null()? {
            return Some(seen);
        }
        self.array(|scan| {
            seen.2 = true;
            let mut delta = Slot::default();
            let mut finish_reason = Slot::default();
            scan.object(|scan, key| match key {
                b"delta" => delta.fill(scan.delta()?),
                b"finish_reason" => finish_reason.fill(!scan.null_or_skip(3)?),
                b"error" => None,
                _ => scan.skip(3),
            })?;
            seen.0 |= finish_reason.0.unwrap_or(false);
            seen.1 |= delta.0.unwrap_or(false);
            Some(())
        })?;
        Some(seen)
    }

    /// Whether a `delta` (or `null`) carries text, reasoning, a refusal or a tool call.
    fn delta(&mut self) -> Option<bool> {
        if self.null()? {
            return Some(false);
        }
        let mut content = false;
        let mut seen = 0u8;
        self.object(|scan, key| {
            let (bit, has) = match key {
                b"content" => (1, scan.text_or_null()?.is_some_and(|t| !t.is_empty())),
                b"reasoning" => (2, scan.text_or_null()?.is_some_and(|t| !t.is_empty())),
                b"reasoning_content" => (4, scan.text_or_null()?.is_some_and(|t| !t.is_empty())),
                b"refusal" => (8, scan.text_or_null()?.is_some_and(|t| !t.is_empty())),
                b"tool_calls" => (16, !scan.null_or_skip(4)?),
                b"function_call" => (32, !scan.null_or_skip(4)?),
                _ => return scan.skip(4),
            };
            content |= has;
            once(&mut seen, bit)
        })?;
        Some(content)
    }

    /// `true` for `null`; any other value is passed over.
    fn null_or_skip(&mut self, depth: usize) -> Option<bool> {
        match self.null()? {
            true => Some(true),
            false => self.skip(depth).map(|()| false),
        }
    }

    /// The `choices` array, or `null`: the bytes of JSON of the messages.
    fn choices(&mut self) -> Option<usize> {
        if self.null()? {
            return Some(0);
        }
        let mut bytes = 0;
        self.array(|scan| {
            let mut message = Slot::default();
            let mut finish_reason = Slot::default();
            scan.object(|scan, key| match key {
                b"message" => {
                    let start = scan.peek().map(|_| scan.at)?;
                    scan.skip(3)?;
                    let raw = &scan.bytes[start..scan.at];
                    message.fill((raw != b"null").then_some(raw.len()))
                }
                // An answer cut short is read by serde.
                b"finish_reason" => match scan.text_or_null()? {
                    Some("error") => None,
                    reason => finish_reason.fill(reason),
                },
                b"error" => None,
                _ => scan.skip(3),
            })?;
            bytes += message.0.flatten().unwrap_or(0);
            Some(())
        })?;
        Some(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_openrouter_answer_is_read_here() {
        let body = br#"{"id":"gen-1","provider":"P","model":"fake/fast","object":"chat.completion","created":1700000000,"choices":[{"index":0,"logprobs":null,"finish_reason":"stop","native_finish_reason":"stop","message":{"role":"assistant","content":"The fox.","refusal":null,"reasoning":null}}],"usage":{"prompt_tokens":16,"completion_tokens":10,"total_tokens":26,"cost":3.6e-05,"is_byok":false,"prompt_tokens_details":{"cached_tokens":4,"cache_write_tokens":0,"audio_tokens":0,"video_tokens":0},"cost_details":{"upstream_inference_cost":3.6e-05},"completion_tokens_details":{"reasoning_tokens":2,"image_tokens":0}}}"#;
        let mapped = read(body).expect("an ordinary answer");
        let usage = mapped.usage.clone().expect("usage");
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (16, 10));
        assert_eq!(usage.cached_tokens, Some(4));
        assert_eq!(usage.cache_write_tokens, Some(0));
        assert_eq!(usage.reasoning_tokens, Some(2));
        assert_eq!(usage.cost_nanos, Some(36_000));
        assert_eq!(mapped.model.as_deref(), Some("fake/fast"));
        let message =
            r#"{"role":"assistant","content":"The fox.","refusal":null,"reasoning":null}"#;
        assert_eq!(mapped.answer_bytes, message.len());
    }

    #[test]
    fn what_it_does_not_expect_is_left_to_serde() {
        for body in [
            "",
            "[]",
            r#"{"model":"m"} x"#,
            r#"{"model":"m","model":"n"}"#,
            r#"{"mod\u0065l":"m"}"#,
            r#"{"model":"\u006d"}"#,
            r#"{"error":{"message":"no"}}"#,
            r#"{"choices":[{"finish_reason":"error","message":null}]}"#,
            r#"{"choices":[{"error":null}]}"#,
            r#"{"usage":{"prompt_tokens":1e2}}"#,
            r#"{"usage":{"prompt_tokens":"16"}}"#,
            r#"{"usage":{"cost":"0.1"}}"#,
            r#"{"usage":[]}"#,
            r#"{"x":01}"#,
            r#"{"x":1.}"#,
            r#"{"x":"tab	in text"}"#,
            r#"{"x":"\q"}"#,
            r#"{"x":tru}"#,
            r#"{"x":[1,]}"#,
            r#"{"x":{"a":1,}}"#,
        ] {
            assert!(read(body.as_bytes()).is_none(), "{body}");
        }
        let deep = format!(r#"{{"x":{}{}}}"#, "[".repeat(150), "]".repeat(150));
        assert!(read(deep.as_bytes()).is_none());
    }
}
