"""Decoupled Triton models for chat VLMs (``qwen2vl``, ``smolvlm2``): OpenAI-style messages in, text streamed out.

Inputs: ``MESSAGES`` (BYTES, JSON list of ``{"role", "content"}``; content is a string or parts
``{"type": "text", "text"}``, ``{"type": "image", "data": base64}``, ``{"type": "video", "data": base64}``) or
``PROMPT`` (BYTES, raw text: no chat template, for ``/v1/completions``), and optional ``PARAMETERS`` (BYTES,
JSON, ``vlmserve.api.openai.GenerationParameters``: max_tokens, temperature, top_p, stop, seed, n,
presence_penalty, frequency_penalty, repetition_penalty, logprobs, top_logprobs, response_format, video_fps,
video_max_frames).

Every response carries ``TEXT`` (a delta of choice ``INDEX``), ``FINISH_REASON`` ("" until that choice ends:
stop | length | cancelled), ``LOGPROBS`` (JSON list for the delta's tokens when asked: ``{"token", "logprob",
"bytes", "top_logprobs"}``, else "") and ``USAGE`` (JSON on the request's final response only: with ``n`` > 1
every choice ends with a FINISH_REASON, and the last of them carries USAGE, summed over the choices).
Bad input is an INVALID_ARG error.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import io
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from vlmserve import telemetry
from vlmserve.api.openai import GenerationParameters
from vlmserve.families import families
from vlmserve.families.contract import DEFAULT_MAX_PIXELS, DEFAULT_MAX_VIDEO_PIXELS, ChatParams
from vlmserve.families.spec import load
from vlmserve.families.tensors import ChatTensors
from vlmserve.model_repository import common
from vlmserve.model_repository.chat_engine import (
    ChatEngine,
    ChatJob,
    TokenLogprob,
    check_engine,
    decode_loop,
)

ROLES = {"system", "user", "assistant"}
log = logging.getLogger("vlmserve.chat")


# ---------------------------------------------------------------------------------------------- inputs


def _b64(data: Any, what: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise common.InputError(f"{what}: 'data' must be a non-empty base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise common.InputError(f"{what}: 'data' is not valid base64") from None


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on one video's decode, checked inside ``execute`` (config parameters of the same names)."""

    max_seconds: float = 600.0  # max_video_seconds: the clip's duration (container header, then frame times)
    max_decoded_frames: int = 3000  # max_video_decoded_frames: frames decoded, sampled or not
    max_pixels: int = DEFAULT_MAX_PIXELS  # max_pixels: width*height of one frame, the image rule
    max_decode_s: float = 30.0  # max_video_decode_s: wall time of the whole decode
    max_request_pixels: int = DEFAULT_MAX_VIDEO_PIXELS  # max_video_pixels: frames kept x pixels, all videos


def decode_video(data: bytes, fps: float, max_frames: int, limits: VideoLimits = VideoLimits(),
                 used_pixels: int = 0) -> list[tuple[float, Any]]:
    """Sample ``(timestamp_s, RGB PIL image)`` frames at ``fps``, at most ``max_frames`` spread over the clip.

    Bounded work and memory: the limits in ``limits`` raise InputError naming the limit, and at most
    ``2 * max_frames`` sampled frames are held at any time (the sampling interval doubles when that fills up).
    ``used_pixels``: what the request's earlier videos keep; with this one's kept frames it must stay within
    ``limits.max_request_pixels`` (checked from the header before decoding, then on the decoded frames).
    """
    import av

    started = time.monotonic()
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as exc:  # noqa: BLE001 - PyAV raises many types for broken input
        raise common.InputError(f"not a decodable video ({type(exc).__name__})") from None
    frames: list[tuple[float, Any]] = []
    try:
        with container:
            stream = container.streams.video[0]
            _check_video_header(container, stream, limits, fps, max_frames, used_pixels)
            step = 1.0 / fps
            next_t = 0.0
            for decoded, frame in enumerate(container.decode(stream), start=1):
                _check_video_progress(decoded, frame, started, limits)
                t = float(frame.time or 0.0)
                if t + 1e-6 >= next_t:
                    _check_video_budget(min(len(frames) + 1, max_frames), frame.width, frame.height, used_pixels,
                                        limits)
                    frames.append((t, frame.to_image().convert("RGB")))
                    next_t = t + step
                    if len(frames) >= 2 * max_frames:
                        frames, step = frames[::2], step * 2
    except IndexError:
        raise common.InputError("the video has no video stream") from None
    except common.InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        if not frames:
            raise common.InputError(f"not a decodable video ({type(exc).__name__})") from None
    if not frames:
        raise common.InputError("the video has no frames")
    if len(frames) > max_frames:
        picks = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in picks]
    return frames


