//! Function calling: which tool calls a request is answered with, and the order their
//! fragments are streamed in.

use serde_json::{Map, Value, json};

use super::wire::{random_alnum, split_evenly};

/// Deltas each call's `arguments` string is streamed in, after the call's first fragment.
pub(crate) const ARGUMENT_PIECES: usize = 3;

/// What `tool_choice` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum ToolChoice {
    /// `"auto"`, `"required"` or absent: the fake always calls a tool, so tests are
    /// deterministic.
    #[default]
    Auto,
    /// `"none"`: answer with text.
    None,
    /// `{"type": "function", "function": {"name": ...}}`: exactly one call of that tool.
    Named(String),
}

/// The request fields that decide whether the answer is a tool call.
#[derive(Clone, Debug, Default)]
pub(crate) struct ToolRequest {
    /// Names of the request's function tools, in request order.
    names: Vec<String>,
    choice: ToolChoice,
    /// `parallel_tool_calls: false` limits the answer to one call.
    single: bool,
}

impl ToolRequest {
    /// Reads `tools`, `tool_choice` and `parallel_tool_calls`. Tools that are not OpenAI
    /// function tools (e.g. OpenRouter's `openrouter:web_search` server tools) are skipped:
    /// the model never calls them itself.
    pub(crate) fn parse(body: &Map<String, Value>) -> ToolRequest {
        let names = body
            .get("tools")
            .and_then(Value::as_array)
            .map(|tools| tools.iter().filter_map(function_name).collect())
            .unwrap_or_default();
        let choice = match body.get("tool_choice") {
            Some(Value::String(s)) if s == "none" => ToolChoice::None,
            Some(Value::Object(obj)) => obj
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .map_or(ToolChoice::Auto, |name| ToolChoice::Named(name.to_owned())),
            _ => ToolChoice::Auto,
        };
        ToolRequest {
            names,
            choice,
            single: body.get("parallel_tool_calls") == Some(&Value::Bool(false)),
        }
    }

    /// The calls that answer a request about `query`; empty means a text answer. `wanted`
    /// is how many distinct tools the model calls when free to choose (2 for
    /// `fake/two-tools`), capped by the number of tools.
    pub(crate) fn calls(&self, query: &str, wanted: usize) -> Vec<ToolCall> {
        if self.names.is_empty() {
            return Vec::new();
        }
        let wanted = if self.single { 1 } else { wanted };
        match &self.choice {
            ToolChoice::None => Vec::new(),
            ToolChoice::Named(name) => vec![ToolCall::new(name, query)],
            ToolChoice::Auto => self
                .names
                .iter()
                .take(wanted)
                .map(|name| ToolCall::new(name, query))
                .collect(),
        }
    }
}

/// `tools[i].function.name` of a function tool (`type` may be omitted, as some clients do).
fn function_name(tool: &Value) -> Option<String> {
    let kind = tool
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("function");
    if kind != "function" {
        return None;
    }
    let name = tool.get("function")?.get("name")?.as_str()?;
    Some(name.to_owned())
}

/// One tool call of an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ToolCall {
    /// `call_` + 24 alphanumerics (the format is provider-specific on the real service).
    pub(crate) id: String,
    pub(crate) name: String,
    /// A JSON text, as on the wire: `{"q":<last user message text>}`.
    pub(crate) arguments: String,
}

impl ToolCall {
    fn new(name: &str, query: &str) -> ToolCall {
        ToolCall {
            id: format!("call_{}", random_alnum(24)),
            name: name.to_owned(),
            arguments: json!({ "q": query }).to_string(),
        }
    }
}

/// Completion tokens of tool calls: `ceil(characters of all arguments / 4)`, the prompt's
/// rule, since arguments are JSON rather than words.
pub(crate) fn tool_tokens(calls: &[ToolCall]) -> u64 {
    let chars: usize = calls.iter().map(|c| c.arguments.chars().count()).sum();
    (chars as u64).div_ceil(4)
}

