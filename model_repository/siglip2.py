"""SigLIP 2 image/text embeddings, torch-free: decode -> preprocess -> encoder -> L2-normalise.

Same client contract as SigLIP v1 (:mod:`vlmserve.model_repository.siglip`): ``siglip2_embed_image`` takes ``IMAGE``
(BYTES) and returns ``EMBEDDING``; ``siglip2_embed_text`` takes ``TEXT`` (BYTES, UTF-8) and returns ``EMBEDDING``
and ``NUM_TOKENS``. What differs from v1:

* text: SigLIP 2 uses the Gemma tokenizer (``tokenizer.json``), run here with the ``tokenizers`` library (Rust,
  no torch), configured exactly as transformers' fast tokenizer configures it; the text encoder also takes the
  ``attention_mask`` the processor returns (transformers' ``get_text_features(**processor(...))`` passes it);
* images of NaFlex checkpoints (``Siglip2Model``): each image is resized so that it keeps its aspect ratio and
  fits ``max_num_patches`` patches, cut into patches and padded to ``max_num_patches`` with a
  ``pixel_attention_mask``; the position-embedding table is resized to the image's patch grid (antialiased
  bilinear, as ``F.interpolate``) by a weight matrix computed here, which the ONNX graph multiplies with the table
  (``position_weights``: see :func:`position_weights`). Fixed-resolution SigLIP 2 checkpoints
  (``google/siglip2-base-patch16-224``) are ``SiglipModel``s: their images go through v1's transform.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from vlmserve.families.contract import DEFAULT_MAX_PIXELS
from vlmserve.families.siglip2 import Siglip2Params
from vlmserve.families.tensors import EmbedImageTensors, EmbedTextTensors
from vlmserve.model_repository import common
from vlmserve.model_repository.siglip import (
    SiglipImagePreprocessor,
    SiglipImageTransform,
    _SiglipModel,
    image_processor_config,
    l2_normalise,
    max_text_length,
    utf8_texts,
)

# ---------------------------------------------------------------------------------------------- NaFlex images


@lru_cache(maxsize=1024)
def size_for_max_patches(height: int, width: int, patch_size: int, max_num_patches: int,
                         eps: float = 1e-5) -> tuple[int, int]:
    """transformers' ``get_image_size_for_max_num_patches`` (4.57, ``image_processing_siglip2``), same float steps:
    the largest scale (binary search) at which both sides, rounded up to whole patches (at least one), give at most
    ``max_num_patches`` patches. Returns the target (height, width) in pixels."""

    def scaled(scale: float, size: int) -> int:
        return int(max(patch_size, math.ceil(size * scale / patch_size) * patch_size))

    scale_min, scale_max = eps / 10, 100.0
    while (scale_max - scale_min) >= eps:
        scale = (scale_min + scale_max) / 2
        if (scaled(scale, height) / patch_size) * (scaled(scale, width) / patch_size) <= max_num_patches:
            scale_min = scale
        else:
            scale_max = scale
    return scaled(scale_min, height), scaled(scale_min, width)


@lru_cache(maxsize=256)
def _aa_bilinear(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of PyTorch's ``F.interpolate(mode="bilinear", align_corners=False,
    antialias=True)`` along one axis: a triangle filter whose support widens by the scale when downsampling
    (PIL's method; ``_compute_indices_weights_aa`` in ATen), each row normalised to sum 1."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.maximum(0.0, 1.0 - np.abs((np.arange(lo, hi) - center + 0.5) * inv))
        weights[i, lo:hi] = taps / taps.sum()
    return weights


@lru_cache(maxsize=1024)
def _grid_weights(grid: int, height: int, width: int) -> np.ndarray:
    rows, cols = _aa_bilinear(grid, height), _aa_bilinear(grid, width)
    # Patch k = r * width + c (row-major, as the patches are cut) takes rows[r] (x) cols[c] of the grid x grid
    # table (row-major too: the checkpoint's [grid * grid, dim] table reshaped to [grid, grid, dim]).
    return np.einsum("ri,cj->rcij", rows, cols).reshape(height * width, grid * grid)


def position_weights(spatial_shapes: np.ndarray, grid: int, num_patches: int) -> np.ndarray:
    """[batch, num_patches, grid * grid] float32: row k of image b mixes the position-embedding table into the
    embedding of patch k, i.e. ``weights @ table`` is transformers' ``resize_positional_embeddings`` (the table
    resized to the image's (h, w) patch grid). Padding rows repeat patch 0's row, as transformers pads with
    ``resized_embeddings[0]``.

    Why not in the graph: the resize is antialiased bilinear to a size that differs per image of a batch, which
    the TorchScript exporter would freeze to the traced sizes (and ONNX ``Resize`` has antialiasing only from
    opset 18, still one size per call). It is linear in the table, so the graph keeps the table and does one
    batched MatMul with these weights; they depend only on (h, w) and are cached.

    One known difference: for a grid one patch wide (aspect ratio about 1:max_num_patches) torch 2.13's CPU
    antialiasing kernel returns one value for all rows (its channels-last path does not); these weights follow
    the filter's definition (tests/unit/test_siglip2.py).
    """
    out = np.empty((len(spatial_shapes), num_patches, grid * grid), dtype=np.float32)
    for b, (height, width) in enumerate(np.asarray(spatial_shapes).tolist()):
        w = _grid_weights(grid, int(height), int(width))
        out[b, : len(w)] = w
        out[b, len(w):] = w[0]
    return out


class NaflexImageTransform:
    """RGB PIL image -> (patches [max_num_patches, p*p*3], mask [max_num_patches], (h, w) in patches), exactly as
    transformers' ``Siglip2ImageProcessor`` (4.57): resize with PIL on the uint8 image to the size
    :func:`size_for_max_patches` gives, rescale and normalise as v1 (:class:`SiglipImageTransform`, reused with
    its resize off), cut into patches row-major (each patch flattened as (y, x, channel)), zero-pad."""

    def __init__(self, config: dict[str, Any], max_num_patches: int | None = None) -> None:
        if not config.get("do_resize", True):
            raise ValueError("NaFlex image processor with do_resize=false is not supported")
        self.patch_size = int(config.get("patch_size", 16))
        self.max_num_patches = int(max_num_patches or config.get("max_num_patches", 256))
        self.pixels = SiglipImageTransform({**config, "do_resize": False, "resample": config.get("resample", 2)})

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) in pixels for an image of ``width`` x ``height``."""
        return size_for_max_patches(height, width, self.patch_size, self.max_num_patches)

    def __call__(self, image) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        height, width = self.target_size(image.width, image.height)
        image = image.resize((width, height), resample=self.pixels.resample)
        x = self.pixels(image).transpose(1, 2, 0)  # CHW -> HWC
        p = self.patch_size
        nh, nw = height // p, width // p
        patches = x.reshape(nh, p, nw, p, 3).transpose(0, 2, 1, 3, 4).reshape(nh * nw, p * p * 3)
        padded = np.zeros((self.max_num_patches, p * p * 3), dtype=np.float32)
        padded[: nh * nw] = patches
        mask = np.zeros(self.max_num_patches, dtype=np.int64)
        mask[: nh * nw] = 1
        return padded, mask, (nh, nw)


