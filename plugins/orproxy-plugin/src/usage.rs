//! Token counts and exact money.
//!
//! Costs are integer nano-dollars (1e-9 USD) so that sums never drift; upstream decimals are
//! converted from their text, never through a float.

use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
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
    /// Of those, the tokens written to be kept an hour, which cost more (Anthropic's
    /// `cache_creation.ephemeral_1h_input_tokens`), when reported.
    pub cache_write_1h_tokens: Option<u64>,
    /// Output tokens spent on reasoning, when reported.
    pub reasoning_tokens: Option<u64>,
    /// The cost the upstream reported (OpenRouter's `usage.cost`), exact.
    pub cost_nanos: Option<Nanos>,
}

/// The OpenAI `usage` object with OpenRouter's additions, read without floats. An answer's
/// view can hold it as a field, so that usage is read in the same pass as the rest.
///
/// Each field is read on its own: one odd value (a count as `null` or text, details that are
/// not an object) costs that field, not the cost or the counts beside it. Anything but an
/// object (an array, text, a number) is no usage at all.
#[derive(Default)]
pub struct WireUsage<'a> {
    pub(crate) prompt_tokens: Option<u64>,
    pub(crate) completion_tokens: Option<u64>,
    /// The cost's JSON text as sent (a number, or a number in a string).
    pub(crate) cost: Option<&'a str>,
    pub(crate) cached_tokens: Option<u64>,
    pub(crate) cache_write_tokens: Option<u64>,
    pub(crate) reasoning_tokens: Option<u64>,
}

impl<'de: 'a, 'a> Deserialize<'de> for WireUsage<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Fields<'a> {
            type Value = WireUsage<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a usage object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<WireUsage<'a>, M::Error> {
                let mut wire = WireUsage::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::PromptTokens => wire.prompt_tokens = map.next_value::<Count>()?.0,
                        Key::CompletionTokens => {
                            wire.completion_tokens = map.next_value::<Count>()?.0;
                        }
                        Key::Cost => {
                            wire.cost = map.next_value::<Option<&RawValue>>()?.map(RawValue::get);
                        }
                        Key::PromptTokensDetails => {
                            let details = map.next_value::<Details>()?;
                            wire.cached_tokens = details.cached_tokens;
                            wire.cache_write_tokens = details.cache_write_tokens;
                        }
                        Key::CompletionTokensDetails => {
                            wire.reasoning_tokens = map.next_value::<Details>()?.reasoning_tokens;
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(wire)
            }
        }
        deserializer.deserialize_map(Fields(std::marker::PhantomData))
    }
}

/// The keys of a usage object and of its details that orproxy reads; matched without
/// allocating, as derived field names are.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Key {
    PromptTokens,
    CompletionTokens,
    Cost,
    PromptTokensDetails,
    CompletionTokensDetails,
    CachedTokens,
    CacheWriteTokens,
    ReasoningTokens,
    #[serde(other)]
    Other,
}

/// A token count as upstreams write it; `None` for anything that is not a whole, non-negative
/// number (`null`, text that is no number, `10.5`, `-3`, past `u64`).
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Lenient;
        impl<'de> Visitor<'de> for Lenient {
            type Value = Count;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a token count")
            }

            fn visit_u64<E>(self, n: u64) -> Result<Count, E> {
                Ok(Count(Some(n)))
            }

            fn visit_i64<E>(self, n: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(n).ok()))
            }

            fn visit_f64<E>(self, n: f64) -> Result<Count, E> {
                // `1e2` is a whole number written as a float; 2^64 and beyond is not a count.
                let whole = n.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&n);
                Ok(Count(whole.then_some(n as u64)))
            }

            fn visit_str<E>(self, text: &str) -> Result<Count, E> {
                Ok(Count(text.trim().parse().ok()))
            }

            fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
                Ok(Count(None))
            }

            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Count, M::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Count(None))
            }

            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Count, S::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Count(None))
            }
        }
        deserializer.deserialize_any(Lenient)
    }
}

/// `prompt_tokens_details` or `completion_tokens_details`, each count read as [`Count`]; a
/// value that is not an object holds none.
#[derive(Default)]
struct Details {
    cached_tokens: Option<u64>,
    cache_write_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

impl<'de> Deserialize<'de> for Details {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Lenient;
        impl<'de> Visitor<'de> for Lenient {
            type Value = Details;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("token details")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Details, M::Error> {
                let mut details = Details::default();
                while let Some(key) = map.next_key::<Key>()? {
                    let slot = match key {
                        Key::CachedTokens => &mut details.cached_tokens,
                        Key::CacheWriteTokens => &mut details.cache_write_tokens,
                        Key::ReasoningTokens => &mut details.reasoning_tokens,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = map.next_value::<Count>()?.0;
                }
                Ok(details)
            }

            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Details, S::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Details::default())
            }

