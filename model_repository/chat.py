"""Decoupled Triton models for chat VLMs (``qwen2vl``, ``smolvlm2``): OpenAI-style messages in, text streamed out.

Inputs: ``MESSAGES`` (BYTES, JSON list of ``{"role", "content"}``; content is a string or parts
``{"type": "text", "text"}``, ``{"type": "image", "data": base64}``, ``{"type": "video", "data": base64}``) and
optional ``PARAMETERS`` (BYTES, JSON: max_tokens, temperature, top_p, stop, seed, video_fps,
video_max_frames). Every response carries ``TEXT`` (a delta), ``FINISH_REASON`` ("" until the final response:
stop | length | cancelled) and ``USAGE`` (JSON on the final response). Bad input is an INVALID_ARG error.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from model_repository import runtime
from model_repository.chat_engine import (
    ChatEngine,
    ChatJob,
    SamplingParams,
    render_prompt,
)
from vlmserve.families.contract import DEFAULT_MAX_PIXELS, ChatParams

ROLES = {"system", "user", "assistant"}


# ---------------------------------------------------------------------------------------------- inputs


def _b64(data: Any, what: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise runtime.InputError(f"{what}: 'data' must be a non-empty base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise runtime.InputError(f"{what}: 'data' is not valid base64") from None


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on one video's decode, checked inside ``execute`` (config parameters of the same names)."""

    max_seconds: float = 600.0  # max_video_seconds: the clip's duration (container header, then frame times)
    max_decoded_frames: int = 3000  # max_video_decoded_frames: frames decoded, sampled or not
    max_pixels: int = DEFAULT_MAX_PIXELS  # max_pixels: width*height of one frame, the image rule
    max_decode_s: float = 30.0  # max_video_decode_s: wall time of the whole decode


def decode_video(data: bytes, fps: float, max_frames: int,
                 limits: VideoLimits = VideoLimits()) -> list[tuple[float, Any]]:
    """Sample ``(timestamp_s, RGB PIL image)`` frames at ``fps``, at most ``max_frames`` spread over the clip.

    Bounded work and memory: the limits in ``limits`` raise InputError naming the limit, and at most
    ``2 * max_frames`` sampled frames are held at any time (the sampling interval doubles when that fills up).
    """
    import av

    started = time.monotonic()
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as exc:  # noqa: BLE001 - PyAV raises many types for broken input
        raise runtime.InputError(f"not a decodable video ({type(exc).__name__})") from None
    frames: list[tuple[float, Any]] = []
    try:
        with container:
            stream = container.streams.video[0]
            _check_video_header(container, stream, limits)
            step = 1.0 / fps
            next_t = 0.0
            for decoded, frame in enumerate(container.decode(stream), start=1):
                _check_video_progress(decoded, frame, started, limits)
                t = float(frame.time or 0.0)
                if t + 1e-6 >= next_t:
                    frames.append((t, frame.to_image().convert("RGB")))
                    next_t = t + step
                    if len(frames) >= 2 * max_frames:
                        frames, step = frames[::2], step * 2
    except IndexError:
        raise runtime.InputError("the video has no video stream") from None
    except runtime.InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        if not frames:
            raise runtime.InputError(f"not a decodable video ({type(exc).__name__})") from None
    if not frames:
        raise runtime.InputError("the video has no frames")
    if len(frames) > max_frames:
        picks = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in picks]
    return frames


def _check_video_header(container: Any, stream: Any, limits: VideoLimits) -> None:
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width * height > limits.max_pixels:
        raise runtime.InputError(f"video frames are {width}x{height} = {width * height:,} pixels; the limit is "
                                 f"{limits.max_pixels:,} pixels per frame (max_pixels)")
    seconds = None
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000  # av.time_base
    if seconds is not None and seconds > limits.max_seconds:
        raise runtime.InputError(f"video is {seconds:.1f}s long; the limit is {limits.max_seconds:g}s "
                                 "(max_video_seconds); send a shorter clip")


