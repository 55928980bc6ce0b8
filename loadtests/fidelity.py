"""Served SigLIP image embeddings vs the transformers reference pipeline: cosine per image, summary per format/mode.

The reference is how the SigLIP embedding service (and ``loadtests/baseline``) embed an image:
``PIL.Image.open(...).convert("RGB")``,
the checkpoint's ``AutoProcessor`` and ``SiglipModel.get_image_features`` in eager PyTorch fp32, L2-normalised.
vlmserve's path differs in every step (gateway validation, JPEG reduced-scale decoding, the numpy preprocessing of
``vlmserve.model_repository.siglip``, the ONNX encoder), so the cosine between the two is the end-to-end fidelity.

    python -m vlmserve.loadtests.fidelity --gateway http://127.0.0.1:8000 --checkpoint DIR [--local-dir DIR]

prints one JSON line per format/mode (``min_cosine``, ``mean_cosine``, ``images``) for the bench report.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from vlmserve.export import photos

DEFAULT_SIZES = ((224, 224), (640, 480), (1024, 768), (2048, 1536), (4000, 3000), (3000, 4000))
# The gateway refuses images over 20 MiB (``max_image_bytes``): a noisy 4000x3000 PNG is ~30 MB, so PNG stops
# at 2048x1536 here. JPEG has no alpha channel; CMYK is the JPEG flavour print workflows produce.
_PNG_MAX_PIXELS = 2048 * 1536
_MAX_PER_REQUEST = 8


@dataclass(frozen=True)
class FidelityImage:
    """One encoded image and what it is (for the per-format/mode summary)."""

    data: bytes
    format: str
    mode: str
    width: int
    height: int
    source: str

    @property
    def label(self) -> str:
        return f"{self.source} {self.width}x{self.height} {self.format} {self.mode}"


def fence_images(sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES, seed: int = 0) -> list[FidelityImage]:
    """The standard set: each size in JPEG (RGB, L, CMYK), PNG (RGB, RGBA, L, P) and WebP (RGB, RGBA), from a
    real photograph and the synthetic generator in turn (deterministic for ``seed``)."""
    combos = [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"),
              ("PNG", "P"), ("WEBP", "RGB"), ("WEBP", "RGBA")]
    images = []
    for i, (width, height) in enumerate(sizes):
        real = photos.real_photo(width, height, seed + i)
        synthetic = photos.synthetic_photo(width, height, seed + i)
        for j, (fmt, mode) in enumerate(combos):
            if fmt == "PNG" and width * height > _PNG_MAX_PIXELS:
                continue
            source, image = ("photo", real) if (i + j) % 2 == 0 else ("synthetic", synthetic)
            images.append(FidelityImage(photos.encode(image, fmt, mode), fmt, mode, width, height, source))
    return images


def reference_embeddings(checkpoint_dir: Path, images: Sequence[bytes]) -> np.ndarray:
    """The SigLIP embedding service's pipeline: PIL open + convert RGB, the checkpoint's AutoProcessor, SiglipModel
    fp32, L2-normalised."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, SiglipModel

    processor = AutoProcessor.from_pretrained(str(checkpoint_dir))
    model = SiglipModel.from_pretrained(str(checkpoint_dir), dtype=torch.float32).eval()
    out = []
    for data in images:  # one at a time, as the seed serves them
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
        inputs = processor(images=[rgb], return_tensors="pt")
        with torch.no_grad():
            features = model.get_image_features(pixel_values=inputs["pixel_values"])
        out.append(torch.nn.functional.normalize(features, dim=-1)[0].numpy())
    return np.stack(out).astype(np.float32)


def served_embeddings(gateway_url: str, images: Sequence[bytes], model: str | None = None,
                      local_dir: Path | None = None, timeout_s: float = 120.0) -> np.ndarray:
    """``POST /embed`` on the gateway. Data URIs by default; with ``local_dir`` (a folder the gateway may read,
    its ``local_image_dir``) the images are written there and sent by path, for images bigger than the body cap."""
    vectors: list[list[float]] = []
    written: list[Path] = []
    try:
        with httpx.Client(base_url=gateway_url, timeout=timeout_s) as client:
            for start in range(0, len(images), _MAX_PER_REQUEST):
                refs = []
                for data in images[start:start + _MAX_PER_REQUEST]:
                    if local_dir is None:
                        refs.append("data:image/*;base64," + base64.b64encode(data).decode())
                        continue
                    fd, name = tempfile.mkstemp(prefix="fidelity-", suffix=".img", dir=local_dir)
                    with open(fd, "wb") as f:
                        f.write(data)
                    written.append(Path(name))
                    refs.append(name)
                body: dict[str, Any] = {"images": refs, **({"model": model} if model else {})}
                response = client.post("/embed", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"POST /embed: HTTP {response.status_code}: {response.text[:300]}")
                vectors.extend(response.json())
    finally:
        for path in written:
            path.unlink(missing_ok=True)
    return np.array(vectors, dtype=np.float32)


def served_vs_reference(gateway_url: str, checkpoint_dir: str | Path, images: Sequence[FidelityImage],
                        model: str | None = None, local_dir: Path | None = None) -> list[dict[str, Any]]:
    """One row per image: what it is and the cosine between the served and the reference embedding."""
    data = [image.data for image in images]
    served = served_embeddings(gateway_url, data, model, local_dir)
    reference = reference_embeddings(Path(checkpoint_dir), data)
    if served.shape != reference.shape:
        raise RuntimeError(f"served embeddings {served.shape} vs reference {reference.shape}")
    served = served / np.linalg.norm(served, axis=1, keepdims=True)
    cosines = np.sum(served * reference, axis=1)
    return [{"label": image.label, "format": image.format, "mode": image.mode, "width": image.width,
             "height": image.height, "source": image.source, "bytes": len(image.data), "cosine": float(c)}
            for image, c in zip(images, cosines, strict=True)]


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Min/mean cosine per (format, mode): the bench line."""
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        groups.setdefault((row["format"], row["mode"]), []).append(row["cosine"])
    return [{"format": fmt, "mode": mode, "images": len(c), "min_cosine": round(min(c), 6),
             "mean_cosine": round(float(np.mean(c)), 6)} for (fmt, mode), c in sorted(groups.items())]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", required=True, help="gateway base URL")
    parser.add_argument("--checkpoint", required=True, type=Path, help="the SigLIP checkpoint the server exported")
    parser.add_argument("--model", default=None, help="model name for POST /embed (default: the gateway's)")
    parser.add_argument("--local-dir", type=Path, default=None, help="the gateway's local_image_dir (send by path)")
    parser.add_argument("--min-cosine", type=float, default=0.999, help="exit 1 when any image is below this")
    args = parser.parse_args(argv)
    rows = served_vs_reference(args.gateway, args.checkpoint, fence_images(), args.model, args.local_dir)
    for line in summarise(rows):
        print(json.dumps(line))
    return 0 if min(r["cosine"] for r in rows) >= args.min_cosine else 1


if __name__ == "__main__":
    raise SystemExit(main())
