"""The Triton Python models' pure logic (no server): decoding, preprocessing, normalising."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmserve.model_repository import common, siglip


def png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def test_decode_image_accepts_images_and_converts_to_rgb() -> None:
    assert common.decode_image(png(10, 7, "L")).mode == "RGB"


@pytest.mark.parametrize(("data", "match"), [(b"", "empty"), (b"not an image", "not a decodable image")])
def test_decode_image_refuses_bad_bytes(data: bytes, match: str) -> None:
    with pytest.raises(common.InputError, match=match):
        common.decode_image(data)


def test_decode_image_refuses_too_many_pixels() -> None:
    with pytest.raises(common.InputError, match="more than the cap"):
        common.decode_image(png(100, 100), max_pixels=5000)


def test_l2_normalise() -> None:
    out = siglip.l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(out[0], [0.6, 0.8])
    assert np.all(np.isfinite(out[1]))


def test_preprocessors_on_tiny_checkpoint(tiny_repo: Path) -> None:
    image = siglip.SiglipImagePreprocessor(tiny_repo / "siglip_embed_image/1/processor")
    pixels = image([png(50, 30), png(20, 20)])
    assert pixels.shape[:2] == (2, 3) and pixels.dtype == np.float32
    with pytest.raises(common.InputError, match=r"IMAGE\[1\]"):
        image([png(5, 5), b"garbage"])

    text = siglip.SiglipTextPreprocessor(tiny_repo / "siglip_embed_text/1/processor", max_length=16)
    ids, lengths = text([b"a photo of a cat", b"hi"])
    assert ids.shape == (2, 16) and ids.dtype == np.int64
    assert lengths[0] > lengths[1] > 0
    with pytest.raises(common.InputError, match="UTF-8"):
        text([b"\xff\xfe"])


def test_jpeg_decoded_at_reduced_scale_but_never_below_twice_min_size() -> None:
    def jpeg(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (10, 20, 30)).save(buf, "JPEG")
        return buf.getvalue()

    assert common.decode_image(jpeg(2048, 1536)).size == (2048, 1536)
    assert common.decode_image(jpeg(2048, 1536), min_size=224).size == (1024, 768)  # 1/2: 768 >= 2 * 224
    assert common.decode_image(jpeg(4000, 3000), min_size=224).size == (1000, 750)  # 1/4, not 1/8 (375 < 448)
    assert common.decode_image(jpeg(1024, 768), min_size=224).size == (1024, 768)  # 1/2 would give 384 < 448
    assert common.decode_image(png(100, 100), min_size=10).size == (100, 100)  # PNG: no DCT scaling


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA", "1", "L", "I;16", "I", "CMYK"])
def test_decode_image_converts_every_mode_like_the_reference(mode: str) -> None:
    """The reference pipelines do ``Image.open(...).convert("RGB")``: alpha dropped, I;16 clipped, CMYK via PIL."""
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 255, (9, 13, 4), dtype=np.uint8), "RGBA")
    if mode in ("I;16", "I"):
        image = Image.fromarray(rng.integers(0, 1000, (9, 13), dtype=np.uint16)).convert(mode)
    elif mode == "P":
        image = rgba.convert("RGB").quantize(16)
        image.info["transparency"] = 0
    else:
        image = rgba.convert(mode)
    buf = io.BytesIO()
    image.save(buf, "TIFF" if mode in ("CMYK", "I", "PA") else "PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as reference:
        want = np.asarray(reference.convert("RGB"))
    got = common.decode_image(buf.getvalue())
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), want)
