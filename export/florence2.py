"""Florence-2 recipe: vision tower + projector -> ONNX; the encoder-decoder as a batched Python model.

Writes ``florence2_vision`` (ONNX: ``pixel_values`` -> ``image_features``; native + embedded configs) and
``florence2`` (client-facing Python model: ``IMAGE``, ``TASK``, optional ``TEXT``/``MAX_NEW_TOKENS``/
``NUM_BEAMS`` -> ``RESULT`` JSON). The checkpoint and processor are copied into ``florence2/1/checkpoint``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vlmserve.export import onnx_utils, photos, runtime_choice
from vlmserve.export.pbtxt import Enum, parameters
from vlmserve.export.progress import Progress
from vlmserve.export.repository import (
    EMBEDDED_CONFIG,
    ExportOptions,
    copy_checkpoint,
    dynamic_batching,
    onnx_configs,
    tensor_configs,
    write_config,
    write_python_model,
)
from vlmserve.families import family
from vlmserve.families.contract import MAX_NEW_TOKENS_LIMIT, FlorenceParams, ModelParams
from vlmserve.families.tensors import FlorenceTensors
from vlmserve.model_repository.florence2_tasks import TASKS

FAMILY = "florence2"
RECIPE_VERSION = "florence2-2"  # 2: per-host runtime/precision choice
# The transformers-native conversion of microsoft/Florence-2-base (the microsoft repo needs remote code).
TRACE_BATCH = 2
VALIDATE_BATCH = 3
CHOICE_BATCH = 4  # what the dynamic batcher forms for Florence-2 under load (768 px: heavy per image)
MODELS = ["florence2_vision", "florence2"]
MAX_BATCH = 8


def export(source_dir: Path, repo: Path, options: ExportOptions, weights: str, source_name: str,
           progress: Progress, default_max_new_tokens: int = MAX_NEW_TOKENS_LIMIT) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, Florence2ForConditionalGeneration

    with progress.step(f"loading {source_name}"):
        hf_config = AutoConfig.from_pretrained(source_dir)
        if hf_config.model_type != "florence2" or not hasattr(hf_config, "vision_config"):
            raise ValueError(f"{source_name} is not a transformers-native Florence-2 checkpoint "
                             f"(model_type {hf_config.model_type!r}); use e.g. {family(FAMILY).default_source}")
        model = Florence2ForConditionalGeneration.from_pretrained(source_dir, dtype=torch.float32).eval()
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(source_dir)
        size = image_processor.size
        height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2

    class Vision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model.model

        def forward(self, pixel_values):
            return self.model.get_image_features(pixel_values)

    vision = Vision().eval()
    with torch.no_grad():
        probe = vision(torch.zeros(1, 3, height, width))
    tokens, dim = int(probe.shape[1]), int(probe.shape[2])

    onnx_path = repo / "florence2_vision" / "1" / "model.onnx"
    with progress.step("exporting florence2_vision (DaViT + projector) to ONNX"):
        onnx_utils.export_onnx(
            vision, [torch.randn(TRACE_BATCH, 3, height, width)], onnx_path, ["pixel_values"], ["image_features"],
            {"pixel_values": {0: "batch"}, "image_features": {0: "batch"}},
        )
    with progress.step(f"parity check florence2_vision at batch {VALIDATE_BATCH}") as step:
        pixels = np.random.default_rng(0).standard_normal((VALIDATE_BATCH, 3, height, width)).astype(np.float32)
        diff = onnx_utils.validate("florence2_vision", vision, onnx_path, {"pixel_values": pixels})
        step.detail = f"max abs diff {diff:.2e}"

    photos_px = image_processor(images=photos.photos(CHOICE_BATCH), return_tensors="np")["pixel_values"]
    choice = runtime_choice.select_for_export(repo, "florence2_vision", vision, onnx_path,
                                              {"pixel_values": photos_px.astype(np.float32)}, options, progress)
    decoder = None
    if options.device == "cpu":
        with progress.step("choosing the decoder precision (timing fp32 vs bf16 autocast)") as step:
            decoder = _choose_decoder(model, image_processor, source_dir, options)
            step.detail = runtime_choice.decoder_summary(decoder)
    with progress.step("copying checkpoint and writing Triton configs"):
        meta = {"family": FAMILY, "source_model": source_name, "weights": weights}
        chosen = runtime_choice.config_params(choice)
        if decoder is not None:
            (repo / "florence2").mkdir(parents=True, exist_ok=True)
            (repo / "florence2" / "decoder_choice.json").write_text(json.dumps(decoder, indent=2))
        native, embedded = onnx_configs(
            "florence2_vision",
            {"name": "pixel_values", "data_type": Enum("TYPE_FP32"), "dims": [3, height, width]},
            {"name": "image_features", "data_type": Enum("TYPE_FP32"), "dims": [tokens, dim]},
            options, ModelParams(**meta, role="encoder", **chosen),
        )
        for cfg in (native, embedded):
            cfg["max_batch_size"] = MAX_BATCH
        write_config(repo, "florence2_vision", native)
        write_config(repo, "florence2_vision", embedded, EMBEDDED_CONFIG)
        write_python_model(repo, "florence2_vision", "vlmserve.model_repository.onnx_model.TritonPythonModel")

        copy_checkpoint(source_dir, repo / "florence2" / "1" / "checkpoint")
        decoder_params = {} if decoder is None else {"decoder_precision": decoder["precision"],
                                                     "decoder_choice": runtime_choice.decoder_summary(decoder)}
        _write_client_model(repo, options, {**meta, **chosen, **decoder_params}, default_max_new_tokens)
    return {"parity_max_abs_diff": {"florence2_vision": diff}, "image_tokens": tokens, "image_size": [width, height],
            "runtime_choice": {"florence2_vision": choice, "florence2_decoder": decoder}}


def _choose_decoder(model, image_processor, source_dir: Path, options: ExportOptions) -> dict[str, Any]:
    """fp32 vs bf16 autocast for the language model, on captions of photos (batch 4, 3 beams, 16 tokens)."""
    import torch
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(source_dir)
    inputs = processor(text=["<CAPTION>"] * CHOICE_BATCH, images=photos.photos(CHOICE_BATCH), return_tensors="pt",
                       padding=True)
    mask = inputs["attention_mask"]
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"])
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        image_positions = (inputs["input_ids"] == processor.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_positions, features.to(embeds.dtype))

    def generate(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            encoded = model.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
            return model.generate(encoder_outputs=encoded, attention_mask=mask, max_new_tokens=16, num_beams=3,
                                  do_sample=False, early_stopping=False)

    def logits(bf16: bool, ids):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=ids).logits

    return runtime_choice.choose_decoder(generate, logits, options.precision)


def _write_client_model(repo: Path, options: ExportOptions, meta: dict[str, Any], default_max_new_tokens: int) -> None:
    def config(runner: str) -> dict[str, Any]:
        return {
            "name": "florence2",
            "backend": "python",
            "max_batch_size": MAX_BATCH,
            "input": tensor_configs(FlorenceTensors.inputs),
            "output": tensor_configs(FlorenceTensors.outputs),
            "instance_group": [{"count": 1, "kind": options.kind()}],
            # A longer window than the encoders: one generate() for many requests is the whole point.
            "dynamic_batching": dynamic_batching(options, max_queue_delay_us=20000),
            "parameters": parameters(FlorenceParams(
                runner=runner,
                encoder_model="florence2_vision",
                **meta,
                role="client",
                task="florence2",
                default_max_new_tokens=default_max_new_tokens,
                max_pixels=options.max_pixels,
                tasks=json.dumps([t.as_dict() for t in TASKS]),
            ).to_triton()),
        }

    write_config(repo, "florence2", config("triton"))
    write_config(repo, "florence2", config("onnxruntime"), EMBEDDED_CONFIG)
    write_python_model(repo, "florence2", "vlmserve.model_repository.florence2.Florence2Model")
