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
