"""SigLIP image/text embeddings: decode -> preprocess -> encoder -> L2-normalise, in one Python model.

``siglip_embed_image`` takes ``IMAGE`` (BYTES, encoded image file) and ``siglip_embed_text`` takes ``TEXT``
(BYTES, UTF-8); both return ``EMBEDDING`` (FP32, unit length). The text model also returns ``NUM_TOKENS``
(INT32, tokens before padding/truncation) for usage accounting. Triton's dynamic batcher groups requests;
each ``execute`` runs the encoder once for the whole group.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

import numpy as np

from vlmserve.families.contract import DEFAULT_MAX_PIXELS, EmbedParams
from vlmserve.families.tensors import EmbedImageTensors, EmbedTextTensors
from vlmserve.model_repository import common


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


# PIL's resampling filters by the integer codes transformers stores in ``preprocessor_config.json``
# (``PILImageResampling`` is an alias of ``PIL.Image.Resampling``).
_RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
# transformers' IMAGENET_STANDARD_MEAN/STD: SiglipImageProcessor's defaults when the config leaves them out.
_DEFAULT_MEAN_STD = [0.5, 0.5, 0.5]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def image_processor_config(processor_dir: Path) -> dict[str, Any]:
    """The checkpoint's image-processor settings: ``preprocessor_config.json``, or the ``image_processor`` section
    of ``processor_config.json`` (where newer transformers versions save it)."""
    path = processor_dir / "preprocessor_config.json"
    if path.exists():
        return _read_json(path)
    combined = processor_dir / "processor_config.json"
    if combined.exists() and isinstance(_read_json(combined).get("image_processor"), dict):
        return _read_json(combined)["image_processor"]
    raise FileNotFoundError(f"no preprocessor_config.json in {processor_dir}; re-run `vlmserve export`")


class SiglipImageTransform:
    """RGB PIL image -> ``pixel_values`` (3, H, W) float32, exactly as transformers' ``SiglipImageProcessor``.

    Plain PIL + numpy so that the Triton stub never imports transformers (and with it torch, ~290 MiB of RSS per
    instance). The reference's steps, in its order and dtypes (transformers 4.57 ``image_processing_siglip``):

    * resize to ``size`` (height x width, aspect ratio ignored) with the config's PIL filter, on the uint8 image
      (``image_transforms.resize`` hands a uint8 array to PIL unchanged, so PIL resizes in 8 bit);
    * rescale: ``(uint8 as float64 * rescale_factor) as float32``;
    * normalise: ``(x - mean) / std`` in float32;
    * channels first.

    One deliberate difference: the reference guesses the channel axis from the array shape, so an RGB image 1 or 3
    pixels high is taken for channels-first and fails (or is silently transposed). Here the layout is known.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        from PIL import Image

        self.do_resize = bool(config.get("do_resize", True))
        size = config.get("size") or {"height": 224, "width": 224}
        if isinstance(size, int):  # transformers' get_size_dict(int, default_to_square=False) is shortest_edge
            size = {"shortest_edge": size}
        if self.do_resize and not {"height", "width"} <= set(size):
            # SiglipImageProcessor.preprocess reads size["height"] and size["width"] and nothing else.
            raise ValueError(f"SigLIP image processor size must have height and width, got {size}")
        self.size = (int(size["height"]), int(size["width"])) if self.do_resize else None
        code = config.get("resample", 3)
        if code not in _RESAMPLE_NAMES:
            raise ValueError(f"unknown resample filter {code!r} in the image processor config")
        self.resample = getattr(Image.Resampling, _RESAMPLE_NAMES[code])
        self.do_rescale = bool(config.get("do_rescale", True))
        self.rescale_factor = float(config.get("rescale_factor", 1 / 255))
        self.do_normalize = bool(config.get("do_normalize", True))
        mean = config.get("image_mean")
        std = config.get("image_std")
        mean = _DEFAULT_MEAN_STD if mean is None else mean
        std = _DEFAULT_MEAN_STD if std is None else std
        # A scalar applies to every channel, as in transformers' normalize().
        self.mean = np.array([mean] * 3 if np.isscalar(mean) else mean, dtype=np.float32)
        self.std = np.array([std] * 3 if np.isscalar(std) else std, dtype=np.float32)
        if self.mean.shape != (3,) or self.std.shape != (3,):
            raise ValueError(f"image_mean/image_std must have 3 values, got {mean!r} / {std!r}")

    @classmethod
    def from_dir(cls, processor_dir: Path) -> SiglipImageTransform:
        return cls(image_processor_config(processor_dir))

    @property
    def min_size(self) -> int | None:
        """The largest side the model resizes to: decoding below it would lose detail."""
        return max(self.size) if self.size else None

    def __call__(self, image) -> np.ndarray:
        """``image``: an RGB PIL image (:func:`common.decode_image` gives one; do_convert_rgb is implied)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.size is not None:
            height, width = self.size
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)
        if self.do_rescale:
            x = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = pixels.astype(np.float32)
        if self.do_normalize:
            x = (x - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


class SiglipImagePreprocessor:
    """Encoded images -> ``pixel_values`` with the checkpoint's own image-processor settings."""

    def __init__(self, processor_dir: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.transform = SiglipImageTransform.from_dir(processor_dir)
        self.max_pixels = max_pixels
        self.min_size = self.transform.min_size

    def __call__(self, images: list[bytes]) -> np.ndarray:
        rows = []
        for i, data in enumerate(images):
            try:
                rows.append(self.transform(common.decode_image(data, self.max_pixels, self.min_size)))
            except common.InputError as exc:
                raise common.InputError(f"IMAGE[{i}]: {exc}") from None
        if len({r.shape for r in rows}) > 1:  # only with do_resize=false
            raise common.InputError(f"images of different sizes {sorted({r.shape for r in rows})}; this model "
                                     "does not resize, send images of its input size")
        return np.stack(rows)


SPIECE_UNDERLINE = "\u2581"


class SiglipTokenizer:
    """transformers' (slow, sentencepiece) ``SiglipTokenizer`` re-done on ``sentencepiece`` alone.

    Same ids for the same string (tests/unit/test_siglip_preprocess.py compares them on unicode, punctuation,
    special-token and overlong strings). The steps of ``PreTrainedTokenizer.tokenize`` + ``SiglipTokenizer``
    (transformers 4.57): lower-case everything but special tokens (``do_lower_case``); split around the added
    tokens (``</s>``, ``<unk>``...), stripping the whitespace their lstrip/rstrip flags eat; each remaining piece is
    canonicalised (ASCII punctuation removed, whitespace runs collapsed, stripped) and encoded by sentencepiece with
    ``add_dummy_prefix`` off, behind a ``<unk>`` prefix that is then dropped; ``</s>`` is appended unless the ids
    already end with it; truncation keeps room for it.
    """

    def __init__(self, processor_dir: Path) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        config = _read_json(processor_dir / "tokenizer_config.json")
        self.do_lower_case = bool(config.get("do_lower_case", True))
        proto = sentencepiece_model_pb2.ModelProto.FromString((processor_dir / "spiece.model").read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False  # as SiglipTokenizer.get_spm_processor does
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(proto.SerializeToString())

        def content(token: Any) -> str | None:
            return token.get("content") if isinstance(token, dict) else token

        added = {int(i): t for i, t in (config.get("added_tokens_decoder") or {}).items()}
        if any(t.get("single_word") for t in added.values()):
            # Never in SigLIP checkpoints; make_tokenizer falls back to transformers rather than guess.
            raise NotImplementedError("single_word added tokens")
        self.added = {t["content"]: (i, t) for i, t in added.items()}
        self.eos_token = content(config.get("eos_token", "</s>")) or "</s>"
        self.unk_token = content(config.get("unk_token", "<unk>")) or "<unk>"
        pad_token = content(config.get("pad_token", "</s>")) or self.eos_token
        self.special = {self.eos_token, self.unk_token, pad_token}
        self.special |= {c for t in config.get("additional_special_tokens") or [] if (c := content(t))}
        self.eos_id = self._token_id(self.eos_token)
        self.pad_id = self._token_id(pad_token)
        self.unk_length = len(self.sp.encode(self.unk_token, out_type=str))
        # Lower-casing leaves special tokens and non-special normalised added tokens alone (tokenize()'s pattern).
        keep = sorted(self.special | {c for c, (_, t) in self.added.items() if not t.get("special") and
                                      t.get("normalized", True)}, key=len, reverse=True)
        self._lower_re = re.compile("(" + "|".join(map(re.escape, keep)) + r")|(.+?)") if keep else None
        # Leftmost-longest match over the added tokens, like transformers' Trie.split.
        names = sorted(self.added, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self._punctuation = str.maketrans("", "", string.punctuation)

    def _token_id(self, token: str) -> int:
        return self.added[token][0] if token in self.added else int(self.sp.piece_to_id(token))

    def _sp_tokenize(self, text: str) -> list[str]:
        text = re.sub(r"\s+", " ", text.translate(self._punctuation)).strip()
        pieces = self.sp.encode(self.unk_token + text, out_type=str)
        return pieces[self.unk_length:] if len(pieces) >= self.unk_length else pieces

    def tokenize(self, text: str) -> list[str]:
        text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        if self.do_lower_case and self._lower_re is not None:
            text = self._lower_re.sub(lambda m: m.group(1) or m.group(2).lower(), text)
        parts = [p for p in self._split_re.split(text) if p] if self._split_re else [text]
        for i, part in enumerate(parts):
            if part not in self.added:
                continue
            token = self.added[part][1]
            if token.get("rstrip") and i + 1 < len(parts):
                parts[i + 1] = parts[i + 1].lstrip()
            if token.get("lstrip") and i > 0:
                parts[i - 1] = parts[i - 1].rstrip()
        tokens: list[str] = []
        for part in parts:
            if part in self.added:
                tokens.append(part)
            elif part:
                tokens.extend(self._sp_tokenize(part))
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.special:
            tokens = tokens[1:]
        return tokens

    def ids(self, text: str) -> list[int]:
        """Token ids without the closing ``</s>``."""
        return [self._token_id(t) for t in self.tokenize(text)]

    def with_eos(self, ids: list[int]) -> list[int]:
        return ids if ids and ids[-1] == self.eos_id else [*ids, self.eos_id]

    def encode(self, text: str, max_length: int) -> tuple[list[int], int]:
        """(ids truncated and padded to ``max_length``, token count before truncation and padding)."""
        ids = self.ids(text)
        full = len(self.with_eos(ids))
        truncated = self.with_eos(ids[: max_length - 1]) if len(ids) + 1 > max_length else self.with_eos(ids)
        return truncated + [self.pad_id] * (max_length - len(truncated)), full


class _TransformersTokenizer:
    """Any other tokenizer through transformers (imports torch): only for checkpoints whose tokenizer is not the
    sentencepiece ``SiglipTokenizer`` that :class:`SiglipTokenizer` re-implements."""

    def __init__(self, processor_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(processor_dir))

    def encode(self, text: str, max_length: int) -> tuple[list[int], int]:
        ids = self.tokenizer(text, padding="max_length", truncation=True, max_length=max_length)["input_ids"]
        return list(ids), len(self.tokenizer(text)["input_ids"])


def make_tokenizer(processor_dir: Path) -> SiglipTokenizer | _TransformersTokenizer:
    """The torch-free :class:`SiglipTokenizer` for SigLIP's sentencepiece tokenizer (every google/siglip-*
    checkpoint), transformers for anything else."""
    config_path = processor_dir / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.exists() else {}
    if config.get("tokenizer_class") == "SiglipTokenizer" and (processor_dir / "spiece.model").exists():
        try:
            return SiglipTokenizer(processor_dir)
        except NotImplementedError:
            pass
    return _TransformersTokenizer(processor_dir)


def utf8_texts(raw: list[bytes]) -> list[str]:
    """The strings of a TEXT tensor; InputError (this request only) when one is not UTF-8."""
    try:
        return [t.decode("utf-8") for t in raw]
    except UnicodeDecodeError as exc:
        raise common.InputError(f"TEXT is not valid UTF-8: {exc}") from None


def max_text_length(config: dict[str, Any], params: EmbedParams) -> int:
    """The text models' token length from their config (the contract's ``max_text_length``), which they need."""
    if params.max_text_length is None:
        raise ValueError(f"model {config.get('name')!r}: required parameter 'max_text_length' missing in config")
    return params.max_text_length


class SiglipTextPreprocessor:
    """UTF-8 strings -> ``input_ids`` padded to the model's length (SigLIP pools the last position)."""

    def __init__(self, processor_dir: Path, max_length: int) -> None:
        self.tokenizer = make_tokenizer(processor_dir)
        self.max_length = max_length

    def __call__(self, texts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        strings = utf8_texts(texts)
        encoded = [self.tokenizer.encode(s, self.max_length) for s in strings]
        ids = np.array([e[0] for e in encoded], dtype=np.int64).reshape(len(strings), self.max_length)
        return ids, np.array([e[1] for e in encoded], dtype=np.int32)


class _SiglipModel:
    tensors: type[EmbedImageTensors | EmbedTextTensors]
    encoder_input: str
    encoder_output: str

    def _setup(self, args: dict[str, Any]) -> dict[str, Any]:
        config = common.model_config(args)
        names = {i["name"] for i in config["input"]}
        if names != self.tensors.input_names():
            raise ValueError(f"{config['name']}: expected the inputs {sorted(self.tensors.input_names())}, "
                             f"got {sorted(names)}")
        missing = set(self.tensors.output_names()) - {o["name"] for o in config["output"]}
        if missing:
            raise ValueError(f"{config['name']}: output {', '.join(sorted(missing))} missing from config")
        self.encoder = common.make_encoder(args, config, [self.encoder_output])
        return config

    def _encode(self, inputs: np.ndarray) -> np.ndarray:
        return l2_normalise(self.encoder({self.encoder_input: inputs})[self.encoder_output])


class EmbedImageModel(_SiglipModel):
    """Triton model ``siglip_embed_image``."""

    tensors = EmbedImageTensors
    encoder_input = "pixel_values"
    encoder_output = "image_embeds"

    def initialize(self, args: dict[str, Any]) -> None:
        config = self._setup(args)
        self.preprocess = SiglipImagePreprocessor(
            common.version_dir(args) / "processor",
            EmbedParams.from_config(config).max_pixels,
        )

    def execute(self, requests):
        pb = common.pb_utils

        def prepare(request):
            image = pb.get_input_tensor_by_name(request, EmbedImageTensors.IMAGE.name)
            return self.preprocess(common.as_bytes_list(image.as_numpy()))

        return common.run_batched(requests, prepare, lambda px: {EmbedImageTensors.EMBEDDING.name: self._encode(px)})


class EmbedTextModel(_SiglipModel):
    """Triton model ``siglip_embed_text``."""

    tensors = EmbedTextTensors
    encoder_input = "input_ids"
    encoder_output = "text_embeds"

    def initialize(self, args: dict[str, Any]) -> None:
        config = self._setup(args)
        length = max_text_length(config, EmbedParams.from_config(config))
        self.preprocess = SiglipTextPreprocessor(common.version_dir(args) / "processor", length)

    def execute(self, requests):
        pb = common.pb_utils

        def prepare(request):
            ids, lengths = self.preprocess(
                common.as_bytes_list(pb.get_input_tensor_by_name(request, EmbedTextTensors.TEXT.name).as_numpy())
            )
            # Carry the token counts through the batch as an extra column; split off in compute.
            return np.concatenate([ids, lengths[:, None].astype(np.int64)], axis=1)

        def compute(rows):
            return {EmbedTextTensors.EMBEDDING.name: self._encode(rows[:, :-1]),
                    EmbedTextTensors.NUM_TOKENS.name: rows[:, -1:].astype(np.int32)}

        return common.run_batched(requests, prepare, compute)
