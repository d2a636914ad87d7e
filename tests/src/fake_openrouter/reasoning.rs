//! Reasoning tokens: whether a request asks for them, and what the fake "thinks".

use serde_json::{Map, Value};

use crate::thinking_signature;

/// Deltas a shown reasoning text is streamed in, before the answer.
pub(crate) const REASONING_PIECES: usize = 2;

/// What a request asks for through `reasoning`, `reasoning_effort` or the deprecated
/// `include_reasoning` (`OPENROUTER.md` §3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Reasoning {
    /// No reasoning requested, or explicitly disabled.
    #[default]
    Off,
    /// Reason and return the text in `reasoning` / `reasoning_details`.
    Shown,
    /// `exclude: true` next to an effort or budget: OpenRouter still has the model reason
    /// (and bills the tokens) but leaves the text out of the response.
    Hidden,
}

impl Reasoning {
    /// Reads the request body; the `reasoning` object, when present, decides alone.
    pub(crate) fn parse(body: &Map<String, Value>) -> Reasoning {
        if let Some(obj) = body.get("reasoning").and_then(Value::as_object) {
            return Reasoning::from_object(obj);
        }
        let effort = body.get("reasoning_effort").and_then(Value::as_str);
        let legacy = body.get("include_reasoning") == Some(&Value::Bool(true));
        match effort {
            Some(effort) if effort != "none" => Reasoning::Shown,
            _ if legacy => Reasoning::Shown,
            _ => Reasoning::Off,
        }
    }

    /// `{effort | max_tokens | enabled: true, exclude?}`; `enabled: false` and
    /// `effort: "none"` turn reasoning off, and `{"exclude": true}` alone asks for nothing.
    fn from_object(obj: &Map<String, Value>) -> Reasoning {
        let flag = |key: &str| obj.get(key).and_then(Value::as_bool);
        if flag("enabled") == Some(false)
            || obj.get("effort").and_then(Value::as_str) == Some("none")
        {
            return Reasoning::Off;
        }
        let asked = obj.contains_key("effort")
            || obj.contains_key("max_tokens")
            || flag("enabled") == Some(true);
        match (asked, flag("exclude") == Some(true)) {
            (false, _) => Reasoning::Off,
            (true, false) => Reasoning::Shown,
            (true, true) => Reasoning::Hidden,
        }
    }

    /// The reasoning a model produces for `user_text`, or `None` when none was requested.
    pub(crate) fn thought(self, user_text: &str) -> Option<Thought> {
        let shown = match self {
            Reasoning::Off => return None,
            Reasoning::Shown => true,
            Reasoning::Hidden => false,
        };
        Some(Thought {
            text: format!("Thinking about: {user_text}"),
            shown,
        })
    }
}

/// The reasoning behind one answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Thought {
    /// `"Thinking about: " + <last user message text>`.
    pub(crate) text: String,
    /// False under `exclude: true`: the tokens are billed, the text is not sent.
    pub(crate) shown: bool,
}

impl Thought {
    /// `completion_tokens_details.reasoning_tokens`: the words of the text, like the
    /// answer's own token rule, so tests can recompute it.
    pub(crate) fn tokens(&self) -> u64 {
        self.text.split_whitespace().count() as u64
    }

    /// The text as the response carries it.
    pub(crate) fn visible(&self) -> Option<&str> {
        self.shown.then_some(self.text.as_str())
    }
}

/// Claude models sign their thinking (`reasoning_details` of format `anthropic-claude-v1`) and
/// check the signature when the thinking comes back, as Anthropic does.
pub(crate) fn signs_thinking(model: &str) -> bool {
    model.starts_with("anthropic/")
}

