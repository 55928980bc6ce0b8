"""Chat VLM recipes: the checkpoint into a decoupled Triton Python model (``qwen2vl``; ``smolvlm2`` adds ONNX).

Writes ``<name>/config.pbtxt`` (+ the same as ``configs/embedded.pbtxt``), ``<name>/1/model.py`` and
``<name>/1/checkpoint`` (hard links where possible).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmserve.export import chat_engine_choice, image_fence, photos, runtime_choice
from vlmserve.export.pbtxt import Enum, parameters
from vlmserve.export.progress import Progress
from vlmserve.export.repository import (
    EMBEDDED_CONFIG,
    ExportOptions,
    copy_checkpoint,
    onnx_configs,
    tensor_configs,
    write_config,
    write_python_model,
)
from vlmserve.families.contract import ChatParams, ModelParams
from vlmserve.families.tensors import ChatTensors


def chat_config(name: str, options: ExportOptions, meta: dict[str, Any], extra: dict[str, Any] | None = None,
                runner: str | None = None) -> dict[str, Any]:
    params = ChatParams(**meta, device=options.device, max_queue_size=options.max_queue_size, **(extra or {}),
                        **({"runner": runner} if runner else {}))
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": 0,  # the model batches itself (chat_engine), streaming per request
        "model_transaction_policy": {"decoupled": True},
        # MESSAGES (a conversation) or PROMPT (raw text, /v1/completions): the model requires exactly one.
        "input": tensor_configs(ChatTensors.inputs),
        # INDEX: the choice a response belongs to (n > 1); LOGPROBS: JSON, when asked for.
        "output": tensor_configs(ChatTensors.outputs),
        "instance_group": [{"count": 1, "kind": options.kind()}],
        "parameters": parameters(params.to_triton()),
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
        write_python_model(repo, "qwen2vl", "vlmserve.model_repository.chat.ChatModel")
    return {}


class _Recipe:
    """A recipe object for a family whose export is a function of this module (see vlmserve/families)."""

    def __init__(self, version: str, models: list[str], fn) -> None:
        self.RECIPE_VERSION, self.MODELS = version, models
        self.export = fn


qwen2vl = _Recipe("qwen2vl-3", ["qwen2vl"], export_qwen2vl)


def export_smolvlm2(source_dir: Path, repo: Path, options: ExportOptions, weights: str, source_name: str,
                    progress: Progress) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor

    from vlmserve.export import onnx_utils
    from vlmserve.model_repository.smolvlm import patch_mask, vision_module

    with progress.step(f"loading {source_name}"):
        config = AutoConfig.from_pretrained(source_dir)
        if config.model_type != "smolvlm":
            raise ValueError(f"{source_name} is a {config.model_type!r} checkpoint, not SmolVLM2")
        model = SmolVLMForConditionalGeneration.from_pretrained(source_dir, dtype=torch.float32,
                                                                attn_implementation="eager").eval()
        processor = SmolVLMImageProcessor.from_pretrained(source_dir)
    vision = vision_module(model)
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    # Real tiles, including a padded global view (non-square image), so the masks are exercised.
    tiles = processor(images=[[Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 160, 3), np.uint8))]],
                      return_tensors="np")
    pixels = tiles["pixel_values"][0].astype(np.float32)
    pmask = patch_mask(tiles["pixel_attention_mask"][0].astype(bool), patch)
    with torch.no_grad():
        reference = model.model.get_image_features(torch.from_numpy(pixels)[None],
                                                   torch.from_numpy(tiles["pixel_attention_mask"][0])[None].bool())
        ours = vision(torch.from_numpy(pixels), torch.from_numpy(pmask))
    wrapper_diff = float((reference - ours).abs().max())
    if wrapper_diff > onnx_utils.PARITY_ATOL:
        raise onnx_utils.ParityError("smolvlm2 vision wrapper vs get_image_features", wrapper_diff,
                                     onnx_utils.PARITY_ATOL)
    onnx_path = repo / "smolvlm2_vision" / "1" / "model.onnx"
    with progress.step("exporting smolvlm2_vision (encoder + connector) to ONNX"):
        onnx_utils.export_onnx(
            vision, [torch.from_numpy(pixels[:2]), torch.from_numpy(pmask[:2])], onnx_path,
            ["pixel_values", "patch_attention_mask"], ["image_features"],
            {"pixel_values": {0: "batch"}, "patch_attention_mask": {0: "batch"}, "image_features": {0: "batch"}},
        )
    n = min(len(pixels), 3) if len(pixels) != 2 else 1
    picks = list(range(len(pixels)))[-n:]  # include the padded global tile, at a batch size != traced (2)
    with progress.step(f"parity check smolvlm2_vision at batch {n}") as step:
        diff = onnx_utils.validate("smolvlm2_vision", vision, onnx_path,
                                   {"pixel_values": pixels[picks], "patch_attention_mask": pmask[picks]})
        step.detail = f"max abs diff {diff:.2e} (wrapper vs transformers {wrapper_diff:.1e})"
    # The runtime for the vision encoder, timed on the tiles of a real photo (the processor's own split) and
    # fenced end to end: the language model's logits over photo prompts with each candidate's features vs the
    # fp32 tower's (export/image_fence.py); the tower's own cosine is reported, not the gate.
    fence = None
    if options.device == "cpu":
        with progress.step("preparing the image-prompt fence (fp32 decoder, reference tower)") as step:
            fence = image_fence.SmolVLMImageFence(source_dir, image_fence.torch_encoder(vision))
            step.detail = fence.description
    photo_tiles = processor(images=[[photos.photos(1)[0]]], return_tensors="np")
    choice = runtime_choice.select_for_export(
        repo, "smolvlm2_vision", vision, onnx_path,
        {"pixel_values": photo_tiles["pixel_values"][0].astype(np.float32),
         "patch_attention_mask": patch_mask(photo_tiles["pixel_attention_mask"][0].astype(bool), patch)},
        options, progress, fence=fence)
    del fence  # its own copy of the decoder
    chosen = runtime_choice.config_params(choice)
    with progress.step("copying checkpoint and writing Triton configs"):
        meta = {"family": "smolvlm2", "source_model": source_name, "weights": weights}
        tokens, dim = int(ours.shape[1]), int(ours.shape[2])
        native, embedded = onnx_configs(
            "smolvlm2_vision", {"name": "pixel_values", "data_type": Enum("TYPE_FP32"), "dims": [3, size, size]},
            {"name": "image_features", "data_type": Enum("TYPE_FP32"), "dims": [tokens, dim]},
            options, ModelParams(**meta, role="encoder", **chosen),
        )
        for cfg in (native, embedded):
            cfg["input"].append({"name": "patch_attention_mask", "data_type": Enum("TYPE_BOOL"),
                                 "dims": [size // patch, size // patch]})
        write_config(repo, "smolvlm2_vision", native)
        write_config(repo, "smolvlm2_vision", embedded, EMBEDDED_CONFIG)
        write_python_model(repo, "smolvlm2_vision", "vlmserve.model_repository.onnx_model.TritonPythonModel")
        copy_checkpoint(source_dir, repo / "smolvlm2" / "1" / "checkpoint")
    extra: dict[str, Any] = {"encoder_model": "smolvlm2_vision", **chosen}
    decoder = engine = None
    if options.device == "cpu":
        with progress.step("choosing the decoder precision (timing fp32 vs bf16 weights)") as step:
            decoder = _choose_smolvlm2_decoder(model, source_dir, options)
            (repo / "smolvlm2" / "decoder_choice.json").write_text(json.dumps(decoder, indent=2))
            step.detail = runtime_choice.decoder_summary(decoder)
        extra |= {"decoder_precision": decoder["precision"], "decoder_choice": runtime_choice.decoder_summary(decoder)}
        with progress.step(f"choosing the chat engine (--chat-engine {options.chat_engine})") as step:
            engine = _choose_smolvlm2_engine(model, source_dir, repo, options, decoder["precision"], progress)
            (repo / "smolvlm2" / chat_engine_choice.REPORT_FILE).write_text(json.dumps(engine, indent=2))
            step.detail = chat_engine_choice.summary(engine)
        extra |= {"chat_engine": engine["engine"], "engine_choice": chat_engine_choice.summary(engine)}
        if engine["engine"] == "llamacpp":
            # llama.cpp decodes 32 rows as llama-server's 32 slots do (one sequence each, cells shared); the torch
            # loop keeps 8 (its per-step cost grows with the padded batch).
            extra |= {"decoder_gguf": engine["gguf"], "max_batch": chat_engine_choice.LLAMACPP_MAX_BATCH}
    with progress.step("writing the smolvlm2 Triton configs"):
        write_config(repo, "smolvlm2", chat_config("smolvlm2", options, meta, extra, runner="triton"))
        write_config(repo, "smolvlm2", chat_config("smolvlm2", options, meta, extra, runner="onnxruntime"),
                     EMBEDDED_CONFIG)
        write_python_model(repo, "smolvlm2", "vlmserve.model_repository.chat.ChatModel")
    return {"parity_max_abs_diff": {"smolvlm2_vision": diff}, "wrapper_vs_transformers": wrapper_diff,
            "runtime_choice": {"smolvlm2_vision": choice}, "decoder_choice": decoder,
            "engine_choice": engine}


def _choose_smolvlm2_engine(model, source_dir: Path, repo: Path, options: ExportOptions, precision: str,
                            progress: Progress) -> dict[str, Any]:
    """The torch loop or llama.cpp for SmolVLM2's language model on this host (export/chat_engine_choice.py);
    a chosen GGUF is written into ``smolvlm2/1/``."""
    if options.chat_engine == "torch":
        return chat_engine_choice.choose_chat_engine(model, None, source_dir, repo, "torch", precision, progress.info)
    from vlmserve.model_repository.smolvlm import SmolVLMPipeline

    def no_images(feeds):
        raise AssertionError("the engine choice times text prompts only")

    family = SmolVLMPipeline(source_dir, encoder=no_images, decoder_precision=precision)
    version = repo / "smolvlm2" / "1"
    return chat_engine_choice.choose_chat_engine(model, family, source_dir, version, options.chat_engine, precision,
                                                 progress.info)


def _choose_smolvlm2_decoder(model, source_dir: Path, options: ExportOptions) -> dict[str, Any]:
    """fp32 vs bf16 weights for the language model (bf16 halves the KV cache too), on batched greedy decoding
    of natural prompts. bf16 weights, not autocast: SmolVLM's image merge does not run under autocast."""
    import copy

    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer([f"Describe {s}." for s in photos.SENTENCES[:4]], return_tensors="pt", padding=True)
    models = {False: model, True: copy.deepcopy(model).to(torch.bfloat16)}

    def generate(bf16: bool):
        return models[bf16].generate(**batch, max_new_tokens=16, do_sample=False, num_beams=1)

    def logits(bf16: bool, ids):
        mask = torch.cat([batch["attention_mask"], torch.ones_like(ids[:, batch["input_ids"].shape[1]:])], dim=1)
        return models[bf16](input_ids=ids, attention_mask=mask).logits[:, batch["input_ids"].shape[1] - 1:]

    return runtime_choice.choose_decoder(generate, logits, options.precision)


