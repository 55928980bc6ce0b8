"""SigLIP 2 (tiny random NaFlex ``Siglip2Model``) served by the real stack: ``/embed``, ``/embed_text``,
``/v1/embeddings`` (openai SDK) and Triton direct (tritonclient HTTP and gRPC), against the transformers pipeline.

The reference is what a seed-004 user runs with SigLIP 2: ``Image.open(...).convert("RGB")``, the checkpoint's
``AutoProcessor`` and ``Siglip2Model.get_image_features`` / ``get_text_features`` in fp32, L2-normalised. The
served path is the gateway, Triton, the numpy NaFlex preprocessing and the ONNX towers.
"""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from vlmserve import paths
from vlmserve.export import photos
from vlmserve.families.tensors import EmbedImageTensors, EmbedTextTensors
from vlmserve.paths import PROJECT_ROOT

pytestmark = pytest.mark.integration

MIN_COSINE = 0.999
# Sizes and aspect ratios: landscape, portrait, square, panorama, tall strip, tiny, large.
SIZES = ((640, 480), (300, 400), (224, 224), (1200, 160), (90, 900), (20, 12), (2048, 1536))
TEXTS = ["a photo of a cat", "Hello, World!", "ünïcödé ✓", "", " ".join(["long"] * 40)]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def reference():
    import torch
    from transformers import AutoProcessor, Siglip2Model

    checkpoint = paths.tiny_models_dir() / "siglip2"
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = Siglip2Model.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def images(data: list[bytes]) -> np.ndarray:
        out = []
        for item in data:  # one at a time, as the seed served them
            with Image.open(io.BytesIO(item)) as image:
                inputs = processor(images=[image.convert("RGB")], return_tensors="pt")
            with torch.no_grad():
                out.append(model.get_image_features(**inputs)[0].numpy())
        return _normalise(np.stack(out))

    def texts(strings: list[str]) -> np.ndarray:
        inputs = processor(text=strings, padding="max_length", truncation=True,
                           max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
        with torch.no_grad():
            return _normalise(model.get_text_features(**inputs).numpy())

    return images, texts


@pytest.fixture(scope="module")
def encoded() -> list[bytes]:
    out = []
    for i, (w, h) in enumerate(SIZES):
        image = photos.real_photo(w, h, i) if i % 2 == 0 else photos.synthetic_photo(w, h, i)
        out.append(photos.encode(image, "JPEG" if i % 3 else "PNG"))
    return out


@pytest.fixture(scope="module")
def gw(stack):
    with httpx.Client(base_url=stack.gateway, timeout=120) as client:
        yield client


def _uri(data: bytes) -> str:
    return "data:image/*;base64," + base64.b64encode(data).decode()


def test_image_embeddings_equal_the_transformers_pipeline_and_triton_direct(gw, stack, encoded, reference) -> None:
    import tritonclient.http as th

    # By path (the gateway's local image folder): together the photos are over the test gateway's body cap.
    refs = []
    for i, data in enumerate(encoded):
        path = stack.image_dir / f"siglip2-{i}.img"
        path.write_bytes(data)
        refs.append(str(path))
    r = gw.post("/embed", json={"images": refs, "model": "siglip2"})
    assert r.status_code == 200, r.text
    served = np.array(r.json(), dtype=np.float32)
    expected = reference[0](encoded)
    cosines = np.sum(_normalise(served) * expected, axis=1)
    assert served.shape == expected.shape and (cosines >= MIN_COSINE).all(), cosines

    client = th.InferenceServerClient(stack.triton_http.removeprefix("http://"))
    inp = th.InferInput(EmbedImageTensors.IMAGE.name, [len(encoded), 1], "BYTES")
    inp.set_data_from_numpy(EmbedImageTensors.IMAGE.pack(encoded))
    direct = client.infer("siglip2_embed_image", [inp]).as_numpy(EmbedImageTensors.EMBEDDING.name)
    np.testing.assert_allclose(direct, served, atol=1e-5)


def test_text_embeddings_equal_the_transformers_pipeline_and_triton_grpc(gw, stack, reference) -> None:
    import tritonclient.grpc as tg

    r = gw.post("/embed_text", json={"texts": TEXTS, "model": "siglip2"})
    assert r.status_code == 200, r.text
    served = np.array(r.json(), dtype=np.float32)
    np.testing.assert_allclose(served, reference[1](TEXTS), atol=1e-5)

    client = tg.InferenceServerClient(stack.triton_grpc)
    inp = tg.InferInput(EmbedTextTensors.TEXT.name, [len(TEXTS), 1], "BYTES")
    inp.set_data_from_numpy(EmbedTextTensors.TEXT.pack(TEXTS))
    result = client.infer("siglip2_embed_text", [inp])
    np.testing.assert_allclose(result.as_numpy(EmbedTextTensors.EMBEDDING.name), served, atol=1e-5)
    # Gemma tokens + the appended </eos>, before truncation to 16: "" is just the EOS.
    counts = result.as_numpy(EmbedTextTensors.NUM_TOKENS.name).ravel().tolist()
    assert counts[3] == 1 and counts[4] > 16 and all(c >= 1 for c in counts)


def test_openai_sdk_text_and_image_embeddings(stack, encoded, reference) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.gateway}/v1", api_key="unused")
    texts = client.embeddings.create(model="siglip2", input=TEXTS[:2])
    assert texts.model == "vlmserve/tiny-siglip2" and texts.usage.prompt_tokens > 0
    np.testing.assert_allclose(np.array([d.embedding for d in texts.data]), reference[1](TEXTS[:2]), atol=1e-5)
    images = client.embeddings.create(model="vlmserve/tiny-siglip2", input=[_uri(encoded[0])],
                                      extra_body={"modality": "image"})
    assert float(np.dot(_normalise(np.array(images.data[0].embedding)), reference[0](encoded[:1])[0])) >= MIN_COSINE
    assert "vlmserve/tiny-siglip2" in {m.id for m in client.models.list().data}


