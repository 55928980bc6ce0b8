"""SigLIP 2 recipe: fixed-resolution and NaFlex checkpoints -> ONNX towers + the client-facing embedding models.

Writes ``siglip2_vision`` / ``siglip2_text`` (ONNX) and ``siglip2_embed_image`` / ``siglip2_embed_text`` (Python
models, :mod:`vlmserve.model_repository.siglip2`), in the layout of SigLIP v1 (:mod:`vlmserve.export.siglip`):

* fixed resolution (``google/siglip2-base-patch16-224``, ``model_type`` ``siglip``): the vision tower takes
  ``pixel_values`` [batch, 3, size, size], exactly as v1;
* NaFlex (``google/siglip2-*-naflex``, ``Siglip2Model``): the vision tower takes ``pixel_values`` [batch, patches,
  3 * p * p], ``pixel_attention_mask`` [batch, patches] and ``position_weights`` [batch, patches, grid * grid]; the
  position-embedding resize is the product ``position_weights @ table`` in the graph, the antialiased-bilinear
  weights come from numpy (``vlmserve.model_repository.siglip2.position_weights``, which says why);
* text (both): ``input_ids`` + ``attention_mask`` [batch, max_position_embeddings] (Gemma tokenizer).

Parity is checked against transformers itself (``get_image_features`` / ``get_text_features`` on its own
processor's outputs) on photos of several sizes and aspect ratios, not only against the traced wrapper.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vlmserve.export import onnx_utils, photos, runtime_choice
from vlmserve.export.pbtxt import Enum
from vlmserve.export.progress import Progress
from vlmserve.export.repository import (
    EMBEDDED_CONFIG,
    ExportOptions,
    copy_tree,
    onnx_configs,
    write_config,
    write_python_model,
)
from vlmserve.export.siglip import _client_configs
from vlmserve.export.tiny import TINY_SEED
from vlmserve.families.siglip2 import Siglip2Params
from vlmserve.families.tensors import EmbedImageTensors, EmbedTextTensors

FAMILY = "siglip2"
RECIPE_VERSION = "siglip2-1"
TRACE_BATCH = 2
CHOICE_BATCH = 8
PARITY_MIN_COSINE = 0.999
PROCESSOR_FILES = [
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "added_tokens.json",
]
MODELS = ["siglip2_vision", "siglip2_text", "siglip2_embed_image", "siglip2_embed_text"]


def _towers(model, naflex: bool):
    import torch
    from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask

    class FixedVision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model.get_image_features(pixel_values=pixel_values)

    def pooling_head(head, hidden, mask):
        """``Siglip2MultiheadAttentionPoolingHead.forward`` without ``nn.MultiheadAttention``, whose traced
        reshapes freeze the patch count (the graph must take any number of patches). Same arithmetic: a probe
        query over the patches, padding masked with the dtype's minimum, q scaled before the product."""
        attention = head.attention
        heads = attention.num_heads
        w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
        q = torch.nn.functional.linear(head.probe, w_q, b_q).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = torch.nn.functional.linear(hidden, w_k, b_k).unflatten(-1, (heads, -1)).transpose(1, 2)
        v = torch.nn.functional.linear(hidden, w_v, b_v).unflatten(-1, (heads, -1)).transpose(1, 2)
        q = q * (q.shape[-1] ** -0.5)
        bias = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) + bias, dim=-1)
        pooled = attention.out_proj(torch.matmul(weights, v).transpose(1, 2).flatten(2))
        pooled = pooled + head.mlp(head.layernorm(pooled))
        return pooled[:, 0]

    class NaflexVision(torch.nn.Module):
        """``Siglip2VisionTransformer.forward`` with the position embeddings as ``position_weights @ table``."""

        def __init__(self) -> None:
            super().__init__()
            self.vision = model.vision_model

        def forward(self, pixel_values, pixel_attention_mask, position_weights):
            vision = self.vision
            embeddings = vision.embeddings
            patches = embeddings.patch_embedding(pixel_values)
            hidden = patches + torch.matmul(position_weights, embeddings.position_embedding.weight)
            mask = _prepare_4d_attention_mask(pixel_attention_mask, hidden.dtype)
            hidden = vision.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
            hidden = vision.post_layernorm(hidden)
            return pooling_head(vision.head, hidden, pixel_attention_mask)

    class Text(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)

    return (NaflexVision() if naflex else FixedVision()).eval(), Text().eval()


