"""Chat model logic without a server: message/parameter validation, per-row streaming and stop strings."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from PIL import Image

from vlmserve.api.openai import GenerationParameters
from vlmserve.families.tensors import ChatTensors
from vlmserve.model_repository import common
from vlmserve.model_repository.chat import parse_messages, parse_params, resolve_attention
from vlmserve.model_repository.chat_engine import ChatJob, RowStreamer


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
    with pytest.raises(common.InputError, match=match):
        parse_messages(raw, 1.0, 4, 2)


def test_parse_params_defaults_and_limits() -> None:
    params = parse_params(None, 64, 1024)
    assert params.model_dump() == GenerationParameters(max_tokens=64).model_dump() and not params.max_tokens_sent
    assert params.plain_greedy and not params.penalised
    params = parse_params(b'{"max_tokens": 5, "stop": "END", "seed": 7, "video_fps": 2}', 64, 1024)
    assert (params.max_tokens, params.stop, params.seed, params.video_fps) == (5, ["END"], 7, 2)
    assert params.max_tokens_sent
    params = parse_params(json.dumps({
        "n": 3, "logprobs": True, "top_logprobs": 2, "presence_penalty": 1, "frequency_penalty": -0.5,
        "repetition_penalty": 1.3, "response_format": {"type": "json_object"}}).encode(), 64, 1024, max_choices=4)
    assert (params.n, params.logprobs, params.top_logprobs, params.presence_penalty, params.frequency_penalty,
            params.repetition_penalty) == (3, True, 2, 1, -0.5, 1.3)
    assert params.response_format == {"type": "json_object"} and params.penalised and not params.plain_greedy
    for bad, match in [(b'{"max_tokens": 0}', "max_tokens"),
                       (b'{"max_tokens": 1025}', "max_tokens must be 1..1024, got 1025"), (b'{"top_p": 0}', "top_p"),
                       (b'{"stop": [""]}', "stop"), (b'[1]', "JSON object"), (b'{"n": 5}', "n must be 1..4"),
                       (b'{"top_logprobs": 2}', "needs logprobs"), (b'{"presence_penalty": 3}', "presence_penalty"),
                       (b'{"response_format": {"type": "yaml"}}', "response_format"),
                       (b'{"temprature": 1}', "temprature: Extra inputs are not permitted")]:
        with pytest.raises(common.InputError, match=match):
            parse_params(bad, 64, 1024, max_choices=4)


def test_logprobs_in_openai_shape() -> None:
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    from vlmserve.export.tiny import build_tiny_qwen2vl
    from vlmserve.model_repository.chat import render_logprobs
    from vlmserve.model_repository.chat_engine import TokenLogprob
    from vlmserve.model_repository.structured import Grammars

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


def run_streamer(text: str, params: GenerationParameters, eos_at: int | None = None):
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
    events = run_streamer("hello", GenerationParameters(max_tokens=50), eos_at=5)
    assert "".join(t for t, _, _ in events) == "hello"
    assert events[-1][1] == "stop" and events[-1][2]["completion_tokens"] == 5
    assert events[-1][2] == {"prompt_tokens": 3, "completion_tokens": 5, "batch_size": 1}


def test_streamer_stop_string_is_not_leaked() -> None:
    events = run_streamer("abc STOP def", GenerationParameters(max_tokens=50, stop=["STOP"]))
    assert "".join(t for t, _, _ in events) == "abc "
    assert events[-1][1] == "stop"


def test_streamer_length_limit() -> None:
    events = run_streamer("abcdefgh", GenerationParameters(max_tokens=3))
    assert "".join(t for t, _, _ in events) == "abc" and events[-1][1] == "length"


def test_streamer_holds_back_a_possible_stop_string_then_flushes_it() -> None:
    events = run_streamer("abc ST", GenerationParameters(max_tokens=6, stop=["STOP"]))
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


# ---------------------------------------------------------------------------------------------- the context limit


def test_fit_context_mirrors_vllm() -> None:
    from vlmserve.model_repository.chat import fit_context

    sent = GenerationParameters(max_tokens=100).resolved(64, 1024, 8)  # the client's max_tokens
    default = GenerationParameters().resolved(100, 1024, 8)  # the model's default max_tokens
    assert sent.max_tokens == default.max_tokens == 100 and sent.max_tokens_sent and not default.max_tokens_sent
    assert fit_context(sent, 50, None) is sent  # no known context: nothing checked
    assert fit_context(sent, 28, 128) is sent  # 28 + 100 = 128 fits exactly
    with pytest.raises(common.InputError, match=r"the prompt is 29 tokens and max_tokens is 100: 129 exceeds "
                                                 r"this model's context of 128 tokens; lower max_tokens to 99"):
        fit_context(sent, 29, 128)
    lowered = fit_context(default, 29, 128)  # the default max_tokens: lowered to what is left, in a copy
    assert lowered.max_tokens == 99 and default.max_tokens == 100 and not lowered.max_tokens_sent
    for params in (GenerationParameters(max_tokens=1), GenerationParameters().resolved(1, 1024, 8)):
        with pytest.raises(common.InputError, match="the prompt is 128 tokens: it leaves no room"):
            fit_context(params, 128, 128)


class FakeTensor:
    def __init__(self, value: str) -> None:
        self.value = value

    def as_numpy(self):
        import numpy as np

        return np.array([self.value.encode()], dtype=np.object_)


class FakeSender:
    def __init__(self) -> None:
        import threading

        self.responses: list = []
        self.done = threading.Event()

    def send(self, response=None, flags=0) -> None:
        self.responses.append(response)
        if flags:
            self.done.set()


class FakeRequest:
    def __init__(self, request_id: str = "", **inputs) -> None:
        self.inputs = {k: FakeTensor(v if isinstance(v, str) else json.dumps(v)) for k, v in inputs.items()}
        self.sender = FakeSender()
        self.id = request_id

    def request_id(self) -> str:
        return self.id

    def get_response_sender(self) -> FakeSender:
        return self.sender

    def is_cancelled(self) -> bool:
        return False

    def outcome(self, timeout: float = 60) -> tuple[str | None, dict]:
        """(error message or None, the final response's USAGE)."""
        assert self.sender.done.wait(timeout), "no final response"
        final = self.sender.responses[-1]
        if final.error is not None:
            assert final.error.code == "INVALID_ARG", final.error.message
            return final.error.message, {}
        usage = dict(final.output_tensors)[ChatTensors.USAGE.name].reshape(-1)[0]
        return None, json.loads(usage)


@pytest.fixture
def fake_pb(monkeypatch):
    from dataclasses import dataclass, field
    from types import SimpleNamespace

    @dataclass
    class Response:
        output_tensors: list = field(default_factory=list)
        error: object = None

    class TritonError:
        INVALID_ARG = "INVALID_ARG"

        def __init__(self, message: str, code: str | None = None) -> None:
            self.message, self.code = message, code

    fake = SimpleNamespace(
        Tensor=lambda name, value: (name, value), InferenceResponse=Response, TritonError=TritonError,
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=1,
        get_input_tensor_by_name=lambda request, name: request.inputs.get(name),
    )
    monkeypatch.setattr(common, "pb_utils", fake)
    return fake


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory):
    from vlmserve.export.tiny import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("qwen") / "checkpoint")


