//! Model selectors: `[backend:]model`.
//!
//! The backend prefix counts only when the first `:` comes before the first `/`, so OpenRouter
//! variants such as `qwen/qwen3-coder:free` stay model names.

use std::fmt;

/// A parsed selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// The backend named by the prefix, if any.
    pub backend: Option<String>,
    /// The upstream model name.
    pub model: String,
}

/// A selector that cannot be parsed; the message names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid model selector `{selector}`: {reason}")]
pub struct SelectorError {
    /// The whole selector as received.
    pub selector: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Selector {
    /// Parses `[backend:]model`.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let fail = |reason: &str| SelectorError {
            selector: text.to_owned(),
            reason: reason.to_owned(),
        };
        let text_trimmed = text.trim();
        if text_trimmed.is_empty() {
            return Err(fail("the model name is empty"));
        }
        let colon = text_trimmed.find(':');
        let slash = text_trimmed.find('/');
        let (backend, model) = match (colon, slash) {
            (Some(c), Some(s)) if c < s => (Some(&text_trimmed[..c]), &text_trimmed[c + 1..]),
            (Some(c), None) => (Some(&text_trimmed[..c]), &text_trimmed[c + 1..]),
            _ => (None, text_trimmed),
        };
        if backend.is_some_and(str::is_empty) {
            return Err(fail("the backend name before `:` is empty"));
        }
        if model.is_empty() {
            return Err(fail("the model name after the backend prefix is empty"));
        }
        Ok(Selector {
            backend: backend.map(str::to_owned),
            model: model.to_owned(),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            Some(backend) => write!(f, "{backend}:{}", self.model),
            None => f.write_str(&self.model),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parsed(text: &str) -> (Option<String>, String) {
        let s = Selector::parse(text).unwrap();
        (s.backend, s.model)
    }

    #[test]
    fn backend_prefix_only_before_the_first_slash() {
        assert_eq!(
            parsed("openrouter:anthropic/claude-3-5-sonnet"),
            (
                Some("openrouter".into()),
                "anthropic/claude-3-5-sonnet".into()
            )
        );
        assert_eq!(
            parsed("qwen/qwen3-coder:free"),
            (None, "qwen/qwen3-coder:free".into())
        );
        assert_eq!(
            parsed("local:llama3:8b"),
            (Some("local".into()), "llama3:8b".into())
        );
        assert_eq!(parsed("gpt-4o"), (None, "gpt-4o".into()));
    }

    #[test]
    fn empty_parts_are_named() {
        assert!(
            Selector::parse("")
                .unwrap_err()
                .reason
                .contains("model name is empty")
        );
        assert!(
            Selector::parse(":gpt")
                .unwrap_err()
                .reason
                .contains("backend name")
        );
        assert!(
            Selector::parse("mock:")
                .unwrap_err()
                .reason
                .contains("after the backend prefix")
        );
    }

    proptest! {
        #[test]
        fn display_round_trips(backend in proptest::option::of("[a-z][a-z0-9_-]{0,8}"), model in "[a-z0-9][a-z0-9./:_-]{0,20}") {
            // A model with a `:` before any `/` would read as a prefix without an explicit backend.
            let ambiguous = backend.is_none() && model.find(':').is_some_and(|c| model.find('/').is_none_or(|s| c < s));
            prop_assume!(!ambiguous);
            let s = Selector { backend, model };
            prop_assert_eq!(Selector::parse(&s.to_string()).unwrap(), s);
        }

        #[test]
        fn never_panics(text in "\\PC{0,40}") {
            let _ = Selector::parse(&text);
        }
    }
}