def _check_video_header(container: Any, stream: Any, limits: VideoLimits, fps: float, max_frames: int,
                        used_pixels: int) -> None:
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width * height > limits.max_pixels:
        raise common.InputError(f"video frames are {width}x{height} = {width * height:,} pixels; the limit is "
                                 f"{limits.max_pixels:,} pixels per frame (max_pixels)")
    seconds = None
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000  # av.time_base
    if seconds is not None and seconds > limits.max_seconds:
        raise common.InputError(f"video is {seconds:.1f}s long; the limit is {limits.max_seconds:g}s "
                                 "(max_video_seconds); send a shorter clip")
    # The frames this clip will keep, as far as the header tells (never more than it will really keep: a clip
    # that fits is not refused here; the decoded frames are checked again).
    kept = max_frames
    if seconds is not None:
        kept = min(kept, int(seconds * fps) + 1)
    if stream.frames:
        kept = min(kept, int(stream.frames))
    _check_video_budget(kept, width, height, used_pixels, limits)


def _check_video_budget(kept: int, width: int, height: int, used_pixels: int, limits: VideoLimits) -> None:
    pixels = kept * width * height
    if used_pixels + pixels > limits.max_request_pixels:
        earlier = f" + {used_pixels:,} of the request's earlier videos" if used_pixels else ""
        raise common.InputError(
            f"video frames: {kept} frames x {width}x{height} = {pixels:,} pixels{earlier}; the limit is "
            f"{limits.max_request_pixels:,} pixels of video frames per request (max_video_pixels); send fewer "
            "frames (video_max_frames), a lower video_fps or a smaller clip")


def _check_video_progress(decoded: int, frame: Any, started: float, limits: VideoLimits) -> None:
    # The header can lie or be missing: the same limits hold for what is actually decoded.
    if frame.width * frame.height > limits.max_pixels:
        raise common.InputError(f"video frames are {frame.width}x{frame.height} pixels; the limit is "
                                 f"{limits.max_pixels:,} pixels per frame (max_pixels)")
    if frame.time is not None and frame.time > limits.max_seconds:
        raise common.InputError(f"video is longer than {limits.max_seconds:g}s (max_video_seconds); "
                                 "send a shorter clip")
    if decoded > limits.max_decoded_frames:
        raise common.InputError(f"video has more than {limits.max_decoded_frames} frames "
                                 "(max_video_decoded_frames); send a shorter clip or a lower frame rate")
    if time.monotonic() - started > limits.max_decode_s:
        raise common.InputError(f"decoding the video took longer than {limits.max_decode_s:g}s "
                                 "(max_video_decode_s); send a shorter or smaller clip")


def load_messages(raw: bytes) -> list[Any]:
    """``MESSAGES`` as JSON: a non-empty list (its parts are checked by :func:`parse_messages`)."""
    try:
        messages = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise common.InputError("MESSAGES must be a JSON list of messages") from None
    if not isinstance(messages, list) or not messages:
        raise common.InputError("MESSAGES must be a non-empty JSON list")
    return messages


def has_video(messages: list[Any]) -> bool:
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(p, dict) and p.get("type") == "video" for p in m["content"]) for m in messages)


def parse_messages(raw: bytes | list[Any], video_fps: float, max_frames: int, max_images: int,
                   max_pixels: int = DEFAULT_MAX_PIXELS,
                   video_limits: VideoLimits = VideoLimits()) -> list[dict[str, Any]]:
    """Validated messages with images decoded; a video becomes timestamped frames (images + text).

    ``raw``: the ``MESSAGES`` bytes, or what :func:`load_messages` made of them."""
    messages = load_messages(raw) if isinstance(raw, bytes) else raw
    out: list[dict[str, Any]] = []
    images = 0
    video_pixels = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise common.InputError(f"messages[{i}] needs a role in {sorted(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise common.InputError(f"messages[{i}].content must be a string or a list of parts")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                try:
                    parts.append({"type": "image", "image": common.decode_image(_b64(part.get("data"), where),
                                                                                   max_pixels)})
                except common.InputError as exc:
                    raise common.InputError(f"{where}: {exc}") from None
                images += 1
            elif kind == "video":
                frames = decode_video(_b64(part.get("data"), where), video_fps, max_frames, video_limits,
                                      video_pixels)
                video_pixels += sum(frame.width * frame.height for _, frame in frames)
                parts.append({"type": "text", "text": f"A video of {len(frames)} sampled frames:"})
                for t, frame in frames:
                    parts.append({"type": "text", "text": f" frame at {t:.1f}s"})
                    parts.append({"type": "image", "image": frame})
                images += len(frames)
            else:
                raise common.InputError(f"{where}: parts are text {{text}}, image {{data}} or video {{data}}")
        out.append({"role": message["role"], "content": parts})
    if images > max_images:
        raise common.InputError(f"{images} images/frames in the conversation; at most {max_images}")
    if out[-1]["role"] == "assistant":
        raise common.InputError("the last message must not be from the assistant")
    return out


def parse_params(raw: bytes | None, default_max_tokens: int, max_tokens_limit: int,
                 max_choices: int = 8) -> GenerationParameters:
    """``PARAMETERS`` checked with the gateway's own rules (``GenerationParameters``) and resolved for the model
    (``GenerationParameters.resolved``: ``max_tokens`` filled in and checked against its limits): what the engine
    runs. The grammar of a ``response_format`` is compiled later (``ChatModel``), against the model's tokenizer.
    """
    try:
        data = json.loads(raw) if raw else {}
    except (UnicodeDecodeError, ValueError):
        raise common.InputError("PARAMETERS must be a JSON object") from None
    if not isinstance(data, dict):
        raise common.InputError("PARAMETERS must be a JSON object")
    try:
        params = GenerationParameters.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'PARAMETERS'}: {e['msg']}"
                             for e in exc.errors())
        raise common.InputError(f"PARAMETERS: {problems}") from None
    try:
        return params.resolved(default_max_tokens, max_tokens_limit, max_choices)
    except ValueError as exc:
        raise common.InputError(str(exc)) from None