def test_siglip_v1_stays_the_default_embedding_model(gw, encoded) -> None:
    refs = [_uri(encoded[0])]
    default = gw.post("/embed", json={"images": refs}).json()
    assert default == gw.post("/embed", json={"images": refs, "model": "siglip"}).json()
    assert default != gw.post("/embed", json={"images": refs, "model": "siglip2"}).json()
    assert gw.get("/health").json()["model"] == "vlmserve/tiny-siglip"


def test_a_broken_image_is_a_clear_400_and_the_model_keeps_serving(gw, encoded) -> None:
    truncated = encoded[1][: len(encoded[1]) // 3]
    r = gw.post("/embed", json={"images": [_uri(truncated)], "model": "siglip2"})
    assert 400 <= r.status_code < 500 and "Traceback" not in r.text, r.text
    assert "image" in r.json()["error"]["message"]
    assert gw.post("/embed", json={"images": [_uri(encoded[2])], "model": "siglip2"}).status_code == 200


DOC_BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", (PROJECT_ROOT / "docs" / "siglip2.md").read_text(), flags=re.S)


def test_the_docs_have_examples() -> None:
    assert [k for k, _ in DOC_BLOCKS] == ["bash", "python"]


@pytest.mark.parametrize("index", range(len(DOC_BLOCKS)))
def test_doc_example_runs(index: int, stack, tmp_path) -> None:
    """docs/siglip2.md's bash and python examples, as written, against the test stack's ports."""
    from tests.integration.test_readme import _localise

    kind, code = DOC_BLOCKS[index]
    code = _localise(code, stack)
    script = tmp_path / "example.py"
    script.write_text(code)
    cmd = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, str(script)]
    result = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"docs/siglip2.md example {index} failed:\n{result.stdout}\n{result.stderr}"
    if kind == "python":
        assert "(1, 32)" in result.stdout, result.stdout
    else:  # /embed and /embed_text answer [[...]], /v1/embeddings an OpenAI list
        assert result.stdout.count("[[") == 2 and '"embedding"' in result.stdout, result.stdout[:300]
