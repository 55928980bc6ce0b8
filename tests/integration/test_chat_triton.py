"""Chat models through the real Triton as direct clients use them: gRPC streaming, HTTP generate_stream,
batching of concurrent requests, cancellation, video, input errors."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from vlmserve.families.tensors import ChatTensors

pytestmark = pytest.mark.integration


def png(size=(80, 60), color=(200, 40, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def mp4(frames: int = 12, fps: int = 4) -> bytes:
    """A small real MPEG-4 clip made with PyAV (no network, no fixtures)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            image = Image.new("RGB", (64, 48), (i * 20 % 255, 100, 200))
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def stream(stack, model: str, messages, params=None, cancel_after: int | None = None, timeout: float = 120):
    """Run one streaming request over gRPC; returns the list of (text, finish, usage) or raises the error."""
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(stack.triton_grpc)
    got: list = []
    errors: list = []
    done = threading.Event()

    def callback(result, error):
        if error:
            errors.append(error)
            done.set()
            return
        item = tuple(result.as_numpy(t.name)[0].decode()
                     for t in (ChatTensors.TEXT, ChatTensors.FINISH_REASON, ChatTensors.USAGE))
        got.append(item)
        if item[1] or (cancel_after is not None and len(got) >= cancel_after):
            done.set()

    client.start_stream(callback=callback)
    inputs = []
    for spec, value in [(ChatTensors.MESSAGES, messages), (ChatTensors.PARAMETERS, params or {})]:
        tensor = tg.InferInput(spec.name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([json.dumps(value).encode()], dtype=np.object_))
        inputs.append(tensor)
    client.async_stream_infer(model, inputs)
    assert done.wait(timeout), "no final response"
    client.stop_stream(cancel_requests=cancel_after is not None)
    if cancel_after is not None:
        errors = [e for e in errors if "CANCELLED" not in str(e)]  # our own cancellation, reported back
    if errors:
        raise errors[0]
    return got