            fn visit_str<E>(self, _: &str) -> Result<Details, E> {
                Ok(Details::default())
            }

            fn visit_u64<E>(self, _: u64) -> Result<Details, E> {
                Ok(Details::default())
            }

            fn visit_i64<E>(self, _: i64) -> Result<Details, E> {
                Ok(Details::default())
            }

            fn visit_f64<E>(self, _: f64) -> Result<Details, E> {
                Ok(Details::default())
            }

            fn visit_bool<E>(self, _: bool) -> Result<Details, E> {
                Ok(Details::default())
            }

            fn visit_unit<E>(self) -> Result<Details, E> {
                Ok(Details::default())
            }
        }
        deserializer.deserialize_any(Lenient)
    }
}

impl WireUsage<'_> {
    /// What the object tells: its cost when readable and not negative, and its counts. Without
    /// a readable cost both counts are needed, else it is no usage (the answer is then
    /// estimated from its size, rather than priced as if it used nothing).
    pub fn read(self) -> Option<Usage> {
        // A negative cost is no charge anyone made: it would lower a budget's spend. One past
        // what nano-dollars hold counts as the most they hold: dropping it would price the
        // request from `pricing` instead, as if it were nearly free.
        let cost_nanos = self
            .cost
            .and_then(|c| usd_to_nanos(c).or_else(|| beyond_nanos(c)))
            .filter(|nanos| *nanos >= 0);
        let counted = self.prompt_tokens.is_some() && self.completion_tokens.is_some();
        (counted || cost_nanos.is_some()).then(|| Usage {
            prompt_tokens: self.prompt_tokens.unwrap_or(0),
            completion_tokens: self.completion_tokens.unwrap_or(0),
            cached_tokens: self.cached_tokens,
            cache_write_tokens: self.cache_write_tokens,
            cache_write_1h_tokens: None,
            reasoning_tokens: self.reasoning_tokens,
            cost_nanos,
        })
    }
}

impl Usage {
    /// Reads an OpenAI-shaped `usage` object (raw JSON); `None` for `null` or an unreadable value.
    pub fn from_openai_json(raw: &RawValue) -> Option<Usage> {
        let wire: Option<WireUsage<'_>> = serde_json::from_str(raw.get()).ok()?;
        wire?.read()
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
                cache_write_1h_tokens: None,
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
    fn one_odd_field_costs_that_field_only() {
        let read =
            |json: &str| Usage::from_openai_json(&RawValue::from_string(json.into()).unwrap());
        let usage = |prompt, completion, cost| Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost_nanos: cost,
            ..Usage::default()
        };
        // A readable cost is kept whatever the counts beside it say.
        let cases = [
            (
                r#"{"prompt_tokens":"ten","completion_tokens":5,"cost":0.0001}"#,
                Some(usage(0, 5, Some(100_000))),
            ),
            (
                r#"{"prompt_tokens":10,"completion_tokens":null,"cost":0.0001}"#,
                Some(usage(10, 0, Some(100_000))),
            ),
            (
                r#"{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":"x"}"#,
                Some(usage(10, 5, None)),
            ),
            (
                r#"{"prompt_tokens":1e2,"completion_tokens":10.0}"#,
                Some(usage(100, 10, None)),
            ),
            (
                r#"{"prompt_tokens":1,"prompt_tokens":2,"completion_tokens":3}"#,
                Some(usage(2, 3, None)),
            ),
            // Without a cost, both counts are needed: else the answer is estimated, not free.
            (r#"{"prompt_tokens":10.5,"completion_tokens":5}"#, None),
            (
                r#"{"prompt_tokens":18446744073709551616,"completion_tokens":1}"#,
                None,
            ),
            (
                r#"{"prompt_tokens":-1,"completion_tokens":1,"cost":null}"#,
                None,
            ),
            ("{}", None),
            // Not an object: no usage, even when a position could be read as a count.
            ("[1,2]", None),
            (r#""lots""#, None),
        ];
        for (json, expected) in cases {
            assert_eq!(read(json), expected, "{json}");
        }
        let details = read(
            r#"{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":"4","audio_tokens":[]},"completion_tokens_details":{"reasoning_tokens":-3}}"#,
        )
        .unwrap();
        assert_eq!(
            (details.cached_tokens, details.reasoning_tokens),
            (Some(4), None)
        );
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
