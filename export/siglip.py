"""SigLIP recipe: vision and text towers -> ONNX, plus the client-facing embedding models.

Writes ``siglip_vision`` / ``siglip_text`` (ONNX; native onnxruntime config + embedded Python config) and
``siglip_embed_image`` / ``siglip_embed_text`` (Python models that decode, preprocess, run the encoder and
L2-normalise; on the NGC image they call the native ONNX model, on the embedded server they run it in-process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlmserve.export import onnx_utils, photos, runtime_choice
from vlmserve.export.pbtxt import Enum, parameters
from vlmserve.export.progress import Progress
from vlmserve.export.repository import (
    EMBEDDED_CONFIG,
    ExportOptions,
    copy_tree,
    dynamic_batching,
    onnx_configs,
    tensor_configs,
    write_config,
    write_python_model,
)
from vlmserve.families.contract import EmbedParams
from vlmserve.families.tensors import EmbedImageTensors, EmbedTextTensors

FAMILY = "siglip"
RECIPE_VERSION = "siglip-2"  # 2: per-host runtime/precision choice
TRACE_BATCH = 2
VALIDATE_BATCH = 3
CHOICE_BATCH = 8  # what Triton's dynamic batcher forms under load
PROCESSOR_FILES = [
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "tokenizer.json",
    "added_tokens.json",
]
MODELS = ["siglip_vision", "siglip_text", "siglip_embed_image", "siglip_embed_text"]


def _towers(model):
    import torch

    class Vision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model.get_image_features(pixel_values=pixel_values)

    class Text(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model.get_text_features(input_ids=input_ids)

    return Vision().eval(), Text().eval()


def _client_configs(
    name: str,
    tensors: type[EmbedImageTensors | EmbedTextTensors],
    width: int,
    encoder_model: str,
    options: ExportOptions,
    params: EmbedParams,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(native, embedded) configs of a client-facing embedding model; ``tensors``: its inputs and outputs (``width``:
    the embedding's); ``params``: its contract, less the runner."""

    def config(runner: str) -> dict[str, Any]:
        return {
            "name": name,
            "backend": "python",
            "max_batch_size": options.max_batch_size,
            "input": tensor_configs(tensors.inputs, width),
            "output": tensor_configs(tensors.outputs, width),
            # Decoding and preprocessing are CPU work even when the encoder runs on a GPU.
            "instance_group": [
                {"count": options.instance_count, "kind": Enum("KIND_CPU") if runner == "triton" else options.kind()}
            ],
            "dynamic_batching": dynamic_batching(options),
            "parameters": parameters(
                params.model_copy(update={"runner": runner, "encoder_model": encoder_model}).to_triton()),
        }

    return config("triton"), config("onnxruntime")