def _check_video_progress(decoded: int, frame: Any, started: float, limits: VideoLimits) -> None:
    # The header can lie or be missing: the same limits hold for what is actually decoded.
    if frame.width * frame.height > limits.max_pixels:
        raise runtime.InputError(f"video frames are {frame.width}x{frame.height} pixels; the limit is "
                                 f"{limits.max_pixels:,} pixels per frame (max_pixels)")
    if frame.time is not None and frame.time > limits.max_seconds:
        raise runtime.InputError(f"video is longer than {limits.max_seconds:g}s (max_video_seconds); "
                                 "send a shorter clip")
    if decoded > limits.max_decoded_frames:
        raise runtime.InputError(f"video has more than {limits.max_decoded_frames} frames "
                                 "(max_video_decoded_frames); send a shorter clip or a lower frame rate")
    if time.monotonic() - started > limits.max_decode_s:
        raise runtime.InputError(f"decoding the video took longer than {limits.max_decode_s:g}s "
                                 "(max_video_decode_s); send a shorter or smaller clip")


def parse_messages(raw: bytes, video_fps: float, max_frames: int, max_images: int,
                   max_pixels: int = DEFAULT_MAX_PIXELS,
                   video_limits: VideoLimits = VideoLimits()) -> list[dict[str, Any]]:
    """Validated messages with images decoded; a video becomes timestamped frames (images + text)."""
    try:
        messages = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise runtime.InputError("MESSAGES must be a JSON list of messages") from None
    if not isinstance(messages, list) or not messages:
        raise runtime.InputError("MESSAGES must be a non-empty JSON list")
    out: list[dict[str, Any]] = []
    images = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise runtime.InputError(f"messages[{i}] needs a role in {sorted(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise runtime.InputError(f"messages[{i}].content must be a string or a list of parts")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                try:
                    parts.append({"type": "image", "image": runtime.decode_image(_b64(part.get("data"), where),
                                                                                   max_pixels)})
                except runtime.InputError as exc:
                    raise runtime.InputError(f"{where}: {exc}") from None
                images += 1
            elif kind == "video":
                frames = decode_video(_b64(part.get("data"), where), video_fps, max_frames, video_limits)
                parts.append({"type": "text", "text": f"A video of {len(frames)} sampled frames:"})
                for t, frame in frames:
                    parts.append({"type": "text", "text": f" frame at {t:.1f}s"})
                    parts.append({"type": "image", "image": frame})
                images += len(frames)
            else:
                raise runtime.InputError(f"{where}: parts are text {{text}}, image {{data}} or video {{data}}")
        out.append({"role": message["role"], "content": parts})
    if images > max_images:
        raise runtime.InputError(f"{images} images/frames in the conversation; at most {max_images}")
    if out[-1]["role"] == "assistant":
        raise runtime.InputError("the last message must not be from the assistant")
    return out


def parse_params(raw: bytes | None, default_max_tokens: int, max_tokens_limit: int) -> tuple[SamplingParams, dict]:
    try:
        params = json.loads(raw) if raw else {}
    except (UnicodeDecodeError, ValueError):
        raise runtime.InputError("PARAMETERS must be a JSON object") from None
    if not isinstance(params, dict):
        raise runtime.InputError("PARAMETERS must be a JSON object")
    try:
        max_tokens = int(default_max_tokens if params.get("max_tokens") is None else params["max_tokens"])
        temperature = float(params.get("temperature", 0.0) or 0.0)
        top_p = float(params.get("top_p", 1.0) if params.get("top_p") is not None else 1.0)
        seed = None if params.get("seed") is None else int(params["seed"])
    except (TypeError, ValueError):
        raise runtime.InputError("PARAMETERS: max_tokens/seed must be integers, temperature/top_p numbers") from None
    stop = params.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise runtime.InputError("PARAMETERS.stop must be a string or a list of up to 4 non-empty strings")
    if not 1 <= max_tokens <= max_tokens_limit:
        raise runtime.InputError(f"max_tokens must be 1..{max_tokens_limit}, got {max_tokens}")
    if not 0.0 <= temperature <= 2.0:
        raise runtime.InputError(f"temperature must be 0..2, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise runtime.InputError(f"top_p must be in (0, 1], got {top_p}")
    return SamplingParams(max_tokens, temperature, top_p, tuple(stop), seed), params


# ---------------------------------------------------------------------------------------------- pipelines


class QwenPipeline:
    """Qwen2-VL: chat template -> image placeholders expanded per image grid; a ``DecoderFamily`` of the engine.

    The vision tower stays in torch (its patch loops are data dependent, docs/platform.md).
    """

    def __init__(self, checkpoint_dir, device: str = "cpu", attn_implementation: str = "sdpa", encoder=None) -> None:
        import torch
        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

        self.torch = torch
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
        self.image_processor = Qwen2VLImageProcessor.from_pretrained(str(checkpoint_dir))
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(
            str(checkpoint_dir), attn_implementation=attn_implementation
        ).eval().to(device)
        self.merge = self.image_processor.merge_size
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}

    def prepare(self, messages: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
        prompt, images = render_prompt(self.tokenizer, messages)
        inputs: dict[str, Any] = {}
        if images:
            # channels_last: the images are RGB PIL images; left to guess, transformers takes an image 1 or 3
            # pixels high for channels-first and fails ("mean must have 1 elements") or transposes it.
            vision = self.image_processor(images=images, return_tensors="pt", input_data_format="channels_last")
            counts = (vision["image_grid_thw"].prod(-1) // (self.merge**2)).tolist()
            pieces = prompt.split("<|image_pad|>")
            if len(pieces) - 1 != len(counts):
                raise runtime.InputError("the chat template did not place every image")
            prompt = pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:],
                                                                                       strict=True))
            inputs = {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, **inputs}, len(ids)

    def prefill_inputs(self, job: ChatJob) -> tuple[dict[str, Any], int]:
        torch = self.torch
        ids = torch.tensor([job.inputs["input_ids"]], device=self.device)
        mask = torch.ones_like(ids)
        grid = job.inputs.get("image_grid_thw")
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if grid is not None:
            grid = grid.to(self.device)
            kwargs.update(pixel_values=job.inputs["pixel_values"].to(self.device), image_grid_thw=grid)
        # mrope: image tokens share positions, so the text after them continues from the largest one (not from
        # the token count); decode steps go on from there, one per token.
        positions, _ = self.model.model.get_rope_index(ids, grid, None, mask)
        kwargs["position_ids"] = positions
        return kwargs, int(positions.max()) + 1

    def decode_positions(self, positions):
        return positions.view(1, -1, 1).expand(3, -1, -1)


