"""The bulk client's speed: ``vlmserve-client embed`` over a folder of JPEGs, against a running gateway.

Makes ``--images`` 640x480 JPEGs in a temporary folder, then runs the command with fresh outputs: the defaults
twice (the first run also warms the gateway), then ``--concurrency 1``, ``--concurrency 8`` and
``--batch-size 1`` to compare. Prints each run's summary line (done, images/s, requests) and writes
``loadtests/reports/client-embed.{md,json}``.

Run: ``python -m vlmserve.loadtests.client_bench --base-url http://127.0.0.1:8080 --images 200``.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlmserve.host import serving_cpu

REPORTS = Path(__file__).parent / "reports"
SETTINGS = [[], [], ["--concurrency", "1"], ["--concurrency", "8"], ["--batch-size", "1"]]


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = (rng.random((480, 640, 3)) * 64 + np.linspace(0, 190, 640)[None, :, None]).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=85)
        (folder / f"{i:04d}.jpg").write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--model", default=None, help="embedding model (default: the gateway's)")
    parser.add_argument("--name", default="client-embed")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        make_images(folder, args.images)
        for index, extra in enumerate(SETTINGS):
            out = Path(tmp) / f"run{index}.npy"
            command = [sys.executable, "-m", "vlmserve_client", "embed", str(folder), "--out", str(out),
                       "--base-url", args.base_url, "--quiet", *(["--model", args.model] if args.model else []),
                       *extra]
            result = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
            last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
            rate = re.search(r"([\d.]+) images/s", last)
            runs.append({"settings": " ".join(extra) or "defaults", "exit": result.returncode, "summary": last,
                         "images_per_s": float(rate.group(1)) if rate else None})
            print(json.dumps(runs[-1]), flush=True)
    report = {"cpu": serving_cpu().summary, "images": args.images, "image": "640x480 JPEG", "runs": runs}
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# `vlmserve-client embed`: {args.images} JPEGs (640x480)", "", f"Host: {report['cpu']}.", "",
             "| settings | images/s | summary |", "|---|---|---|"]
    lines += [f"| {r['settings']} | {r['images_per_s']} | `{r['summary']}` |" for r in runs]
    (REPORTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