def export(source_dir: Path, repo: Path, options: ExportOptions, weights: str, source_name: str,
           progress: Progress) -> dict[str, Any]:
    """Export one SigLIP checkpoint into ``repo``; returns the parity report."""
    import torch
    from transformers import AutoConfig, SiglipModel

    with progress.step(f"loading {source_name}"):
        hf_config = AutoConfig.from_pretrained(source_dir)
        if hf_config.model_type != "siglip":
            raise ValueError(
                f"{source_name} is a {hf_config.model_type!r} checkpoint; the SigLIP recipe supports fixed-"
                "resolution 'siglip' checkpoints; export SigLIP 2 with --model siglip2=... (docs/siglip2.md)"
            )
        model = SiglipModel.from_pretrained(source_dir, dtype=torch.float32, attn_implementation="eager").eval()
    vision, text = _towers(model)
    vc, tc = hf_config.vision_config, hf_config.text_config
    size, seq = vc.image_size, tc.max_position_embeddings
    dim = int(getattr(tc, "projection_size", None) or tc.hidden_size)
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {}

    with progress.step("exporting siglip_vision to ONNX"):
        vision_path = onnx_utils.export_onnx(
            vision, [torch.randn(TRACE_BATCH, 3, size, size)], repo / "siglip_vision" / "1" / "model.onnx",
            ["pixel_values"], ["image_embeds"], {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
        )
    with progress.step(f"parity check siglip_vision at batch {VALIDATE_BATCH}") as step:
        pixels = rng.standard_normal((VALIDATE_BATCH, 3, size, size)).astype(np.float32)
        report["siglip_vision"] = onnx_utils.validate("siglip_vision", vision, vision_path, {"pixel_values": pixels})
        step.detail = f"max abs diff {report['siglip_vision']:.2e}"

    with progress.step("exporting siglip_text to ONNX"):
        text_path = onnx_utils.export_onnx(
            text, [torch.randint(0, tc.vocab_size, (TRACE_BATCH, seq))], repo / "siglip_text" / "1" / "model.onnx",
            ["input_ids"], ["text_embeds"], {"input_ids": {0: "batch"}, "text_embeds": {0: "batch"}},
        )
    with progress.step(f"parity check siglip_text at batch {VALIDATE_BATCH}") as step:
        ids = rng.integers(0, tc.vocab_size, (VALIDATE_BATCH, seq)).astype(np.int64)
        report["siglip_text"] = onnx_utils.validate("siglip_text", text, text_path, {"input_ids": ids})
        step.detail = f"max abs diff {report['siglip_text']:.2e}"

    pixels, ids = _realistic_inputs(source_dir, CHOICE_BATCH, seq)
    choices = {
        "siglip_vision": runtime_choice.select_for_export(repo, "siglip_vision", vision, vision_path,
                                                          {"pixel_values": pixels}, options, progress),
        "siglip_text": runtime_choice.select_for_export(repo, "siglip_text", text, text_path, {"input_ids": ids},
                                                        options, progress),
    }

    meta = {"family": FAMILY, "source_model": source_name, "weights": weights, "embedding_dim": dim}
    with progress.step("writing Triton configs"):
        _write_models(repo, source_dir, options, meta, "", dim, size, seq, choices)
    result: dict[str, Any] = {"parity_max_abs_diff": report, "embedding_dim": dim, "image_size": size,
                              "max_text_length": seq, "runtime_choice": choices}
    if options.int8:
        with progress.step("quantizing siglip_vision/siglip_text to int8 (dynamic, onnxruntime)") as step:
            fidelity = {
                "siglip_vision": onnx_utils.quantize_int8(
                    vision_path, repo / "siglip_vision_int8" / "1" / "model.onnx",
                    {"pixel_values": rng.standard_normal((8, 3, size, size)).astype(np.float32)}),
                "siglip_text": onnx_utils.quantize_int8(
                    text_path, repo / "siglip_text_int8" / "1" / "model.onnx",
                    {"input_ids": rng.integers(0, tc.vocab_size, (8, seq)).astype(np.int64)}),
            }
            step.detail = "min cosine vs fp32 " + ", ".join(f"{k} {v:.4f}" for k, v in fidelity.items())
            _write_models(repo, source_dir, options, {**meta, "source_model": f"{source_name}:int8",
                                                       "precision": "int8"}, "_int8", dim, size, seq,
                           {})
        result["int8_min_cosine"] = fidelity
    return result


def _realistic_inputs(source_dir: Path, batch: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Photos through the checkpoint's own image processor, sentences through its tokenizer."""
    from transformers import AutoImageProcessor, AutoTokenizer

    pixels = AutoImageProcessor.from_pretrained(source_dir)(images=photos.photos(batch), return_tensors="np")
    tokens = AutoTokenizer.from_pretrained(source_dir)(
        [photos.SENTENCES[i % len(photos.SENTENCES)] for i in range(batch)], padding="max_length", truncation=True,
        max_length=seq, return_tensors="np")
    return pixels["pixel_values"].astype(np.float32), tokens["input_ids"].astype(np.int64)


def _write_models(repo: Path, source_dir: Path, options: ExportOptions, meta: dict[str, Any], suffix: str,
                  dim: int, size: int, seq: int, choices: dict[str, dict[str, Any] | None]) -> None:
    """The two ONNX encoders and the two client-facing models; ``suffix`` names a variant (e.g. ``_int8``).

    ``choices``: the runtime chosen per encoder (``runtime_choice``), written into the encoder's and its client
    model's parameters (the client runs the encoder in-process on the embedded server).
    """
    for name, inp, out in [
        ("siglip_vision", {"name": "pixel_values", "data_type": Enum("TYPE_FP32"), "dims": [3, size, size]},
         {"name": "image_embeds", "data_type": Enum("TYPE_FP32"), "dims": [dim]}),
        ("siglip_text", {"name": "input_ids", "data_type": Enum("TYPE_INT64"), "dims": [seq]},
         {"name": "text_embeds", "data_type": Enum("TYPE_FP32"), "dims": [dim]}),
    ]:
        chosen = runtime_choice.config_params(choices.get(name))
        native, embedded = onnx_configs(name + suffix, inp, out, options,
                                        EmbedParams(**meta, role="encoder", **chosen))
        write_config(repo, name + suffix, native)
        write_config(repo, name + suffix, embedded, EMBEDDED_CONFIG)
        write_python_model(repo, name + suffix, "vlmserve.model_repository.onnx_model.TritonPythonModel")

    clients: list[tuple[str, type[EmbedImageTensors | EmbedTextTensors], str, dict[str, Any], str]] = [
        ("siglip_embed_image", EmbedImageTensors, "siglip_vision",
         {"task": "embed_image", "image_size": size, "max_pixels": options.max_pixels},
         "vlmserve.model_repository.siglip.EmbedImageModel"),
        ("siglip_embed_text", EmbedTextTensors, "siglip_text", {"task": "embed_text", "max_text_length": seq},
         "vlmserve.model_repository.siglip.EmbedTextModel"),
    ]
    for name, tensors, encoder, extra, cls in clients:
        chosen = runtime_choice.config_params(choices.get(encoder))
        native, embedded = _client_configs(name + suffix, tensors, dim, encoder + suffix, options,
                                           EmbedParams(**meta, role="client", **extra, **chosen))
        write_config(repo, name + suffix, native)
        write_config(repo, name + suffix, embedded, EMBEDDED_CONFIG)
        write_python_model(repo, name + suffix, cls)
        copy_tree(source_dir, repo / (name + suffix) / "1" / "processor", PROCESSOR_FILES)
