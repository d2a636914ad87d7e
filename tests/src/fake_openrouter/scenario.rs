//! Behaviours selected by `fake/...` model names, so that unmodified SDK clients can drive them.

use std::time::Duration;

/// Upper bound for N in `fake/events-N` and friends, so one request cannot exhaust memory.
pub(crate) const MAX_EVENTS: usize = 100_000;
/// Content events before a mid-stream error when the name gives no N.
const DEFAULT_MIDSTREAM_AFTER: usize = 3;

/// What the `Retry-After` header of a `fake/status-CODE...` answer should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetryAfter {
    /// 1 second on 429, absent otherwise.
    Default,
    Secs(u64),
    Omit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Scenario {
    Echo,
    /// Like `Echo`, but a tool-call answer calls the first two tools in parallel.
    TwoTools,
    Fast,
    Status {
        code: u16,
        retry_after: RetryAfter,
    },
    ContextLength,
    ContentPolicy,
    BadModel,
    /// A `fake/...` name the fake does not know.
    Unknown,
    FailFirst(u64),
    MidstreamError(usize),
    /// `MidstreamError` whose error chunk is billed at the model's price.
    BilledError(usize),
    CutAfter(usize),
    StallAfter(usize),
    Events(usize),
    Slow(Duration),
    Keepalive(Duration),
    FirstByte(Duration),
    Hang,
    Reset,
    Malformed,
    NoDone,
    Error200,
    UsageVariant,
    /// Answers a stream request with a JSON body, as some OpenAI-compatible servers do.
    IgnoreStream,
    /// A complete answer that reports no usage, even when the stream asked for it.
    NoUsage,
}

fn count(text: &str) -> Option<usize> {
    let n = number(text)?;
    usize::try_from(n).ok().filter(|n| *n <= MAX_EVENTS)
}

fn number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn millis(text: &str) -> Option<Duration> {
    number(text).map(Duration::from_millis)
}

impl Scenario {
    /// Reads the behaviour from a model name; every name outside `fake/` is a normal model.
    /// A `:variant` suffix (`fake/echo:free`) is ignored for the choice of behaviour.
    pub(crate) fn parse(model: &str) -> Scenario {
        let Some(name) = model.strip_prefix("fake/") else {
            return Scenario::Echo;
        };
        let name = name.split_once(':').map_or(name, |(base, _)| base);
        Scenario::parse_fake(name).unwrap_or(Scenario::Unknown)
    }

    fn parse_fake(name: &str) -> Option<Scenario> {
        let fixed = match name {
            "echo" => Some(Scenario::Echo),
            "two-tools" => Some(Scenario::TwoTools),
            "fast" => Some(Scenario::Fast),
            "context-length" => Some(Scenario::ContextLength),
            "content-policy" => Some(Scenario::ContentPolicy),
            "bad-model" => Some(Scenario::BadModel),
            "midstream-error" => Some(Scenario::MidstreamError(DEFAULT_MIDSTREAM_AFTER)),
            "hang" => Some(Scenario::Hang),
            "reset" => Some(Scenario::Reset),
            "malformed" => Some(Scenario::Malformed),
            "no-done" => Some(Scenario::NoDone),
            "200-error" => Some(Scenario::Error200),
            "usage-variant" => Some(Scenario::UsageVariant),
            "ignore-stream" => Some(Scenario::IgnoreStream),
            "no-usage" => Some(Scenario::NoUsage),
            _ => None,
        };
        if fixed.is_some() {
            return fixed;
        }
        if let Some(rest) = name.strip_prefix("status-") {
            return parse_status(rest);
        }
        let (prefix, arg) = name.rsplit_once('-')?;
        match prefix {
            "fail-first" => number(arg).map(Scenario::FailFirst),
            "midstream-error-after" => count(arg).map(Scenario::MidstreamError),
            "billed-error-after" => count(arg).map(Scenario::BilledError),
            "cut-after" => count(arg).map(Scenario::CutAfter),
            "stall-after" => count(arg).map(Scenario::StallAfter),
            "events" => count(arg).map(Scenario::Events),
            "slow" => millis(arg).map(Scenario::Slow),
            "keepalive" => millis(arg).map(Scenario::Keepalive),
            "first-byte" => millis(arg).map(Scenario::FirstByte),
            _ => None,
        }
    }
}

fn parse_status(rest: &str) -> Option<Scenario> {
    let (code, suffix) = rest.split_once('-').unwrap_or((rest, ""));
    let code = u16::try_from(number(code)?).ok()?;
    if !(400..=599).contains(&code) {
        return None;
    }
    let retry_after = match suffix {
        "" => RetryAfter::Default,
        "noretry" => RetryAfter::Omit,
        _ => RetryAfter::Secs(number(suffix.strip_prefix("retry-")?)?),
    };
    Some(Scenario::Status { code, retry_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(Scenario::parse("openai/gpt-4o"), Scenario::Echo);
        assert_eq!(Scenario::parse("fake/echo:free"), Scenario::Echo);
        assert_eq!(Scenario::parse("fake/two-tools"), Scenario::TwoTools);
        assert_eq!(
            Scenario::parse("fake/status-429"),
            Scenario::Status {
                code: 429,
                retry_after: RetryAfter::Default
            }
        );
        assert_eq!(
            Scenario::parse("fake/status-429-retry-7"),
            Scenario::Status {
                code: 429,
                retry_after: RetryAfter::Secs(7)
            }
        );
        assert_eq!(
            Scenario::parse("fake/status-429-noretry"),
            Scenario::Status {
                code: 429,
                retry_after: RetryAfter::Omit
            }
        );
        assert_eq!(Scenario::parse("fake/status-200"), Scenario::Unknown);
        assert_eq!(Scenario::parse("fake/fail-first-2"), Scenario::FailFirst(2));
        assert_eq!(
            Scenario::parse("fake/midstream-error"),
            Scenario::MidstreamError(3)
        );
        assert_eq!(
            Scenario::parse("fake/midstream-error-after-5"),
            Scenario::MidstreamError(5)
        );
        assert_eq!(
            Scenario::parse("fake/billed-error-after-0"),
            Scenario::BilledError(0)
        );
        assert_eq!(Scenario::parse("fake/cut-after-4"), Scenario::CutAfter(4));
        assert_eq!(Scenario::parse("fake/events-0"), Scenario::Events(0));
        assert_eq!(
            Scenario::parse("fake/slow-250"),
            Scenario::Slow(Duration::from_millis(250))
        );
        assert_eq!(
            Scenario::parse("fake/first-byte-10"),
            Scenario::FirstByte(Duration::from_millis(10))
        );
        assert_eq!(Scenario::parse("fake/events-+3"), Scenario::Unknown);
        assert_eq!(Scenario::parse("fake/events-1000001"), Scenario::Unknown);
        assert_eq!(Scenario::parse("fake/no-usage"), Scenario::NoUsage);
        assert_eq!(Scenario::parse("fake/nope"), Scenario::Unknown);
    }
}
