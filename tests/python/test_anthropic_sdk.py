"""The official `anthropic` Python SDK against orproxy, unmodified: only `base_url` points at it.

orproxy answers `POST /v1/messages` by translating to the OpenAI format for the fake OpenRouter
and back; the SDK's own parsing (models, stream events) is the check that the translation is
faithful.
"""

import anthropic
import pytest

from conftest import PROXY_KEY

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"q": {"type": "string"}},
        "required": ["q"],
    },
}


@pytest.fixture
def client(orproxy):
    # The SDK appends /v1/messages itself; no retries so each test sees orproxy's own answer.
    base = orproxy.removesuffix("/v1")
    return anthropic.Anthropic(base_url=base, api_key=PROXY_KEY, max_retries=0)


def test_plain_message(client):
    message = client.messages.create(
        model="anthropic/claude-sonnet-4.5",
        max_tokens=100,
        system="You are terse.",
        messages=[{"role": "user", "content": "hello from the sdk"}],
    )
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: hello from the sdk"
    assert message.stop_reason == "end_turn"
    assert message.model == "anthropic/claude-sonnet-4.5"
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0


def test_streamed_message(client):
    with client.messages.stream(
        model="anthropic/claude-sonnet-4.5",
        max_tokens=100,
        messages=[{"role": "user", "content": "one two three four"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: one two three four"
    assert final.stop_reason == "end_turn"
    assert final.content[0].text == text
    assert final.usage.output_tokens > 0


def test_tool_use_round_trip(client):
    question = {"role": "user", "content": "Paris"}
    first = client.messages.create(
        model="anthropic/claude-sonnet-4.5",
        max_tokens=200,
        tools=[WEATHER],
        messages=[question],
    )
    assert first.stop_reason == "tool_use"
    call = next(block for block in first.content if block.type == "tool_use")
    assert call.name == "get_weather"
    assert call.input == {"q": "Paris"}
    second = client.messages.create(
        model="anthropic/claude-sonnet-4.5",
        max_tokens=200,
        tools=[WEATHER],
        messages=[
            question,
            {"role": "assistant", "content": [block.model_dump() for block in first.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"}
                ],
            },
        ],
    )
    assert second.stop_reason == "end_turn"
    assert second.content[-1].text == "tool said: sunny, 21 C"


def test_streamed_tool_use(client):
    with client.messages.stream(
        model="anthropic/claude-sonnet-4.5",
        max_tokens=200,
        tools=[WEATHER],
        messages=[{"role": "user", "content": "Lyon"}],
    ) as stream:
        final = stream.get_final_message()
    call = next(block for block in final.content if block.type == "tool_use")
    assert call.input == {"q": "Lyon"}
    assert final.stop_reason == "tool_use"


def test_claude_code_style_request(client):
    """System blocks with cache_control, tools, thinking and a stream, as Claude Code sends."""
    events = []
    with client.messages.stream(
        model="anthropic/claude-sonnet-4.5",
        max_tokens=2048,
        thinking={"type": "enabled", "budget_tokens": 1024},
        system=[
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be brief."},
        ],
        tools=[WEATHER],
        tool_choice={"type": "auto"},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Nice"}]}],
        metadata={"user_id": "user-123"},
    ) as stream:
        for event in stream:
            events.append(event.type)
        final = stream.get_final_message()
    assert events[0] == "message_start"
    assert "content_block_start" in events and "content_block_stop" in events
    assert events[-1] == "message_stop"
    kinds = [block.type for block in final.content]
    assert kinds[0] == "thinking"
    assert "tool_use" in kinds


def test_thinking_tool_loop_keeps_the_signature(client):
    """Claude through OpenRouter signs its thinking and refuses a tool result without it: the
    SDK's own accumulation of the stream must give back a block the upstream accepts."""
    thinking = {"type": "enabled", "budget_tokens": 1024}
    question = {"role": "user", "content": "Oslo"}
    with client.messages.stream(
        model="anthropic/claude-sonnet-4.5",
        max_tokens=2048,
        thinking=thinking,
        tools=[WEATHER],
        messages=[question],
    ) as stream:
        first = stream.get_final_message()
    assert [block.type for block in first.content] == ["thinking", "tool_use"]
    assert first.content[0].signature.startswith("fakesig")
    call = first.content[1]
    second = client.messages.create(
        model="anthropic/claude-sonnet-4.5",
        max_tokens=2048,
        thinking=thinking,
        tools=[WEATHER],
        messages=[
            question,
            {"role": "assistant", "content": [block.model_dump() for block in first.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "snow"}],
            },
        ],
    )
    assert second.content[-1].text == "tool said: snow"


def test_count_tokens(client):
    counted = client.messages.count_tokens(
        model="anthropic/claude-sonnet-4.5",
        messages=[{"role": "user", "content": "count these words please"}],
    )
    assert counted.input_tokens > 0


def test_errors_use_the_anthropic_shape(orproxy, client):
    bad = anthropic.Anthropic(base_url=orproxy.removesuffix("/v1"), api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        bad.messages.create(model="x", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(
            model="fake/status-429-retry-1",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
        )


def test_parse_returns_the_structured_output(client):
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    message = client.messages.parse(
        model="anthropic/claude-sonnet-4.5",
        max_tokens=200,
        messages=[{"role": "user", "content": "Ann"}],
        output_format=Person,
    )
    assert message.parsed_output == Person(name="Ann", age=1)
    assert message.stop_reason == "end_turn"


def test_a_json_answer_to_a_stream_request_still_streams(client):
    with client.messages.stream(
        model="fake/ignore-stream",
        max_tokens=100,
        messages=[{"role": "user", "content": "one two"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: one two"
    assert final.stop_reason == "end_turn"
    assert final.model == "fake/ignore-stream"
    assert final.usage.output_tokens > 0
