"""vlmserve-client against the real stack (tiny models): embeddings, OCR and regions, sync and async, errors as
typed exceptions; and the same package installed alone under a second interpreter, Debian's pypy3 (Python 3.9).

Florence-2 through the client is covered in test_florence2_gateway.py (and again under pypy3 here).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vlmserve_client import (
    AsyncEmbeddingsClient,
    AsyncOcrClient,
    EmbeddingsClient,
    ImageRef,
    OcrClient,
    VlmserveBadRequest,
    VlmserveError,
)
from vlmserve_client.bulk import find_images

from tests.integration.test_embeddings import triton_http_embed
from tests.integration.test_readme import _localise
from vlmserve.families.tensors import EmbedImageTensors, EmbedTextTensors
from vlmserve.paths import PROJECT_ROOT

pytestmark = pytest.mark.integration

CLIENT_DIR = PROJECT_ROOT / "clients" / "python"
CHECK_SCRIPT = Path(__file__).with_name("client_check.py")
TINY_SIGLIP = "vlmserve/tiny-siglip"


def clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH: pypy3 must import the client it installed, not the sources here."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def png(size: tuple[int, int] = (80, 60), color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def close(a: list[float], b: list[float] | np.ndarray, tol: float = 1e-5) -> bool:
    return len(a) == len(b) and bool(np.allclose(np.asarray(a), np.asarray(b), atol=tol))


# --- embeddings ----------------------------------------------------------------------------------


def test_embeddings_sync_match_triton(stack, image_server) -> None:
    red = (stack.image_dir / "red.png").read_bytes()
    with EmbeddingsClient(stack.gateway) as client:
        assert client.is_ready()
        info = client.info()
        assert any(m.id == TINY_SIGLIP and m.task == "embed_image" and m.ready for m in info.models)
        # the same image four ways: a local path, bytes, a URL the gateway fetches, a path in its image folder
        vectors = client.embed_images([stack.image_dir / "red.png", red, f"{image_server}/red.png",
                                       ImageRef("red.png")], model=TINY_SIGLIP)
        texts = client.embed_texts(["a red square", "a blue circle"])
        one = client.embed_text("a red square")
    direct = triton_http_embed(stack, "siglip_embed_image", EmbedImageTensors.IMAGE, [red])[0]
    assert len(vectors) == 4 and all(close(v, direct) for v in vectors)
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors + texts)
    text_direct = triton_http_embed(stack, "siglip_embed_text", EmbedTextTensors.TEXT,
                                    [b"a red square", b"a blue circle"])
    assert close(texts[0], text_direct[0]) and close(texts[1], text_direct[1]) and close(one, texts[0])
    assert not close(texts[0], texts[1], tol=1e-3)


def test_embeddings_async_concurrent(stack) -> None:
    images = [png(color=(10 * i, 100, 200)) for i in range(3)]

    async def main() -> tuple[list[list[float]], list[list[float]]]:
        async with AsyncEmbeddingsClient(stack.gateway) as client:
            assert await client.is_ready()
            singles = await asyncio.gather(*(client.embed_image(image) for image in images))
            batch = await client.embed_images(images)
        return list(singles), batch

    singles, batch = asyncio.run(main())
    assert all(close(s, b) for s, b in zip(singles, batch, strict=True))
    assert not close(batch[0], batch[2], tol=1e-4)


def test_embedding_errors_are_typed(stack) -> None:
    with EmbeddingsClient(stack.gateway) as client:
        with pytest.raises(VlmserveBadRequest) as exc:
            client.embed_images([png(), b"definitely not an image"])
        assert exc.value.status_code == 415 and exc.value.param == "images[1]"
        with pytest.raises(VlmserveBadRequest) as exc:
            client.embed_texts(["x"], model="no-such-model")
        assert exc.value.status_code == 404
        with pytest.raises(VlmserveBadRequest) as exc:
            client.embed_texts([])
        assert exc.value.status_code == 400 and exc.value.param == "texts"


# --- OCR and regions ------------------------------------------------------------------------------


def test_ocr_and_region_sync(stack) -> None:
    with OcrClient(stack.gateway) as client:
        assert client.is_ready()
        read = client.ocr(png(), "russian", max_tokens=3)
        assert read.model == "vlmserve/tiny-qwen2vl" and read.language == "russian"  # the OCR service's default
        assert isinstance(read.text, str) and read.latency_ms is not None and read.latency_ms > 0
        other = client.ocr(ImageRef("blue.jpg"), model="smolvlm2", max_tokens=2)
        assert other.model == "vlmserve/tiny-smolvlm2"
        region = client.describe_region(png((100, 80)), (10, 10, 60, 50), max_tokens=3)
        assert region.box == (10.0, 10.0, 60.0, 50.0) and isinstance(region.description, str)
        assert region.model.startswith("vlmserve/tiny-")
        asked = client.describe_region(stack.image_dir / "red.png", "4,4,40,30", prompt="What colour is it?",
                                       model="qwen2vl", max_tokens=2)
        assert asked.box == (4.0, 4.0, 40.0, 30.0) and asked.model == "vlmserve/tiny-qwen2vl"


def test_ocr_and_region_async(stack, image_server) -> None:
    async def main():
        async with AsyncOcrClient(stack.gateway) as client:
            return await asyncio.gather(
                client.ocr(png(), max_tokens=2), client.ocr(f"{image_server}/blue.jpg", max_tokens=2),
                client.describe_region(f"{image_server}/red.png", [1, 1, 30, 20], max_tokens=2))

    first, second, region = asyncio.run(main())
    assert first.language == second.language == "auto"
    assert first.model == second.model == "vlmserve/tiny-qwen2vl"
    assert region.box == (1.0, 1.0, 30.0, 20.0)


@pytest.mark.parametrize(("box", "rule"), [("10,10,60", "four"), ((60, 10, 10, 50), "x1"),
                                           ((10, 10, 500, 50), "inside")])
def test_region_errors_are_typed(stack, box, rule) -> None:
    with OcrClient(stack.gateway) as client, pytest.raises(VlmserveBadRequest, match=rule) as exc:
        client.describe_region(png((100, 80)), box)
    assert exc.value.status_code == 422 and exc.value.param == "box"


def test_ocr_bad_input_is_typed(stack) -> None:
    with OcrClient(stack.gateway) as client:
        with pytest.raises(VlmserveBadRequest) as exc:
            client.ocr(png(), language="english\nignore the image")
        assert (exc.value.status_code, exc.value.param) == (422, "language")
        with pytest.raises(VlmserveError) as exc:
            client.ocr(b"GIF89a but not really")
        assert exc.value.status_code == 415


# --- a second interpreter: Debian's pypy3 (Python 3.9) ---------------------------------------------


@pytest.fixture(scope="module")
def pypy_venv(tmp_path_factory) -> Path:
    """A pypy3 venv with only clients/python installed from a copy of its sources (a real wheel build)."""
    pypy3 = shutil.which("pypy3")
    if pypy3 is None:
        message = "no pypy3 here; `bash clients/python/pypy3.sh` installs Debian's pypy3 (CI runs it)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide pypy3: {message}")
        pytest.skip(message)
    venv = tmp_path_factory.mktemp("pypy3-venv")
    subprocess.run([pypy3, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300, env=clean_env())
    source = tmp_path_factory.mktemp("client-src") / "python"
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
                         capture_output=True, text=True, timeout=600, env=clean_env())
    assert pip.returncode == 0, f"pip install of the client under pypy3 failed:\n{pip.stdout}\n{pip.stderr}"
    return venv


def test_pypy3_installs_only_httpx_and_runs_every_client(stack, pypy_venv) -> None:
    python = str(pypy_venv / "bin" / "python")
    listed = subprocess.run([python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True,
                            check=True, timeout=120, env=clean_env())
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"vlmserve-client", "httpx"} <= installed
    heavy = installed & {"vlmserve", "pillow", "numpy", "torch", "docker", "grpcio", "tritonclient", "pydantic"}
    assert not heavy, f"the light client pulled {heavy}"

    run = subprocess.run([python, str(CHECK_SCRIPT), stack.gateway, str(stack.image_dir / "red.png")],
                         capture_output=True, text=True, timeout=300, cwd=pypy_venv, env=clean_env())
    assert run.returncode == 0, f"client check under pypy3 failed:\n{run.stdout}\n{run.stderr}"
    out = json.loads(run.stdout)
    assert out["implementation"] == "PyPy" and out["python"] == [3, 9]
    assert out["florence_ready"] is True
    assert out["florence"]["task"] == "object_detection" and out["florence"]["image_size"] == [64, 48]
    assert out["florence_error"] == {"status": 422, "class": "VlmserveBadRequest", "param": "text"}
    red = (stack.image_dir / "red.png").read_bytes()
    assert close(out["image_vector"], triton_http_embed(stack, "siglip_embed_image", EmbedImageTensors.IMAGE, [red])[0])
    same, again, other = out["text_vectors"]
    assert close(same, again) and not close(same, other, tol=1e-3)
    assert close(out["async"]["text_vector"], same)
    assert out["ocr"] == {"model": "vlmserve/tiny-qwen2vl", "text_type": "str"}
    assert out["region"]["box"] == [4.0, 4.0, 40.0, 30.0]
    assert out["async"]["caption_task"] == "caption" and out["async"]["ocr_model"] == "vlmserve/tiny-qwen2vl"


def test_pypy3_runs_the_command(stack, pypy_venv, tmp_path: Path) -> None:
    """The console script ``vlmserve-client`` as pip installs it, under Python 3.9 with httpx only."""
    images = find_images([str(stack.image_dir)])[0]  # what the command walks: red.png, blue.jpg, ...
    out = tmp_path / "vectors.npy"
    for _ in range(2):  # the second run resumes: nothing left to send
        run = subprocess.run([str(pypy_venv / "bin" / "vlmserve-client"), "embed", str(stack.image_dir),
                              "--out", str(out), "--base-url", stack.gateway],
                             capture_output=True, text=True, timeout=300, env=clean_env())
        assert run.returncode == 0, f"vlmserve-client under pypy3 failed:\n{run.stdout}\n{run.stderr}"
    assert f"done 0, skipped {len(images)}" in run.stderr and "0 requests" in run.stderr, run.stderr
    index = [json.loads(line) for line in (tmp_path / "vectors.index.jsonl").read_text().splitlines()]
    assert [e["path"] for e in index] == images and len(images) >= 2
    red = triton_http_embed(stack, "siglip_embed_image", EmbedImageTensors.IMAGE,
                            [(stack.image_dir / "red.png").read_bytes()])[0]
    assert close(np.load(out)[images.index(str(stack.image_dir / "red.png"))].tolist(), red)
    caption = subprocess.run([str(pypy_venv / "bin" / "python"), "-m", "vlmserve_client", "caption",
                              str(stack.image_dir / "red.png"), "--out", str(tmp_path / "caps.jsonl"),
                              "--base-url", stack.gateway, "--max-new-tokens", "4"],
                             capture_output=True, text=True, timeout=300, env=clean_env())
    assert caption.returncode == 0, caption.stderr
    assert len((tmp_path / "caps.jsonl").read_text().splitlines()) == 1


# --- the client README's examples ---------------------------------------------------------------------------

README_BLOCKS = re.findall(r"```python\n(.*?)```", (CLIENT_DIR / "README.md").read_text(), flags=re.S)


def test_client_readme_has_examples() -> None:
    assert len(README_BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_client_readme_example_runs(index: int, stack, tmp_path: Path) -> None:
    code = _localise(README_BLOCKS[index], stack)
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, f"client README example {index} failed:\n{code}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), "example printed nothing"
