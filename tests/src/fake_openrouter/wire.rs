//! Wire shapes and the small pieces of arithmetic behind them: ids, prices, exact cost text.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::reasoning::signs_thinking;
use super::server::Dialect;
use super::tools::{ToolCall, ToolDelta};
use crate::thinking_signature;

/// The SSE comment OpenRouter sends while it waits for a provider.
pub(crate) const KEEPALIVE: &[u8] = b": OPENROUTER PROCESSING\n\n";
/// The SSE terminator of both dialects.
pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";
/// Top-level `user_id` sibling that real OpenRouter error bodies carry.
pub(crate) const FAKE_USER_ID: &str = "user_2fakeOrproxyTestkitUser0000";

/// Prices are kept in pico-dollars (1e-12 USD) so that every per-token price in the catalog
/// is an integer and costs add up exactly; the text on the wire is derived from that integer.
pub(crate) const PICO_PER_USD: u128 = 1_000_000_000_000;

pub(crate) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn next_random() -> u64 {
    // splitmix64 over a shared counter: ids only need to be unique and look random, and this
    // avoids a dependency on a rand crate.
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0x5eed, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32)
    });
    let mut z = seed.wrapping_add(
        COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` random characters from `[A-Za-z0-9]`.
pub(crate) fn random_alnum(n: usize) -> String {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(n);
    let (mut bits, mut left) = (0u64, 0u32);
    for _ in 0..n {
        if left == 0 {
            // 62^10 < 2^64, so one draw yields ten unbiased-enough digits.
            bits = next_random();
            left = 10;
        }
        out.push(char::from(ALPHABET[(bits % 62) as usize]));
        bits /= 62;
        left -= 1;
    }
    out
}

/// A fresh generation id in the dialect's format.
pub(crate) fn generation_id(dialect: Dialect, created: u64) -> String {
    match dialect {
        Dialect::OpenRouter => format!("gen-{created}-{}", random_alnum(20)),
        Dialect::OpenAi => format!("chatcmpl-{}", random_alnum(29)),
    }
}

/// Prints a pico-dollar amount as a JSON number. With `exponent`, amounts below 1e-4 use
/// Python-style exponent form (`4.25e-06`), as OpenRouter's `cost_details` did in real captures;
/// clients must accept both forms, so the fake exercises both.
pub(crate) fn format_usd(pico: u128, exponent: bool) -> String {
    if pico == 0 {
        return "0".to_owned();
    }
    if exponent && pico < PICO_PER_USD / 10_000 {
        let digits = pico.to_string();
        let exp = 12 - (digits.len() as i64 - 1);
        let mantissa = digits.trim_end_matches('0');
        let (head, tail) = mantissa.split_at(1);
        return if tail.is_empty() {
            format!("{head}e-{exp:02}")
        } else {
            format!("{head}.{tail}e-{exp:02}")
        };
    }
    let whole = pico / PICO_PER_USD;
    let frac = pico % PICO_PER_USD;
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:012}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// Our own decimal text as a raw JSON number, so the bytes on the wire are exactly the text
/// recorded in [`crate::BillingEntry::cost`] (a float round trip could reformat it).
pub(crate) fn raw_number(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.to_owned()).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// USD per token, in pico-dollars.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pricing {
    pub(crate) prompt: u64,
    pub(crate) completion: u64,
}

const FREE: Pricing = Pricing {
    prompt: 0,
    completion: 0,
};
/// Price of any `author/slug` the catalog does not list: $1/M prompt, $2/M completion.
const DEFAULT_PRICING: Pricing = Pricing {
    prompt: 1_000_000,
    completion: 2_000_000,
};

/// One entry of the fake's model catalog.
pub(crate) struct CatalogModel {
    pub(crate) id: &'static str,
    pub(crate) name: &'static str,
    pub(crate) provider: &'static str,
    pub(crate) context_length: u64,
    pub(crate) max_completion_tokens: u64,
    pub(crate) created: u64,
    pub(crate) pricing: Pricing,
    /// Honours `reasoning`; OpenRouter ignores parameters a model does not support.
    pub(crate) reasoning: bool,
}

pub(crate) const CATALOG: &[CatalogModel] = &[
    CatalogModel {
        id: "openai/gpt-4o",
        name: "OpenAI: GPT-4o",
        provider: "OpenAI",
        context_length: 128_000,
        max_completion_tokens: 16_384,
        created: 1_715_367_049,
        pricing: Pricing {
            prompt: 2_500_000,
            completion: 10_000_000,
        },
        reasoning: false,
    },
    CatalogModel {
        id: "openai/gpt-4o-mini",
        name: "OpenAI: GPT-4o-mini",
        provider: "OpenAI",
        context_length: 128_000,
        max_completion_tokens: 16_384,
        created: 1_721_260_800,
        pricing: Pricing {
            prompt: 150_000,
            completion: 600_000,
        },
        reasoning: false,
    },
    CatalogModel {
        id: "anthropic/claude-3-5-sonnet",
        name: "Anthropic: Claude 3.5 Sonnet",
        provider: "Anthropic",
        context_length: 200_000,
        max_completion_tokens: 8_192,
        created: 1_729_555_200,
        pricing: Pricing {
            prompt: 3_000_000,
            completion: 15_000_000,
        },
        reasoning: false,
    },
    CatalogModel {
        id: "google/gemini-2.5-flash",
        name: "Google: Gemini 2.5 Flash",
        provider: "Google AI Studio",
        context_length: 1_048_576,
        max_completion_tokens: 65_535,
        created: 1_750_172_488,
        pricing: Pricing {
            prompt: 300_000,
            completion: 2_500_000,
        },
        reasoning: true,
    },
    CatalogModel {
        id: "meta-llama/llama-3.3-70b-instruct:free",
        name: "Meta: Llama 3.3 70B Instruct (free)",
        provider: "Chutes",
        context_length: 65_536,
        max_completion_tokens: 8_192,
        created: 1_733_506_137,
        pricing: FREE,
        reasoning: false,
    },
    CatalogModel {
        id: "fake/echo",
        name: "Fake: Echo",
        provider: "FakeProvider",
        context_length: 32_768,
        max_completion_tokens: 4_096,
        created: 1_700_000_000,
        pricing: DEFAULT_PRICING,
        reasoning: true,
    },
    CatalogModel {
        id: "fake/fast",
        name: "Fake: Fast (benchmarks)",
        provider: "FakeProvider",
        context_length: 32_768,
        max_completion_tokens: 4_096,
        created: 1_700_000_000,
        pricing: DEFAULT_PRICING,
        reasoning: false,
    },
];

/// Catalog entry for `id`, trying the id without its `:variant` suffix second.
pub(crate) fn lookup(id: &str) -> Option<&'static CatalogModel> {
    CATALOG.iter().find(|m| m.id == id).or_else(|| {
        let base = id.split_once(':').map(|(base, _)| base)?;
        CATALOG.iter().find(|m| m.id == base)
    })
}

/// Per-token price OpenRouter would charge for `model`; `:free` variants cost nothing.
pub(crate) fn pricing_for(model: &str) -> Pricing {
    if model.ends_with(":free") {
        return FREE;
    }
    if model.starts_with("fake/") {
        return DEFAULT_PRICING;
    }
    lookup(model).map_or(DEFAULT_PRICING, |m| m.pricing)
}

/// Whether `model` reasons when asked to: catalog models as flagged, every other model
/// (including all `fake/...` behaviours) yes.
pub(crate) fn reasons(model: &str) -> bool {
    if model.starts_with("fake/") {
        return true;
    }
    lookup(model).is_none_or(|m| m.reasoning)
}

/// Provider display name (OpenRouter reports names, not slugs).
pub(crate) fn provider_for(model: &str) -> String {
    if let Some(m) = lookup(model) {
        return m.provider.to_owned();
    }
    let author = model.split('/').next().unwrap_or(model);
    let known = match author {
        "openai" => "OpenAI",
        "anthropic" => "Anthropic",
        "google" => "Google AI Studio",
        "meta-llama" => "DeepInfra",
        "mistralai" => "Mistral",
        "x-ai" => "xAI",
        "deepseek" => "DeepSeek",
        "fake" => "FakeProvider",
        _ => "",
    };
    if !known.is_empty() {
        return known.to_owned();
    }
    let mut chars = author.chars();
    chars.next().map_or_else(
        || "Unknown".to_owned(),
        |first| first.to_uppercase().chain(chars).collect(),
    )
}

/// The `usage` object of a completion, chunk or error chunk.
#[derive(Serialize, Debug)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    pub(crate) total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cost: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) is_byok: Option<bool>,
    pub(crate) prompt_tokens_details: PromptTokensDetails,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cost_details: Option<CostDetails>,
    pub(crate) completion_tokens_details: CompletionTokensDetails,
}

#[derive(Serialize, Debug)]
pub(crate) struct PromptTokensDetails {
    pub(crate) cached_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cache_write_tokens: Option<u64>,
    pub(crate) audio_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) video_tokens: Option<u64>,
}

#[derive(Serialize, Debug)]
pub(crate) struct CompletionTokensDetails {
    pub(crate) reasoning_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) image_tokens: Option<u64>,
    pub(crate) audio_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) accepted_prediction_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rejected_prediction_tokens: Option<u64>,
}

#[derive(Serialize, Debug)]
pub(crate) struct CostDetails {
    pub(crate) upstream_inference_cost: Box<RawValue>,
    pub(crate) upstream_inference_prompt_cost: Box<RawValue>,
    pub(crate) upstream_inference_completions_cost: Box<RawValue>,
}

/// A usage object together with the exact cost text it carries.
pub(crate) struct Billed {
    pub(crate) usage: Usage,
    /// Empty for the OpenAI dialect, whose usage has no cost.
    pub(crate) cost_text: String,
    pub(crate) cost_pico: u128,
}

impl Billed {
    /// Marks `tokens` of the (already counted and priced) completion tokens as reasoning.
    pub(crate) fn with_reasoning(mut self, tokens: u64) -> Billed {
        self.usage.completion_tokens_details.reasoning_tokens = tokens;
        self
    }
}

/// Builds the usage object; `charge == false` is OpenRouter's zero-completion insurance
/// (errored generations report `cost: 0` and a null upstream cost, as in the 2025-11 capture).
pub(crate) fn bill(
    dialect: Dialect,
    pricing: Pricing,
    prompt_tokens: u64,
    completion_tokens: u64,
    charge: bool,
) -> Billed {
    let total_tokens = prompt_tokens + completion_tokens;
    match dialect {
        Dialect::OpenAi => Billed {
            usage: Usage {
                prompt_tokens,
                completion_tokens,
                total_tokens,
                cost: None,
                is_byok: None,
                prompt_tokens_details: PromptTokensDetails {
                    cached_tokens: 0,
                    cache_write_tokens: None,
                    audio_tokens: 0,
                    video_tokens: None,
                },
                cost_details: None,
                completion_tokens_details: CompletionTokensDetails {
                    reasoning_tokens: 0,
                    image_tokens: None,
                    audio_tokens: 0,
                    accepted_prediction_tokens: Some(0),
                    rejected_prediction_tokens: Some(0),
                },
            },
            cost_text: String::new(),
            cost_pico: 0,
        },
        Dialect::OpenRouter => {
            let (prompt_pico, completion_pico) = if charge {
                (
                    u128::from(prompt_tokens) * u128::from(pricing.prompt),
                    u128::from(completion_tokens) * u128::from(pricing.completion),
                )
            } else {
                (0, 0)
            };
            let cost_pico = prompt_pico + completion_pico;
            let cost_text = format_usd(cost_pico, true);
            let upstream = if charge {
                raw_number(&cost_text)
            } else {
                RawValue::NULL.to_owned()
            };
            Billed {
                usage: Usage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens,
                    cost: Some(raw_number(&cost_text)),
                    is_byok: Some(false),
                    prompt_tokens_details: PromptTokensDetails {
                        cached_tokens: 0,
                        cache_write_tokens: Some(0),
                        audio_tokens: 0,
                        video_tokens: Some(0),
                    },
                    cost_details: Some(CostDetails {
                        upstream_inference_cost: upstream,
                        upstream_inference_prompt_cost: raw_number(&format_usd(prompt_pico, true)),
                        upstream_inference_completions_cost: raw_number(&format_usd(
                            completion_pico,
                            true,
                        )),
                    }),
                    completion_tokens_details: CompletionTokensDetails {
                        reasoning_tokens: 0,
                        image_tokens: Some(0),
                        audio_tokens: 0,
                        accepted_prediction_tokens: None,
                        rejected_prediction_tokens: None,
                    },
                },
                cost_text,
                cost_pico,
            }
        }
    }
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
    model: &'a str,
    object: &'static str,
    created: u64,
    choices: [Choice<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<Option<()>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<&'a Usage>,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    logprobs: Option<()>,
    finish_reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    native_finish_reason: Option<Option<&'a str>>,
    message: Message<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a Value>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    /// `null` only for OpenAI tool calls; OpenRouter sends `""` (2025-11 capture).
    content: Option<&'a str>,
    refusal: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_details: Option<[ReasoningDetail<'a>; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<WireToolCall<'a>>>,
}

/// One `reasoning_details` entry, shaped like captures of non-Anthropic providers
/// (`format: "unknown"`), or of Claude models (`anthropic-claude-v1`, with a signature).
#[derive(Serialize)]
struct ReasoningDetail<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature: Option<String>,
    format: &'static str,
    index: u32,
}

/// A whole tool call (`message.tool_calls[i]`) or one streamed fragment of it.
#[derive(Serialize)]
struct WireToolCall<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: WireFunction<'a>,
}

#[derive(Serialize)]
struct WireFunction<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

impl<'a> WireToolCall<'a> {
    fn whole(index: Option<usize>, call: &'a ToolCall) -> WireToolCall<'a> {
        WireToolCall {
            index,
            id: Some(&call.id),
            kind: Some("function"),
            function: WireFunction {
                name: Some(&call.name),
                arguments: &call.arguments,
            },
        }
    }

    /// A streamed fragment: the head names the call, later pieces carry only arguments.
    fn fragment(delta: ToolDelta<'a>) -> WireToolCall<'a> {
        match delta {
            ToolDelta::Head { index, call } => WireToolCall {
                function: WireFunction {
                    name: Some(&call.name),
                    arguments: "",
                },
                ..WireToolCall::whole(Some(index), call)
            },
            ToolDelta::Arguments { index, piece } => WireToolCall {
                index: Some(index),
                id: None,
                kind: None,
                function: WireFunction {
                    name: None,
                    arguments: piece,
                },
            },
        }
    }
}

/// What a non-streaming choice's `message` says besides its fixed fields.
pub(crate) struct Reply<'a> {
    pub(crate) content: &'a str,
    /// Shown reasoning text (OpenRouter only).
    pub(crate) reasoning: Option<&'a str>,
    pub(crate) tool_calls: &'a [ToolCall],
}

impl<'a> Reply<'a> {
    /// A plain text answer.
    pub(crate) fn text(content: &'a str) -> Reply<'a> {
        Reply {
            content,
            reasoning: None,
            tool_calls: &[],
        }
    }
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a Value>,
    choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<&'a Usage>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    finish_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    native_finish_reason: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<Option<()>>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_details: Option<[ReasoningDetail<'a>; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[WireToolCall<'a>; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<Option<()>>,
}

#[derive(Serialize)]
struct TextCompletion<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
    model: &'a str,
    object: &'static str,
    created: u64,
    choices: [TextChoice<'a>; 1],
    usage: &'a Usage,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<()>,
    finish_reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    native_finish_reason: Option<Option<&'a str>>,
}

fn sse_event<T: Serialize>(value: &T) -> Bytes {
    let mut out = Vec::with_capacity(320);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&serde_json::to_vec(value).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Everything that stays the same across one generation's body or chunks.
pub(crate) struct GenCtx {
    pub(crate) dialect: Dialect,
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) provider: Option<String>,
    pub(crate) pricing: Pricing,
}

impl GenCtx {
    pub(crate) fn new(dialect: Dialect, model: &str) -> GenCtx {
        let created = unix_secs();
        GenCtx {
            dialect,
            id: generation_id(dialect, created),
            created,
            model: model.to_owned(),
            provider: (dialect == Dialect::OpenRouter).then(|| provider_for(model)),
            pricing: pricing_for(model),
        }
    }

    fn is_openrouter(&self) -> bool {
        self.dialect == Dialect::OpenRouter
    }

    pub(crate) fn bill(&self, prompt_tokens: u64, completion_tokens: u64, charge: bool) -> Billed {
        bill(
            self.dialect,
            self.pricing,
            prompt_tokens,
            completion_tokens,
            charge,
        )
    }

    fn event(
        &self,
        choices: &[ChunkChoice<'_>],
        error: Option<&Value>,
        usage: Option<&Usage>,
    ) -> Bytes {
        sse_event(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            provider: self.provider.as_deref(),
            error,
            choices,
            usage,
        })
    }

    fn choice<'a>(&self, delta: Delta<'a>, finish: Option<&'a str>) -> ChunkChoice<'a> {
        ChunkChoice {
            index: 0,
            delta,
            finish_reason: finish,
            native_finish_reason: self.is_openrouter().then_some(finish),
            logprobs: (!self.is_openrouter()).then_some(None),
        }
    }

    /// The role-only first chunk.
    pub(crate) fn preamble(&self) -> Bytes {
        let delta = Delta {
            content: Some(Some("")),
            role: Some("assistant"),
            refusal: (!self.is_openrouter()).then_some(None),
            ..Delta::default()
        };
        self.event(&[self.choice(delta, None)], None, None)
    }

    /// One content delta; OpenRouter repeats `role` on every chunk, OpenAI does not.
    pub(crate) fn content(&self, text: &str) -> Bytes {
        let delta = Delta {
            content: Some(Some(text)),
            role: self.is_openrouter().then_some("assistant"),
            ..Delta::default()
        };
        self.event(&[self.choice(delta, None)], None, None)
    }

    /// One reasoning delta, as real reasoning streams send it: `content: ""` next to the
    /// `reasoning` piece and the same piece as a `reasoning.text` detail.
    pub(crate) fn reasoning(&self, piece: &str) -> Bytes {
        let delta = Delta {
            content: Some(Some("")),
            role: Some("assistant"),
            reasoning: Some(piece),
            reasoning_details: Some(self.reasoning_detail(piece, None)),
            ..Delta::default()
        };
        self.event(&[self.choice(delta, None)], None, None)
    }

    /// The signature that ends a Claude model's streamed thinking block, for its whole `text`:
    /// a `reasoning.text` detail with no text of its own.
    pub(crate) fn reasoning_signature(&self, text: &str) -> Bytes {
        let delta = Delta {
            content: Some(Some("")),
            role: Some("assistant"),
            reasoning_details: Some(self.reasoning_detail("", Some(thinking_signature(text)))),
            ..Delta::default()
        };
        self.event(&[self.choice(delta, None)], None, None)
    }

    fn reasoning_detail<'a>(
        &self,
        text: &'a str,
        signature: Option<String>,
    ) -> [ReasoningDetail<'a>; 1] {
        let claude = signs_thinking(&self.model);
        [ReasoningDetail {
            kind: "reasoning.text",
            text,
            signature: signature.filter(|_| claude),
            format: if claude {
                "anthropic-claude-v1"
            } else {
                "unknown"
            },
            index: 0,
        }]
    }

    /// One tool-call fragment. OpenRouter sends `content: null` (not `""`) next to
    /// `tool_calls`, as in a 2026-03 Bedrock capture; OpenAI sends the fragment alone.
    pub(crate) fn tool_call(&self, fragment: ToolDelta<'_>) -> Bytes {
        let (content, role) = if self.is_openrouter() {
            (Some(None), Some("assistant"))
        } else {
            (None, None)
        };
        let delta = Delta {
            content,
            role,
            tool_calls: Some([WireToolCall::fragment(fragment)]),
            ..Delta::default()
        };
        self.event(&[self.choice(delta, None)], None, None)
    }

    pub(crate) fn finish(&self, reason: &str) -> Bytes {
        let delta = if self.is_openrouter() {
            Delta {
                content: Some(Some("")),
                role: Some("assistant"),
                ..Delta::default()
            }
        } else {
            Delta::default()
        };
        self.event(&[self.choice(delta, Some(reason))], None, None)
    }

    /// The usage chunk: `choices: []` (2026-03 capture) or, with `repeat_choice`, one choice
    /// with an empty delta and `finish_reason: null` (2026-02 capture).
    pub(crate) fn usage_chunk(&self, usage: &Usage, repeat_choice: bool) -> Bytes {
        if repeat_choice {
            let choice = ChunkChoice {
                index: 0,
                delta: Delta {
                    content: Some(Some("")),
                    role: Some("assistant"),
                    ..Delta::default()
                },
                finish_reason: None,
                native_finish_reason: self.is_openrouter().then_some(None),
                logprobs: Some(None),
            };
            self.event(&[choice], None, Some(usage))
        } else {
            self.event(&[], None, Some(usage))
        }
    }

    /// Mid-stream error chunk shaped like the 2025-11 real capture: top-level `error`, one
    /// choice with `finish_reason: null`, usage attached.
    pub(crate) fn error_chunk(&self, error: &Value, usage: &Usage) -> Bytes {
        let choice = ChunkChoice {
            index: 0,
            delta: Delta {
                content: Some(Some("")),
                role: Some("assistant"),
                ..Delta::default()
            },
            finish_reason: None,
            native_finish_reason: self.is_openrouter().then_some(None),
            logprobs: Some(None),
        };
        self.event(&[choice], Some(error), Some(usage))
    }

    /// A whole non-streaming `chat.completion` body; `usage: None` leaves the field out.
    pub(crate) fn completion(
        &self,
        reply: &Reply<'_>,
        finish_reason: &str,
        native_finish_reason: Option<&str>,
        error: Option<&Value>,
        usage: Option<&Usage>,
    ) -> Bytes {
        let or = self.is_openrouter();
        let body = Completion {
            id: &self.id,
            provider: self.provider.as_deref(),
            model: &self.model,
            object: "chat.completion",
            created: self.created,
            choices: [Choice {
                index: 0,
                logprobs: None,
                finish_reason,
                native_finish_reason: or.then_some(native_finish_reason),
                message: self.message(reply),
                error,
            }],
            system_fingerprint: (!or).then_some(None),
            usage,
        };
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    /// The `message` of a non-streaming choice. Tool calls carry `index` on OpenRouter
    /// (2025-11 capture) but not on OpenAI, whose `content` is then `null`.
    fn message<'a>(&self, reply: &Reply<'a>) -> Message<'a> {
        let or = self.is_openrouter();
        let calls = reply.tool_calls;
        let tool_calls = (!calls.is_empty()).then(|| {
            calls
                .iter()
                .enumerate()
                .map(|(i, call)| WireToolCall::whole(or.then_some(i), call))
                .collect()
        });
        Message {
            role: "assistant",
            content: (or || calls.is_empty()).then_some(reply.content),
            refusal: None,
            reasoning: or.then_some(reply.reasoning),
            reasoning_details: reply
                .reasoning
                .filter(|_| or)
                .map(|text| self.reasoning_detail(text, Some(thinking_signature(text)))),
            tool_calls,
        }
    }

    /// A legacy `text_completion` body.
    pub(crate) fn text_completion(&self, text: &str, finish_reason: &str, usage: &Usage) -> Bytes {
        let body = TextCompletion {
            id: &self.id,
            provider: self.provider.as_deref(),
            model: &self.model,
            object: "text_completion",
            created: self.created,
            choices: [TextChoice {
                text,
                index: 0,
                logprobs: None,
                finish_reason,
                native_finish_reason: self.is_openrouter().then_some(Some(finish_reason)),
            }],
            usage,
        };
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

/// Splits an answer into stream deltas, one per whitespace-separated word, keeping the
/// whitespace (leading whitespace goes with the word after it, trailing with the last word)
/// so that concatenating the deltas gives back the exact text.
pub(crate) fn split_pieces(text: &str) -> Vec<&str> {
    let mut bounds = Vec::new();
    let (mut seen_word, mut in_word, mut ws_start) = (false, false, 0);
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if in_word {
                ws_start = i;
                in_word = false;
            }
        } else if !in_word {
            if seen_word {
                bounds.push(ws_start);
            }
            seen_word = true;
            in_word = true;
        }
    }
    if !seen_word {
        return Vec::new();
    }
    let mut pieces = Vec::with_capacity(bounds.len() + 1);
    let mut start = 0;
    for b in bounds {
        pieces.push(&text[start..b]);
        start = b;
    }
    pieces.push(&text[start..]);
    pieces
}

/// Splits `text` into `n` pieces of nearly equal length in characters (earlier pieces one
/// longer), never inside a character, for values streamed in a fixed number of deltas
/// (tool arguments, reasoning). With fewer than `n` characters some pieces are empty.
pub(crate) fn split_evenly(text: &str, n: usize) -> Vec<&str> {
    let n = n.max(1);
    let chars = text.chars().count();
    let (base, longer) = (chars / n, chars % n);
    let mut rest = text;
    (0..n)
        .map(|i| {
            let len = base + usize::from(i < longer);
            let cut = rest
                .char_indices()
                .nth(len)
                .map_or(rest.len(), |(at, _)| at);
            let (piece, tail) = rest.split_at(cut);
            rest = tail;
            piece
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn usd_text_is_exact() {
        assert_eq!(format_usd(0, true), "0");
        assert_eq!(format_usd(4_250_000, true), "4.25e-06");
        assert_eq!(format_usd(5_000_000, true), "5e-06");
        assert_eq!(format_usd(100_000_000, true), "0.0001");
        assert_eq!(format_usd(3_530_250_000, true), "0.00353025");
        assert_eq!(format_usd(4_250_000, false), "0.00000425");
        assert_eq!(format_usd(2 * PICO_PER_USD + 5, false), "2.000000000005");
        assert_eq!(format_usd(3 * PICO_PER_USD, true), "3");
        for pico in [1u128, 7, 42_000, 99_999_999, 123_456_789_012] {
            let text = format_usd(pico, true);
            let back: f64 = text.parse().unwrap();
            assert!((back * 1e12 - pico as f64).abs() < 1e-3, "{text}");
        }
    }

    #[test]
    fn pieces_concatenate_to_the_text() {
        for text in [
            "echo: hello world",
            "  lead and  double  spaces ",
            "one",
            "line\nbreak\ttab",
        ] {
            let pieces = split_pieces(text);
            assert_eq!(pieces.concat(), text);
            assert_eq!(pieces.len(), text.split_whitespace().count());
        }
        assert_eq!(split_pieces("a b"), vec!["a", " b"]);
        assert!(split_pieces("   ").is_empty());
    }

    #[test]
    fn even_split_keeps_every_character() {
        assert_eq!(split_evenly("abcdefgh", 3), ["abc", "def", "gh"]);
        assert_eq!(split_evenly("éàü", 2), ["éà", "ü"]);
        assert_eq!(split_evenly("a", 3), ["a", "", ""]);
        for text in [r#"{"q":"hello there"}"#, "Thinking about: x", ""] {
            for n in 1..5 {
                let pieces = split_evenly(text, n);
                assert_eq!(pieces.len(), n);
                assert_eq!(pieces.concat(), text);
            }
        }
    }

    #[test]
    fn ids_have_the_real_shape() {
        let id = generation_id(Dialect::OpenRouter, 1_770_044_198);
        let rest = id.strip_prefix("gen-1770044198-").unwrap();
        assert_eq!(rest.len(), 20);
        assert!(rest.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(id, generation_id(Dialect::OpenRouter, 1_770_044_198));
    }

    #[test]
    fn pricing_and_providers() {
        assert_eq!(pricing_for("openai/gpt-4o").prompt, 2_500_000);
        assert_eq!(pricing_for("openai/gpt-4o:free"), FREE);
        assert_eq!(pricing_for("some/unknown"), DEFAULT_PRICING);
        assert_eq!(provider_for("anthropic/claude-3-5-sonnet"), "Anthropic");
        assert_eq!(provider_for("acme/thing"), "Acme");
        assert!(!reasons("openai/gpt-4o"));
        assert!(reasons("google/gemini-2.5-flash:free"));
        assert!(reasons("fake/two-tools"));
        assert!(reasons("acme/thinker"));
    }
}