/// One streamed fragment of a tool call (`delta.tool_calls[0]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ToolDelta<'a> {
    /// The call's first fragment: `index`, `id`, `type`, `function.name`, empty arguments.
    Head { index: usize, call: &'a ToolCall },
    /// A piece of the arguments string; only `index` and `function.arguments`.
    Arguments { index: usize, piece: &'a str },
}

/// The fragments of `calls` in stream order: every call's head, then the argument pieces
/// round-robin by index (0, 1, 0, 1, ...). Interleaving parallel calls is what some
/// providers do, and it is the order that breaks translators assuming one call at a time.
pub(crate) fn stream_order(calls: &[ToolCall]) -> Vec<ToolDelta<'_>> {
    let heads = calls
        .iter()
        .enumerate()
        .map(|(index, call)| ToolDelta::Head { index, call });
    let pieces: Vec<Vec<&str>> = calls
        .iter()
        .map(|c| split_evenly(&c.arguments, ARGUMENT_PIECES))
        .collect();
    let rounds = (0..ARGUMENT_PIECES).flat_map(|round| {
        pieces
            .iter()
            .enumerate()
            .map(move |(index, p)| ToolDelta::Arguments {
                index,
                piece: p[round],
            })
    });
    heads.chain(rounds).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn request(body: Value) -> ToolRequest {
        ToolRequest::parse(body.as_object().unwrap())
    }

    fn tools(names: &[&str]) -> Value {
        names
            .iter()
            .map(|n| json!({"type": "function", "function": {"name": n, "parameters": {}}}))
            .collect()
    }

    fn names(calls: &[ToolCall]) -> Vec<&str> {
        calls.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn tool_choice_picks_the_tools() {
        let auto = request(json!({"tools": tools(&["a", "b", "c"])}));
        assert_eq!(names(&auto.calls("q", 1)), ["a"]);
        assert_eq!(names(&auto.calls("q", 2)), ["a", "b"]);
        let named = request(json!({
            "tools": tools(&["a", "b"]),
            "tool_choice": {"type": "function", "function": {"name": "b"}},
        }));
        assert_eq!(names(&named.calls("q", 2)), ["b"]);
        let none = request(json!({"tools": tools(&["a"]), "tool_choice": "none"}));
        assert!(none.calls("q", 1).is_empty());
        let required = request(json!({"tools": tools(&["a"]), "tool_choice": "required"}));
        assert_eq!(names(&required.calls("q", 2)), ["a"]);
        let serial = request(json!({"tools": tools(&["a", "b"]), "parallel_tool_calls": false}));
        assert_eq!(names(&serial.calls("q", 2)), ["a"]);
        assert!(request(json!({"tools": []})).calls("q", 1).is_empty());
        let server_tool = request(json!({"tools": [{"type": "openrouter:web_search"}]}));
        assert!(server_tool.calls("q", 1).is_empty());
    }

    #[test]
    fn calls_carry_the_query_as_json_arguments() {
        let call = &request(json!({"tools": tools(&["a"])})).calls("say \"hi\"", 1)[0];
        assert_eq!(call.arguments, r#"{"q":"say \"hi\""}"#);
        let id = call.id.strip_prefix("call_").unwrap();
        assert_eq!(id.len(), 24);
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric()));
        // `{"q":"abcdefgh"}` is 16 characters -> 4 tokens; one more character -> 5.
        assert_eq!(tool_tokens(&[ToolCall::new("a", "abcdefgh")]), 4);
        assert_eq!(tool_tokens(&[ToolCall::new("a", "abcdefghi")]), 5);
        let both = [ToolCall::new("a", "abcdefgh"), ToolCall::new("b", "a")];
        // 16 + 9 characters -> ceil(25 / 4) = 7.
        assert_eq!(tool_tokens(&both), 7);
    }

    #[test]
    fn parallel_calls_stream_interleaved() {
        let calls = request(json!({"tools": tools(&["a", "b"])})).calls("xyz", 2);
        let order: Vec<(usize, bool)> = stream_order(&calls)
            .iter()
            .map(|d| match d {
                ToolDelta::Head { index, .. } => (*index, true),
                ToolDelta::Arguments { index, .. } => (*index, false),
            })
            .collect();
        assert_eq!(
            order,
            [
                (0, true),
                (1, true),
                (0, false),
                (1, false),
                (0, false),
                (1, false),
                (0, false),
                (1, false)
            ]
        );
        for (index, call) in calls.iter().enumerate() {
            let args: String = stream_order(&calls)
                .iter()
                .filter_map(|d| match d {
                    ToolDelta::Arguments { index: i, piece } if *i == index => Some(*piece),
                    _ => None,
                })
                .collect();
            assert_eq!(args, call.arguments);
        }
    }
}
