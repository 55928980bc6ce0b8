"""The Triton engine's surfaces: requests packed and responses read through ``vlmserve.families.tensors`` (chat,
Florence-2, embeddings), with a transport that records the tensors instead of a Triton server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

import numpy as np
import pytest

from tests.fakes import model
from tests.unit.gateway.backends.tensors import USAGE, resp
from vlmserve.api.openai import GenerationParameters
from vlmserve.families.tensors import ChatTensors as Chat
from vlmserve.families.tensors import EmbedImageTensors as EmbedImage
from vlmserve.families.tensors import EmbedTextTensors as EmbedText
from vlmserve.families.tensors import FlorenceTensors as Florence
from vlmserve.gateway.backends.triton import (
    TritonBackend,
    cancel_request,
    chat_inputs,
    florence_inputs,
    parse_delta,
    parse_result,
)
from vlmserve.gateway.engines import FlorenceRequest
from vlmserve.gateway.errors import APIError


class RecordingTriton(TritonBackend):
    """The Triton engine over a transport that records what it sends and answers from ``answer``/``script``."""

    def __init__(self, answer: Callable[[dict[str, np.ndarray], list[str]], dict[str, np.ndarray]] | None = None,
                 script: list[dict[str, np.ndarray]] | None = None) -> None:
        super().__init__("127.0.0.1:18000")
        self.answer = answer
        self.script = script or []
        self.sent: list[dict[str, Any]] = []

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        self.sent.append({"model": model, "inputs": inputs, "outputs": outputs})
        assert self.answer is not None
        return self.answer(inputs, outputs)

    async def stream(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str], *,
                     cancel_inputs: Any = None,
                     final_output: str | None = None) -> AsyncGenerator[dict[str, np.ndarray], None]:
        self.sent.append({"model": model, "inputs": inputs, "outputs": outputs, "final_output": final_output,
                          "cancel_inputs": cancel_inputs})
        for values in self.script:
            yield values


def test_chat_inputs_send_parameters_only_when_set() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert set(chat_inputs(GenerationParameters(), messages=messages)) == {Chat.MESSAGES.name}
    inputs = chat_inputs(GenerationParameters(max_tokens=5, stop=["\n"], seed=3), messages=messages)
    assert inputs[Chat.MESSAGES.name].shape == (1,) and inputs[Chat.MESSAGES.name].dtype == np.object_
    assert json.loads(inputs[Chat.MESSAGES.name][0]) == messages
    assert json.loads(inputs[Chat.PARAMETERS.name][0]) == {"max_tokens": 5, "stop": ["\n"], "seed": 3}
    prompt = chat_inputs(GenerationParameters(priority="batch"), prompt="Once")
    assert set(prompt) == {Chat.PROMPT.name, Chat.PARAMETERS.name} and prompt[Chat.PROMPT.name][0] == b"Once"
    assert json.loads(prompt[Chat.PARAMETERS.name][0]) == {"priority": "batch"}
    assert json.loads(cancel_request("r-1")[Chat.PARAMETERS.name][0]) == {"cancel": "r-1"}


def test_parse_delta_reads_text_finish_and_usage() -> None:
    assert parse_delta(resp("ab")).text == "ab" and parse_delta(resp("ab")).finish_reason is None
    last = parse_delta(resp("", "length", USAGE, index=1, logprobs=[{"token": "a"}]))
    assert last.finish_reason == "length" and last.usage is not None and last.usage.total_tokens == 14
    assert last.index == 1 and last.logprobs == [{"token": "a"}]
    broken = parse_delta({Chat.TEXT.name: np.array([b"x"], dtype=np.object_),
                          Chat.FINISH_REASON.name: np.array([b"stop"], dtype=np.object_),
                          Chat.USAGE.name: np.array([b"{not json"], dtype=np.object_)})
    assert broken.text == "x" and broken.usage is not None and broken.usage.total_tokens == 0


def test_generate_streams_the_chat_contract_and_reads_deltas() -> None:
    """The chat models are decoupled: streamed with every chat output, USAGE marking the request's last response,
    and a ``{"cancel": id}`` request to end an abandoned one."""
    backend = RecordingTriton(script=[resp("Hel"), resp("lo", "stop", USAGE)])
    info = model("smolvlm2", family="smolvlm2", task="chat")

    async def run() -> list[Any]:
        return [d async for d in backend.generate(info, GenerationParameters(max_tokens=4),
                                                  messages=[{"role": "user", "content": "hi"}])]

    deltas = asyncio.run(run())
    assert [d.text for d in deltas] == ["Hel", "lo"] and deltas[-1].usage is not None
    [sent] = backend.sent
    assert sent["model"] == "smolvlm2" and sent["outputs"] == Chat.output_names()
    assert sent["outputs"] == Chat.output_names()
    assert sent["final_output"] == Chat.USAGE.name and sent["cancel_inputs"] is cancel_request
    assert json.loads(sent["inputs"][Chat.PARAMETERS.name][0]) == {"max_tokens": 4}


def test_florence_inputs_shapes_and_optional_inputs() -> None:
    inputs = florence_inputs(FlorenceRequest(b"img", "<CAPTION>"))
    assert set(inputs) == {Florence.IMAGE.name, Florence.TASK.name}
    assert inputs[Florence.IMAGE.name].shape == (1, 1) and inputs[Florence.IMAGE.name].dtype == np.object_
    assert inputs[Florence.TASK.name][0, 0] == b"<CAPTION>"
    inputs = florence_inputs(FlorenceRequest(b"img", "<OD>", "héllo", 32, 2))
    assert inputs[Florence.TEXT.name][0, 0] == "héllo".encode()
    max_new_tokens = inputs[Florence.MAX_NEW_TOKENS.name]
    assert max_new_tokens.dtype == np.int32 and max_new_tokens.tolist() == [[32]]
    assert inputs[Florence.NUM_BEAMS.name].dtype == np.int32 and inputs[Florence.NUM_BEAMS.name].tolist() == [[2]]
    assert set(inputs) <= Florence.input_names()


def test_parse_result_rejects_what_the_model_does_not_promise() -> None:
    ok = parse_result(np.array([[b'{"result": "x", "text": "y"}']], dtype=np.object_))
    assert ok["result"] == "x"
    for raw in (b"not json", b'["a"]', b'{"text": "no result"}'):
        with pytest.raises(ValueError, match="."):
            parse_result(np.array([[raw]], dtype=np.object_))


def test_run_florence_reads_the_result_and_an_unreadable_one_is_502() -> None:
    info = model("florence2", family="florence2", task="florence2")

    def answering(raw: bytes) -> RecordingTriton:
        return RecordingTriton(lambda inputs, outputs: {Florence.RESULT.name: np.array([[raw]], dtype=np.object_)})

    backend = answering(b'{"result": "a cat", "text": "raw"}')
    assert asyncio.run(backend.run_florence(info, FlorenceRequest(b"img", "<CAPTION>")))["result"] == "a cat"
    assert backend.sent[0]["outputs"] == Florence.output_names() and backend.sent[0]["model"] == "florence2"
    with pytest.raises(APIError) as err:
        asyncio.run(answering(b"<html>").run_florence(info, FlorenceRequest(b"img", "<CAPTION>")))
    assert err.value.status == 502 and err.value.code == "bad_model_output"


def test_embeddings_go_in_calls_of_the_models_batch_size() -> None:
    def embed(inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        [(name, rows)] = inputs.items()
        out = {EmbedText.EMBEDDING.name: np.ones((len(rows), 2), dtype=np.float32)}
        if EmbedText.NUM_TOKENS.name in outputs:
            out[EmbedText.NUM_TOKENS.name] = np.full((len(rows), 1), 3, dtype=np.int32)
        return out

    backend = RecordingTriton(embed)
    images = model("siglip_embed_image", max_batch_size=2, family="siglip", task="embed_image")
    result = asyncio.run(backend.embed_images(images, [b"a", b"b", b"c"]))
    assert result.vectors.shape == (3, 2) and result.tokens == 0
    assert [s["inputs"][EmbedImage.IMAGE.name].shape for s in backend.sent] == [(2, 1), (1, 1)]
    assert backend.sent[0]["outputs"] == EmbedImage.output_names()
    texts = model("siglip_embed_text", family="siglip", task="embed_text")  # 0: one call for all
    result = asyncio.run(backend.embed_texts(texts, ["x", "yz"]))
    assert result.tokens == 6 and backend.sent[-1]["inputs"][EmbedText.TEXT.name][:, 0].tolist() == [b"x", b"yz"]
    assert backend.sent[-1]["outputs"] == EmbedText.output_names()