def fit_context(params: GenerationParameters, prompt_tokens: int, context: int | None) -> GenerationParameters:
    """Check that the prompt (images included) plus ``max_tokens`` fits the model's context of ``context`` tokens:
    ``params``, or a copy with ``max_tokens`` lowered.

    vLLM's rule: a prompt that leaves no room for one answer token fails; an explicit ``max_tokens`` (the client
    sent it: ``params.max_tokens_sent``) that does not fit fails (INVALID_ARG naming both numbers); the default
    ``max_tokens`` is lowered to the room that is left. ``context`` None: the pipeline knows no limit, nothing is
    checked.
    """
    if context is None:
        return params
    room = context - prompt_tokens
    if room < 1:
        raise common.InputError(f"the prompt is {prompt_tokens} tokens: it leaves no room for an answer within "
                                 f"this model's context of {context} tokens; send fewer or smaller images, or "
                                 "less text")
    max_tokens = params.token_limit
    if max_tokens <= room:
        return params
    if params.max_tokens_sent:
        raise common.InputError(f"the prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                                 f"{prompt_tokens + max_tokens} exceeds this model's context of {context} "
                                 f"tokens; lower max_tokens to {room} or shorten the prompt")
    return params.model_copy(update={"max_tokens": room})


def fit_kv_budget(params: GenerationParameters, prompt_tokens: int, budget: int, bytes_per_token: int) -> None:
    """A request's KV reservation (each of its ``n`` choices holds prompt + ``max_tokens`` positions) must fit the
    model's KV budget (``max_batch_tokens``) on its own: the engine admits the first request of an empty batch
    whatever it reserves, so one that can never fit is refused here (INVALID_ARG naming the numbers, in positions
    and bytes)."""
    choices, max_tokens = params.n, params.token_limit
    need = choices * (prompt_tokens + max_tokens)
    if need <= budget:
        return
    mib = 2**20
    raise common.InputError(
        f"this request needs {need} KV positions ({choices} choice(s) x (prompt {prompt_tokens} + max_tokens "
        f"{max_tokens}), {need * bytes_per_token / mib:.0f} MiB); this model's KV budget is {budget} "
        f"positions ({budget * bytes_per_token / mib:.0f} MiB, max_batch_tokens); lower max_tokens or n, or "
        "shorten the prompt")


def context_tokens(pipeline, cap: int | None) -> int | None:
    """The model's context in tokens: its pipeline's ``context_length`` (the checkpoint's
    ``max_position_embeddings``), lowered to ``cap`` (``max_context_tokens``) when set; None when unknown."""
    known = getattr(pipeline, "context_length", None)
    if known is None:
        return cap
    return known if cap is None else min(known, cap)


def prepare_text(tokenizer, prompt: str) -> tuple[dict[str, Any], int]:
    """A raw text prompt (``PROMPT``, no chat template) as model inputs, tokenized as transformers would."""
    if not prompt:
        raise common.InputError("PROMPT must be non-empty text")
    ids = tokenizer(prompt)["input_ids"]
    return {"input_ids": ids}, len(ids)


def render_logprobs(entries: list[TokenLogprob], tokenizer, grammars) -> list[dict[str, Any]]:
    """Token log probabilities in OpenAI's shape: ``{"token", "logprob", "bytes", "top_logprobs": [...]}``.

    ``bytes`` are the token's exact bytes; a token that is only part of a UTF-8 character is shown as
    ``"bytes:\\xe2\\x80"`` (OpenAI's convention).
    """
    special = set(getattr(tokenizer, "all_special_ids", []))

    def one(token: int, logprob: float) -> dict[str, Any]:
        if token in special:
            text = tokenizer.convert_ids_to_tokens(token)
            data = text.encode("utf-8")
        else:
            data = grammars.token_bytes(token)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
        # -inf (a token the model gives no chance) is not JSON: the smallest float says the same.
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(data)}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]


# ---------------------------------------------------------------------------------------------- pipelines




# ---------------------------------------------------------------------------------------------- Triton


def resolve_attention(setting: str, device: str) -> str:
    """``USE_FLASH_ATTENTION`` (the Qwen2-VL OCR service): auto -> flash-attn when importable on a GPU, else SDPA."""
    import importlib.util

    setting = (setting or "auto").strip().lower()
    installed = importlib.util.find_spec("flash_attn") is not None
    available = device == "cuda" and installed
    if setting in ("1", "true", "yes"):
        if not available:
            raise RuntimeError("USE_FLASH_ATTENTION=true but flash-attn is not usable here "
                               f"(device {device}, flash_attn installed: {installed})")
        return "flash_attention_2"
    if setting in ("0", "false", "no"):
        return "sdpa"
    if setting != "auto":
        raise ValueError(f"USE_FLASH_ATTENTION must be auto, true or false, got {setting!r}")
    return "flash_attention_2" if available else "sdpa"



