"""Chat model logic without a server: message/parameter validation, per-row streaming and stop strings."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from model_repository import runtime
from model_repository.chat import parse_messages, parse_params, resolve_attention
from model_repository.chat_engine import ChatJob, RowStreamer, SamplingParams


def b64_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_parse_messages_normalises_and_decodes() -> None:
    raw = json.dumps([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image", "data": b64_png()}, {"type": "text", "text": "what?"}]},
    ]).encode()
    messages = parse_messages(raw, 1.0, 4, 4)
    assert messages[0]["content"] == [{"type": "text", "text": "be brief"}]
    assert messages[1]["content"][0]["image"].size == (20, 10)


@pytest.mark.parametrize(("raw", "match"), [
    (b"not json", "JSON list"),
    (b"[]", "non-empty"),
    (json.dumps([{"role": "user", "content": 5}]).encode(), "string or a list"),
    (json.dumps([{"role": "user", "content": [{"type": "audio"}]}]).encode(), "parts are"),
    (json.dumps([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]).encode(), "last message"),
    (json.dumps([{"role": "user", "content": [{"type": "image", "data": b64_png()}] * 3}]).encode(), "at most 2"),
])
def test_parse_messages_errors(raw: bytes, match: str) -> None:
    with pytest.raises(runtime.InputError, match=match):
        parse_messages(raw, 1.0, 4, 2)


def test_parse_params_defaults_and_limits() -> None:
    params, _ = parse_params(None, 64, 1024)
    assert params == SamplingParams(64, 0.0, 1.0, (), None)
    params, settings = parse_params(b'{"max_tokens": 5, "stop": "END", "seed": 7, "video_fps": 2}', 64, 1024)
    assert (params.max_tokens, params.stop, params.seed, settings.video_fps) == (5, ("END",), 7, 2)
    params, settings = parse_params(json.dumps({
        "n": 3, "logprobs": True, "top_logprobs": 2, "presence_penalty": 1, "frequency_penalty": -0.5,
        "repetition_penalty": 1.3, "response_format": {"type": "json_object"}}).encode(), 64, 1024, max_choices=4)
    assert (settings.n, params.logprobs, params.top_logprobs, params.presence_penalty, params.frequency_penalty,
            params.repetition_penalty) == (3, True, 2, 1, -0.5, 1.3)
    assert settings.response_format == {"type": "json_object"} and params.penalised and not params.plain_greedy
    for bad, match in [(b'{"max_tokens": 0}', "max_tokens"), (b'{"top_p": 0}', "top_p"),
                       (b'{"stop": [""]}', "stop"), (b'[1]', "JSON object"), (b'{"n": 5}', "n must be 1..4"),
                       (b'{"top_logprobs": 2}', "needs logprobs"), (b'{"presence_penalty": 3}', "presence_penalty"),
                       (b'{"response_format": {"type": "yaml"}}', "response_format"),
                       (b'{"temprature": 1}', "temprature: Extra inputs are not permitted")]:
        with pytest.raises(runtime.InputError, match=match):
            parse_params(bad, 64, 1024, max_choices=4)


def test_logprobs_in_openai_shape() -> None:
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    from export.tiny import build_tiny_qwen2vl
    from model_repository.chat import render_logprobs
    from model_repository.chat_engine import TokenLogprob
    from model_repository.structured import Grammars

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(build_tiny_qwen2vl(Path(tmp) / "q"))
    grammars = Grammars(tokenizer, {tokenizer.eos_token_id}, len(tokenizer))
    word = tokenizer("hello")["input_ids"][0]
    eos = tokenizer.eos_token_id
    [entry] = render_logprobs([TokenLogprob(word, -0.25, [(word, -0.25), (eos, float("-inf"))])], tokenizer, grammars)
    text = tokenizer.decode([word])
    assert entry == {"token": text, "logprob": -0.25, "bytes": list(text.encode()), "top_logprobs": [
        {"token": text, "logprob": -0.25, "bytes": list(text.encode())},
        {"token": tokenizer.eos_token, "logprob": -9999.0, "bytes": list(tokenizer.eos_token.encode())}]}
    json.dumps(entry, allow_nan=False)  # what goes over the wire is plain JSON


class CharTokenizer:
    """One character per token id (ord), enough to exercise the streamer's text logic."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def run_streamer(text: str, params: SamplingParams, eos_at: int | None = None):
    events: list = []
    job = ChatJob(None, params, 3, lambda t, f, u: events.append((t, f, u)))
    job.batch_size = 1
    streamer = RowStreamer(CharTokenizer(), eos_ids={0})
    ids = [ord(c) for c in text] + ([0] if eos_at is not None else [])
    for token in ids:
        if streamer.push(job, token):
            break
    streamer.close(job)
    return events


def test_streamer_deltas_join_to_the_text_and_final_has_usage() -> None:
    events = run_streamer("hello", SamplingParams(max_tokens=50), eos_at=5)
    assert "".join(t for t, _, _ in events) == "hello"
    assert events[-1][1] == "stop" and events[-1][2]["completion_tokens"] == 5
    assert events[-1][2] == {"prompt_tokens": 3, "completion_tokens": 5, "batch_size": 1}


def test_streamer_stop_string_is_not_leaked() -> None:
    events = run_streamer("abc STOP def", SamplingParams(max_tokens=50, stop=("STOP",)))
    assert "".join(t for t, _, _ in events) == "abc "
    assert events[-1][1] == "stop"


def test_streamer_length_limit() -> None:
    events = run_streamer("abcdefgh", SamplingParams(max_tokens=3))
    assert "".join(t for t, _, _ in events) == "abc" and events[-1][1] == "length"


def test_streamer_holds_back_a_possible_stop_string_then_flushes_it() -> None:
    events = run_streamer("abc ST", SamplingParams(max_tokens=6, stop=("STOP",)))
    deltas = [t for t, f, _ in events if not f]
    assert "".join(deltas) == "abc ST" and events[-1][1] == "length"
    assert "ST" not in "".join(deltas[:-1])  # "ST" could have begun "STOP": sent only at the end


def test_resolve_attention() -> None:
    assert resolve_attention("auto", "cpu") == "sdpa"
    assert resolve_attention("false", "cuda") == "sdpa"
    with pytest.raises(RuntimeError, match="flash-attn is not usable"):
        resolve_attention("true", "cpu")
    with pytest.raises(ValueError, match="auto, true or false"):
        resolve_attention("maybe", "cpu")
