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

/// The OpenAI `usage` object with OpenRouter's additions, read without floats. An answer's
/// view can hold it as a field, so that usage is read in the same pass as the rest.
#[derive(Deserialize)]
pub struct WireUsage<'a> {
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

impl From<WireUsage<'_>> for Usage {
    fn from(wire: WireUsage<'_>) -> Usage {
        let (cached_tokens, cache_write_tokens) = wire
            .prompt_tokens_details
            .map_or((None, None), |d| (d.cached_tokens, d.cache_write_tokens));
        Usage {
            prompt_tokens: wire.prompt_tokens,
            completion_tokens: wire.completion_tokens,
            cached_tokens,
            cache_write_tokens,
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
        }
    }
}

impl Usage {
    /// Reads an OpenAI-shaped `usage` object (raw JSON); `None` for `null` or an unreadable value.
    pub fn from_openai_json(raw: &RawValue) -> Option<Usage> {
        let wire: Option<WireUsage<'_>> = serde_json::from_str(raw.get()).ok()?;
        wire.map(Usage::from)
    }
}

/// Converts a decimal USD amount written as JSON number text (`0.00353025`, `4.25e-06`, `"0.1"`)
/// to nano-dollars, rounding half away from zero at the ninth decimal.
pub fn usd_to_nanos(text: &str) -> Option<Nanos> {
    let Decimal {
        negative,
        int_part,
        frac_part,
        exponent,
    } = Decimal::parse(text)?;
    // value = digits * 10^(exponent - frac_len); nanos = value * 10^9. Computed on the digits
    // in place: this runs for every answer, and allocating per call showed in profiles.
    let scale = i64::from(exponent) - frac_part.len() as i64 + 9;
    let digits = int_part
        .bytes()
        .chain(frac_part.bytes())
        .skip_while(|d| *d == b'0')
        .map(|d| i64::from(d - b'0'));
    let count = digits.clone().count();
    let magnitude = if count == 0 {
        0
    } else if scale >= 0 {
        // i64 holds at most 19 digits: anything longer is not a price.
        if count as i64 + scale > 19 {
            return None;
        }
        number(digits.clone())?.checked_mul(10i64.checked_pow(u32::try_from(scale).ok()?)?)?
    } else {
        let drop = usize::try_from(-scale).ok()?;
        if drop > count {
            0
        } else {
            let mut digits = digits;
            let kept = number(digits.by_ref().take(count - drop))?;
            let round_up = digits.next().is_some_and(|d| d >= 5);
            kept.saturating_add(i64::from(round_up))
        }
    };
    Some(if negative { -magnitude } else { magnitude })
}

/// A decimal number's text taken apart: `-12.5e3` is negative, `12`, `5`, exponent 3.
struct Decimal<'a> {
    negative: bool,
    int_part: &'a str,
    frac_part: &'a str,
    exponent: i32,
}

impl<'a> Decimal<'a> {
    /// Reads JSON number text, possibly quoted; `None` unless every mantissa character is a
    /// digit (besides one point) and there is at least one.
    fn parse(text: &'a str) -> Option<Decimal<'a>> {
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
        let mut digits = int_part.bytes().chain(frac_part.bytes());
        if (int_part.is_empty() && frac_part.is_empty()) || !digits.all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Decimal {
            negative,
            int_part,
            frac_part,
            exponent,
        })
    }
}

/// The decimal digits as a number; `None` past what an `i64` holds.
fn number(mut digits: impl Iterator<Item = i64>) -> Option<i64> {
    digits.try_fold(0i64, |acc, d| acc.checked_mul(10)?.checked_add(d))
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

    /// The conversion by shifting the digits as text, the way it was first written: the
    /// arithmetic in place must agree with it on every input.
    fn shifted_as_text(text: &str) -> Option<Nanos> {
        let decimal = Decimal::parse(text)?;
        let (int_part, frac_part) = (decimal.int_part, decimal.frac_part);
        let digits = format!("{int_part}{frac_part}");
        let digits = digits.trim_start_matches('0');
        let scale = i64::from(decimal.exponent) - frac_part.len() as i64 + 9;
        let magnitude = if digits.is_empty() {
            0
        } else if scale >= 0 {
            if digits.len() as i64 + scale > 19 {
                return None;
            }
            format!("{digits}{}", "0".repeat(scale as usize))
                .parse::<i64>()
                .ok()?
        } else {
            let drop = (-scale) as usize;
            if drop > digits.len() {
                0
            } else {
                let (kept, dropped) = digits.split_at(digits.len() - drop);
                let kept = if kept.is_empty() {
                    0
                } else {
                    kept.parse::<i64>().ok()?
                };
                kept.saturating_add(i64::from(dropped.as_bytes()[0] >= b'5'))
            }
        };
        Some(if decimal.negative {
            -magnitude
        } else {
            magnitude
        })
    }

    proptest! {
        #[test]
        fn whole_nanos_round_trip(n in 0i64..1_000_000_000_000_000) {
            prop_assert_eq!(usd_to_nanos(&format_usd(n)), Some(n));
        }

        #[test]
        fn agrees_with_shifting_the_digits_as_text(
            sign in "[-+]?",
            int in "0{0,3}[0-9]{0,12}",
            frac in "(\\.[0-9]{0,14})?",
            exp in proptest::option::of(-40i32..30),
        ) {
            let exp = exp.map(|e| format!("e{e}")).unwrap_or_default();
            let text = format!("{sign}{int}{frac}{exp}");
            prop_assert_eq!(usd_to_nanos(&text), shifted_as_text(&text), "{}", text);
        }

        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = usd_to_nanos(&s);
        }
    }
}
