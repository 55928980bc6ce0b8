"""The torch-free SigLIP preprocessing equals transformers' (the reference) exactly, and never imports torch.

``SiglipImageTransform`` vs ``SiglipImageProcessor`` and ``SiglipTokenizer`` vs transformers' ``SiglipTokenizer``
on a tiny checkpoint (random weights do not matter here: only the processor files are used).
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmserve.export import photos
from vlmserve.model_repository import common, siglip

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from vlmserve.export.tiny import build_tiny_siglip

    return build_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip"))


def reference_pixels(processor, data: bytes) -> np.ndarray:
    """The SigLIP embedding service's preprocessing: PIL open + convert RGB + the transformers image processor.

    ``input_data_format`` is stated because transformers otherwise guesses the channel axis from the shape and
    takes an image 1 or 3 pixels high for channels-first (it then fails or transposes; see the module docstring of
    ``vlmserve.model_repository.siglip``), which is a reference bug, not a behaviour to copy.
    """
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    return processor(images=[rgb], return_tensors="np", input_data_format="channels_last")["pixel_values"][0]


def _i16(image: Image.Image) -> Image.Image:
    # 16-bit grayscale with values across 0..1020, so PIL's clip to 0..255 on convert("RGB") is exercised.
    return Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 4)


def encoded(width: int, height: int, fmt: str, mode: str, seed: int) -> bytes:
    image = photos.synthetic_photo(width, height, seed) if seed % 2 else photos.real_photo(width, height, seed)
    if mode == "I;16":
        buf = io.BytesIO()
        _i16(image).save(buf, "PNG")
        return buf.getvalue()
    if mode == "1":
        buf = io.BytesIO()
        image.convert("1").save(buf, fmt)
        return buf.getvalue()
    if mode == "P" and fmt == "PNG":
        # A palette image with a transparent colour (tRNS): PIL drops it on convert("RGB"), as the reference does.
        palette = image.quantize(64, dither=Image.Dither.NONE)
        buf = io.BytesIO()
        palette.save(buf, "PNG", transparency=0)
        return buf.getvalue()
    return photos.encode(image, fmt, mode)


CASES = [
    (1, 1, "PNG", "L"), (1, 1, "PNG", "RGB"), (3, 1, "PNG", "RGBA"), (1, 3, "PNG", "LA"), (2, 3, "JPEG", "RGB"),
    (3, 3, "WEBP", "RGB"), (7, 5, "PNG", "P"), (31, 33, "PNG", "1"), (32, 32, "PNG", "RGB"), (50, 40, "PNG", "I;16"),
    (224, 224, "JPEG", "RGB"), (224, 224, "JPEG", "L"), (224, 224, "JPEG", "CMYK"), (300, 200, "WEBP", "RGBA"),
    (640, 480, "PNG", "RGBA"), (640, 480, "PNG", "LA"), (640, 480, "PNG", "P"), (480, 640, "WEBP", "RGB"),
    (1000, 10, "PNG", "L"), (10, 1000, "JPEG", "RGB"), (1024, 768, "PNG", "I;16"), (1024, 768, "PNG", "1"),
    (2048, 1536, "JPEG", "CMYK"), (4000, 3000, "JPEG", "RGB"), (3000, 4000, "WEBP", "RGB"), (4000, 3000, "PNG", "L"),
]


@pytest.mark.parametrize("config", [
    {},  # the tiny checkpoint's own: 32x32, bicubic, mean/std 0.5
    {"size": {"height": 224, "width": 224}, "resample": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
     "image_std": [0.26862954, 0.26130258, 0.27577711]},
    {"size": {"height": 40, "width": 24}, "resample": 1, "image_mean": 0.5, "image_std": 0.25},
    {"size": {"height": 16, "width": 16}, "resample": 0, "do_normalize": False},
    {"size": {"height": 16, "width": 16}, "resample": 4, "do_rescale": False},
])
def test_image_transform_equals_siglip_image_processor(checkpoint: Path, tmp_path: Path, config) -> None:
    from transformers import SiglipImageProcessor

    base = json.loads((checkpoint / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**base, **config}))
    reference = SiglipImageProcessor.from_pretrained(tmp_path)
    ours = siglip.SiglipImageTransform.from_dir(tmp_path)
    # The big sizes once (the tiny checkpoint's config), the rest with every config: same code path, less CPU.
    cases = CASES if not config else [c for c in CASES if c[0] * c[1] <= 1024 * 768]
    for i, (width, height, fmt, mode) in enumerate(cases):
        data = encoded(width, height, fmt, mode, i)
        want = reference_pixels(reference, data)
        got = ours(common.decode_image(data))
        assert got.dtype == np.float32 and got.shape == want.shape, (width, height, fmt, mode)
        # Same operations in the same dtypes: bit-identical, not just close.
        assert np.array_equal(got, want), (width, height, fmt, mode, float(np.abs(got - want).max()))


def test_preprocessor_matches_reference_for_non_jpeg_and_is_close_for_jpeg(checkpoint: Path) -> None:
    """The served preprocessor: exact for PNG/WebP; JPEG may be decoded at reduced scale (the fidelity fence
    bounds what that does to the embedding), so its pixels only stay close."""
    from transformers import SiglipImageProcessor

    reference = SiglipImageProcessor.from_pretrained(checkpoint)
    pre = siglip.SiglipImagePreprocessor(checkpoint)
    items = [encoded(w, h, f, m, i) for i, (w, h, f, m) in enumerate(CASES) if w * h <= 1024 * 768]
    batch = pre(items)
    assert batch.shape == (len(items), 3, 32, 32) and batch.dtype == np.float32
    for row, data, (_, _, fmt, _) in zip(batch, items, [c for c in CASES if c[0] * c[1] <= 1024 * 768], strict=True):
        diff = np.abs(row - reference_pixels(reference, data))
        if fmt == "JPEG":  # after the /0.5 normalisation 0.02 is 2.5 of 255 levels on average, 0.15 is 19
            assert diff.mean() <= 0.02 and diff.max() <= 0.15, (fmt, float(diff.mean()), float(diff.max()))
        else:
            assert diff.max() == 0, fmt


def test_image_config_errors_are_clear(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 224}}))
    with pytest.raises(ValueError, match="height and width"):
        siglip.SiglipImageTransform.from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": 9}))
    with pytest.raises(ValueError, match="resample"):
        siglip.SiglipImageTransform.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        siglip.SiglipImageTransform.from_dir(tmp_path / "missing")


def _strings() -> list[str]:
    fixed = ["", " ", "a photo of a cat", "A Photo Of A CAT!!", "héllo wörld ÇA VA?", "日本語のテキスト",
             "emoji 🐱🐶 done", "</s>", "hi </s> there", "</s>start", "end</s>", "<unk> x <unk>",
             "  lots   of\n\n spaces\t",
             "İstanbul ΣΑΣ ß", "x" * 500, " ".join(["word"] * 100), "▁under▁score", "mix</s></s>", "tab\there",
             "a,b.c;d:e!f?g", "'quoted' \"double\"", "\u00a0nbsp\u2009thin", "zwj\u200dx", "<s>not special</s>",
             "ＦＵＬＬＷＩＤＴＨ", "e\u0301 combining", "\u0000nul", "Ωmega " * 30]
    rng = random.Random(0)
    alphabet = "abcXYZ .,!?</>sunk\u2581é日🐱\n\tİ"
    return fixed + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(300)]


@pytest.mark.parametrize("max_length", [16, 64])
def test_tokenizer_ids_equal_transformers(checkpoint: Path, max_length: int) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(checkpoint))
    assert type(reference).__name__ == "SiglipTokenizer"
    pre = siglip.SiglipTextPreprocessor(checkpoint, max_length)
    assert isinstance(pre.tokenizer, siglip.SiglipTokenizer)  # the torch-free one, not the fallback
    strings = _strings()
    ids, lengths = pre([s.encode() for s in strings])
    want = reference(strings, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    mismatched = [s for s, a, b in zip(strings, ids, want["input_ids"], strict=True) if not np.array_equal(a, b)]
    assert not mismatched, mismatched[:5]
    assert ids.dtype == np.int64 and ids.shape == (len(strings), max_length)
    want_lengths = [len(reference(s)["input_ids"]) for s in strings]
    assert lengths.tolist() == want_lengths
    assert max(want_lengths) > max_length  # truncation was exercised


def test_torch_and_transformers_never_imported(checkpoint: Path) -> None:
    """The Triton stubs of siglip_embed_image/_text import only this module (and runtime): no torch in them."""
    code = textwrap.dedent(f"""
        import io, sys
        from pathlib import Path
        from PIL import Image
        from vlmserve.model_repository import siglip
        buf = io.BytesIO(); Image.new("RGBA", (40, 30), (1, 2, 3, 4)).save(buf, "PNG")
        pixels = siglip.SiglipImagePreprocessor(Path({str(checkpoint)!r}))([buf.getvalue()])
        ids, n = siglip.SiglipTextPreprocessor(Path({str(checkpoint)!r}), 16)([b"a photo of a cat"])
        assert pixels.shape == (1, 3, 32, 32) and ids.shape == (1, 16) and n[0] > 0
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_unsupported_tokenizer_falls_back_to_transformers(checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint whose tokenizer the torch-free one does not cover still serves (through transformers)."""
    import shutil

    for name in ("spiece.model", "special_tokens_map.json"):
        shutil.copy(checkpoint / name, tmp_path / name)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["1"]["single_word"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = siglip.make_tokenizer(tmp_path)
    assert not isinstance(tokenizer, siglip.SiglipTokenizer)
    ids, count = tokenizer.encode("a photo of a cat", 16)
    assert len(ids) == 16 and count > 1
    assert isinstance(siglip.make_tokenizer(checkpoint), siglip.SiglipTokenizer)
