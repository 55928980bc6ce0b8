"""The embedding routes (/embed, /embed_text, /v1/embeddings) against the typed fake engine's Embedder."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from tests.fakes import Call, FakeEngine, model, vectors
from vlmserve.gateway.app import create_app
from vlmserve.gateway.engines import Embedded
from vlmserve.gateway.settings import GatewaySettings


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def embedded(call: Call) -> Embedded:
    return Embedded(vectors(len(call.items)), tokens=sum(len(str(t)) for t in call.items))


def engine() -> FakeEngine:
    models = [model("siglip_embed_image", True, 4, family="siglip", task="embed_image", role="client",
                    source_model="vlmserve/tiny-siglip", embedding_dim=4),
              model("siglip_embed_text", True, 4, family="siglip", task="embed_text", role="client",
                    source_model="vlmserve/tiny-siglip", embedding_dim=4)]
    return FakeEngine(models, embed={"siglip_embed_image": embedded, "siglip_embed_text": embedded})


def client(backend: FakeEngine, tmp_path: Any) -> TestClient:
    return TestClient(create_app(GatewaySettings(storage_dir=str(tmp_path)), backend=backend),
                      raise_server_exceptions=False)


def test_images_and_texts_go_to_the_embedder_as_checked_bytes_and_strings(tmp_path) -> None:
    backend = engine()
    image = png()
    with client(backend, tmp_path) as c:
        r = c.post("/embed", json={"images": [base64.b64encode(image).decode()]})
        assert r.status_code == 200 and np.allclose(r.json(), vectors(1))
        r = c.post("/v1/embeddings", json={"input": ["ab", "cde"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "vlmserve/tiny-siglip" and body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
        assert [d["index"] for d in body["data"]] == [0, 1]
        r = c.post("/v1/embeddings", json={"input": "ab", "dimensions": 3})
        assert r.status_code == 400 and "returns 4 dimensions" in r.json()["error"]["message"]
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["vlmserve/tiny-siglip"]["embedding_dim"] == 4
    assert [(call.kind, call.model, list(call.items)) for call in backend.calls] == [
        ("embed_images", "siglip_embed_image", [image]),
        ("embed_texts", "siglip_embed_text", ["ab", "cde"]),
        ("embed_texts", "siglip_embed_text", ["ab"]),
    ]


def test_a_model_with_a_broken_config_is_not_ready_with_the_reason(tmp_path) -> None:
    backend = engine()
    backend.models["siglip_embed_text"] = model("siglip_embed_text", True, 4, family="siglip", task="embed_text",
                                               embedding_dim="-1")
    with client(backend, tmp_path) as c:
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["models"]["siglip_embed_text"] is False
        assert "embedding_dim" in health.json()["problems"]["siglip_embed_text"]
        r = c.post("/embed_text", json={"text": "a"})
        assert r.status_code == 502 and r.json()["error"]["code"] == "bad_model_config"
        assert "embedding_dim" in r.json()["error"]["message"]
