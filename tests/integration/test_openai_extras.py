"""Issue 15 on the real stack (tiny random models) with the official ``openai`` SDK: structured outputs (streaming
too), logprobs, n choices, penalties, models.retrieve, legacy completions, and the OCR route's opt-in schema.

With random weights, the grammar is the only thing that makes an answer valid JSON: a schema-valid answer here is
proof of the constrained decoding, not luck."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys

import httpx
import jsonschema
import pytest

from tests.integration.test_chat_gateway import data_uri, png_bytes
from vlmserve.paths import PROJECT_ROOT

pytestmark = pytest.mark.integration

# Bounded (about 100 bytes of JSON at most), so max_tokens=128 always reaches the closing brace.
INVOICE = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string", "maxLength": 8},
        "total": {"type": "integer", "minimum": 0, "maximum": 9999},
        "paid": {"type": "boolean"},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
    },
    "required": ["vendor", "total", "paid", "currency"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": INVOICE, "strict": True}}


@pytest.fixture(scope="module")
def client(stack):
    from openai import OpenAI

    return OpenAI(base_url=f"{stack.gateway}/v1", api_key="unused", max_retries=0)


def image_message(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png_bytes())}},
                                         {"type": "text", "text": text}]}]


@pytest.mark.parametrize("model", ["smolvlm2", "qwen2vl"])
def test_json_schema_answers_validate_streaming_and_not(client, model) -> None:
    reply = client.chat.completions.create(model=model, max_tokens=128, temperature=1.0, seed=3, n=2,
                                           response_format=SCHEMA_FORMAT, messages=image_message("Read the invoice."))
    assert len(reply.choices) == 2
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), INVOICE)
    chunks = list(client.chat.completions.create(
        model=model, max_tokens=128, temperature=0.8, seed=5, stream=True, response_format=SCHEMA_FORMAT,
        messages=image_message("Read the invoice.")))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed
    jsonschema.validate(json.loads(streamed), INVOICE)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_json_object_and_length_cut(client) -> None:
    reply = client.chat.completions.create(model="qwen2vl", max_tokens=5, response_format={"type": "json_object"},
                                           messages=[{"role": "user", "content": "Some JSON please."}])
    choice = reply.choices[0]
    # Five tokens rarely close an object: then the answer is cut ("length") and says so; else it parses.
    if choice.finish_reason == "length":
        assert choice.message.content.startswith("{") and reply.usage.completion_tokens == 5
    else:
        assert isinstance(json.loads(choice.message.content), dict)


def test_unsupported_schema_is_400(client) -> None:
    import openai

    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError, match="schema is not supported"):
        client.chat.completions.create(model="smolvlm2", response_format=bad,
                                       messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("model", ["smolvlm2", "qwen2vl"])
def test_logprobs_chat_and_stream(client, model) -> None:
    kwargs = {"model": model, "max_tokens": 6, "logprobs": True, "top_logprobs": 3,
                  "messages": [{"role": "user", "content": "Say something."}]}
    reply = client.chat.completions.create(**kwargs)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(bytes(t.bytes).decode("utf-8", "replace") for t in content).startswith(
        reply.choices[0].message.content[:1])
    for token in content:  # greedy: the chosen token is the most likely one
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token and math.isclose(token.top_logprobs[0].logprob,
                                                                           token.logprob, abs_tol=1e-5)
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1 + 1e-5
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


def test_n_choices_with_a_seed(client) -> None:
    kwargs = {"model": "qwen2vl", "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 11,
                  "messages": [{"role": "user", "content": "Describe a sunset."}]}
    reply = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert reply.usage.completion_tokens <= 24
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in again.choices] == texts  # seed + choice index: reproducible


def test_penalties_change_the_output(client) -> None:
    kwargs = {"model": "qwen2vl", "max_tokens": 16, "messages": [{"role": "user", "content": "a dog in the park"}]}
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.8}}):
        assert client.chat.completions.create(**kwargs, **extra).choices[0].message.content != plain, extra


def test_models_retrieve(client) -> None:
    by_id = client.models.retrieve("vlmserve/tiny-smolvlm2")
    assert by_id.id == "vlmserve/tiny-smolvlm2" and by_id.object == "model"
    assert client.models.retrieve("qwen2vl").id == "vlmserve/tiny-qwen2vl"
    import openai

    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_legacy_completions(client) -> None:
    reply = client.completions.create(model="qwen2vl", prompt="Once upon a time", max_tokens=6, logprobs=2, n=2,
                                      temperature=0.9, seed=2)
    assert reply.object == "text_completion" and len(reply.choices) == 2
    for choice in reply.choices:
        assert choice.finish_reason in ("stop", "length")
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) <= 6
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    streamed = list(client.completions.create(model="smolvlm2", prompt="Hello", max_tokens=5, stream=True))
    whole = client.completions.create(model="smolvlm2", prompt="Hello", max_tokens=5)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    many = client.completions.create(model="smolvlm2", prompt=["Hello", "Bye"], max_tokens=3)
    assert [c.index for c in many.choices] == [0, 1]


def test_ocr_with_a_schema(stack) -> None:
    image = base64.b64encode(png_bytes()).decode()
    r = httpx.post(f"{stack.gateway}/ocr", json={"image": image, "schema": INVOICE, "max_tokens": 128}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["finish_reason"] == "stop"
    jsonschema.validate(r.json()["json"], INVOICE)


DOC_BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", (PROJECT_ROOT / "docs" / "openai.md").read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(DOC_BLOCKS)))
def test_docs_openai_example_runs(index: int, stack) -> None:
    """Every example in docs/openai.md runs as written (ports mapped to the test stack's)."""
    kind, code = DOC_BLOCKS[index]
    code = code.replace("127.0.0.1:8080", f"127.0.0.1:{stack.gateway.rsplit(':', 1)[1]}")
    cmd = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
    result = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"docs/openai.md example {index} failed:\n{code}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), "example printed nothing"
