"""``vlmserve-client embed|caption|ocr`` against the real stack (tiny models), run as users run it
(``python -m vlmserve_client``, a subprocess): a folder to ``.npy`` + index and to Parquet, the vectors equal to
the client's own ``/embed`` answers, resume without a request for a finished file, a bad file in the errors file
with its reason, one line per image for caption and OCR, progress and a summary on stderr.

``VLMSERVE_CLI_BENCH_IMAGES=200`` adds a throughput run (skipped otherwise): the images/s it prints are the
figure the client README quotes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vlmserve_client import EmbeddingsClient

from tests.integration.test_readme import _localise
from vlmserve.paths import PROJECT_ROOT

pytestmark = pytest.mark.integration

TINY_SIGLIP = "vlmserve/tiny-siglip"
CLIENT_DIR = PROJECT_ROOT / "clients" / "python"


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The command in a subprocess, with this interpreter and this process's PYTHONPATH (the client it tests)."""
    return subprocess.run([sys.executable, "-m", "vlmserve_client", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def summary(stderr: str) -> dict[str, int]:
    match = re.search(r"done (\d+), skipped (\d+) \((\d+) already done, (\d+) known bad\), failed (\d+), "
                      r"[\d.]+ images/s \(\d+ in [\d.]+ s, (\d+) requests", stderr)
    assert match, stderr
    keys = ("done", "skipped", "already_done", "known_bad", "failed", "requests")
    return dict(zip(keys, map(int, match.groups()), strict=True))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Nine small images in nested folders (PNG and JPEG), a text file the walk leaves out."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "2024" / "summer").mkdir(parents=True)
    for i in range(9):
        sub = folder / ("2024/summer" if i % 3 == 0 else "2024" if i % 3 == 1 else ".")
        img = Image.new("RGB", (40 + 8 * i, 30 + 4 * i), (25 * i, 200 - 20 * i, 90))
        img.save(sub / f"img{i}.{'jpg' if i % 2 else 'png'}")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_embed_folder_to_npy_then_resume(stack, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "vectors.npy"
    first = cli("embed", str(photos), "--out", str(out), "--base-url", stack.gateway, "--model", TINY_SIGLIP)
    assert first.returncode == 0, first.stderr
    counts = summary(first.stderr)
    assert counts["done"] == 9 and counts["failed"] == 0 and counts["skipped"] == 0
    assert counts["requests"] >= 1
    # progress on stderr (not a terminal: whole lines), with the rate and the ETA
    assert re.search(r"\[#+\] 9/9 100%\s+[\d.]+ images/s\s+ETA", first.stderr), first.stderr
    array = np.load(out)
    index = read_jsonl(tmp_path / "vectors.index.jsonl")
    paths = [e["path"] for e in index]
    assert array.shape[0] == 9 and [e["row"] for e in index] == list(range(9))
    assert paths == sorted(paths) and all(p.endswith((".png", ".jpg")) for p in paths)
    with EmbeddingsClient(stack.gateway) as client:
        expected = client.embed_images([Path(p) for p in paths], model=TINY_SIGLIP)
    assert np.allclose(array, np.asarray(expected, dtype=np.float32), atol=1e-5)

    # the same command again: nothing to do, no request sent, the output unchanged
    again = cli("embed", str(photos), "--out", str(out), "--base-url", stack.gateway, "--model", TINY_SIGLIP)
    assert again.returncode == 0, again.stderr
    assert summary(again.stderr) == {"done": 0, "skipped": 9, "already_done": 9, "known_bad": 0, "failed": 0,
                                     "requests": 0}
    assert np.array_equal(np.load(out), array)

    # a run cut short (only some files done) is finished by the next one, which sends only the rest
    partial = tmp_path / "partial.npy"
    some = cli("embed", *paths[:4], "--out", str(partial), "--base-url", stack.gateway, "--model", TINY_SIGLIP)
    assert some.returncode == 0 and summary(some.stderr)["done"] == 4, some.stderr
    rest = cli("embed", str(photos), "--out", str(partial), "--base-url", stack.gateway, "--model", TINY_SIGLIP)
    assert summary(rest.stderr)["done"] == 5 and summary(rest.stderr)["already_done"] == 4, rest.stderr
    assert np.allclose(np.load(partial), array, atol=1e-6)
    assert [e["path"] for e in read_jsonl(tmp_path / "partial.index.jsonl")] == paths


def test_bad_files_land_in_the_errors_file(stack, photos: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for src in sorted(photos.rglob("*.png"))[:3]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated, not an image")
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "mixed.npy"
    result = cli("embed", str(folder), "--out", str(out), "--base-url", stack.gateway, "--batch-size", "8")
    assert result.returncode == 1, result.stderr
    assert summary(result.stderr)["done"] == 3 and summary(result.stderr)["failed"] == 2
    assert "mixed.errors.jsonl" in result.stderr
    errors = {Path(e["path"]).name: e for e in read_jsonl(tmp_path / "mixed.errors.jsonl")}
    assert set(errors) == {"broken.png", "empty.jpg"}
    assert errors["empty.jpg"]["reason"] == "empty file"
    # the gateway refused the one image of the batch; the others of that batch were embedded
    broken = errors["broken.png"]
    assert broken["status"] == 415 and "not a decodable image" in broken["reason"] and not broken["transient"]
    assert np.load(out).shape[0] == 3
    # a second run leaves the known bad files alone
    again = cli("embed", str(folder), "--out", str(out), "--base-url", stack.gateway)
    assert again.returncode == 0 and summary(again.stderr)["known_bad"] == 2 and summary(again.stderr)["requests"] == 0


def test_embed_to_parquet_and_through_the_openai_route(stack, photos: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    native = tmp_path / "native.parquet"
    result = cli("embed", str(photos), "--out", str(native), "--base-url", stack.gateway, "--model", TINY_SIGLIP,
                 "--quiet")
    assert result.returncode == 0 and summary(result.stderr)["done"] == 9, result.stderr
    assert "ETA" not in result.stderr  # --quiet: the summary only
    openai = tmp_path / "openai.parquet"
    result = cli("embed", str(photos), "--out", str(openai), "--api", "openai", "--model", TINY_SIGLIP,
                 "--base-url", stack.gateway + "/v1", "--concurrency", "2")
    assert result.returncode == 0 and summary(result.stderr)["done"] == 9, result.stderr
    a, b = pq.read_table(native), pq.read_table(openai)
    assert a.column("path").to_pylist() == b.column("path").to_pylist()
    assert a.num_rows == 9 and set(a.column_names) == {"path", "size", "mtime", "embedding"}
    assert np.allclose(np.asarray(a.column("embedding").to_pylist()), np.asarray(b.column("embedding").to_pylist()),
                       atol=1e-5)


@pytest.mark.parametrize(("command", "options"), [("caption", ["--max-new-tokens", "4"]),
                                                  ("ocr", ["--max-tokens", "3", "--language", "english"])])
def test_caption_and_ocr_write_one_line_per_image(stack, photos: Path, tmp_path: Path, command: str,
                                                  options: list[str]) -> None:
    out = tmp_path / f"{command}.jsonl"
    images = sorted(str(p) for p in photos.rglob("*.png"))[:3]
    result = cli(command, *images, "--out", str(out), "--base-url", stack.gateway, *options)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out)
    assert [r["path"] for r in rows] == images
    assert all(isinstance(r["text"], str) and r["model"] for r in rows)
    again = cli(command, *images, "--out", str(out), "--base-url", stack.gateway, *options)
    assert summary(again.stderr)["already_done"] == 3 and len(read_jsonl(out)) == 3


# --- the client README's command-line examples ---------------------------------------------------------------

README_BASH = re.findall(r"```bash\n(.*?)```", (CLIENT_DIR / "README.md").read_text(), flags=re.S)


def test_client_readme_has_command_examples() -> None:
    assert len(README_BASH) >= 2 and all("vlmserve-client" in block for block in README_BASH)


@pytest.mark.parametrize("index", range(len(README_BASH)))
def test_client_readme_command_example_runs(index: int, stack, tmp_path: Path) -> None:
    # `vlmserve-client` and `python` as the examples call them: this interpreter, with the client it tests
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vlmserve-client").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m vlmserve_client "$@"\n')
    (bin_dir / "vlmserve-client").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    # the commands without --base-url use VLMSERVE_BASE_URL (the test stack), as `make demo`'s port 8080 would
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path),
           "VLMSERVE_BASE_URL": stack.gateway}
    code = _localise(README_BASH[index], stack)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, f"client README command {index} failed:\n{code}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), "example printed nothing"
    assert "failed 0" in result.stderr, result.stderr