def load(source_dir: Path, source_name: str):
    """(model, naflex) for a SigLIP 2 checkpoint; refuses other architectures with a message that says why."""
    import torch
    from transformers import AutoConfig, Siglip2Model, SiglipModel

    hf_config = AutoConfig.from_pretrained(source_dir)
    if hf_config.model_type not in ("siglip", "siglip2"):
        raise ValueError(f"{source_name} is a {hf_config.model_type!r} checkpoint; the SigLIP 2 recipe takes "
                         "'siglip2' (NaFlex) and fixed-resolution 'siglip' checkpoints with a Gemma tokenizer")
    if not (source_dir / "tokenizer.json").exists():
        raise ValueError(f"{source_name} has no tokenizer.json (a SigLIP v1 checkpoint with the sentencepiece "
                         "tokenizer?): export it as the 'siglip' family (--model siglip=...)")
    naflex = hf_config.model_type == "siglip2"
    cls = Siglip2Model if naflex else SiglipModel
    model = cls.from_pretrained(source_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return model, naflex


def reference_inputs(source_dir: Path, images: list, texts: list[str], seq: int,
                     max_num_patches: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The checkpoint's own image processor and tokenizer (transformers) on ``images`` and ``texts``."""
    from transformers import AutoImageProcessor, AutoTokenizer

    processor = AutoImageProcessor.from_pretrained(source_dir)
    kwargs = {"max_num_patches": max_num_patches} if max_num_patches else {}
    pixels = dict(processor(images=images, return_tensors="np", **kwargs))
    tokens = dict(AutoTokenizer.from_pretrained(source_dir)(texts, padding="max_length", truncation=True,
                                                            max_length=seq, return_tensors="np"))
    return pixels, tokens


def reference_features(model, naflex: bool, pixels: dict[str, np.ndarray] | None = None,
                       tokens: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """transformers' ``get_image_features`` (``pixels``) or ``get_text_features`` (``tokens``), fp32."""
    import torch

    with torch.no_grad():
        if pixels is not None:
            return model.get_image_features(**{k: torch.from_numpy(np.asarray(v)) for k, v in pixels.items()}).numpy()
        assert tokens is not None
        return model.get_text_features(**{k: torch.from_numpy(np.asarray(v)) for k, v in tokens.items()}).numpy()


def graph_inputs(naflex: bool, grid: int, pixels: dict[str, np.ndarray] | None = None,
                 tokens: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The ONNX towers' inputs for the processor's outputs (the same tensors the Triton models build in numpy)."""
    from vlmserve.model_repository.siglip2 import position_weights

    if pixels is not None:
        if not naflex:
            return {"pixel_values": pixels["pixel_values"].astype(np.float32)}
        return {"pixel_values": pixels["pixel_values"].astype(np.float32),
                "pixel_attention_mask": pixels["pixel_attention_mask"].astype(np.int64),
                "position_weights": position_weights(pixels["spatial_shapes"], grid,
                                                     pixels["pixel_values"].shape[1])}
    assert tokens is not None
    ids = tokens["input_ids"].astype(np.int64)
    mask = tokens.get("attention_mask")
    return {"input_ids": ids, "attention_mask": np.ones_like(ids) if mask is None else mask.astype(np.int64)}


def check_parity(name: str, onnx_path: Path, inputs: dict[str, np.ndarray], expected: np.ndarray,
                 atol: float = onnx_utils.PARITY_ATOL) -> dict[str, float]:
    """ONNX Runtime on ``inputs`` vs ``expected`` (transformers): max abs diff and min cosine, or ParityError."""
    import onnxruntime as ort

    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    if got.shape != expected.shape:
        raise onnx_utils.ParityError(f"{name} (shape {got.shape} != {expected.shape})", float("inf"), atol)
    diff = float(np.max(np.abs(got - expected)))
    cosine = runtime_choice.cosine_min(expected, got)
    if not (diff <= atol or cosine >= PARITY_MIN_COSINE):
        raise onnx_utils.ParityError(f"{name} (min cosine {cosine:.6f})", diff, atol)
    return {"max_abs_diff": diff, "min_cosine": cosine}


def export(source_dir: Path, repo: Path, options: ExportOptions, weights: str, source_name: str,
           progress: Progress) -> dict[str, Any]:
    """Export one SigLIP 2 checkpoint into ``repo``; returns the parity report."""
    import torch

    with progress.step(f"loading {source_name}"):
        model, naflex = load(source_dir, source_name)
    if options.int8:
        progress.info("[yellow]siglip2: --int8 variants are not exported for SigLIP 2 (fp32 only)[/yellow]")
    vision, text = _towers(model, naflex)
    vc, tc = model.config.vision_config, model.config.text_config
    seq = int(tc.max_position_embeddings)
    dim = int(getattr(tc, "projection_size", None) or tc.hidden_size)
    patch_dim = vc.num_channels * vc.patch_size ** 2
    grid = int(vc.num_patches ** 0.5) if naflex else 0
    pixels, tokens = reference_inputs(source_dir, photos.photos(CHOICE_BATCH),
                                      [photos.SENTENCES[i % len(photos.SENTENCES)] for i in range(CHOICE_BATCH)], seq)
    image_inputs = graph_inputs(naflex, grid, pixels=pixels)
    text_inputs = graph_inputs(naflex, grid, tokens=tokens)

    vision_path = repo / "siglip2_vision" / "1" / "model.onnx"
    with progress.step("exporting siglip2_vision to ONNX"):
        trace = {k: torch.from_numpy(v[:TRACE_BATCH]) for k, v in image_inputs.items()}
        axes = ({"pixel_values": {0: "batch", 1: "patches"}, "pixel_attention_mask": {0: "batch", 1: "patches"},
                 "position_weights": {0: "batch", 1: "patches"}} if naflex else {"pixel_values": {0: "batch"}})
        onnx_utils.export_onnx(vision, list(trace.values()), vision_path, list(trace), ["image_embeds"],
                               {**axes, "image_embeds": {0: "batch"}})
    text_path = repo / "siglip2_text" / "1" / "model.onnx"
    with progress.step("exporting siglip2_text to ONNX"):
        trace = {k: torch.from_numpy(v[:TRACE_BATCH]) for k, v in text_inputs.items()}
        onnx_utils.export_onnx(text, list(trace.values()), text_path, list(trace), ["text_embeds"],
                               {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "text_embeds": {0: "batch"}})

    report: dict[str, Any] = {}
    with progress.step(f"parity vs transformers on {CHOICE_BATCH} photos and sentences") as step:
        report["siglip2_vision"] = check_parity("siglip2_vision", vision_path, image_inputs,
                                                reference_features(model, naflex, pixels=pixels))
        report["siglip2_text"] = check_parity("siglip2_text", text_path, text_inputs,
                                              reference_features(model, naflex, tokens=tokens))
        step.detail = ", ".join(f"{k} max abs diff {v['max_abs_diff']:.2e} cosine {v['min_cosine']:.6f}"
                                for k, v in report.items())

    choices = {
        "siglip2_vision": runtime_choice.select_for_export(repo, "siglip2_vision", vision, vision_path, image_inputs,
                                                           options, progress),
        "siglip2_text": runtime_choice.select_for_export(repo, "siglip2_text", text, text_path, text_inputs,
                                                         options, progress),
    }
    meta = {"family": FAMILY, "source_model": source_name, "weights": weights, "embedding_dim": dim}
    vision_meta: dict[str, Any] = ({"vision_mode": "naflex", "position_grid": grid,
                                    "max_num_patches": int(pixels["pixel_values"].shape[1])}
                                   if naflex else {"vision_mode": "fixed", "image_size": int(vc.image_size)})
    with progress.step("writing Triton configs"):
        _write_models(repo, source_dir, options, meta, vision_meta, dim, seq, patch_dim, choices)
    return {"parity": report, "embedding_dim": dim, "max_text_length": seq, "runtime_choice": choices,
            **vision_meta}


def _tensor(name: str, dtype: str, dims: list[int]) -> dict[str, Any]:
    return {"name": name, "data_type": Enum(dtype), "dims": dims}


def _write_models(repo: Path, source_dir: Path, options: ExportOptions, meta: dict[str, Any],
                  vision_meta: dict[str, Any], dim: int, seq: int, patch_dim: int,
                  choices: dict[str, dict[str, Any] | None]) -> None:
    if vision_meta["vision_mode"] == "naflex":
        vision_inputs = [_tensor("pixel_values", "TYPE_FP32", [-1, patch_dim]),
                         _tensor("pixel_attention_mask", "TYPE_INT64", [-1]),
                         _tensor("position_weights", "TYPE_FP32", [-1, vision_meta["position_grid"] ** 2])]
    else:
        size = vision_meta["image_size"]
        vision_inputs = [_tensor("pixel_values", "TYPE_FP32", [3, size, size])]
    text_inputs = [_tensor("input_ids", "TYPE_INT64", [seq]), _tensor("attention_mask", "TYPE_INT64", [seq])]
    for name, inputs, out in [
        ("siglip2_vision", vision_inputs, _tensor("image_embeds", "TYPE_FP32", [dim])),
        ("siglip2_text", text_inputs, _tensor("text_embeds", "TYPE_FP32", [dim])),
    ]:
        chosen = runtime_choice.config_params(choices.get(name))
        native, embedded = onnx_configs(name, inputs[0], out, options,
                                        Siglip2Params(**meta, role="encoder", **chosen))
        native["input"] = embedded["input"] = inputs
        write_config(repo, name, native)
        write_config(repo, name, embedded, EMBEDDED_CONFIG)
        write_python_model(repo, name, "vlmserve.model_repository.onnx_model.TritonPythonModel")

    clients: list[tuple[str, type[EmbedImageTensors | EmbedTextTensors], str, dict[str, Any], str]] = [
        ("siglip2_embed_image", EmbedImageTensors, "siglip2_vision",
         {"task": "embed_image", "max_pixels": options.max_pixels, **vision_meta},
         "vlmserve.model_repository.siglip2.EmbedImageModel"),
        ("siglip2_embed_text", EmbedTextTensors, "siglip2_text", {"task": "embed_text", "max_text_length": seq},
         "vlmserve.model_repository.siglip2.EmbedTextModel"),
    ]
    for name, tensors, encoder, extra, cls in clients:
        chosen = runtime_choice.config_params(choices.get(encoder))
        native, embedded = _client_configs(name, tensors, dim, encoder, options,
                                           Siglip2Params(**meta, role="client", **extra, **chosen))
        write_config(repo, name, native)
        write_config(repo, name, embedded, EMBEDDED_CONFIG)
        write_python_model(repo, name, cls)
        copy_tree(source_dir, repo / name / "1" / "processor", PROCESSOR_FILES)


# ---------------------------------------------------------------------------------------------- tiny checkpoints

_GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids 0..3


def gemma_tokenizer(vocab_size: int, max_length: int):
    """A small Gemma-style fast tokenizer (BPE on "▁"-joined words, trained on the fixed corpus) configured as the
    released SigLIP 2 tokenizers are (transformers' convert_siglip2_to_hf.py): no BOS, EOS appended, right
    padding, and ``input_ids`` as the only model input."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import GemmaTokenizerFast

    from vlmserve.export.tiny import _CORPUS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Replace("\u2581", " ")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_GEMMA_SPECIALS, show_progress=False,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789,.\u2581"))
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return GemmaTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                              unk_token="<unk>", add_bos_token=False, add_eos_token=True, padding_side="right",
                              model_input_names=["input_ids"], model_max_length=max_length)


def _save(out_dir: Path, model, processor, architecture: str) -> Path:
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "VLMSERVE_TINY.json").write_text(
        json.dumps({"weights": "random", "seed": TINY_SEED, "architecture": architecture}, indent=2))
    return out_dir


TINY_TEXT_LENGTH = 16


def _tiny_text_config(vocab_size: int) -> dict[str, Any]:
    return {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": TINY_TEXT_LENGTH, "projection_size": 32}


def build_tiny_siglip2(out_dir: Path) -> Path:
    """A tiny random NaFlex ``Siglip2Model`` + processor: hidden size 32, an 8 x 8 position grid, and the released
    patching (16 px patches, up to 256 of them). The patching must be the released one: ``Siglip2Processor``
    applies its own defaults (patch 16, 256 patches) over the image processor's settings."""
    import torch
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model, Siglip2Processor

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(TINY_SEED)
    tokenizer = gemma_tokenizer(320, TINY_TEXT_LENGTH)
    config = Siglip2Config(
        text_config=_tiny_text_config(len(tokenizer)),
        vision_config={"num_patches": 64, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
    )
    image_processor = Siglip2ImageProcessor(patch_size=16, max_num_patches=256)
    return _save(out_dir, Siglip2Model(config).eval(), Siglip2Processor(image_processor, tokenizer), "Siglip2Model")


def build_tiny_siglip2_fixed(out_dir: Path) -> Path:
    """A tiny random fixed-resolution SigLIP 2 (``SiglipModel`` + Gemma tokenizer, 32 px)."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(TINY_SEED)
    tokenizer = gemma_tokenizer(320, TINY_TEXT_LENGTH)
    config = SiglipConfig(
        text_config=_tiny_text_config(len(tokenizer)),
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
    )
    processor = SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}),
                                tokenizer=tokenizer)
    return _save(out_dir, SiglipModel(config).eval(), processor, "SiglipModel (SigLIP 2, fixed resolution)")


# ---------------------------------------------------------------------------------------------- perf checkpoint

PERF_REFERENCE = "google/siglip2-so400m-patch16-naflex"
PERF_TOKENIZER_VOCAB = 320  # the tokenizer is small; the model keeps the real 256000-row embedding


def perf_siglip2_config():
    """``Siglip2Config`` with the dimensions of ``google/siglip2-so400m-patch16-naflex`` (SoViT-400m/16 towers,
    a 16 x 16 position grid, Gemma's 256k vocabulary, 64 text positions)."""
    from transformers import Siglip2Config

    shape = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
             "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
    return Siglip2Config(
        text_config={**shape, "vocab_size": 256000, "max_position_embeddings": 64, "projection_size": 1152},
        vision_config={**shape, "num_patches": 256, "patch_size": 16, "num_channels": 3},
    )


def build_perf_siglip2(out_dir: Path) -> Path:
    """A random ``Siglip2Model`` the size of so400m-patch16-naflex (about 1.1 B parameters, 4.5 GB) + processor."""
    import torch
    from transformers import Siglip2ImageProcessor, Siglip2Model, Siglip2Processor

    from vlmserve.export.perf import PERF_SEED, _write_markers

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(PERF_SEED)
    model = Siglip2Model(perf_siglip2_config()).eval()
    model.save_pretrained(out_dir)
    Siglip2Processor(Siglip2ImageProcessor(patch_size=16, max_num_patches=256),
                     gemma_tokenizer(PERF_TOKENIZER_VOCAB, 64)).save_pretrained(out_dir)
    _write_markers(out_dir, "Siglip2Model", PERF_REFERENCE, model.num_parameters())
    return out_dir