def _response(text: str, finish: str, usage: dict | None, index: int = 0, logprobs: list | None = None):
    pb = common.pb_utils
    tensors = [
        pb.Tensor(ChatTensors.TEXT.name, np.array([text.encode("utf-8")], dtype=np.object_)),
        pb.Tensor(ChatTensors.FINISH_REASON.name, np.array([finish.encode()], dtype=np.object_)),
        pb.Tensor(ChatTensors.USAGE.name, np.array([json.dumps(usage).encode() if usage else b""], dtype=np.object_)),
        pb.Tensor(ChatTensors.INDEX.name, np.array([index], dtype=np.int32)),
        pb.Tensor(ChatTensors.LOGPROBS.name,
                  np.array([json.dumps(logprobs).encode() if logprobs else b""], dtype=np.object_)),
    ]
    return pb.InferenceResponse(output_tensors=tensors)


# name -> what its hits, misses and bytes count (Triton metrics vlmserve_<name>_{hits_total,misses_total,bytes}).
CACHE_METRICS = {
    "image_cache": ("Images whose vision-encoder output came from the chat model's cache",
                    "Images the chat model's vision encoder had to encode (not in the cache)",
                    "Bytes of vision-encoder output held by the chat model's image cache"),
    "prefix_cache": ("Prompt tokens whose keys and values came from the chat model's prefix cache",
                     "Prompt tokens the chat model computed (their prefix was not in the cache)",
                     "Bytes of prompt-prefix keys and values held by the chat model's prefix cache"),
}


class CacheMetrics:
    """A cache's counters among Triton's own metrics (its metrics port, ``/metrics``; the gateway's ``/metrics``
    has the HTTP side): ``vlmserve_<name>_hits_total`` and ``vlmserve_<name>_misses_total`` (counters: images
    for the image cache, prompt tokens for the prefix cache) and ``vlmserve_<name>_bytes`` (gauge: bytes held),
    labelled ``model``.
    """

    def __init__(self, name: str, model: str) -> None:
        pb = common.pb_utils
        counter, gauge = pb.MetricFamily.COUNTER, pb.MetricFamily.GAUGE
        hits, misses, held = CACHE_METRICS[name]
        # The families must outlive their metrics (the Python backend's rule): both live as long as this object.
        self.families = [
            pb.MetricFamily(name=f"vlmserve_{name}_hits_total", kind=counter, description=hits),
            pb.MetricFamily(name=f"vlmserve_{name}_misses_total", kind=counter, description=misses),
            pb.MetricFamily(name=f"vlmserve_{name}_bytes", kind=gauge, description=held),
        ]
        self.hits, self.misses, self.bytes = (f.Metric(labels={"model": model}) for f in self.families)

    @classmethod
    def create(cls, name: str, model: str) -> CacheMetrics | None:
        """None outside Triton (unit tests) or where the Python backend has no custom metrics."""
        if common.pb_utils is None or not hasattr(common.pb_utils, "MetricFamily"):
            return None
        try:
            return cls(name, model)
        except Exception as exc:  # noqa: BLE001 - metrics are not worth failing the model load for
            log.warning("%s: no %s metrics (%s: %s)", model, name, type(exc).__name__, exc)
            return None

    def hit(self, count: int = 1) -> None:
        if count:
            self.hits.increment(count)

    def miss(self, count: int = 1) -> None:
        if count:
            self.misses.increment(count)

    def held(self, size: int) -> None:
        self.bytes.set(size)


def engine_metric(model: str, engine: str) -> Any:
    """``vlmserve_chat_engine{model, engine} 1``: the engine this model really decodes with (a name of
    ``chat_engine.ENGINES``: export's choice, or the torch loop where that choice cannot run here; "static" for a
    pipeline without a decode loop). None outside Triton."""
    pb = common.pb_utils
    if pb is None or not hasattr(pb, "MetricFamily"):
        return None
    family = pb.MetricFamily(name="vlmserve_chat_engine", kind=pb.MetricFamily.GAUGE,
                             description="1 for the decode engine this chat model runs (torch, llamacpp, static)")
    family.Metric(labels={"model": model, "engine": engine}).set(1)
    return family


