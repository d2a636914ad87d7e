"""The official `openai` Python SDK against orproxy, unmodified: only `base_url` points at it."""

import openai
import pytest

from conftest import PROXY_KEY


@pytest.fixture
def client(orproxy):
    # No SDK retries: each test sees exactly what orproxy answered.
    return openai.OpenAI(base_url=orproxy, api_key=PROXY_KEY, max_retries=0)


def ask(client, model, text="hello from the sdk", **kwargs):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **kwargs
    )


def test_plain_completion(client):
    completion = ask(client, "openai/gpt-4o")
    assert completion.choices[0].message.content == "echo: hello from the sdk"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "openai/gpt-4o"
    assert completion.id.startswith("gen-")
    assert completion.usage.completion_tokens > 0


def test_raw_response_carries_orproxy_headers(client):
    raw = client.chat.completions.with_raw_response.create(
        model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-orproxy-route"] == "openrouter:openai/gpt-4o"
    assert raw.headers["x-orproxy-request-id"].startswith("req-")


def test_streamed_completion(client):
    stream = ask(client, "anthropic/claude-3-5-sonnet", "one two three four", stream=True)
    text = ""
    finish = None
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert text == "echo: one two three four"
    assert finish == "stop"
    assert usage is not None and usage.total_tokens > 0


def test_models_list(client):
    ids = {model.id for model in client.models.list()}
    assert "openai/gpt-4o" in ids


def test_models_retrieve(client):
    assert client.models.retrieve("openai/gpt-4o").id == "openai/gpt-4o"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no/such-model")
    assert err.value.code == "model_not_found"


def test_unknown_proxy_key_is_authentication_error(orproxy):
    bad = openai.OpenAI(base_url=orproxy, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        ask(bad, "openai/gpt-4o")
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"


def test_upstream_402_reaches_the_sdk(client):
    with pytest.raises(openai.APIStatusError) as err:
        ask(client, "fake/status-402")
    assert err.value.status_code == 402
    assert "credits" in err.value.message


def test_upstream_429_is_rate_limit_error_with_retry_after(client):
    with pytest.raises(openai.RateLimitError) as err:
        ask(client, "fake/status-429-retry-7")
    assert err.value.status_code == 429
    assert err.value.response.headers["retry-after"] == "7"


def test_upstream_502_is_internal_server_error(client):
    with pytest.raises(openai.InternalServerError) as err:
        ask(client, "fake/status-502")
    assert err.value.status_code == 502


def test_midstream_error_raises_while_iterating(client):
    stream = ask(client, "fake/midstream-error-after-2", stream=True)
    received = ""
    with pytest.raises(openai.APIError):
        for chunk in stream:
            for choice in chunk.choices:
                received += choice.delta.content or ""
    assert received, "content before the error must reach the client"


def test_stream_cut_raises_instead_of_ending_cleanly(client):
    stream = ask(client, "fake/cut-after-3", stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