class NaflexImagePreprocessor:
    """Encoded images -> the NaFlex vision encoder's inputs (``pixel_values``, ``pixel_attention_mask``,
    ``position_weights``)."""

    def __init__(self, processor_dir: Path, grid: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_num_patches: int | None = None) -> None:
        self.transform = NaflexImageTransform(image_processor_config(processor_dir), max_num_patches)
        self.grid = grid
        self.max_pixels = max_pixels

    def __call__(self, images: list[bytes]) -> dict[str, np.ndarray]:
        rows = []
        for i, data in enumerate(images):
            try:
                # No reduced-scale JPEG decode: the target size is computed from the decoded size, so a draft
                # decode could change the patch grid itself, not only the pixels.
                rows.append(self.transform(common.decode_image(data, self.max_pixels)))
            except common.InputError as exc:
                raise common.InputError(f"IMAGE[{i}]: {exc}") from None
        shapes = np.array([r[2] for r in rows], dtype=np.int64)
        return {
            "pixel_values": np.stack([r[0] for r in rows]),
            "pixel_attention_mask": np.stack([r[1] for r in rows]),
            "position_weights": position_weights(shapes, self.grid, self.transform.max_num_patches),
        }


# ---------------------------------------------------------------------------------------------- text


class FastTokenizer:
    """A transformers fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) on ``tokenizers`` alone.

    Reproduces what ``AutoTokenizer.from_pretrained(dir)(text, padding="max_length", truncation=True,
    max_length=n)`` does (transformers 4.57, tests/unit/test_siglip2.py compares the ids): Gemma/Llama tokenizers
    rebuild their post-processor from ``add_bos_token``/``add_eos_token`` (class defaults True/False) instead of
    the one in ``tokenizer.json``; truncation keeps room for the special tokens; padding with ``pad_token`` on the
    ``padding_side`` (Gemma's class default: left). The attention mask is what the text encoder gets when
    ``model_input_names`` has it (transformers' Gemma default); SigLIP 2's released tokenizers leave it out
    (``model_input_names: ["input_ids"]``, as big_vision trained), and an all-ones mask is then the same as none.
    """

    _BOS_EOS_CLASSES = {"GemmaTokenizer": "left", "GemmaTokenizerFast": "left", "LlamaTokenizer": "left",
                        "LlamaTokenizerFast": "left"}

    def __init__(self, processor_dir: Path, max_length: int) -> None:
        from tokenizers import Tokenizer, processors

        config = json.loads((processor_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.tokenizer = Tokenizer.from_file(str(processor_dir / "tokenizer.json"))
        self.max_length = max_length
        cls = config.get("tokenizer_class") or ""

        def content(key: str, default: str | None) -> str | None:
            value = config.get(key, default)
            return value.get("content") if isinstance(value, dict) else value

        if cls in self._BOS_EOS_CLASSES:
            bos, eos = content("bos_token", "<bos>"), content("eos_token", "<eos>")
            add_bos, add_eos = bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
            if (add_bos and bos is None) or (add_eos and eos is None):
                raise ValueError(f"{processor_dir}: add_bos_token/add_eos_token set without the token")
            specials = [(t, self._id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on and t is not None]
            def template(seq: str, type_id: int) -> str:
                return " ".join([f"{bos}:{type_id}"] * add_bos + [f"${seq}:{type_id}"] + [f"{eos}:{type_id}"] * add_eos)

            single = template("A", 0)
            pair = f"{single} {template('B', 1)}"
            self.tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                         special_tokens=specials)
        pad = content("pad_token", None)
        if pad is None:
            raise ValueError(f"{processor_dir}: the tokenizer has no pad_token; SigLIP pads to max_length")
        side = config.get("padding_side") or self._BOS_EOS_CLASSES.get(cls, "right")
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.padded = Tokenizer.from_str(self.tokenizer.to_str())
        self.padded.enable_truncation(max_length, direction=config.get("truncation_side") or "right")
        self.padded.enable_padding(direction=side, pad_id=self._id(pad), pad_token=pad, length=max_length)
        self.uses_mask = "attention_mask" in (config.get("model_input_names") or ["input_ids", "attention_mask"])

    def _id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return int(token_id)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) [n, max_length] int64 and the token counts before truncation/padding."""
        encoded = self.padded.encode_batch(texts)
        counts = [len(e.ids) for e in self.tokenizer.encode_batch(texts)]
        shape = (len(texts), self.max_length)
        ids = np.array([e.ids for e in encoded], dtype=np.int64).reshape(shape)
        mask = (np.array([e.attention_mask for e in encoded], dtype=np.int64).reshape(shape) if self.uses_mask
                else np.ones(shape, dtype=np.int64))
        return ids, mask, np.array(counts, dtype=np.int32)


# ---------------------------------------------------------------------------------------------- Triton models


class EmbedImageModel(_SiglipModel):
    """Triton model ``siglip2_embed_image``: NaFlex (``vision_mode`` naflex) or fixed resolution (v1's transform)."""

    tensors = EmbedImageTensors
    encoder_output = "image_embeds"

    def initialize(self, args: dict[str, Any]) -> None:
        config = self._setup(args)
        processor_dir = common.version_dir(args) / "processor"
        params = Siglip2Params.from_config(config)
        self.naflex = params.vision_mode == "naflex"
        self.preprocess: NaflexImagePreprocessor | SiglipImagePreprocessor
        if self.naflex:
            if params.position_grid is None or params.max_num_patches is None:
                raise ValueError(f"model {config.get('name')!r}: NaFlex needs position_grid and max_num_patches")
            self.preprocess = NaflexImagePreprocessor(processor_dir, params.position_grid, params.max_pixels,
                                                      params.max_num_patches)
        else:
            self.preprocess = SiglipImagePreprocessor(processor_dir, params.max_pixels)

    def execute(self, requests):
        pb = common.pb_utils

        def prepare(request):
            images = common.as_bytes_list(pb.get_input_tensor_by_name(request, EmbedImageTensors.IMAGE.name).as_numpy())
            out = self.preprocess(images)
            return out if isinstance(out, dict) else {"pixel_values": out}

        def compute(inputs):
            return {EmbedImageTensors.EMBEDDING.name: l2_normalise(self.encoder(inputs)[self.encoder_output])}

        return common.run_batched(requests, prepare, compute)


class EmbedTextModel(_SiglipModel):
    """Triton model ``siglip2_embed_text``: Gemma tokenizer (``tokenizers``), ``input_ids`` + ``attention_mask``."""

    tensors = EmbedTextTensors
    encoder_output = "text_embeds"

    def initialize(self, args: dict[str, Any]) -> None:
        config = self._setup(args)
        length = max_text_length(config, Siglip2Params.from_config(config))
        self.tokenizer = FastTokenizer(common.version_dir(args) / "processor", length)

    def execute(self, requests):
        pb = common.pb_utils
        t = EmbedTextTensors

        def prepare(request):
            texts = utf8_texts(common.as_bytes_list(pb.get_input_tensor_by_name(request, t.TEXT.name).as_numpy()))
            ids, mask, counts = self.tokenizer(texts)
            return {"input_ids": ids, "attention_mask": mask, t.NUM_TOKENS.name: counts[:, None]}

        def compute(rows):
            encoded = self.encoder({"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]})
            return {t.EMBEDDING.name: l2_normalise(encoded[self.encoder_output]),
                    t.NUM_TOKENS.name: rows[t.NUM_TOKENS.name]}

        return common.run_batched(requests, prepare, compute)