class LoadMetrics:
    """A chat model's load among Triton's metrics, labelled ``model``: what a replica is asked to do, which
    Triton's own queue time does not show for decoupled models (their requests leave Triton's queue at once).

    - ``vlmserve_chat_admitted`` (gauge): requests admitted and not finished (0 when idle: a leak shows here);
    - ``vlmserve_chat_rows{state="running"|"waiting"}`` (gauge): rows (choices) decoding / queued for prefill;
    - ``vlmserve_chat_queue_seconds_total`` (counter): seconds requests waited before their prefill, summed;
    - ``vlmserve_chat_tokens_total{kind="prompt"|"completion"}`` (counter): tokens of finished requests (tokens/s).
    """

    def __init__(self, model: str) -> None:
        pb = common.pb_utils
        gauge, counter = pb.MetricFamily.GAUGE, pb.MetricFamily.COUNTER
        self.families = [  # the families must outlive their metrics (the Python backend's rule)
            pb.MetricFamily(name="vlmserve_chat_admitted", kind=gauge,
                            description="Chat requests admitted and not yet finished"),
            pb.MetricFamily(name="vlmserve_chat_rows", kind=gauge,
                            description="Chat rows (choices) decoding (running) or queued for prefill (waiting)"),
            pb.MetricFamily(name="vlmserve_chat_queue_seconds_total", kind=counter,
                            description="Seconds chat requests waited in the model's queue before prefill"),
            pb.MetricFamily(name="vlmserve_chat_tokens_total", kind=counter,
                            description="Tokens of finished chat requests: prompt and completion"),
        ]
        self.admitted = self.families[0].Metric(labels={"model": model})
        self.running = self.families[1].Metric(labels={"model": model, "state": "running"})
        self.waiting = self.families[1].Metric(labels={"model": model, "state": "waiting"})
        self.queued = self.families[2].Metric(labels={"model": model})
        self.prompt_tokens = self.families[3].Metric(labels={"model": model, "kind": "prompt"})
        self.completion_tokens = self.families[3].Metric(labels={"model": model, "kind": "completion"})
        self.waited_s = 0.0

    def tokens(self, usage: dict[str, int]) -> None:
        self.prompt_tokens.increment(usage.get("prompt_tokens", 0))
        self.completion_tokens.increment(usage.get("completion_tokens", 0))

    @classmethod
    def create(cls, model: str) -> LoadMetrics | None:
        """None outside Triton (unit tests) or where the Python backend has no custom metrics."""
        if common.pb_utils is None or not hasattr(common.pb_utils, "MetricFamily"):
            return None
        try:
            return cls(model)
        except Exception as exc:  # noqa: BLE001 - metrics are not worth failing the model load for
            log.warning("%s: no chat load metrics (%s: %s)", model, type(exc).__name__, exc)
            return None

    def rows(self, running: int, waiting: int, waited_s: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        if waited_s > self.waited_s:
            self.queued.increment(waited_s - self.waited_s)
            self.waited_s = waited_s


class Admission:
    """Chat requests admitted and not yet finished, at most ``limit`` (running rows + waiting jobs);
    ``on_change(count)`` sees every change (the ``vlmserve_chat_admitted`` gauge)."""

    def __init__(self, limit: int, on_change: Callable[[int], None] = lambda _count: None) -> None:
        self.limit = limit
        self.count = 0
        self.on_change = on_change
        self.lock = threading.Lock()  # execute runs on Triton's thread, finishes on the engine's

    def enter(self) -> Callable[[], None] | None:
        """A release function (idempotent) when admitted, None when full."""
        with self.lock:
            if self.count >= self.limit:
                return None
            self.count += 1
            self.on_change(self.count)
        released = threading.Event()

        def release() -> None:
            with self.lock:
                if not released.is_set():
                    released.set()
                    self.count -= 1
                    self.on_change(self.count)

        return release


@dataclass
class RequestTrace:
    """One chat request's timeline (wall clock), logged and (tracing on) exported as spans when it ends:
    ``chat request`` with ``chat prepare`` (messages, images, video decode, tokens), ``chat queue`` (waiting for
    the engine), ``chat prefill`` (until the first output) and ``chat decode`` (until the last)."""

    request_id: str
    parent: str | None  # traceparent: Triton's span of the request, or the gateway's
    received: float
    queued: float = 0.0
    first_output: float = 0.0
    metrics: LoadMetrics | None = None

    def finish(self, started: float, usage: dict[str, int], finish: str, n: int) -> None:
        end = time.time()
        if self.metrics is not None:
            self.metrics.tokens(usage)
        model = common.MODEL_NAME or "chat"
        log.info("chat request done: %s, %d prompt + %d completion tokens, n=%d, %.0f ms",
                 finish, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), n,
                 (end - self.received) * 1000, extra={"request_id": self.request_id})
        if self.parent is None:
            return
        attrs = {"vlmserve.request_id": self.request_id, "vlmserve.model": model}
        root = telemetry.record_span(model, "chat request", self.parent, self.received, end, **attrs, **{
            "vlmserve.finish_reason": finish, "vlmserve.choices": n,
            "vlmserve.prompt_tokens": usage.get("prompt_tokens"),
            "vlmserve.completion_tokens": usage.get("completion_tokens"),
            "vlmserve.batch_size": usage.get("batch_size")})
        if root is None:
            return
        queued = self.queued or self.received
        started = started or queued
        first = self.first_output or end
        telemetry.record_span(model, "chat prepare", root, self.received, queued, **attrs)
        telemetry.record_span(model, "chat queue", root, queued, started, **attrs)
        telemetry.record_span(model, "chat prefill", root, started, first, **attrs,
                              **{"vlmserve.prompt_tokens": usage.get("prompt_tokens")})
        telemetry.record_span(model, "chat decode", root, first, end, **attrs,
                              **{"vlmserve.completion_tokens": usage.get("completion_tokens"),
                                 "vlmserve.batch_size": usage.get("batch_size")})


