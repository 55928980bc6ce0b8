"""Realistic inputs for fidelity checks and load tests, offline: photo-like images and natural sentences.

Gaussian noise is a poor stand-in for what a model serves: it has no edges, no smooth regions and no colour
structure, so precision losses that show on real photos can hide in it. These are built from a fixed seed.
A real photograph ships with matplotlib (``grace_hopper.jpg``); it is used when matplotlib is installed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

SENTENCES = [
    "a photo of a dog playing in the snow",
    "two people walking on a beach at sunset",
    "an invoice with a table of items and a total at the bottom",
    "a close-up of a red apple on a wooden table",
    "the skyline of a city at night with lights reflecting in the river",
    "a handwritten note that says meet me at noon",
    "a cat sleeping on a laptop keyboard",
    "a bowl of ramen with an egg and green onions",
]


def synthetic_photo(width: int, height: int, seed: int):
    """A photo-like RGB PIL image: graded sky and ground, soft shapes, sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    top, bottom = rng.uniform(40, 230, 3), rng.uniform(40, 230, 3)
    base = top * (1 - y) + bottom * y
    pixels = np.clip(np.broadcast_to(base, (height, width, 3)) + rng.normal(0, 10, (height, width, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(10):
        x0, y0 = int(rng.integers(0, max(1, width - 4))), int(rng.integers(0, max(1, height - 4)))
        x1 = x0 + int(rng.integers(2, max(3, width // 3)))
        y1 = y0 + int(rng.integers(2, max(3, height // 3)))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(radius=max(width, height) / 800))


def sample_photo() -> Path | None:
    """matplotlib's ``grace_hopper.jpg`` (a real 512x600 photograph), when matplotlib is installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return path if path.exists() else None


def photos(count: int, seed: int = 0) -> list:
    """``count`` RGB PIL images of varied sizes: the real photo (cropped differently) and synthetic ones."""
    from PIL import Image

    sizes = [(640, 480), (1024, 768), (300, 400), (224, 224), (1600, 1200), (800, 600)]
    real = sample_photo()
    out = []
    for i in range(count):
        if real is not None and i % 2 == 0:
            image = Image.open(real).convert("RGB")
            w, h = image.size
            box = (i * 7 % 60, i * 11 % 80, w - i * 5 % 50, h - i * 13 % 70)
            out.append(image.crop(box))
        else:
            out.append(synthetic_photo(*sizes[i % len(sizes)], seed=seed + i))
    return out


def encode(image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()