/// Anthropic's checks of the thinking a request sends back (OpenRouter hands it over as
/// `reasoning_details`): a signed block must carry its own signature, and with thinking on, a
/// turn that answers tool calls must keep the thinking that came with those calls.
pub(crate) fn check_thinking(messages: &[Value], thinking_on: bool) -> Result<(), String> {
    let claude = |detail: &&Value| detail.get("format") == Some(&"anthropic-claude-v1".into());
    for (i, message) in messages.iter().enumerate() {
        let details = message.get("reasoning_details").and_then(Value::as_array);
        for detail in details.into_iter().flatten().filter(claude) {
            let (Some("reasoning.text"), Some(text)) = (
                detail.get("type").and_then(Value::as_str),
                detail.get("text").and_then(Value::as_str),
            ) else {
                continue;
            };
            if detail.get("signature").and_then(Value::as_str) != Some(&thinking_signature(text)) {
                return Err(format!(
                    "messages.{i}.content.0: Invalid `signature` in `thinking` block"
                ));
            }
        }
    }
    // The tool loop in progress: the last assistant message called tools and their results
    // came after it (a user message may follow them: Anthropic sees one turn).
    let is = |m: &Value, role: &str| m.get("role").and_then(Value::as_str) == Some(role);
    let Some(i) = messages.iter().rposition(|m| is(m, "assistant")) else {
        return Ok(());
    };
    let called = messages[i]
        .get("tool_calls")
        .and_then(Value::as_array)
        .is_some_and(|calls| !calls.is_empty());
    let answered = messages[i + 1..].iter().any(|m| is(m, "tool"));
    let claude_thought = messages[i]
        .get("reasoning_details")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|detail| claude(&detail));
    if thinking_on && called && answered && !claude_thought {
        return Err(format!(
            "messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found \
             `tool_use`. When `thinking` is enabled, a final `assistant` message must start \
             with a thinking block"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(body: Value) -> Reasoning {
        Reasoning::parse(body.as_object().unwrap_or(&Map::new()))
    }

    #[test]
    fn requests_that_turn_reasoning_on_and_off() {
        assert_eq!(parse(json!({})), Reasoning::Off);
        assert_eq!(
            parse(json!({"reasoning": {"effort": "low"}})),
            Reasoning::Shown
        );
        assert_eq!(
            parse(json!({"reasoning": {"max_tokens": 64}})),
            Reasoning::Shown
        );
        assert_eq!(
            parse(json!({"reasoning": {"enabled": true}})),
            Reasoning::Shown
        );
        assert_eq!(parse(json!({"reasoning_effort": "high"})), Reasoning::Shown);
        assert_eq!(parse(json!({"include_reasoning": true})), Reasoning::Shown);
        assert_eq!(
            parse(json!({"reasoning": {"exclude": true}})),
            Reasoning::Off
        );
        assert_eq!(
            parse(json!({"reasoning": {"effort": "high", "exclude": true}})),
            Reasoning::Hidden
        );
        assert_eq!(
            parse(json!({"reasoning": {"effort": "high", "enabled": false}})),
            Reasoning::Off
        );
        assert_eq!(
            parse(json!({"reasoning": {"effort": "none"}})),
            Reasoning::Off
        );
        assert_eq!(parse(json!({"reasoning_effort": "none"})), Reasoning::Off);
        // The object decides, even against the top-level shorthand.
        assert_eq!(
            parse(json!({"reasoning": {"enabled": false}, "reasoning_effort": "high"})),
            Reasoning::Off
        );
    }

    #[test]
    fn thinking_sent_back_must_be_signed_and_kept_between_tool_calls() {
        let sig = thinking_signature("Hm.");
        let detail = |sig: &str| {
            json!([{"type": "reasoning.text", "text": "Hm.", "signature": sig,
                    "format": "anthropic-claude-v1", "index": 0}])
        };
        let turn = |details: Value| {
            vec![
                json!({"role": "user", "content": "q"}),
                json!({"role": "assistant", "content": "", "reasoning_details": details,
                       "tool_calls": [{"id": "c", "type": "function",
                                       "function": {"name": "f", "arguments": "{}"}}]}),
                json!({"role": "tool", "tool_call_id": "c", "content": "r"}),
            ]
        };
        assert_eq!(check_thinking(&turn(detail(&sig)), true), Ok(()));
        let forged = check_thinking(&turn(detail("other")), true).unwrap_err();
        assert!(forged.contains("Invalid `signature`"), "{forged}");
        let dropped = check_thinking(&turn(json!([])), true).unwrap_err();
        assert!(
            dropped.contains("must start with a thinking block"),
            "{dropped}"
        );
        assert_eq!(check_thinking(&turn(json!([])), false), Ok(()));
        // Text sent with the tool results (a user message after them) is the same turn.
        let mut with_text = turn(json!([]));
        with_text.push(json!({"role": "user", "content": "and?"}));
        assert!(check_thinking(&with_text, true).is_err());
        // Another provider's details are not Claude's thinking.
        let foreign = json!([{"type": "reasoning.text", "text": "Hm.", "format": "unknown"}]);
        assert!(check_thinking(&turn(foreign), true).is_err());
    }

    #[test]
    fn thoughts_count_words() {
        let thought = Reasoning::Shown.thought("two words").unwrap();
        assert_eq!(thought.text, "Thinking about: two words");
        assert_eq!(thought.tokens(), 4);
        assert_eq!(thought.visible(), Some("Thinking about: two words"));
        let hidden = Reasoning::Hidden.thought("x").unwrap();
        assert_eq!((hidden.tokens(), hidden.visible()), (3, None));
        assert!(Reasoning::Off.thought("x").is_none());
    }
}