class ChoiceGroup:
    """The ``n`` rows of one request answering through one Triton response sender: per-choice deltas, and the
    final flag (with the summed usage) only once, on the last choice's end."""

    def __init__(self, sender, n: int, is_cancelled, render, release: Callable[[], None] = lambda: None) -> None:
        self.sender = sender
        self.release = release  # the request's admission slot, freed when its last choice ends
        self.open = n
        self.closed = False
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "batch_size": 0}
        self.request_cancelled = is_cancelled
        self.abandoned = False  # a ``{"cancel": request id}`` request came for it (the gateway's client left)
        self.render = render  # TokenLogprob entries -> OpenAI dicts
        self.trace: RequestTrace | None = None
        self.n = n

    def is_cancelled(self) -> bool:
        return self.closed or self.abandoned or self.request_cancelled()

    def emitter(self, job_ref: list[ChatJob]):
        pb = common.pb_utils

        def emit(text: str, finish: str, usage: dict | None) -> None:
            if self.closed:
                return
            try:
                send(text, finish, usage)
            except Exception:
                # The client went away (Triton's sender raises): the request is over, whatever it was sending.
                # Its admission slot must not leak (the engine drops the row when this raises).
                self.closed = True
                self.release()
                raise

        def send(text: str, finish: str, usage: dict | None) -> None:
            job = job_ref[0]
            if self.trace is not None and not self.trace.first_output:
                self.trace.first_output = time.time()
            if finish == "error":
                self.closed = True  # the other choices stop at their next step
                self.release()
                if self.trace is not None:
                    self.trace.finish(job.started_at, self.usage, "error", self.n)
                self.sender.send(common.error_response(text), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            logprobs = self.render(job.take_logprobs()) if job.params.logprobs else None
            if finish:
                self.open -= 1
                if usage:
                    self.usage["prompt_tokens"] = usage["prompt_tokens"]
                    self.usage["completion_tokens"] += usage["completion_tokens"]
                    self.usage["batch_size"] = max(self.usage["batch_size"], usage["batch_size"])
                last = self.open == 0
                self.closed = last
                if last:
                    self.release()
                    if self.trace is not None:
                        self.trace.finish(job.started_at, self.usage, finish, self.n)
                self.sender.send(_response(text, finish, dict(self.usage) if last else None, job.index, logprobs),
                                 flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0)
            elif text or logprobs:
                self.sender.send(_response(text, "", None, job.index, logprobs))

        return emit


def _log_failure(future: Future) -> None:
    """A video worker's request that failed outside its own error handling (a bug): at least in the log."""
    if not future.cancelled() and future.exception() is not None:
        log.error("chat request failed in the video pool", exc_info=future.exception())


class ChatModel:
    """Triton model for one chat family (decoupled; see the module docstring)."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = common.model_config(args)
        if not config.get("model_transaction_policy", {}).get("decoupled"):
            raise ValueError(f"{config['name']}: chat models must be decoupled (model_transaction_policy)")
        params = ChatParams.from_config(config)
        try:  # before loading anything: an unknown engine fails the load, naming the known ones
            check_engine(params.chat_engine)
        except ValueError as exc:
            raise ValueError(f"{config['name']}: {exc}") from None
        family = params.family
        spec = families().get(family)
        if spec is None or spec.pipeline is None:
            raise ValueError(f"{config['name']}: unknown chat family {family!r}")
        device = common.torch_device(args)
        common.apply_gpu_budget(args, config)  # before loading: an over-budget checkpoint fails loudly here
        attn = resolve_attention(os.environ.get("USE_FLASH_ATTENTION", "auto"), device)
        # SmolVLM2's vision encoder is the exported ONNX model (in-process or via BLS, like the other encoders).
        encoder = common.make_encoder(args, config, ["image_features"]) if family == "smolvlm2" else None
        # bf16 weights where export measured them faithful and faster on this host (decoder_choice.json).
        extra: dict[str, Any] = {"decoder_precision": params.decoder_precision} if encoder else {}
        # The family's spec names its pipeline (vlmserve/families/<family>.py), imported only here.
        pipeline_class = load(spec.pipeline)
        self.image_cache_metrics = None
        if "image_cache" in inspect.signature(pipeline_class).parameters:
            # Vision-encoder outputs of images seen again (image_cache_bytes of host memory; 0: off).
            self.image_cache_metrics = CacheMetrics.create("image_cache", config["name"])
            extra["image_cache"] = common.FeatureCache(params.image_cache_bytes, self.image_cache_metrics)
        self.pipeline = pipeline_class(common.version_dir(args) / "checkpoint", device, attn, encoder=encoder,
                                       **extra)
        self.max_tokens_limit = params.max_new_tokens_limit
        # Prompt tokens (images included) + max_tokens must fit here (fit_context, checked before any encoding).
        self.context = context_tokens(self.pipeline, params.max_context_tokens)
        # MAX_NEW_TOKENS (the Qwen2-VL OCR service) sets the default answer length, within the configured limit.
        self.default_max_tokens = min(self.max_tokens_limit,
                                      int(os.environ.get("MAX_NEW_TOKENS") or params.default_max_new_tokens))
        self.max_frames = params.max_video_frames
        self.max_images = params.max_images
        self.default_fps = params.video_fps
        self.video_limits = VideoLimits(params.max_video_seconds, params.max_video_decoded_frames, params.max_pixels,
                                        params.max_video_decode_s, params.max_video_pixels)
        # Videos are decoded here, off Triton's execute thread (which then admits the next requests at once);
        # at most video_workers decodes run together, the others wait their turn holding only their bytes.
        self.video_pool = ThreadPoolExecutor(params.video_workers, thread_name_prefix=f"{config['name']}-video")
        # The pipeline's tokenizer and image processor are shared by Triton's thread and the video workers.
        self.prepare_lock = threading.Lock()
        self.open_groups: dict[str, ChoiceGroup] = {}  # by Triton request id: what a {"cancel": id} request ends
        # Ids cancelled before their request reached the engine (a video still waiting for a worker), bounded.
        self.cancelled_early: deque[str] = deque(maxlen=1024)
        self.load_metrics = LoadMetrics.create(config["name"])
        self.admission = Admission(params.max_batch + params.max_queue_size,
                                   self.load_metrics.admitted.set if self.load_metrics else lambda _count: None)
        # Prompt prefixes seen again (system prompts, earlier turns) reuse their KV (prefix_cache_bytes; 0: off).
        self.prefix_cache_metrics = CacheMetrics.create("prefix_cache", config["name"])
        # The decode engine export chose (chat_engine: a name of chat_engine.ENGINES), or the torch loop where it
        # cannot run here; none for a static pipeline.
        loop, engine = decode_loop(self.pipeline, params, common.version_dir(args), self.prefix_cache_metrics)
        self.engine = ChatEngine(self.pipeline, params.max_batch, params.batch_window_ms / 1000,
                                 params.max_batch_tokens, params.prefix_cache_bytes, self.prefix_cache_metrics,
                                 loop=loop, load=self.load_metrics.rows if self.load_metrics else None)
        self.engine_metric = engine_metric(config["name"], engine)
        # Static pipelines (deepseek_ocr) run plain requests only; the per-row features live in the decode loop.
        self.grammars = self.engine.loop.grammars if self.engine.loop is not None else None

    def _cancel_request(self, request) -> bool:
        """A request with no MESSAGES/PROMPT and ``PARAMETERS`` ``{"cancel": id}`` ends the running request whose
        Triton request id is ``id`` (its rows stop at their next step and it gets its final response,
        ``finish_reason`` "cancelled"); it is answered with a final flag only. The gateway sends one down the same
        stream when its client goes away, instead of cancelling the gRPC call (see gateway/backends/triton/client.py).
        True when
        ``request`` was such a request."""
        pb = common.pb_utils
        raw = pb.get_input_tensor_by_name(request, ChatTensors.PARAMETERS.name)
        if raw is None or pb.get_input_tensor_by_name(request, ChatTensors.MESSAGES.name) is not None \
                or pb.get_input_tensor_by_name(request, ChatTensors.PROMPT.name) is not None:
            return False
        try:
            data = json.loads(common.as_bytes_list(raw.as_numpy())[0])
        except (UnicodeDecodeError, ValueError):
            return False
        if not isinstance(data, dict) or set(data) != {"cancel"} or not isinstance(data["cancel"], str):
            return False
        group = self.open_groups.get(data["cancel"])
        if group is not None:
            group.abandoned = True
        else:  # not admitted yet (a video waiting for a worker), or already finished
            self.cancelled_early.append(data["cancel"])
        request.get_response_sender().send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return True

    def _register(self, request_id: str, release: Callable[[], None]) -> tuple[Callable[[], None],
                                                                            Callable[[Any], None]]:
        """(release, bind): the request's release also forgets it; ``bind(group)`` makes it cancellable by id."""
        if not request_id:
            return release, lambda _group: None

        def forget() -> None:
            self.open_groups.pop(request_id, None)
            release()

        return forget, lambda group: self.open_groups.__setitem__(request_id, group)

    def execute(self, requests):
        pb = common.pb_utils
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            if self._cancel_request(request):
                continue
            received = time.time()
            sender = request.get_response_sender()
            release = self.admission.enter()
            if release is None:
                # Before decoding anything: a refused request must not hold images. UNAVAILABLE: the gateway
                # answers 503 + Retry-After.
                log.warning("chat request refused: queue full", extra={"request_id": request.request_id()})
                sender.send(common.error_response(
                    f"chat queue is full ({self.admission.limit} requests running or waiting: max_batch + "
                    "max_queue_size); retry later", unavailable=True), flags=final)
                continue
            # Read on this thread: the request's tensors are Triton's.
            raw = {name: (None if tensor is None else common.as_bytes_list(tensor.as_numpy())[0])
                   for name in (ChatTensors.PARAMETERS.name, ChatTensors.PROMPT.name, ChatTensors.MESSAGES.name)
                   for tensor in [pb.get_input_tensor_by_name(request, name)]}
            messages: list[Any] | None = None
            if raw[ChatTensors.MESSAGES.name] is not None:
                try:
                    messages = load_messages(raw[ChatTensors.MESSAGES.name])
                except common.InputError as exc:
                    release()
                    log.info("chat request refused: invalid MESSAGES", extra={"request_id": request.request_id()})
                    sender.send(common.error_response(str(exc), invalid_arg=True), flags=final)
                    continue
            if messages is not None and has_video(messages):
                # Decoding takes up to max_video_decode_s: in the pool, so that this thread admits the others.
                future = self.video_pool.submit(self._admit, request, sender, release, raw, messages, received)
                future.add_done_callback(_log_failure)
            else:
                self._admit(request, sender, release, raw, messages, received)

    def _admit(self, request, sender, release: Callable[[], None], raw: dict[str, bytes | None],
               messages: list[Any] | None, received: float = 0.0) -> None:
        """Validate one request, prepare its prompt (decoding its images and videos) and hand it to the engine;
        any failure is that request's error response (INVALID_ARG for the client's input) and frees its slot."""
        final = common.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if request.is_cancelled() or request.request_id() in self.cancelled_early:  # gone while its video waited
            release()
            sender.send(common.error_response("cancelled before its video was decoded"), flags=final)
            return
        try:
            params = parse_params(raw[ChatTensors.PARAMETERS.name], self.default_max_tokens, self.max_tokens_limit,
                                  self.engine.max_batch)
            if self.grammars is None and (params.n > 1 or params.logprobs or params.penalised
                                          or params.response_format is not None):
                raise common.InputError("n, logprobs, penalties and response_format need a continuously "
                                         "batched chat model; this one runs plain requests only")
            grammar = None
            if params.response_format is not None:
                assert self.grammars is not None
                try:
                    grammar = self.grammars.compile(params.response_format)
                except ValueError as exc:
                    raise common.InputError(str(exc)) from None
            if (raw[ChatTensors.PROMPT.name] is None) == (messages is None):
                raise common.InputError("send MESSAGES (a conversation) or PROMPT (raw text), one of them")
            if messages is None:
                if self.grammars is None:
                    raise common.InputError("PROMPT needs a continuously batched chat model; send MESSAGES")
                prompt = (raw[ChatTensors.PROMPT.name] or b"").decode("utf-8", errors="strict")
                with self.prepare_lock:
                    inputs, prompt_tokens = prepare_text(self.pipeline.tokenizer, prompt)
            else:
                fps = float(params.video_fps or self.default_fps)
                frames = min(int(params.video_max_frames or self.max_frames), self.max_frames)
                parsed = parse_messages(messages, fps, max(1, frames), self.max_images,
                                        self.video_limits.max_pixels, self.video_limits)
                with self.prepare_lock:
                    inputs, prompt_tokens = self.pipeline.prepare(parsed)
            # Before the job reaches the engine: no image has gone through the vision encoder yet (prepare
            # only runs the image processor).
            params = fit_context(params, prompt_tokens, self.context)
            if self.engine.loop is not None:
                fit_kv_budget(params, prompt_tokens, self.engine.loop.max_batch_tokens,
                              self.engine.loop.kv_bytes_per_token)
        except UnicodeDecodeError:
            release()
            sender.send(common.error_response("PROMPT must be UTF-8 text", invalid_arg=True), flags=final)
            return
        except common.InputError as exc:
            release()
            log.info("chat request refused: invalid input", extra={"request_id": request.request_id()})
            sender.send(common.error_response(str(exc), invalid_arg=True), flags=final)
            return
        except Exception as exc:  # noqa: BLE001
            release()
            log.warning("chat preprocessing failed: %s", type(exc).__name__,
                        extra={"request_id": request.request_id()})
            sender.send(common.error_response(f"preprocessing failed: {type(exc).__name__}: {exc}"),
                        flags=final)
            return

        release, bind = self._register(request.request_id(), release)
        group = ChoiceGroup(sender, params.n, request.is_cancelled,
                            lambda entries: render_logprobs(entries, self.pipeline.tokenizer, self.grammars),
                            release)
        group.trace = RequestTrace(request.request_id(), common.request_traceparent(request),
                                   received or time.time(), queued=time.time(), metrics=self.load_metrics)
        bind(group)
        group.abandoned = request.request_id() in self.cancelled_early  # a cancel that came while it was prepared
        jobs = []
        for index in range(params.n):
            ref: list[ChatJob] = []
            jobs.append(ChatJob(inputs, params, prompt_tokens, group.emitter(ref), group.is_cancelled,
                                index=index, request_id=request.request_id(), grammar=grammar,
                                background=params.priority == "batch"))
            ref.append(jobs[-1])
        jobs[0].shared = jobs[1:]
        self.engine.submit(jobs[0])

    def finalize(self) -> None:
        self.video_pool.shutdown(wait=False, cancel_futures=True)
        self.engine.stop()
