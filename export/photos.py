"""Realistic inputs, offline: photo-like images and natural sentences for export's runtime choice (fidelity
against the fp32 reference, timing), the benchmark and the fidelity tests. Gaussian noise is a poor stand-in:
it has no edges, smooth regions or colour structure, so precision losses that show on photos can hide in it.


``photo_jpeg`` is the synthetic photo the bench users send (gradient sky, shapes, noise). ``real_photo`` is a real
photograph that ships inside matplotlib (``grace_hopper.jpg``, 512x600), cropped and resized to any size with a
little sensor-like noise so that large sizes still carry pixel-level detail (an upscaled photo alone is too smooth
to exercise JPEG's reduced-scale decoding or the resize filter). ``encode`` writes an image in a file format and a
PIL mode the way clients' files come: RGB, RGBA (with a real alpha channel), grayscale L, JPEG CMYK, palette...
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

# The real photographs in matplotlib's sample data (the other sample images are drawings and logos).
SAMPLE_PHOTOS = ("grace_hopper.jpg",)


def synthetic_photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: gradient sky, coloured ellipses, Gaussian noise (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    base = (np.array([90, 140, 220]) * (1 - y) + np.array([230, 200, 160]) * y).astype(np.float32)
    pixels = np.clip(np.broadcast_to(base, (height, width, 3)) + rng.normal(0, 12, (height, width, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, max(1, width - 10))), int(rng.integers(0, max(1, height - 10)))
        x1, y1 = x0 + int(rng.integers(10, max(11, width // 3))), y0 + int(rng.integers(10, max(11, height // 3)))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return image


SENTENCES = (
    "a photo of a dog playing in the snow",
    "two people walking on a beach at sunset",
    "an invoice with a table of items and a total at the bottom",
    "a close-up of a red apple on a wooden table",
    "the skyline of a city at night with lights reflecting in the river",
    "a handwritten note that says meet me at noon",
    "a cat sleeping on a laptop keyboard",
    "a bowl of ramen with an egg and green onions",
)
SIZES = ((640, 480), (1024, 768), (300, 400), (224, 224), (1600, 1200), (800, 600))


def photos(count: int, seed: int = 0) -> list[Image.Image]:
    """``count`` RGB images of varied sizes, alternating the real photograph (when matplotlib is installed)
    and synthetic ones."""
    import importlib.util

    has_real = importlib.util.find_spec("matplotlib") is not None
    out = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        real = has_real and i % 2 == 0
        out.append(real_photo(width, height, seed + i) if real else synthetic_photo(width, height, seed + i))
    return out


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """:func:`synthetic_photo` as a quality-90 JPEG (the bench's request image: realistic decode/resize cost)."""
    return encode(synthetic_photo(width, height, seed), "JPEG")


def real_photo(width: int, height: int, seed: int = 0, name: str = SAMPLE_PHOTOS[0]) -> Image.Image:
    """matplotlib's sample photograph ``name``, centre-cropped to the aspect ratio and resized to width x height."""
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data(name, asfileobj=False)) as src:
        photo = src.convert("RGB")
    aspect = width / height
    w, h = photo.size
    if w / h > aspect:
        crop_w = max(1, round(h * aspect))
        box = ((w - crop_w) // 2, 0, (w - crop_w) // 2 + crop_w, h)
    else:
        crop_h = max(1, round(w / aspect))
        box = (0, (h - crop_h) // 2, w, (h - crop_h) // 2 + crop_h)
    resized = photo.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    noise = np.random.default_rng(seed).normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(resized, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def with_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` (RGB) in PIL ``mode``; RGBA/LA get a real alpha ramp (transparent left edge, opaque right)."""
    if mode in ("RGBA", "LA"):
        alpha = np.broadcast_to(np.linspace(0, 255, image.width, dtype=np.float32)[None, :],
                                (image.height, image.width)).astype(np.uint8)
        out = image.convert(mode[:-1]).convert(mode)
        out.putalpha(Image.fromarray(alpha))
        return out
    if mode == "P":
        return image.quantize(256, dither=Image.Dither.NONE)
    return image.convert(mode)


def encode(image: Image.Image, fmt: str, mode: str = "RGB", quality: int = 90) -> bytes:
    """``image`` converted to ``mode`` and saved as ``fmt`` (JPEG has no alpha: use RGB, L or CMYK with it)."""
    buf = io.BytesIO()
    converted = with_mode(image, mode)
    converted.save(buf, fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()