smolvlm2 = _Recipe("smolvlm2-8", ["smolvlm2_vision", "smolvlm2"], export_smolvlm2)


def export_deepseek_ocr(source_dir: Path, repo: Path, options: ExportOptions, weights: str, source_name: str,
                        progress: Progress) -> dict[str, Any]:
    """DeepSeek-OCR (remote code): only copied and configured; it cannot be run or tested offline here."""
    if weights == "random":
        raise ValueError("there is no tiny DeepSeek-OCR: it needs its real weights and remote code")
    with progress.step("copying checkpoint and writing Triton configs"):
        copy_checkpoint(source_dir, repo / "deepseek_ocr" / "1" / "checkpoint")
        meta = {"family": "deepseek_ocr", "source_model": source_name, "weights": weights}
        extra = {"supports_video": False, "max_batch": 1}
        write_config(repo, "deepseek_ocr", chat_config("deepseek_ocr", options, meta, extra))
        write_config(repo, "deepseek_ocr", chat_config("deepseek_ocr", options, meta, extra), EMBEDDED_CONFIG)
        write_python_model(repo, "deepseek_ocr", "vlmserve.model_repository.chat.ChatModel")
    return {}


deepseek_ocr = _Recipe("deepseek_ocr-3", ["deepseek_ocr"], export_deepseek_ocr)