def _smolvlm(*args, **kwargs):
    from model_repository.smolvlm import SmolVLMPipeline

    return SmolVLMPipeline(*args, **kwargs)


def _deepseek_ocr(*args, **kwargs):
    from model_repository.deepseek_ocr import DeepSeekOcrPipeline

    return DeepSeekOcrPipeline(*args, **kwargs)


PIPELINES = {"qwen2vl": QwenPipeline, "smolvlm2": _smolvlm, "deepseek_ocr": _deepseek_ocr}


# ---------------------------------------------------------------------------------------------- Triton


def resolve_attention(setting: str, device: str) -> str:
    """``USE_FLASH_ATTENTION`` (seed 002): auto -> flash-attn when importable on a GPU, else SDPA."""
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



def _response(text: str, finish: str, usage: dict | None):
    pb = runtime.pb_utils
    tensors = [
        pb.Tensor("TEXT", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb.Tensor("FINISH_REASON", np.array([finish.encode()], dtype=np.object_)),
        pb.Tensor("USAGE", np.array([json.dumps(usage).encode() if usage else b""], dtype=np.object_)),
    ]
    return pb.InferenceResponse(output_tensors=tensors)


class Admission:
    """Chat requests admitted and not yet finished, at most ``limit`` (running rows + waiting jobs)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.lock = threading.Lock()  # execute runs on Triton's thread, finishes on the engine's

    def enter(self) -> Callable[[], None] | None:
        """A release function (idempotent) when admitted, None when full."""
        with self.lock:
            if self.count >= self.limit:
                return None
            self.count += 1
        released = threading.Event()

        def release() -> None:
            with self.lock:
                if not released.is_set():
                    released.set()
                    self.count -= 1

        return release


class ChatModel:
    """Triton model for one chat family (decoupled; see the module docstring)."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = runtime.model_config(args)
        if not config.get("model_transaction_policy", {}).get("decoupled"):
            raise ValueError(f"{config['name']}: chat models must be decoupled (model_transaction_policy)")
        params = ChatParams.from_config(config)
        family = params.family
        if family not in PIPELINES:
            raise ValueError(f"{config['name']}: unknown chat family {family!r}")
        device = runtime.torch_device(args)
        runtime.apply_gpu_budget(args, config)  # before loading: an over-budget checkpoint fails loudly here
        attn = resolve_attention(os.environ.get("USE_FLASH_ATTENTION", "auto"), device)
        # SmolVLM2's vision encoder is the exported ONNX model (in-process or via BLS, like the other encoders).
        encoder = runtime.make_encoder(args, config, ["image_features"]) if family == "smolvlm2" else None
        # bf16 weights where export measured them faithful and faster on this host (decoder_choice.json).
        extra = {"decoder_precision": params.decoder_precision} if encoder else {}
        self.pipeline = PIPELINES[family](runtime.version_dir(args) / "checkpoint", device, attn, encoder=encoder,
                                          **extra)
        self.max_tokens_limit = params.max_new_tokens_limit
        # MAX_NEW_TOKENS (seed 002) sets the default answer length, within the configured limit.
        self.default_max_tokens = min(self.max_tokens_limit,
                                      int(os.environ.get("MAX_NEW_TOKENS") or params.default_max_new_tokens))
        self.max_frames = params.max_video_frames
        self.max_images = params.max_images
        self.default_fps = params.video_fps
        self.video_limits = VideoLimits(params.max_video_seconds, params.max_video_decoded_frames, params.max_pixels,
                                        params.max_video_decode_s)
        self.admission = Admission(params.max_batch + params.max_queue_size)
        self.engine = ChatEngine(self.pipeline, params.max_batch, params.batch_window_ms / 1000,
                                 params.max_batch_tokens)

    def execute(self, requests):
        pb = runtime.pb_utils
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            release = self.admission.enter()
            if release is None:
                # Before decoding anything: a refused request must not hold images. The gateway maps this
                # wording ("queue ... full") to 429 + Retry-After.
                sender.send(runtime.error_response(
                    f"chat queue is full ({self.admission.limit} requests running or waiting: max_batch + "
                    "max_queue_size); retry later"), flags=final)
                continue
            try:
                raw_params = pb.get_input_tensor_by_name(request, "PARAMETERS")
                params, extra = parse_params(
                    None if raw_params is None else runtime.as_bytes_list(raw_params.as_numpy())[0],
                    self.default_max_tokens, self.max_tokens_limit,
                )
                fps = float(extra.get("video_fps") or self.default_fps)
                frames = min(int(extra.get("video_max_frames") or self.max_frames), self.max_frames)
                if not 0 < fps <= 30:
                    raise runtime.InputError(f"video_fps must be in (0, 30], got {fps}")
                raw = runtime.as_bytes_list(pb.get_input_tensor_by_name(request, "MESSAGES").as_numpy())[0]
                messages = parse_messages(raw, fps, max(1, frames), self.max_images,
                                          self.video_limits.max_pixels, self.video_limits)
                inputs, prompt_tokens = self.pipeline.prepare(messages)
            except runtime.InputError as exc:
                release()
                sender.send(runtime.error_response(str(exc), invalid_arg=True), flags=final)
                continue
            except Exception as exc:  # noqa: BLE001
                release()
                sender.send(runtime.error_response(f"preprocessing failed: {type(exc).__name__}: {exc}"),
                            flags=final)
                continue

            def emit(text: str, finish: str, usage: dict | None, sender=sender, release=release) -> None:
                if finish:
                    release()
                if finish == "error":
                    sender.send(runtime.error_response(text), flags=final)
                elif finish:
                    sender.send(_response(text, finish, usage), flags=final)
                elif text:
                    sender.send(_response(text, "", None))

            self.engine.submit(ChatJob(inputs, params, prompt_tokens, emit, request.is_cancelled))
        return None

    def finalize(self) -> None:
        self.engine.stop()
