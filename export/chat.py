"""Chat VLM recipes: the checkpoint into a decoupled Triton Python model (``qwen2vl``; ``smolvlm2`` adds ONNX).

Writes ``<name>/config.pbtxt`` (+ the same as ``configs/embedded.pbtxt``), ``<name>/1/model.py`` and
``<name>/1/checkpoint`` (hard links where possible).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.florence2 import _link_or_copy
from export.pbtxt import Enum, parameters
from export.progress import Progress
from export.repository import EMBEDDED_CONFIG, ExportOptions, write_config, write_python_model

MAX_NEW_TOKENS_LIMIT = 1024


def copy_checkpoint(source_dir: Path, dst: Path) -> None:
    for f in source_dir.iterdir():
        if f.is_file() and f.suffix in (".json", ".safetensors", ".txt", ".model", ".jinja", ".py"):
            _link_or_copy(f, dst / f.name)


def chat_config(name: str, options: ExportOptions, meta: dict[str, Any], extra: dict[str, Any] | None = None,
                runner: str | None = None) -> dict[str, Any]:
    def tensor(n: str, optional: bool = False) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": n, "data_type": Enum("TYPE_STRING"), "dims": [1]}
        if optional:
            spec["optional"] = True
        return spec

    params = {
        **meta,
        "role": "client",
        "task": "chat",
        "default_max_new_tokens": 256,
        "max_new_tokens_limit": MAX_NEW_TOKENS_LIMIT,
        "supports_video": "true",
        "max_video_frames": 8,
        "video_fps": "1.0",
        "max_images": 16,
        "max_batch": 8,
        "batch_window_ms": 20,
        "device": options.device,
        **(extra or {}),
    }
    if runner:
        params["runner"] = runner
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": 0,  # the model batches itself (chat_engine), streaming per request
        "model_transaction_policy": {"decoupled": True},
        "input": [tensor("MESSAGES"), tensor("PARAMETERS", optional=True)],
        "output": [tensor("TEXT"), tensor("FINISH_REASON"), tensor("USAGE")],
        "instance_group": [{"count": 1, "kind": options.kind()}],
        "parameters": parameters(params),
    }


def export_qwen2vl(source_dir: Path, repo: Path, options: ExportOptions, weights: str, source_name: str,
                   progress: Progress) -> dict[str, Any]:
    from transformers import AutoConfig

    with progress.step(f"checking {source_name}"):
        config = AutoConfig.from_pretrained(source_dir)
        if config.model_type != "qwen2_vl":
            raise ValueError(f"{source_name} is a {config.model_type!r} checkpoint, not Qwen2-VL")
    with progress.step("copying checkpoint and writing Triton configs"):
        copy_checkpoint(source_dir, repo / "qwen2vl" / "1" / "checkpoint")
        meta = {"family": "qwen2vl", "source_model": source_name, "weights": weights}
        write_config(repo, "qwen2vl", chat_config("qwen2vl", options, meta))
        write_config(repo, "qwen2vl", chat_config("qwen2vl", options, meta), EMBEDDED_CONFIG)
        write_python_model(repo, "qwen2vl", "model_repository.chat.ChatModel")
    return {}


class _Recipe:
    def __init__(self, family: str, version: str, default: str, models: list[str], fn) -> None:
        self.FAMILY, self.RECIPE_VERSION, self.DEFAULT_MODEL, self.MODELS = family, version, default, models
        self.export = fn


qwen2vl = _Recipe("qwen2vl", "qwen2vl-1", "Qwen/Qwen2-VL-2B-Instruct", ["qwen2vl"], export_qwen2vl)
