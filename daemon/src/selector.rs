//! Model selectors: `[backend:]model[?param=value&...][|selector...]`.
//!
//! - The backend prefix counts only when the first `:` comes before the first `/`, so OpenRouter
//!   variants such as `qwen/qwen3-coder:free` stay model names.
//! - URI parameters are percent-decoded and typed by look (integer, float, `true`/`false`, else
//!   string); they override the body's values. Standard numeric parameters are range-checked.
//! - `a|b|c` is an ordered failover chain.

use std::fmt;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use serde_json::{Number, Value};

/// One selector of a chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    /// The backend named by the prefix, if any.
    pub backend: Option<String>,
    /// The upstream model name.
    pub model: String,
    /// URI parameters, in order, typed.
    pub params: Vec<(String, Value)>,
}

/// A selector that cannot be used; the message names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid model selector `{selector}`: {reason}")]
pub struct SelectorError {
    /// The whole selector as received.
    pub selector: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The longest `model` accepted, in bytes.
pub const MAX_SELECTOR_BYTES: usize = 8192;

/// Parses a whole selector, chain included; the first element is the primary target.
pub fn parse_chain(text: &str) -> Result<Vec<Selector>, SelectorError> {
    // Far above any real selector, and below what a rule script may hold in a string: a
    // longer one would fail in the first script that reads it, blamed on the script.
    if text.len() > MAX_SELECTOR_BYTES {
        let start = text
            .char_indices()
            .nth(40)
            .map_or(text, |(at, _)| &text[..at]);
        return Err(SelectorError {
            selector: format!("{}…", start.escape_debug()),
            reason: format!(
                "{} bytes long; a model selector is at most {MAX_SELECTOR_BYTES}",
                text.len()
            ),
        });
    }
    let fail = |reason: String| SelectorError {
        selector: text.to_owned(),
        reason,
    };
    // No model name has one, and it could not travel in `x-orproxy-route` or a log line.
    if let Some(at) = text.find(char::is_control) {
        return Err(SelectorError {
            selector: text.escape_debug().to_string(),
            reason: format!("a control character at byte {at}"),
        });
    }
    text.split('|')
        .enumerate()
        .map(|(i, part)| {
            parse_one(part.trim()).map_err(|reason| {
                if text.contains('|') {
                    fail(format!(
                        "chain element {} (`{}`): {reason}",
                        i + 1,
                        part.trim()
                    ))
                } else {
                    fail(reason)
                }
            })
        })
        .collect()
}

fn parse_one(text: &str) -> Result<Selector, String> {
    if text.is_empty() {
        return Err("the model name is empty".into());
    }
    let (name, query) = match text.split_once('?') {
        Some((name, query)) => (name, Some(query)),
        None => (text, None),
    };
    let colon = name.find(':');
    let slash = name.find('/');
    let (backend, model) = match (colon, slash) {
        (Some(c), Some(s)) if c < s => (Some(&name[..c]), &name[c + 1..]),
        (Some(c), None) => (Some(&name[..c]), &name[c + 1..]),
        _ => (None, name),
    };
    if backend.is_some_and(str::is_empty) {
        return Err("the backend name before `:` is empty".into());
    }
    if model.is_empty() {
        return Err(if backend.is_some() {
            "the model name after the backend prefix is empty".into()
        } else {
            "the model name is empty".into()
        });
    }
    let params = match query {
        None => Vec::new(),
        Some(query) => parse_params(query)?,
    };
    Ok(Selector {
        backend: backend.map(str::to_owned),
        model: model.to_owned(),
        params,
    })
}

/// Body fields that are the request itself, not parameters: a selector or a rule may not set
/// them (`?model=x` would send another model than the one routed, budgeted and recorded).
pub const NOT_PARAMS: &[&str] = &[
    "model",
    "messages",
    "stream",
    "tools",
    "functions",
    "prompt",
];

fn parse_params(query: &str) -> Result<Vec<(String, Value)>, String> {
    if query.contains('?') {
        return Err("a second `?`: parameters are separated by `&`".into());
    }
    let mut params = Vec::new();
    for pair in query.split('&') {
        let (raw_key, raw_value) = pair
            .split_once('=')
            .ok_or_else(|| format!("parameter `{pair}` has no `=value`"))?;
        let key = decode(raw_key)?;
        if key.is_empty() {
            return Err(format!("parameter `{pair}` has an empty name"));
        }
        if NOT_PARAMS.contains(&key.as_str()) {
            return Err(format!(
                "`{key}` cannot be a parameter: it is part of the request itself"
            ));
        }
        let text = decode(raw_value)?;
        let value = typed(&text);
        check_standard(&key, &text, &value)?;
        params.push((key, value));
    }
    Ok(params)
}

fn decode(part: &str) -> Result<String, String> {
    let bytes = part.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%' {
            let hex = bytes.get(i + 1..i + 3);
            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                return Err(format!("bad percent encoding in `{part}`"));
            }
        }
    }
    percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("`{part}` does not decode to UTF-8"))
}

