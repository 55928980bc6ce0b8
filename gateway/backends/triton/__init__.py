"""The Triton engine: every surface of :mod:`vlmserve.gateway.engines` over one Triton server.

The only place in the gateway that knows Triton's tensors: requests are packed and responses read through the
declarations of :mod:`vlmserve.families.tensors` (``EmbedImageTensors``, ``ChatTensors``, ``FlorenceTensors``...).
The transport (registry, one-shot HTTP calls, gRPC streams, error mapping, reconnects) is :class:`TritonClient`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import numpy as np

from vlmserve.api.openai import GenerationParameters
from vlmserve.families.tensors import ChatTensors, EmbedImageTensors, EmbedTextTensors, FlorenceTensors, TensorSpec
from vlmserve.gateway.backends.triton.client import TritonClient, TritonUnavailable
from vlmserve.gateway.engines import Delta, Embedded, FlorenceRequest, ModelInfo, Usage
from vlmserve.gateway.errors import APIError

__all__ = ["TritonBackend", "TritonClient", "TritonUnavailable", "cancel_request", "chat_inputs", "florence_inputs",
           "parse_delta", "parse_result"]

log = logging.getLogger("vlmserve.gateway")


class TritonBackend(TritonClient):
    """The gateway's engine on Triton (``VLMSERVE_GATEWAY_BACKEND=triton``, the default)."""

    @classmethod
    def from_settings(cls, settings: Any) -> TritonBackend:
        return cls(settings.triton_url, settings.triton_timeout_s, settings.retry_after_s, settings.registry_ttl_s,
                   grpc_url=settings.triton_grpc_url, reconnect_s=settings.triton_reconnect_s)

    # --- Embedder --------------------------------------------------------------------------------------------

    async def embed_images(self, model: ModelInfo, images: Sequence[bytes]) -> Embedded:
        out = await self._batched(model, EmbedImageTensors.IMAGE, list(images), EmbedImageTensors.output_names())
        return Embedded(out[EmbedImageTensors.EMBEDDING.name])

    async def embed_texts(self, model: ModelInfo, texts: Sequence[str]) -> Embedded:
        out = await self._batched(model, EmbedTextTensors.TEXT, list(texts), EmbedTextTensors.output_names())
        return Embedded(out[EmbedTextTensors.EMBEDDING.name], int(out[EmbedTextTensors.NUM_TOKENS.name].sum()))

    async def _batched(self, model: ModelInfo, spec: TensorSpec, items: list[Any],
                       outputs: list[str]) -> dict[str, np.ndarray]:
        """``items`` in calls of at most the model's ``max_batch_size`` rows, outputs concatenated."""
        chunk = model.max_batch_size or len(items)
        results = [await self.infer(model.name, {spec.name: spec.pack(items[start:start + chunk])}, outputs)
                   for start in range(0, len(items), chunk)]
        return {n: np.concatenate([r[n] for r in results]) for n in outputs}

    # --- Generator -------------------------------------------------------------------------------------------

    async def generate(self, model: ModelInfo, params: GenerationParameters, *,
                       messages: list[dict[str, Any]] | None = None,
                       prompt: str | None = None) -> AsyncGenerator[Delta, None]:
        responses = self.stream(model.name, chat_inputs(params, messages=messages, prompt=prompt),
                                ChatTensors.output_names(), final_output=ChatTensors.USAGE.name,
                                cancel_inputs=cancel_request)
        try:
            async for values in responses:
                yield parse_delta(values)
        finally:
            # Closed here, not left to garbage collection, so an abandoned answer is cancelled right away.
            await responses.aclose()

    # --- FlorenceRunner --------------------------------------------------------------------------------------

    async def run_florence(self, model: ModelInfo, request: FlorenceRequest) -> dict[str, Any]:
        outputs = await self.infer(model.name, florence_inputs(request), FlorenceTensors.output_names())
        try:
            return parse_result(outputs[FlorenceTensors.RESULT.name])
        except (KeyError, ValueError) as exc:
            log.error("%s returned an unreadable RESULT: %s", model.name, exc)
            raise APIError(502, f"{model.name} returned an unreadable result ({exc})",
                           code="bad_model_output") from None


# --- the chat models' tensors ------------------------------------------------------------------------------------