def chat_model(root, checkpoint, family: str = "qwen2vl", **parameters):
    """A ChatModel loaded by its own ``initialize``, as Triton would, from a one-model repository in ``root``."""
    from vlmserve.model_repository.chat import ChatModel

    version = root / family / "1"
    version.mkdir(parents=True)
    (version / "checkpoint").symlink_to(checkpoint)
    config = {"name": family, "model_transaction_policy": {"decoupled": True},
              "parameters": {k: {"string_value": str(v)} for k, v in {"family": family, **parameters}.items()}}
    model = ChatModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(root / family),
                      "model_version": "1", "model_instance_kind": "CPU"})
    return model


def test_context_limit_fails_before_the_vision_encoder(fake_pb, tiny_qwen_dir, tmp_path) -> None:
    model = chat_model(tmp_path, tiny_qwen_dir, max_context_tokens=64)
    try:
        assert model.context == 64  # the checkpoint's 4096, lowered by max_context_tokens
        vision_calls: list[int] = []
        visual = model.pipeline.model.model.visual
        original = visual.forward
        visual.forward = lambda *a, **kw: vision_calls.append(1) or original(*a, **kw)
        submitted: list = []
        submit = model.engine.submit
        model.engine.submit = lambda job: submitted.append(job) or submit(job)
        image = [{"role": "user", "content": [{"type": "image", "data": b64_png()},
                                              {"type": "text", "text": "what is this?"}]}]

        too_long = FakeRequest(MESSAGES=image, PARAMETERS={"max_tokens": 60})
        model.execute([too_long])
        error, _ = too_long.outcome()
        assert error is not None
        prompt = int(error.split("the prompt is ")[1].split(" tokens")[0])
        assert f"the prompt is {prompt} tokens and max_tokens is 60: {prompt + 60} exceeds this model's context " \
               "of 64 tokens" in error
        assert not submitted and not vision_calls  # refused before the engine, the image never encoded

        # Without max_tokens the default (256) is lowered to what fits, as vLLM does; the model keeps serving.
        fits = FakeRequest(MESSAGES=image)
        model.execute([fits])
        error, usage = fits.outcome()
        assert error is None and usage["prompt_tokens"] == prompt
        assert submitted[-1].params.max_tokens == 64 - prompt and usage["completion_tokens"] <= 64 - prompt
        assert vision_calls

        # A PROMPT (/v1/completions) is held to the same limit, and a prompt alone beyond it too.
        text = "hello world " * 4
        assert 14 < len(model.pipeline.tokenizer(text)["input_ids"]) < 64
        words = FakeRequest(PROMPT=text, PARAMETERS={"max_tokens": 50})
        model.execute([words])
        error, _ = words.outcome()
        assert error is not None and "and max_tokens is 50" in error and "context of 64 tokens" in error
        huge = FakeRequest(PROMPT="hello world " * 100)
        model.execute([huge])
        error, _ = huge.outcome()
        assert error is not None and "leaves no room for an answer within this model's context of 64" in error
    finally:
        model.finalize()


