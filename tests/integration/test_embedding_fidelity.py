"""The end-to-end fidelity fence: ``POST /embed`` vs the transformers reference pipeline, image by image.

The reference is the SigLIP embedding service's way (PIL ``Image.open`` + ``convert("RGB")``, the checkpoint's
``AutoProcessor``,
``SiglipModel.get_image_features`` in torch fp32, L2-normalised); the served path is the gateway, Triton, JPEG
reduced-scale decoding, the numpy preprocessing and the ONNX encoder. Photos from 224 px to 4000 px, as JPEG (RGB,
grayscale L, CMYK), PNG (RGB, RGBA, L, palette) and WebP (RGB, RGBA); see ``vlmserve.loadtests.fidelity.fence_images``.

The tiny SigLIP has random weights, so the cosine measures numerics (decode, resize, normalisation, encoder), not
semantic quality: any preprocessing mismatch (a wrong filter, channel order, alpha handling, colour conversion or
a too-aggressive reduced-scale decode) moves a random-weight embedding as much as a trained one, or more.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlmserve import paths
from vlmserve.export import photos
from vlmserve.loadtests import fidelity

pytestmark = pytest.mark.integration

MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def rows(stack) -> list[dict]:
    images = fidelity.fence_images()
    # By path: the 4000 px JPEGs are bigger than the test gateway's 4 MiB body cap as data URIs.
    return fidelity.served_vs_reference(stack.gateway, paths.tiny_models_dir() / "siglip", images,
                                        local_dir=stack.image_dir)


def test_every_image_matches_the_reference(rows) -> None:
    for line in fidelity.summarise(rows):
        print(json.dumps(line))  # the bench line, visible with -s
    worst = sorted(rows, key=lambda r: r["cosine"])[:5]
    assert all(r["cosine"] >= MIN_COSINE for r in rows), [(r["label"], round(r["cosine"], 6)) for r in worst]


def test_the_fence_covers_sizes_formats_and_modes(rows) -> None:
    summary = fidelity.summarise(rows)
    combos = {(s["format"], s["mode"]) for s in summary}
    assert {("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGBA"), ("PNG", "L"), ("WEBP", "RGB")} <= combos
    assert min(r["width"] * r["height"] for r in rows) == 224 * 224
    assert max(r["width"] * r["height"] for r in rows) == 4000 * 3000
    assert {r["source"] for r in rows} == {"photo", "synthetic"}
    assert all(s["min_cosine"] >= MIN_COSINE for s in summary)


def test_the_threshold_catches_preprocessing_mistakes(tiny_repo) -> None:
    """The fence can fail: mistakes a preprocessing rewrite could make move the tiny model's embedding below it."""
    photo = photos.real_photo(640, 480, 7)
    pixels = np.asarray(photo)
    mistakes = {
        "BGR channel order": Image.fromarray(np.ascontiguousarray(pixels[..., ::-1])),
        "8 levels brighter (a rescale/offset slip)": Image.fromarray(np.clip(pixels.astype(int) + 8, 0, 255)
                                                                   .astype(np.uint8)),
        "bilinear instead of bicubic": photo.resize((32, 32), Image.Resampling.BILINEAR),
    }
    encoded = [photos.encode(photo, "PNG")] + [photos.encode(m, "PNG") for m in mistakes.values()]
    embeddings = fidelity.reference_embeddings(paths.tiny_models_dir() / "siglip", encoded)
    cosines = dict(zip(mistakes, (embeddings[1:] @ embeddings[0]).tolist(), strict=True))
    assert all(c < MIN_COSINE for c in cosines.values()), cosines