def chat_inputs(params: GenerationParameters, *, messages: list[dict[str, Any]] | None = None,
                prompt: str | None = None) -> dict[str, np.ndarray]:
    """``MESSAGES`` (JSON; or ``PROMPT``, raw text) and, when any setting differs from the model's defaults,
    ``PARAMETERS`` (JSON): BYTES ``[1]`` each (the chat models batch themselves)."""
    if prompt is not None:
        inputs = {ChatTensors.PROMPT.name: ChatTensors.PROMPT.pack_one(prompt)}
    else:
        inputs = {ChatTensors.MESSAGES.name: ChatTensors.MESSAGES.pack_one(json.dumps(messages, ensure_ascii=False))}
    sent = params.model_dump(mode="json", exclude_defaults=True)
    if sent:
        inputs[ChatTensors.PARAMETERS.name] = ChatTensors.PARAMETERS.pack_one(json.dumps(sent))
    return inputs


def cancel_request(request_id: str) -> dict[str, np.ndarray]:
    """The inputs that make a chat model end its request ``request_id`` (model_repository/chat.py: no
    MESSAGES/PROMPT, ``PARAMETERS`` ``{"cancel": id}``; answered with a final flag only)."""
    return {ChatTensors.PARAMETERS.name: ChatTensors.PARAMETERS.pack_one(json.dumps({"cancel": request_id}))}


def parse_delta(values: Mapping[str, np.ndarray]) -> Delta:
    """One chat response (``TEXT``, ``FINISH_REASON``, ``USAGE``, ``INDEX``, ``LOGPROBS``) as a :class:`Delta`."""
    index_array = values.get(ChatTensors.INDEX.name)
    index = int(index_array.reshape(-1)[0]) if index_array is not None and index_array.size else 0
    raw_logprobs = ChatTensors.LOGPROBS.first_text(values)
    logprobs = None
    if raw_logprobs:
        try:
            logprobs = json.loads(raw_logprobs)
        except ValueError:
            log.warning("chat model sent unreadable LOGPROBS: %.200r", raw_logprobs)
    raw_usage = ChatTensors.USAGE.first_text(values)
    usage = None
    if raw_usage:
        try:
            data = json.loads(raw_usage)
            usage = Usage(int(data.get("prompt_tokens", 0)), int(data.get("completion_tokens", 0)),
                          int(data["batch_size"]) if data.get("batch_size") is not None else None)
        except (ValueError, TypeError, AttributeError):
            # Token counts are bookkeeping; a malformed USAGE must not throw away the answer itself.
            log.warning("chat model sent an unreadable USAGE: %.200r", raw_usage)
            usage = Usage()
    return Delta(ChatTensors.TEXT.first_text(values), ChatTensors.FINISH_REASON.first_text(values) or None, usage,
                 index, logprobs)


# --- Florence-2's tensors ----------------------------------------------------------------------------------------


def florence_inputs(request: FlorenceRequest) -> dict[str, np.ndarray]:
    """One request's rows ``[1, 1]``; the optional inputs only when given."""
    t = FlorenceTensors
    inputs = {t.IMAGE.name: t.IMAGE.pack([request.image]), t.TASK.name: t.TASK.pack([request.task_token])}
    for spec, value in ((t.TEXT, request.text), (t.MAX_NEW_TOKENS, request.max_new_tokens),
                        (t.NUM_BEAMS, request.num_beams)):
        if value is not None:
            inputs[spec.name] = spec.pack([value])
    return inputs


def parse_result(output: np.ndarray) -> dict[str, Any]:
    """The ``RESULT`` tensor ([1, 1] BYTES of UTF-8 JSON); ValueError when it is not what the model promises."""
    flat = np.asarray(output).reshape(-1)
    if flat.size != 1:
        raise ValueError(f"RESULT has {flat.size} elements, expected 1")
    raw = flat[0]
    if isinstance(raw, bytes | bytearray):
        raw = raw.decode("utf-8", errors="replace")
    try:
        payload = json.loads(str(raw))
    except json.JSONDecodeError as exc:
        raise ValueError(f"RESULT is not JSON ({exc.msg})") from None
    if not isinstance(payload, dict) or "result" not in payload:
        raise ValueError("RESULT JSON has no 'result'")
    return payload