def test_a_request_beyond_the_kv_budget_is_refused_even_alone(fake_pb, tiny_qwen_dir, tmp_path) -> None:
    """The engine runs the first request of an empty batch whatever it reserves: one that can never fit the KV
    budget (n x (prompt + max_tokens) > max_batch_tokens) is refused up front, naming positions and bytes."""
    model = chat_model(tmp_path, tiny_qwen_dir, max_batch_tokens=100)
    try:
        loop = model.engine.loop
        text = loop.family.model.config.get_text_config()
        head_dim = text.hidden_size // text.num_attention_heads
        assert loop.kv_bytes_per_token == text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 4
        submitted: list = []
        submit = model.engine.submit
        model.engine.submit = lambda job: submitted.append(job) or submit(job)
        prompt = "hello world"
        tokens = len(model.pipeline.tokenizer(prompt)["input_ids"])
        fits = FakeRequest(PROMPT=prompt, PARAMETERS={"max_tokens": 100 - tokens})
        model.execute([fits])
        error, _ = fits.outcome()
        assert error is None and len(submitted) == 1
        two = FakeRequest(PROMPT=prompt, PARAMETERS={"max_tokens": 100 - tokens, "n": 2})
        model.execute([two])
        error, _ = two.outcome()
        need = 2 * 100
        assert error is not None and f"this request needs {need} KV positions (2 choice(s) x (prompt {tokens} + " \
            f"max_tokens {100 - tokens}" in error and "KV budget is 100 positions" in error
        assert len(submitted) == 1  # refused before the engine
    finally:
        model.finalize()


def test_a_sender_that_breaks_mid_stream_releases_the_admission_slot(fake_pb, tiny_qwen_dir, tmp_path) -> None:
    """The client goes away between two deltas (Triton's sender raises): the engine drops the row and the request's
    admission slot is freed, so requests broken like this never fill the queue (max_batch + max_queue_size)."""
    model = chat_model(tmp_path, tiny_qwen_dir, max_batch=1, max_queue_size=0)
    try:
        assert model.admission.limit == 1
        for _ in range(3):  # more broken requests than the model admits at once
            broken = FakeRequest(PROMPT="hello world, tell me a story", PARAMETERS={"max_tokens": 16})
            sends: list = []

            def send(response, flags=0, sends=sends) -> None:
                sends.append(response)
                if len(sends) == 2:
                    raise ConnectionError("the client went away")

            broken.sender.send = send
            model.execute([broken])
            deadline = time.monotonic() + 10
            while model.admission.count and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(sends) == 2 and model.admission.count == 0
        healthy = FakeRequest(PROMPT="hello world", PARAMETERS={"max_tokens": 4})
        model.execute([healthy])
        error, usage = healthy.outcome()
        assert error is None and usage["completion_tokens"] >= 1
        assert model.admission.count == 0
    finally:
        model.finalize()


def test_a_cancel_request_ends_the_running_request_it_names(fake_pb, tiny_qwen_dir, tmp_path) -> None:
    """The gateway's way to abandon a stream without cancelling the gRPC call (which can abort Triton 2.51): a
    request with only PARAMETERS {"cancel": id}. It is answered with a final flag and no response; the request
    with that Triton id stops at its next step with finish_reason "cancelled", and its admission slot is free.
    A cancel naming no running request changes nothing."""
    model = chat_model(tmp_path, tiny_qwen_dir, max_batch=2)
    try:
        stranger = FakeRequest(PARAMETERS={"cancel": "nobody"})
        model.execute([stranger])
        assert stranger.sender.responses == [None] and stranger.sender.done.is_set()
        long = FakeRequest("req-1", PROMPT="hello world, tell me a story", PARAMETERS={"max_tokens": 1000})
        model.execute([long])
        deadline = time.monotonic() + 30
        while len(long.sender.responses) < 3:  # polls a condition (decoding has started), bounded
            assert time.monotonic() < deadline and not long.sender.done.is_set()
            time.sleep(0.01)
        assert model.admission.count == 1 and "req-1" in model.open_groups
        cancel = FakeRequest(PARAMETERS={"cancel": "req-1"})
        model.execute([cancel])
        assert cancel.sender.responses == [None] and cancel.sender.done.is_set()
        error, usage = long.outcome(timeout=30)
        assert error is None and usage["completion_tokens"] < 1000
        finish = dict(long.sender.responses[-1].output_tensors)[ChatTensors.FINISH_REASON.name].reshape(-1)[0]
        assert (finish.decode() if isinstance(finish, bytes) else finish) == "cancelled"
        assert model.admission.count == 0 and model.open_groups == {}
        # A request whose PARAMETERS merely contain "cancel" among generation settings is not a cancel.
        odd = FakeRequest(PROMPT="hi", PARAMETERS={"cancel": "req-1", "max_tokens": 2})
        model.execute([odd])
        message, _ = odd.outcome()
        assert message is not None and "cancel" in message
    finally:
        model.finalize()