/// Types a parameter value by its look: integer, float, boolean, else string.
pub fn typed(text: &str) -> Value {
    let numeric = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
        && text.bytes().any(|b| b.is_ascii_digit());
    if numeric {
        if let Ok(i) = text.parse::<i64>() {
            return Value::Number(i.into());
        }
        // A seed or id above i64::MAX is still exact as u64; a float would round it.
        if let Ok(u) = text.parse::<u64>() {
            return Value::Number(u.into());
        }
        if let Some(n) = text.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    match text {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::String(text.to_owned()),
    }
}

/// Range checks for the standard numeric parameters (SPEC §4).
fn check_standard(key: &str, text: &str, value: &Value) -> Result<(), String> {
    enum Kind {
        Number(f64, f64),
        Integer(i64, i64),
    }
    let kind = match key {
        "temperature" => Kind::Number(0.0, 2.0),
        "top_p" => Kind::Number(0.0, 1.0),
        "frequency_penalty" | "presence_penalty" => Kind::Number(-2.0, 2.0),
        "top_k" => Kind::Integer(0, i64::MAX),
        "max_tokens" | "max_completion_tokens" => Kind::Integer(1, i64::MAX),
        "n" => Kind::Integer(1, 128),
        "seed" => Kind::Integer(i64::MIN, i64::MAX),
        _ => return Ok(()),
    };
    match kind {
        Kind::Number(lo, hi) => match value.as_f64() {
            Some(v) if (lo..=hi).contains(&v) => Ok(()),
            Some(_) => Err(format!(
                "parameter `{key}={text}` is out of range ({lo} to {hi})"
            )),
            None => Err(format!("parameter `{key}={text}` is not a number")),
        },
        Kind::Integer(lo, hi) => match value.as_i64() {
            Some(v) if (lo..=hi).contains(&v) => Ok(()),
            Some(_) if hi == i64::MAX => {
                Err(format!("parameter `{key}={text}` must be at least {lo}"))
            }
            Some(_) => Err(format!(
                "parameter `{key}={text}` is out of range ({lo} to {hi})"
            )),
            None => Err(format!("parameter `{key}={text}` is not an integer")),
        },
    }
}

/// Characters escaped when a selector is written back (they would split it otherwise).
const RESERVED: &AsciiSet = &CONTROLS
    .add(b'%')
    .add(b'&')
    .add(b'=')
    .add(b'?')
    .add(b'|')
    .add(b' ')
    .add(b'#');

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(backend) = &self.backend {
            write!(f, "{backend}:")?;
        }
        f.write_str(&self.model)?;
        for (i, (key, value)) in self.params.iter().enumerate() {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            write!(
                f,
                "{}{}={}",
                if i == 0 { '?' } else { '&' },
                utf8_percent_encode(key, RESERVED),
                utf8_percent_encode(&text, RESERVED)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn one(text: &str) -> Selector {
        let mut chain = parse_chain(text).unwrap();
        assert_eq!(chain.len(), 1);
        chain.remove(0)
    }

    fn err(text: &str) -> String {
        parse_chain(text).unwrap_err().to_string()
    }

    #[test]
    fn backend_prefix_only_before_the_first_slash() {
        let s = one("openrouter:anthropic/claude-3-5-sonnet");
        assert_eq!(
            (s.backend.as_deref(), s.model.as_str()),
            (Some("openrouter"), "anthropic/claude-3-5-sonnet")
        );
        let s = one("qwen/qwen3-coder:free");
        assert_eq!(
            (s.backend, s.model.as_str()),
            (None, "qwen/qwen3-coder:free")
        );
        let s = one("local:llama3:8b");
        assert_eq!(
            (s.backend.as_deref(), s.model.as_str()),
            (Some("local"), "llama3:8b")
        );
    }

    #[test]
    fn integers_up_to_u64_stay_exact() {
        assert_eq!(
            typed("12345678901234567890"),
            json!(12_345_678_901_234_567_890_u64)
        );
        assert_eq!(typed("-9223372036854775808"), json!(i64::MIN));
        assert!(typed("123456789012345678901234").is_f64());
    }

    #[test]
    fn control_characters_are_refused_and_shown_escaped() {
        for text in ["openai/gpt-4o\r\nx-evil: 1", "a\u{0}b", "echo\u{7f}"] {
            let message = err(text);
            assert!(message.contains("control character"), "{message}");
            assert!(!message.contains(|c: char| c.is_control()), "{message:?}");
        }
    }

    #[test]
    fn the_seed_example_with_parameters() {
        let s = one("openrouter:anthropic/claude-3-5-sonnet?temperature=0.7&top_p=0.9");
        assert_eq!(s.backend.as_deref(), Some("openrouter"));
        assert_eq!(
            s.params,
            vec![
                ("temperature".into(), json!(0.7)),
                ("top_p".into(), json!(0.9))
            ]
        );
    }

    #[test]
    fn parameters_are_decoded_and_typed_by_look() {
        let s = one("m?a=1&b=-2.5&c=true&d=false&e=hello%20world&f=1e3&g=%E2%9C%93&h=nan&i=");
        let values: Vec<Value> = s.params.into_iter().map(|(_, v)| v).collect();
        assert_eq!(
            values,
            vec![
                json!(1),
                json!(-2.5),
                json!(true),
                json!(false),
                json!("hello world"),
                json!(1000.0),
                json!("✓"),
                json!("nan"),
                json!("")
            ]
        );
    }

    #[test]
    fn chains_are_ordered() {
        let chain =
            parse_chain("openrouter:openai/gpt-4o | local:llama3?temperature=0 |mock").unwrap();
        let labels: Vec<String> = chain.iter().map(ToString::to_string).collect();
        assert_eq!(
            labels,
            [
                "openrouter:openai/gpt-4o",
                "local:llama3?temperature=0",
                "mock"
            ]
        );
    }

    #[test]
    fn errors_name_the_offending_part() {
        assert!(err("").contains("the model name is empty"));
        assert!(err(":gpt").contains("backend name before `:` is empty"));
        assert!(err("mock:").contains("after the backend prefix is empty"));
        assert!(err("m?temperature=hot").contains("parameter `temperature=hot` is not a number"));
        assert!(err("m?temperature=3").contains("`temperature=3` is out of range (0 to 2)"));
        assert!(err("m?max_tokens=0").contains("`max_tokens=0` must be at least 1"));
        assert!(err("m?n=1.5").contains("`n=1.5` is not an integer"));
        assert!(err("m?a=%zz").contains("bad percent encoding in `%zz`"));
        assert!(err("m?a=%").contains("bad percent encoding"));
        assert!(err("m?a=1?b=2").contains("a second `?`"));
        assert!(err("m?=1").contains("empty name"));
        assert!(err("m?flag").contains("`flag` has no `=value`"));
        assert!(err("a||b").contains("chain element 2 (``): the model name is empty"));
        assert!(err("a|b?top_p=2").contains("chain element 2 (`b?top_p=2`)"));
        let long = err(&"a".repeat(MAX_SELECTOR_BYTES + 1));
        assert!(
            long.contains("8193 bytes long; a model selector is at most 8192"),
            "{long}"
        );
        assert!(long.len() < 200, "{long}");
        assert!(parse_chain(&"a".repeat(MAX_SELECTOR_BYTES)).is_ok());
        // What would route, bill and record one model while sending another.
        for name in ["model", "stream", "messages", "mod%65l"] {
            let e = err(&format!("m?{name}=x"));
            assert!(e.contains("cannot be a parameter"), "{e}");
        }
    }

    proptest! {
        #[test]
        fn display_round_trips(
            backend in proptest::option::of("[a-z][a-z0-9_-]{0,8}"),
            model in "[a-z0-9][a-z0-9./_-]{0,20}",
            params in proptest::collection::vec(("[a-z_]{1,8}", "[a-z &=?|%#]{0,8}"), 0..4),
        ) {
            let params: Vec<(String, Value)> = params
                .into_iter()
                .filter(|(k, _)| !matches!(k.as_str(), "temperature" | "top_p" | "top_k" | "max_tokens" | "max_completion_tokens" | "frequency_penalty" | "presence_penalty" | "seed" | "n"))
                .map(|(k, v)| { let t = typed(&v); (k, t) })
                .collect();
            let s = Selector { backend, model, params };
            prop_assert_eq!(parse_chain(&s.to_string()).unwrap(), vec![s]);
        }

        #[test]
        fn never_panics(text in "\\PC{0,60}") {
            let _ = parse_chain(&text);
        }

        #[test]
        fn never_panics_on_selector_like_input(text in "[a-z:/?&=|%0-9.]{0,40}") {
            let _ = parse_chain(&text);
        }
    }
}
