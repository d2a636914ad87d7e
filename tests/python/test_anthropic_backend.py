"""The official `openai` SDK reaching an Anthropic upstream through orproxy's `anthropic`
backend (OpenAI in, Messages out, and back), and the `anthropic` SDK passed through to it."""

import anthropic
import openai
import pytest

from conftest import PROXY_KEY


@pytest.fixture
def client(orproxy_anthropic):
    return openai.OpenAI(base_url=orproxy_anthropic, api_key=PROXY_KEY, max_retries=0)


def test_openai_sdk_plain_completion(client):
    completion = client.chat.completions.create(
        model="claude-test",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello anthropic"},
        ],
    )
    assert completion.choices[0].message.content == "echo: hello anthropic"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens > 0


def test_openai_sdk_streamed_completion(client):
    stream = client.chat.completions.create(
        model="claude-test",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert text == "echo: one two three"
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens > 0


def test_openai_sdk_thinking_tool_loop_keeps_the_signature(client):
    """Anthropic refuses a tool result whose turn lost its signed thinking: the thinking comes
    back as `reasoning_details` (OpenRouter's form) and the client returns the message as is."""
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
    question = {"role": "user", "content": "Bergen"}
    first = client.chat.completions.create(
        model="claude-test",
        messages=[question],
        tools=[weather],
        reasoning_effort="low",
    )
    message = first.choices[0].message
    details = message.model_extra["reasoning_details"]
    assert details[0]["type"] == "reasoning.text"
    assert details[0]["signature"].startswith("fakesig")
    call = message.tool_calls[0]
    second = client.chat.completions.create(
        model="claude-test",
        messages=[
            question,
            message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "rain"},
        ],
        tools=[weather],
        reasoning_effort="low",
    )
    assert second.choices[0].message.content == "tool result: rain"


def test_openai_sdk_upstream_errors_keep_their_meaning(client):
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="fake/status-429", messages=[{"role": "user", "content": "hi"}]
        )


def test_anthropic_sdk_passes_through(orproxy_anthropic):
    claude = anthropic.Anthropic(
        base_url=orproxy_anthropic.removesuffix("/v1"), api_key=PROXY_KEY, max_retries=0
    )
    message = claude.messages.create(
        model="claude-test",
        max_tokens=64,
        messages=[{"role": "user", "content": "straight through"}],
    )
    assert message.content[0].text == "echo: straight through"
    with claude.messages.stream(
        model="claude-test",
        max_tokens=64,
        messages=[{"role": "user", "content": "streamed through"}],
    ) as stream:
        assert "".join(stream.text_stream) == "echo: streamed through"
