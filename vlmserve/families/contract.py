"""The model contract: every key a vlmserve Triton model carries in its config ``parameters`` block.

Export writes these (``to_triton``), the Triton models read them at load (``from_config``), the gateway reads them
from Triton's registry (``from_triton``). Defaults and limits live here once; a bad value fails model loading
loudly (pydantic's ``ValidationError`` is a ``ValueError``). Torch-free: imported by the Triton stubs and the gateway.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Json, ValidationError

__all__ = [
    "DEFAULT_IMAGE_CACHE_BYTES",
    "DEFAULT_PREFIX_CACHE_BYTES",
    "DEFAULT_MAX_BATCH_TOKENS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_VIDEO_PIXELS",
    "DEFAULT_MAX_QUEUE_SIZE",
    "MAX_NEW_TOKENS_LIMIT",
    "ChatParams",
    "EmbedParams",
    "FlorenceParams",
    "ModelParams",
    "ValidationError",
]

DEFAULT_MAX_PIXELS = 40_000_000  # decoded image size cap (decompression bombs); per model: ``max_pixels``
DEFAULT_MAX_VIDEO_PIXELS = 100_000_000  # chat: frames kept by a request's videos x their pixels (12 4K frames)
MAX_NEW_TOKENS_LIMIT = 1024  # the generating models' default ceiling for max_tokens / max_new_tokens
DEFAULT_MAX_BATCH_TOKENS = 16384  # chat engine: prompt + max_tokens summed over the running batch
DEFAULT_MAX_QUEUE_SIZE = 64  # requests waiting per model beyond what runs (Triton queue policy, chat admission)
DEFAULT_IMAGE_CACHE_BYTES = 256 * 2**20  # chat models: vision-encoder outputs kept for images seen again
DEFAULT_PREFIX_CACHE_BYTES = 256 * 2**20  # chat models: KV of prompt prefixes kept for prompts that repeat them


class ModelParams(BaseModel):
    """Keys every vlmserve model has (encoders and client-facing models)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    family: str
    source_model: str = ""  # Hub id, local path or vlmserve/tiny-<family>: what `model` names in the APIs
    weights: Literal["random", "pretrained"] = "pretrained"
    role: Literal["client", "encoder"] = "client"
    task: str = ""  # what the gateway routes on (embed_image, embed_text, florence2, chat); empty on encoders
    device: str = "cpu"
    # How the encoder runs: in-process (onnxruntime/openvino, the embedded server) or over BLS (``triton``).
    runner: str = "onnxruntime"
    encoder_model: str = ""
    runtime: str = "onnxruntime"  # chosen at export per host (export/runtime_choice.py)
    precision: str = "fp32"
    runtime_choice: str = ""  # the export's measurement, one line
    # Every candidate that passed export's fence, fastest first ("openvino/bf16,onnxruntime/fp32"): where the
    # serving CPU lacks the choice's ISA, the model runs the first one it has (vlmserve.host.serve_choice).
    runtime_faithful: str = ""
    decoder_precision: str = "fp32"
    decoder_choice: str = ""
    onnx_file: str = "model.onnx"
    intra_op_threads: int = Field(0, ge=0)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    # Written by the GPU memory plan (orchestrator/memory.py) into configs/vlmserve-plan.pbtxt:
    gpu_mem_limit: int | None = Field(None, gt=0)  # bytes: onnxruntime's CUDA arena cap
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1)  # torch's per-process cap (Python models)

    @classmethod
    def from_triton(cls, params: Mapping[str, str]) -> Any:
        """From Triton's string map (the gateway's registry); empty strings mean "not set"."""
        return cls.model_validate({k: v for k, v in params.items() if v != ""})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Any:
        """From a model config as Triton hands it to a Python model (``json.loads(args["model_config"])``)."""
        raw = {k: (v or {}).get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        try:
            return cls.from_triton(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
                                 for e in exc.errors())
            raise ValueError(f"model {config.get('name')!r}: invalid parameters: {problems}") from None

    def to_triton(self, **extra: Any) -> dict[str, str]:
        """The string map export writes.

        Always the routing keys and every knob of this kind of model (the fields a subclass declares, so a config
        shows what an operator may tune); of the common keys, only those set explicitly. ``extra``: keys outside
        the contract (e.g. the GPU plan's).
        """
        dumped = self.model_dump(mode="json")
        own = set(type(self).model_fields) - set(ModelParams.model_fields)
        keep = {"family", "role", "task"} | own | self.model_fields_set
        values = {**{k: v for k, v in dumped.items() if k in keep}, **extra}
        return {k: _string(v) for k, v in values.items() if v is not None and v != ""}


def _string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


class EmbedParams(ModelParams):
    """SigLIP-style embedding models (``embed_image`` / ``embed_text``) and their encoders."""

    embedding_dim: int = Field(0, ge=0)
    image_size: int | None = Field(None, ge=1)
    max_text_length: int | None = Field(None, ge=1)


class FlorenceTaskRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    token: str = Field(min_length=1)
    needs_text: bool = False
    description: str = ""
    text_hint: str = ""


class FlorenceParams(ModelParams):
    """The ``florence2`` model: generation defaults and limits, and the task table it serves."""

    default_num_beams: int = Field(3, ge=1)
    default_max_new_tokens: int = Field(MAX_NEW_TOKENS_LIMIT, ge=1)
    max_new_tokens_limit: int = Field(MAX_NEW_TOKENS_LIMIT, ge=1)
    num_beams_limit: int = Field(8, ge=1)
    tasks: Json[list[FlorenceTaskRow]] | None = None


class ChatParams(ModelParams):
    """The decoupled chat models (``qwen2vl``, ``smolvlm2``, ``deepseek_ocr``)."""

    task: str = "chat"
    default_max_new_tokens: int = Field(256, ge=1)
    max_new_tokens_limit: int = Field(MAX_NEW_TOKENS_LIMIT, ge=1)
    # Prompt tokens (images included) + max_tokens per request: the checkpoint's context (its text model's
    # max_position_embeddings), or this lower cap when set (a higher value is no use: the checkpoint's wins).
    max_context_tokens: int | None = Field(None, ge=1)
    supports_video: bool = True
    max_video_frames: int = Field(8, ge=1)
    video_fps: float = Field(1.0, gt=0)
    max_images: int = Field(16, ge=1)
    max_batch: int = Field(8, ge=1)  # rows decoding together (continuous batching)
    max_batch_tokens: int = Field(DEFAULT_MAX_BATCH_TOKENS, ge=1)
    max_queue_size: int = Field(DEFAULT_MAX_QUEUE_SIZE, ge=0)  # admitted jobs waiting beyond the running rows
    # Bounds on one video's decode (a 400 naming the limit): duration, frames decoded, wall time.
    max_video_seconds: float = Field(600.0, gt=0)
    max_video_decoded_frames: int = Field(3000, ge=1)
    max_video_decode_s: float = Field(30.0, gt=0)
    # Pixels of every frame a request's videos keep (frames x width x height, all videos together): a 400 naming
    # it, from the header before decoding where it can tell; decoding holds at most twice that.
    max_video_pixels: int = Field(DEFAULT_MAX_VIDEO_PIXELS, ge=1)
    # Videos are decoded by this many worker threads, off Triton's execute thread: other requests are admitted
    # meanwhile, and at most this many decodes (each within the bounds above) run at once.
    video_workers: int = Field(2, ge=1)
    batch_window_ms: float = Field(20, ge=0)
    # Host memory for the vision encoder's outputs of images seen again (LRU keyed by a hash of the encoder's
    # exact inputs; docs/chat.md); 0 turns the cache off.
    image_cache_bytes: int = Field(DEFAULT_IMAGE_CACHE_BYTES, ge=0)
    # Host memory for the KV of prompt prefixes (system prompts, earlier turns) by blocks of 32 tokens, kept for
    # prompts that begin the same way (docs/chat.md); 0 turns the cache off.
    prefix_cache_bytes: int = Field(DEFAULT_PREFIX_CACHE_BYTES, ge=0)
    # The decode engine export chose for this host (export/chat_engine_choice.py): a name of the engine table
    # (vlmserve.model_repository.chat_engine.ENGINES, checked when the model loads), e.g. the torch loop or
    # llama.cpp with the GGUF ``decoder_gguf`` (relative to the version directory); ``engine_choice``: the
    # measurement.
    chat_engine: str = "torch"
    engine_choice: str = ""
    decoder_gguf: str = ""
