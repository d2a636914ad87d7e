//! Token counts and exact money.
//!
//! Costs are integer nano-dollars (1e-9 USD) so that sums never drift; upstream decimals are
//! converted from their text, never through a float.

use serde::Deserialize;
use serde_json::value::RawValue;

/// Nano-dollars: 1 USD is 1_000_000_000.
pub type Nanos = i64;

/// What one upstream call consumed, as far as the upstream said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Output tokens, reasoning ones included.
    pub completion_tokens: u64,
    /// Input tokens served from the provider's prompt cache, when reported.
    pub cached_tokens: Option<u64>,
    /// Input tokens written to the provider's prompt cache (OpenRouter's
    /// `prompt_tokens_details.cache_write_tokens`, Anthropic's cache creation), when reported.
    pub cache_write_tokens: Option<u64>,
    /// Output tokens spent on reasoning, when reported.
    pub reasoning_tokens: Option<u64>,
    /// The cost the upstream reported (OpenRouter's `usage.cost`), exact.
    pub cost_nanos: Option<Nanos>,
}

/// The OpenAI `usage` object with OpenRouter's additions, read without floats.
#[derive(Deserialize)]
struct WireUsage<'a> {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default, borrow)]
    cost: Option<&'a RawValue>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    cache_write_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl Usage {
    /// Reads an OpenAI-shaped `usage` object (raw JSON); `None` for `null` or an unreadable value.
    pub fn from_openai_json(raw: &RawValue) -> Option<Usage> {
        let wire: Option<WireUsage<'_>> = serde_json::from_str(raw.get()).ok()?;
        let wire = wire?;
        Some(Usage {
            prompt_tokens: wire.prompt_tokens,
            completion_tokens: wire.completion_tokens,
            cached_tokens: wire
                .prompt_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens),
            cache_write_tokens: wire
                .prompt_tokens_details
                .as_ref()
                .and_then(|d| d.cache_write_tokens),
            reasoning_tokens: wire
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens),
            // A negative cost is no charge anyone made: it would lower a budget's spend. One
            // past what nano-dollars hold counts as the most they hold: dropping it would
            // price the request from `pricing` instead, as if it were nearly free.
            cost_nanos: wire
                .cost
                .and_then(|c| usd_to_nanos(c.get()).or_else(|| beyond_nanos(c.get())))
                .filter(|nanos| *nanos >= 0),
        })
    }
}

/// Converts a decimal USD amount written as JSON number text (`0.00353025`, `4.25e-06`, `"0.1"`)
/// to nano-dollars, rounding half away from zero at the ninth decimal.
pub fn usd_to_nanos(text: &str) -> Option<Nanos> {
    let text = text.trim().trim_matches('"');
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], text[at + 1..].parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    if !int_part
        .bytes()
        .chain(frac_part.bytes())
        .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // value = digits * 10^(exponent - frac_len); nanos = value * 10^9.
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    let scale = i64::from(exponent) - frac_part.len() as i64 + 9;
    let magnitude = if digits.is_empty() {
        0
    } else if scale >= 0 {
        // i64 holds at most 19 digits: anything longer is not a price, and must not allocate.
        if digits.len() as i64 + scale > 19 {
            return None;
        }
        let shifted = format!("{digits}{}", "0".repeat(usize::try_from(scale).ok()?));
        shifted.parse::<i64>().ok()?
    } else {
        let drop = usize::try_from(-scale).ok()?;
        if drop > digits.len() {
            0
        } else {
            let (kept, dropped) = digits.split_at(digits.len() - drop);
            let kept = if kept.is_empty() {
                0
            } else {
                kept.parse::<i64>().ok()?
            };
            let round_up = dropped.as_bytes().first().is_some_and(|d| *d >= b'5');
            kept.saturating_add(i64::from(round_up))
        }
    };
    Some(if negative { -magnitude } else { magnitude })
}

/// [`Nanos::MAX`] for a USD amount too large for nano-dollars (`1e300`), else `None`.
pub fn beyond_nanos(text: &str) -> Option<Nanos> {
    let usd: f64 = text.trim().trim_matches('"').parse().ok()?;
    (usd.is_finite() && usd >= Nanos::MAX as f64 / 1e9).then_some(Nanos::MAX)
}

