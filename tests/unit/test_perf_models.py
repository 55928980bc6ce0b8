"""The perf model set's configs (real dimensions, checked without building) and the baseline server on tiny models.

Building the perf checkpoints themselves takes ~1 GB and a minute per family, so that is left to a manual run.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import threading
import time
from pathlib import Path

import pytest

from vlmserve.export import perf
from vlmserve.families import family


def _meta_params(build) -> int:
    import torch

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return sum(p.numel() for p in build().parameters())


def test_perf_siglip_config_has_siglip_base_dimensions() -> None:
    config = perf.perf_siglip_config()
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (768, 12, 12)
    assert (vision.intermediate_size, vision.image_size, vision.patch_size) == (3072, 224, 16)
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (32000, 768, 12, 12)
    assert (text.intermediate_size, text.max_position_embeddings, text.projection_size) == (3072, 64, 768)


def test_perf_siglip_parameter_counts_match_siglip_base() -> None:
    from transformers import SiglipModel, SiglipVisionModel

    config = perf.perf_siglip_config()
    total = _meta_params(lambda: SiglipModel(config))
    vision = _meta_params(lambda: SiglipVisionModel(config.vision_config))
    head = _meta_params(lambda: SiglipVisionModel(config.vision_config).vision_model.head)
    # google/siglip-base-patch16-224: 203.16M parameters, a ViT-B/16 vision backbone (~86M) + the MAP head.
    assert math.isclose(total, 203.16e6, rel_tol=0.005), total
    assert math.isclose(vision - head, 86e6, rel_tol=0.01), vision - head


def test_perf_florence2_config_has_florence2_base_dimensions() -> None:
    config = perf.perf_florence2_config(tokenizer_len=1500, image_token_id=405)
    vision, text = config.vision_config, config.text_config
    assert vision.depths == [1, 1, 9, 1]
    assert vision.embed_dim == [128, 256, 512, 1024]
    assert vision.num_heads == [4, 8, 16, 32] and vision.num_groups == [4, 8, 16, 32]
    assert (vision.window_size, vision.projection_dim) == (12, 768)
    assert (text.d_model, text.encoder_layers, text.decoder_layers) == (768, 6, 6)
    assert (text.encoder_attention_heads, text.decoder_attention_heads) == (12, 12)
    assert (text.encoder_ffn_dim, text.decoder_ffn_dim) == (3072, 3072)
    assert text.vocab_size == perf.FLORENCE2_VOCAB_SIZE == 51328
    assert config.image_token_id == 405


def test_florence2_vocab_is_the_real_size_or_the_tokenizer_rounded_up() -> None:
    assert perf.florence2_vocab_size(1) == 51328
    assert perf.florence2_vocab_size(51290) == 51328  # the real tokenizer + <image>, padded to 64
    assert perf.florence2_vocab_size(51329) == 51392


def test_perf_florence2_parameter_count_matches_florence2_base() -> None:
    from transformers import Florence2ForConditionalGeneration

    config = perf.perf_florence2_config(tokenizer_len=1500, image_token_id=405)
    total = _meta_params(lambda: Florence2ForConditionalGeneration(config))
    assert math.isclose(total, 0.23e9, rel_tol=0.02), total  # Florence-2-base: 0.23B


def test_perf_smolvlm2_config_has_smolvlm2_256m_dimensions() -> None:
    config = perf.perf_smolvlm2_config(image_token_id=3, pad_token_id=0, eos_token_id=2)
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (768, 12, 12)
    assert (vision.intermediate_size, vision.image_size, vision.patch_size) == (3072, 512, 16)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        576, 30, 9, 3)
    assert (text.intermediate_size, text.vocab_size, text.model_type) == (1536, 49280, "llama")
    assert (config.scale_factor, config.image_token_id) == (4, 3)
    # 64 image tokens per 512 px tile: (512 / 16)^2 patches, pixel-shuffled by 4x4.
    assert (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2 == 64


def test_perf_smolvlm2_parameter_count_matches_smolvlm2_256m() -> None:
    from transformers import SmolVLMForConditionalGeneration

    config = perf.perf_smolvlm2_config(image_token_id=3, pad_token_id=0, eos_token_id=2)
    total = _meta_params(lambda: SmolVLMForConditionalGeneration(config))
    vision = _meta_params(lambda: SmolVLMForConditionalGeneration(config).model.vision_model)
    assert math.isclose(total, 256e6, rel_tol=0.01), total  # SmolVLM2-256M: 256M
    assert math.isclose(vision, 86e6, rel_tol=0.02), vision  # SigLIP-B/16 at 512 px (1024 positions)


def test_perf_smolvlm2_tokenizer_decodes_every_model_id() -> None:
    tokenizer = perf._smolvlm2_tokenizer()
    assert len(tokenizer) == perf.SMOLVLM2_VOCAB_SIZE
    assert tokenizer.decode([perf.SMOLVLM2_VOCAB_SIZE - 1]) == f" w{perf.SMOLVLM2_VOCAB_SIZE - 1}"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": "a red car"}]}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<image>") in ids and max(ids) < perf.SMOLVLM2_TOKENIZER_TRAINED
    assert tokenizer.decode(ids, skip_special_tokens=True).endswith("a red car\nAssistant:")


def test_export_perf_accepts_the_smolvlm2_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmserve.export import run
    from vlmserve.export.progress import Progress

    built: list[str] = []
    exported: list[tuple[str, Path]] = []
    monkeypatch.setattr(perf, "perf_source", lambda spec, progress: built.append(spec.name) or tmp_path / spec.name)
    monkeypatch.setattr(run, "export_family", lambda family, source, *a, **k: exported.append((family, source)) or {})
    reports = run.export_model_set("perf", repo=tmp_path / "repo", families=["smolvlm2"], progress=Progress(quiet=True))
    assert list(reports) == ["smolvlm2"] and built == ["smolvlm2"]
    assert exported == [("smolvlm2", tmp_path / "smolvlm2")]
    assert run.default_families("perf") == ["florence2", "siglip"]  # smolvlm2 is opt-in


def test_perf_source_builds_once_into_the_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmserve.export.progress import Progress

    monkeypatch.setenv("VLMSERVE_HOME", str(tmp_path))
    calls: list[Path] = []

    def fake_build(out: Path) -> Path:
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        perf._write_markers(out, "SiglipModel", perf.SIGLIP_REFERENCE, 1)
        return out

    monkeypatch.setattr(perf, "build_perf_siglip", fake_build)  # the siglip spec names it; imported on use
    first = perf.perf_source(family("siglip"), Progress(quiet=True))
    second = perf.perf_source(family("siglip"), Progress(quiet=True))
    assert first == second == tmp_path.resolve() / "perf-models" / "siglip"
    assert len(calls) == 1 and calls[0] != first  # built beside the target, then renamed
    assert json.loads((first / "VLMSERVE_PERF.json").read_text())["weights"] == "random"
    from vlmserve.export.tiny import is_tiny

    assert is_tiny(first) and perf.is_perf(first)
    with pytest.raises(ValueError, match="no perf model"):
        perf.perf_source(family("qwen2vl"), Progress(quiet=True))


# --- the baseline server, on the tiny checkpoints -------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline_app(tmp_path_factory: pytest.TempPathFactory):
    from vlmserve.export.tiny import build_tiny_florence2, build_tiny_siglip
    from vlmserve.loadtests.baseline.server import create_app

    root = tmp_path_factory.mktemp("baseline-tiny")
    return create_app(build_tiny_siglip(root / "siglip"), build_tiny_florence2(root / "florence2"), device="cpu")


@pytest.fixture(scope="module")
def client(baseline_app):
    from fastapi.testclient import TestClient

    with TestClient(baseline_app) as c:
        yield c


def _png(size: tuple[int, int] = (40, 30)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _assert_unit_vectors(vectors: list[list[float]], count: int, dim: int) -> None:
    assert len(vectors) == count
    for v in vectors:
        assert len(v) == dim
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-4)


def test_baseline_health_says_random_weights(client) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["model_loaded"] is True
    assert set(body["models"]) == {"siglip", "florence2"}
    assert body["weights"] == "random" and body["device"] == "cpu"


def test_baseline_embed_returns_unit_vectors(client) -> None:
    image = _png()
    response = client.post("/embed", json={"images": [f"data:image/png;base64,{image}", image]})
    assert response.status_code == 200, response.text
    vectors = response.json()
    _assert_unit_vectors(vectors, 2, 32)  # the tiny SigLIP's embedding size
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(vectors[0], vectors[1], strict=True))


def test_baseline_embed_text_takes_both_forms(client) -> None:
    many = client.post("/embed_text", json={"texts": ["a photo of a cat", "hello world"]})
    one = client.post("/embed_text", json={"text": "a photo of a cat"})
    assert many.status_code == one.status_code == 200
    _assert_unit_vectors(many.json(), 2, 32)
    _assert_unit_vectors(one.json(), 1, 32)
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(many.json()[0], one.json()[0], strict=True))


def test_baseline_infer_caption(client) -> None:
    response = client.post("/infer", json={"image_base64": _png((50, 40)), "task": "caption", "max_new_tokens": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["task"], body["task_token"]) == ("caption", "<CAPTION>")
    assert isinstance(body["text"], str) and isinstance(body["result"], str)
    assert body["image_size"] == {"width": 50, "height": 40}
    assert body["latency_ms"] > 0


def test_baseline_infer_task_with_text_and_token_name(client) -> None:
    response = client.post("/infer", json={"image_base64": _png((50, 40)), "task": "<REGION_TO_CATEGORY>",
                                           "text": "5,5,30,20", "max_new_tokens": 3, "num_beams": 1})
    assert response.status_code == 200, response.text
    assert response.json()["task"] == "region_to_category"


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/embed", {"images": ["not base64!"]}, 400),
        ("/embed", {"images": [base64.b64encode(b"plain text, not an image").decode()]}, 415),
        ("/embed", {"images": []}, 400),
        ("/embed", {"images": ["https://example.com/cat.jpg"]}, 400),
        ("/embed", {}, 422),
        ("/embed_text", {}, 400),
        ("/embed_text", {"text": "a", "texts": ["b"]}, 400),
        ("/embed_text", {"texts": []}, 400),
        ("/infer", {"image_base64": "@@@", "task": "caption"}, 400),
        ("/infer", {"image_base64": "PNG", "task": "dance"}, 400),
        ("/infer", {"task": "caption"}, 422),
        ("/infer", {"image_base64": "IMAGE", "task": "phrase_grounding"}, 400),
        ("/infer", {"image_base64": "IMAGE", "task": "region_to_category", "text": "1,2,3"}, 400),
        ("/infer", {"image_base64": "IMAGE", "task": "caption", "max_new_tokens": 0}, 400),
        ("/infer", {"image_base64": "IMAGE", "task": "caption", "num_beams": 9}, 400),
    ],
)
def test_baseline_bad_input_is_4xx_with_a_message(client, path: str, body: dict, status: int) -> None:
    if body.get("image_base64") in ("IMAGE", "PNG"):
        body = {**body, "image_base64": _png()}
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    if status != 422:
        assert response.json()["error"]["message"]


def test_baseline_serves_one_request_at_a_time(baseline_app, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from vlmserve.loadtests.baseline import server

    active = 0
    peak = 0
    lock = threading.Lock()

    def slow_embed(self, texts: list[str]) -> list[list[float]]:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)  # long enough for the other requests to arrive while this one runs
        with lock:
            active -= 1
        return [[1.0] for _ in texts]

    monkeypatch.setattr(server.SiglipRunner, "embed_texts", slow_embed)

    async def burst() -> list[int]:
        transport = httpx.ASGITransport(app=baseline_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://baseline") as c:
            responses = await asyncio.gather(*(c.post("/embed_text", json={"text": str(i)}) for i in range(6)))
        return [r.status_code for r in responses]

    assert asyncio.run(burst()) == [200] * 6
    assert peak == 1


# --- the baseline's chat route and --bf16, on the tiny SmolVLM2 -------------------------------------------------


@pytest.fixture(scope="module")
def chat_client(tmp_path_factory: pytest.TempPathFactory):
    from fastapi.testclient import TestClient

    from vlmserve.export.tiny import build_tiny_smolvlm2
    from vlmserve.loadtests.baseline.server import create_app

    app = create_app(smolvlm2_dir=build_tiny_smolvlm2(tmp_path_factory.mktemp("baseline-chat") / "smolvlm2"),
                     device="cpu")
    with TestClient(app) as c:
        yield c


def _chat_body(**extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_png((50, 40))}"}},
               {"type": "text", "text": "What is in the picture?"}]
    return {"model": "smolvlm2", "messages": [{"role": "user", "content": content}], "max_tokens": 6,
            "temperature": 0, **extra}


def _sse_payloads(text: str) -> list:
    lines = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_baseline_chat_non_streaming(chat_client) -> None:
    response = chat_client.post("/v1/chat/completions", json=_chat_body())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 6 and usage["prompt_tokens"] > 64  # the image's tiles are in it
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "smolvlm2" in chat_client.get("/health").json()["models"]


def test_baseline_chat_streaming_matches_non_streaming(chat_client) -> None:
    whole = chat_client.post("/v1/chat/completions", json=_chat_body()).json()
    response = chat_client.post("/v1/chat/completions",
                                json=_chat_body(stream=True, stream_options={"include_usage": True}))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = _sse_payloads(response.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize(("body", "fragment"), [
    ({"messages": []}, "non-empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "parts are"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "@@"}}]}]}, "base64"),
])
def test_baseline_chat_bad_input_is_400(chat_client, body: dict, fragment: str) -> None:
    response = chat_client.post("/v1/chat/completions", json={"stream": True, **body})
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


def test_baseline_bf16_runs_model_work_under_autocast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from fastapi.testclient import TestClient

    from vlmserve.export.tiny import build_tiny_siglip, build_tiny_smolvlm2
    from vlmserve.loadtests.baseline import server

    seen: list = []

    def spy(self, texts: list[str]) -> list[list[float]]:
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return [[1.0] for _ in texts]

    app = server.create_app(build_tiny_siglip(tmp_path / "siglip"), None, "cpu",
                            smolvlm2_dir=build_tiny_smolvlm2(tmp_path / "smolvlm2"), bf16=True)
    with TestClient(app) as c:
        assert c.get("/health").json()["bf16_autocast"] is True
        streamed = c.post("/v1/chat/completions", json=_chat_body(stream=True))
        assert streamed.status_code == 200
        assert _sse_payloads(streamed.text)[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        monkeypatch.setattr(server.SiglipRunner, "embed_texts", spy)
        assert c.post("/embed_text", json={"text": "a cat"}).status_code == 200
    assert seen == [(True, torch.bfloat16)]
    assert not torch.is_autocast_enabled("cpu")  # only inside the model worker
