//! Test kit for orproxy: fake upstreams (OpenRouter, plain OpenAI and Anthropic) that reproduce the real
//! wire format and can be told, through the model name, to fail in the ways real upstreams do.

pub mod fake_anthropic;
pub mod fake_openai;
pub mod fake_openrouter;
mod serve;
pub mod tls;

pub use fake_anthropic::{FAKE_ANTHROPIC_KEY, FAKE_ANTHROPIC_MODEL, FakeAnthropic};
pub use fake_openai::FakeOpenAi;
pub use fake_openrouter::{
    BillingEntry, FAKE_API_KEY, FakeOpenRouter, FakeOptions, RecordedRequest,
};

/// The fakes' signature of a model's thinking text (FNV-1a): enough to tell a text sent back
/// unchanged, as Anthropic checks the thinking blocks a tool loop sends back.
pub(crate) fn thinking_signature(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("fakesig{hash:016x}")
}