/// Formats nano-dollars as USD with nine decimals (`0.003530250`).
pub fn format_usd(nanos: Nanos) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let abs = nanos.unsigned_abs();
    format!("{sign}{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decimals_convert_exactly() {
        assert_eq!(usd_to_nanos("0.00353025"), Some(3_530_250));
        assert_eq!(usd_to_nanos("4.25e-06"), Some(4_250));
        assert_eq!(usd_to_nanos("0.000837"), Some(837_000));
        assert_eq!(usd_to_nanos("0"), Some(0));
        assert_eq!(usd_to_nanos("12"), Some(12_000_000_000));
        assert_eq!(usd_to_nanos("1E2"), Some(100_000_000_000));
        assert_eq!(usd_to_nanos("\"0.1\""), Some(100_000_000));
    }

    #[test]
    fn rounding_is_half_away_from_zero_at_the_ninth_decimal() {
        assert_eq!(usd_to_nanos("0.0000000005"), Some(1));
        assert_eq!(usd_to_nanos("0.0000000004999"), Some(0));
        assert_eq!(usd_to_nanos("-0.0000000015"), Some(-2));
        assert_eq!(usd_to_nanos("1.5e-10"), Some(0));
        assert_eq!(usd_to_nanos("5e-10"), Some(1));
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            "",
            ".",
            "abc",
            "1.2.3",
            "1e",
            "0x10",
            "--1",
            "1e999999999999",
            "1e2000000000",
        ] {
            assert_eq!(usd_to_nanos(bad), None, "{bad}");
        }
    }

    #[test]
    fn usage_reads_openrouter_fields() {
        let raw = RawValue::from_string(
            r#"{"prompt_tokens":17,"completion_tokens":1763,"total_tokens":1780,"cost":0.00353025,
            "prompt_tokens_details":{"cached_tokens":3,"cache_write_tokens":4},"completion_tokens_details":{"reasoning_tokens":832}}"#
                .to_owned(),
        )
        .unwrap();
        let usage = Usage::from_openai_json(&raw).unwrap();
        assert_eq!(
            usage,
            Usage {
                prompt_tokens: 17,
                completion_tokens: 1763,
                cached_tokens: Some(3),
                cache_write_tokens: Some(4),
                reasoning_tokens: Some(832),
                cost_nanos: Some(3_530_250),
            }
        );
        let null = RawValue::from_string("null".to_owned()).unwrap();
        assert_eq!(Usage::from_openai_json(&null), None);
        let negative = RawValue::from_string(
            r#"{"prompt_tokens":1,"completion_tokens":1,"cost":-0.000001}"#.to_owned(),
        )
        .unwrap();
        assert_eq!(Usage::from_openai_json(&negative).unwrap().cost_nanos, None);
        // Past what nano-dollars hold: the most they hold, not nothing.
        for cost in ["9223372036.854775808", "1e300", "99999999999999999999999"] {
            let huge = RawValue::from_string(format!(
                r#"{{"prompt_tokens":1,"completion_tokens":1,"cost":{cost}}}"#
            ))
            .unwrap();
            let usage = Usage::from_openai_json(&huge).unwrap();
            assert_eq!(usage.cost_nanos, Some(Nanos::MAX), "{cost}");
        }
        // Rounding up at the very top saturates instead of overflowing.
        assert_eq!(usd_to_nanos("9223372036.8547758075"), Some(Nanos::MAX));
    }

    #[test]
    fn format_prints_nine_decimals() {
        assert_eq!(format_usd(3_530_250), "0.003530250");
        assert_eq!(format_usd(-1), "-0.000000001");
    }

    proptest! {
        #[test]
        fn whole_nanos_round_trip(n in 0i64..1_000_000_000_000_000) {
            prop_assert_eq!(usd_to_nanos(&format_usd(n)), Some(n));
        }

        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = usd_to_nanos(&s);
        }
    }
}