@pytest.mark.parametrize("model", ["smolvlm2", "qwen2vl"])
def test_grpc_stream_with_image_multi_turn(stack, model) -> None:
    messages = [
        {"role": "user", "content": [{"type": "image", "data": png()}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "And its colour?"},
    ]
    got = stream(stack, model, messages, {"max_tokens": 6, "temperature": 0.8, "seed": 3})
    text, finish, usage = got[-1]
    assert finish in ("stop", "length")
    usage = json.loads(usage)
    assert usage["completion_tokens"] <= 6 and usage["prompt_tokens"] > 10
    assert all(f == "" for _, f, _ in got[:-1])
    # Same seed, same answer: per-request sampling is reproducible.
    again = stream(stack, model, messages, {"max_tokens": 6, "temperature": 0.8, "seed": 3})
    assert "".join(t for t, _, _ in again) == "".join(t for t, _, _ in got)


@pytest.mark.parametrize("model", ["smolvlm2", "qwen2vl"])
def test_video_input(stack, model) -> None:
    messages = [{"role": "user", "content": [{"type": "video", "data": base64.b64encode(mp4()).decode()},
                                             {"type": "text", "text": "What happens?"}]}]
    got = stream(stack, model, messages, {"max_tokens": 4, "video_fps": 2, "video_max_frames": 3})
    assert got[-1][1] in ("stop", "length")
    usage = json.loads(got[-1][2])
    image_only = stream(stack, model, [{"role": "user", "content": [{"type": "image", "data": png()},
                                                                   {"type": "text", "text": "What happens?"}]}],
                        {"max_tokens": 4})
    assert usage["prompt_tokens"] > json.loads(image_only[-1][2])["prompt_tokens"]  # 3 frames > 1 image


def test_http_generate_stream_sse(stack) -> None:
    body = {ChatTensors.MESSAGES.name: json.dumps([{"role": "user", "content": "hello"}]),
            ChatTensors.PARAMETERS.name: json.dumps({"max_tokens": 5})}
    events = []
    with httpx.stream("POST", f"{stack.triton_http}/v2/models/qwen2vl/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert events and events[-1][ChatTensors.FINISH_REASON.name] in ("stop", "length")
    assert json.loads(events[-1][ChatTensors.USAGE.name])["completion_tokens"] <= 5


def test_concurrent_requests_share_one_batch(stack) -> None:
    results: dict[int, list] = {}

    def run(i: int) -> None:
        results[i] = stream(stack, "qwen2vl", [{"role": "user", "content": f"question {i}"}], {"max_tokens": 4 + i})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    usages = [json.loads(results[i][-1][2]) for i in range(6)]
    assert max(u["batch_size"] for u in usages) > 1, usages
    assert [u["completion_tokens"] <= 4 + i for i, u in enumerate(usages)] == [True] * 6


def test_cancellation_stops_generation(stack) -> None:
    log = stack.launcher.services["triton"].log
    before = log.read_text(errors="replace").count("request cancelled by the client")
    got = stream(stack, "smolvlm2", [{"role": "user", "content": "tell me a long story"}], {"max_tokens": 1000},
                 cancel_after=2)
    assert len(got) >= 2 and all(f == "" for _, f, _ in got)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if log.read_text(errors="replace").count("request cancelled by the client") > before:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the model did not notice the cancellation")
    # And the model keeps serving.
    assert stream(stack, "smolvlm2", [{"role": "user", "content": "hi"}], {"max_tokens": 2})[-1][1]


@pytest.mark.parametrize(("messages", "params", "fragment"), [
    ([], {}, "non-empty"),
    ([{"role": "robot", "content": "x"}], {}, "role"),
    ([{"role": "user", "content": [{"type": "image", "data": "!!!"}]}], {}, "base64"),
    ([{"role": "user", "content": [{"type": "image", "data": base64.b64encode(b"nope").decode()}]}], {},
     "not a decodable image"),
    ([{"role": "user", "content": [{"type": "video", "data": base64.b64encode(b"nope").decode()}]}], {},
     "not a decodable video"),
    ([{"role": "user", "content": "x"}], {"max_tokens": 100000}, "max_tokens"),
    ([{"role": "user", "content": "x"}], {"temperature": 9}, "temperature"),
])
def test_bad_input_is_invalid_arg(stack, messages, params, fragment) -> None:
    with pytest.raises(Exception, match=fragment):
        stream(stack, "qwen2vl", messages, params)


def triton_metric(stack, name: str, model: str) -> float:
    """One series of Triton's own metrics (its metrics port), 0 when it is not there yet."""
    text = httpx.get(f"http://{stack.settings.host}:{stack.settings.metrics_port}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("model", ["smolvlm2", "qwen2vl"])
def test_repeated_image_is_served_from_the_image_cache(stack, model) -> None:
    noise = np.random.default_rng({"smolvlm2": 11, "qwen2vl": 12}[model]).integers(0, 255, (70, 90, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    messages = [{"role": "user", "content": [{"type": "image", "data": base64.b64encode(buf.getvalue()).decode()},
                                             {"type": "text", "text": "What is this?"}]}]
    hits, misses = (triton_metric(stack, f"vlmserve_image_cache_{k}_total", model) for k in ("hits", "misses"))
    first = stream(stack, model, messages, {"max_tokens": 5})
    assert triton_metric(stack, "vlmserve_image_cache_misses_total", model) == misses + 1  # a new image
    assert triton_metric(stack, "vlmserve_image_cache_hits_total", model) == hits
    assert triton_metric(stack, "vlmserve_image_cache_bytes", model) > 0
    again = stream(stack, model, messages, {"max_tokens": 5})
    assert triton_metric(stack, "vlmserve_image_cache_hits_total", model) == hits + 1  # not encoded again
    assert triton_metric(stack, "vlmserve_image_cache_misses_total", model) == misses + 1
    assert "".join(t for t, _, _ in again) == "".join(t for t, _, _ in first)  # greedy: the same answer


@pytest.mark.parametrize("model", ["smolvlm2", "qwen2vl"])
def test_a_repeated_prompt_prefix_is_counted_in_the_prefix_cache_metrics(stack, model) -> None:
    """The same long prompt twice: the first computes every prompt token (misses), the second takes its whole
    32-token blocks from the prefix cache (hits), and answers the same."""
    text = "Describe a quiet harbour at dawn, the boats, the gulls, the light on the water, in detail. " * 3
    messages = [{"role": "user", "content": text + model}]
    hits, misses = (triton_metric(stack, f"vlmserve_prefix_cache_{k}_total", model) for k in ("hits", "misses"))
    first = stream(stack, model, messages, {"max_tokens": 4})
    computed = triton_metric(stack, "vlmserve_prefix_cache_misses_total", model) - misses
    assert computed >= 32 and triton_metric(stack, "vlmserve_prefix_cache_hits_total", model) == hits
    assert triton_metric(stack, "vlmserve_prefix_cache_bytes", model) > 0
    again = stream(stack, model, messages, {"max_tokens": 4})
    reused = triton_metric(stack, "vlmserve_prefix_cache_hits_total", model) - hits
    assert reused >= 32 and reused % 32 == 0
    assert triton_metric(stack, "vlmserve_prefix_cache_misses_total", model) - misses == 2 * computed - reused
    assert "".join(t for t, _, _ in again) == "".join(t for t, _, _ in first)


def test_each_chat_model_decodes_with_the_engine_export_chose(stack) -> None:
    """SmolVLM2 decodes with llama.cpp where its bindings are installed (the tiny export asks for it; CI builds
    them), Qwen2-VL with the torch loop: Triton's ``vlmserve_chat_engine`` gauge names the loop each model really
    runs, and ``/v1/models`` shows export's choice."""
    import re

    from vlmserve.export import llamacpp

    expected = {"qwen2vl": "torch", "smolvlm2": "llamacpp" if llamacpp.bindings_version() else "torch"}
    text = httpx.get(f"http://{stack.settings.host}:{stack.settings.metrics_port}/metrics", timeout=30).text
    running = {}
    for line in text.splitlines():
        if line.startswith("vlmserve_chat_engine{") and line.endswith(" 1"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            running[labels["model"]] = labels["engine"]
    assert {m: running.get(m) for m in expected} == expected
    models = httpx.get(f"{stack.gateway}/v1/models", timeout=30).json()["data"]
    smol = next(m for m in models if "smolvlm2" in m["triton_models"])
    assert smol["runtimes"]["smolvlm2"]["chat_engine"] == expected["smolvlm2"]
    assert smol["runtimes"]["smolvlm2"]["engine_why"]
