"""SigLIP image/text embeddings: decode -> preprocess -> encoder -> L2-normalise, in one Python model.

``siglip_embed_image`` takes ``IMAGE`` (BYTES, encoded image file) and ``siglip_embed_text`` takes ``TEXT``
(BYTES, UTF-8); both return ``EMBEDDING`` (FP32, unit length). The text model also returns ``NUM_TOKENS``
(INT32, tokens before padding/truncation) for usage accounting. Triton's dynamic batcher groups requests;
each ``execute`` runs the encoder once for the whole group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from model_repository import runtime


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


class SiglipImagePreprocessor:
    """Encoded images -> ``pixel_values`` with the checkpoint's own image processor."""

    def __init__(self, processor_dir: Path, max_pixels: int = runtime.DEFAULT_MAX_PIXELS) -> None:
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(str(processor_dir))
        self.max_pixels = max_pixels
        size = getattr(self.processor, "size", None) or {}
        self.min_size = max(size.values()) if size else None

    def __call__(self, images: list[bytes]) -> np.ndarray:
        decoded = []
        for i, data in enumerate(images):
            try:
                decoded.append(runtime.decode_image(data, self.max_pixels, self.min_size))
            except runtime.InputError as exc:
                raise runtime.InputError(f"IMAGE[{i}]: {exc}") from None
        return self.processor(images=decoded, return_tensors="np")["pixel_values"].astype(np.float32)


class SiglipTextPreprocessor:
    """UTF-8 strings -> ``input_ids`` padded to the model's length (SigLIP pools the last position)."""

    def __init__(self, processor_dir: Path, max_length: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(processor_dir))
        self.max_length = max_length

    def __call__(self, texts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        try:
            strings = [t.decode("utf-8") for t in texts]
        except UnicodeDecodeError as exc:
            raise runtime.InputError(f"TEXT is not valid UTF-8: {exc}") from None
        encoded = self.tokenizer(
            strings, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="np"
        )
        lengths = np.array([len(self.tokenizer(s)["input_ids"]) for s in strings], dtype=np.int32)
        return encoded["input_ids"].astype(np.int64), lengths


class _SiglipModel:
    input_name: str
    encoder_input: str
    encoder_output: str

    def _setup(self, args: dict[str, Any]) -> dict[str, Any]:
        config = runtime.model_config(args)
        names = {i["name"] for i in config["input"]}
        if names != {self.input_name}:
            raise ValueError(f"{config['name']}: expected the single input {self.input_name}, got {sorted(names)}")
        if "EMBEDDING" not in {o["name"] for o in config["output"]}:
            raise ValueError(f"{config['name']}: output EMBEDDING missing from config")
        self.encoder = runtime.make_encoder(args, config, [self.encoder_output])
        return config

    def _encode(self, inputs: np.ndarray) -> np.ndarray:
        return l2_normalise(self.encoder({self.encoder_input: inputs})[self.encoder_output])


class EmbedImageModel(_SiglipModel):
    """Triton model ``siglip_embed_image``."""

    input_name = "IMAGE"
    encoder_input = "pixel_values"
    encoder_output = "image_embeds"

    def initialize(self, args: dict[str, Any]) -> None:
        config = self._setup(args)
        self.preprocess = SiglipImagePreprocessor(
            runtime.version_dir(args) / "processor",
            int(runtime.param(config, "max_pixels", str(runtime.DEFAULT_MAX_PIXELS))),
        )

    def execute(self, requests):
        pb = runtime.pb_utils

        def prepare(request):
            return self.preprocess(runtime.as_bytes_list(pb.get_input_tensor_by_name(request, "IMAGE").as_numpy()))

        return runtime.run_batched(requests, prepare, lambda px: {"EMBEDDING": self._encode(px)})


class EmbedTextModel(_SiglipModel):
    """Triton model ``siglip_embed_text``."""

    input_name = "TEXT"
    encoder_input = "input_ids"
    encoder_output = "text_embeds"

    def initialize(self, args: dict[str, Any]) -> None:
        config = self._setup(args)
        self.preprocess = SiglipTextPreprocessor(
            runtime.version_dir(args) / "processor", int(runtime.param(config, "max_text_length"))
        )

    def execute(self, requests):
        pb = runtime.pb_utils

        def prepare(request):
            ids, lengths = self.preprocess(
                runtime.as_bytes_list(pb.get_input_tensor_by_name(request, "TEXT").as_numpy())
            )
            # Carry the token counts through the batch as an extra column; split off in compute.
            return np.concatenate([ids, lengths[:, None].astype(np.int64)], axis=1)

        def compute(rows):
            return {"EMBEDDING": self._encode(rows[:, :-1]), "NUM_TOKENS": rows[:, -1:].astype(np.int32)}

        return runtime.run_batched(requests, prepare, compute)
