"""Backpressure: the gateway's in-flight caps per route group, the overload mapping of Triton's errors, the chat
model's bounded admission and the queue policy written into the Triton configs."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from tritonclient.utils import InferenceServerException

from export.repository import ExportOptions, dynamic_batching
from gateway.limits import ROUTE_GROUPS, InFlightLimit
from gateway.triton import TritonBackend
from model_repository.chat import Admission


async def _capped_app_run(cap: int, extra_requests: int) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """``cap`` chat requests held open inside the app, then ``extra_requests`` more and one to another group."""
    entered = 0
    all_in = asyncio.Event()
    release = asyncio.Event()

    async def app(scope, receive, send) -> None:
        nonlocal entered
        if scope["path"] == "/v1/chat/completions" and scope["method"] == "POST":
            entered += 1
            if entered == cap:
                all_in.set()
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = InFlightLimit(app, {"chat": cap, "embeddings": 1}, retry_after_s=7)
    transport = httpx.ASGITransport(app=limited)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        held = [asyncio.create_task(client.post("/v1/chat/completions", json={})) for _ in range(cap)]
        await all_in.wait()
        rejected = [await client.post("/v1/chat/completions", json={}) for _ in range(extra_requests)]
        rejected.append(await client.post("/embed", json={}))  # another group: its own cap, still free
        rejected.append(await client.get("/v1/chat/completions"))  # only POSTs (inference) count
        release.set()
        done = list(await asyncio.gather(*held))
        done.append(await client.post("/v1/chat/completions", json={}))  # slots are given back
    return done, rejected


def test_inflight_cap_answers_429_with_retry_after_and_frees_slots() -> None:
    done, answers = asyncio.run(_capped_app_run(cap=3, extra_requests=2))
    assert [r.status_code for r in done] == [200] * 4
    over, embed, get = answers[:2], answers[2], answers[3]
    for r in over:
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert "max_inflight_chat=3" in r.json()["error"]["message"]
    assert embed.status_code == 200 and get.status_code == 200


def test_every_inference_route_is_in_a_group() -> None:
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    app = create_app(GatewaySettings())
    posts = {path for path, ops in app.openapi()["paths"].items() if "post" in ops}
    assert posts == set(ROUTE_GROUPS)
    assert set(ROUTE_GROUPS.values()) == set(GatewaySettings().inflight_caps())


@pytest.mark.parametrize(("message", "status", "code"), [
    ("Exceeds maximum queue size", 429, "queue_full"),
    ("Request timeout expired", 429, "queue_timeout"),
    ("chat queue is full (72 requests running or waiting: max_batch + max_queue_size); retry later", 429,
     "queue_full"),
    ("Request for unknown model: 'x' is not found", 503, "triton_unavailable"),
])
def test_triton_overload_errors_map_to_429_or_503_with_retry_after(message: str, status: int, code: str) -> None:
    backend = TritonBackend("127.0.0.1:1", retry_after_s=3)
    for mapped in (backend._map_error("m", InferenceServerException(message)),
                   backend._map_stream_error("m", InferenceServerException(message))):
        assert (mapped.status, mapped.code, mapped.headers.get("Retry-After")) == (status, code, "3")


def test_chat_admission_is_bounded_and_releases_once() -> None:
    admission = Admission(2)
    first, second = admission.enter(), admission.enter()
    assert first is not None and second is not None
    assert admission.enter() is None
    first()
    first()  # a second release of the same request frees nothing more
    third = admission.enter()
    assert third is not None and admission.enter() is None
    threads = [threading.Thread(target=f) for f in (second, third)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert admission.count == 0


def test_queue_policy_in_the_rendered_configs(monkeypatch) -> None:
    monkeypatch.setenv("VLMSERVE_MAX_QUEUE_SIZE", "5")
    monkeypatch.setenv("VLMSERVE_QUEUE_TIMEOUT_S", "2.5")
    policy = dynamic_batching(ExportOptions())["default_queue_policy"]
    assert (policy["max_queue_size"], policy["default_timeout_microseconds"], policy["timeout_action"].name) == (
        5, 2_500_000, "REJECT")
    from export.chat import chat_config

    params = chat_config("qwen2vl", ExportOptions(), {"family": "qwen2vl"})["parameters"]
    assert json.loads(params["max_queue_size"]["string_value"]) == 5


_DEAD = InferenceServerException("Failed to process the request(s) for model instance 'm_0_0', message: "
                                 "Stub process 'm_0_0' is not healthy.")


def test_dead_stub_answers_503_and_reloads_the_model_once() -> None:
    calls: list[str] = []
    gate = asyncio.Event()

    class Client:
        async def unload_model(self, name: str) -> None:
            calls.append(f"unload {name}")

        async def load_model(self, name: str) -> None:
            calls.append(f"load {name}")
            await gate.wait()

    async def scenario() -> tuple[int, int, bool, bool]:
        backend = TritonBackend("127.0.0.1:1", retry_after_s=4)
        backend._client = Client()  # type: ignore[assignment]
        first = backend._map_stream_error("m", _DEAD)
        second = backend._map_error("m", _DEAD)  # while reloading: no second reload
        await asyncio.sleep(0)
        during = backend.reloading("m")
        try:
            await backend.infer("m", {}, [])
            refused_during = False
        except Exception as exc:  # noqa: BLE001
            refused_during = getattr(exc, "status", None) == 503
        gate.set()
        await asyncio.sleep(0.01)
        assert first.headers["Retry-After"] == "4"
        return first.status, second.status, during and refused_during, backend.reloading("m")

    first, second, refused_while_reloading, still_reloading = asyncio.run(scenario())
    assert (first, second) == (503, 503)
    assert refused_while_reloading and not still_reloading
    # Unload first: Triton's load alone is a no-op for a loaded model whose files did not change (issue 12).
    assert calls == ["unload m", "load m"]


def test_stub_reload_retries_each_step_until_it_succeeds_and_stays_503_meanwhile() -> None:
    calls: list[str] = []
    failures = {"unload": 1, "load": 2}

    class Client:
        async def _step(self, kind: str, name: str) -> None:
            calls.append(f"{kind} {name}")
            if failures[kind]:
                failures[kind] -= 1
                if kind == "load":
                    await asyncio.sleep(1)  # past timeout_s: a load still running in Triton, cut client-side
                raise InferenceServerException(f"{kind} failed", status="500")

        async def unload_model(self, name: str) -> None:
            await self._step("unload", name)

        async def load_model(self, name: str) -> None:
            await self._step("load", name)

    async def scenario() -> tuple[list[bool], bool]:
        backend = TritonBackend("127.0.0.1:1", timeout_s=0.05, retry_after_s=4)
        backend.reload_backoff_s, backend.reload_backoff_max_s = 0.01, 0.02
        backend._client = Client()  # type: ignore[assignment]
        backend._map_error("m", _DEAD)
        seen = []
        for _ in range(20):
            await asyncio.sleep(0.01)
            seen.append(backend.reloading("m"))
        task = backend._reloading["m"]
        await asyncio.wait_for(task, timeout=5)
        return seen, backend.reloading("m")

    seen, still_reloading = asyncio.run(scenario())
    assert calls == ["unload m", "unload m", "load m", "load m", "load m"]
    assert seen[0] and not still_reloading
    assert failures == {"unload": 0, "load": 0}


def test_closing_the_backend_stops_a_reload_that_keeps_failing() -> None:
    class Client:
        async def unload_model(self, name: str) -> None:
            raise OSError("connection refused")

        async def close(self) -> None:
            pass

    async def scenario() -> bool:
        backend = TritonBackend("127.0.0.1:1", retry_after_s=4)
        backend.reload_backoff_s = backend.reload_backoff_max_s = 0.01
        backend._client = Client()  # type: ignore[assignment]
        backend._map_error("m", _DEAD)
        await asyncio.sleep(0.05)
        task = backend._reloading["m"]
        assert backend.reloading("m")  # still refusing: Triton never answered
        await backend.close()
        await asyncio.wait([task], timeout=5)
        return task.cancelled()

    assert asyncio.run(scenario())


def test_a_model_being_reloaded_keeps_its_surface_and_answers_503_not_another_family() -> None:
    """Unloaded for its reload, Triton lists the model UNAVAILABLE with no config: the default must not move."""
    state = {"siglip_embed_text": "READY", "siglip2_embed_text": "READY"}
    gate = asyncio.Event()

    class Client:
        async def get_model_repository_index(self) -> list[dict]:
            return [{"name": n, "state": s} for n, s in state.items()]

        async def get_model_config(self, name: str) -> dict:
            family = name.split("_")[0]
            return {"max_batch_size": 8, "parameters": {"family": {"string_value": family},
                                                        "task": {"string_value": "embed_text"}}}

        async def unload_model(self, name: str) -> None:
            state[name] = "UNAVAILABLE"

        async def load_model(self, name: str) -> None:
            await gate.wait()
            state[name] = "READY"

    async def scenario() -> tuple[str, bool, str, bool, str, bool]:
        backend = TritonBackend("127.0.0.1:1", retry_after_s=4)
        backend._client = Client()  # type: ignore[assignment]
        before = (await backend.registry(refresh=True)).find("embed_text", None)
        backend._map_error("siglip_embed_text", _DEAD)
        await asyncio.sleep(0.01)  # unloaded, the load waits on the gate
        during = (await backend.registry(refresh=True)).find("embed_text", None)
        gate.set()
        await asyncio.wait([backend._reloading["siglip_embed_text"]], timeout=5)
        after = (await backend.registry(refresh=True)).find("embed_text", None)
        return before.name, before.ready, during.name, during.ready, after.name, after.ready

    before, before_ready, during, during_ready, after, after_ready = asyncio.run(scenario())
    assert (before, before_ready) == ("siglip_embed_text", True)
    assert (during, during_ready) == ("siglip_embed_text", False)  # use_model answers 503 + Retry-After
    assert (after, after_ready) == ("siglip_embed_text", True)


def test_sigterm_drains_in_flight_requests_and_answers_new_ones_503() -> None:
    """A real uvicorn (gateway.__main__.DrainingServer) on a free port: after the stop signal a request in progress
    completes, new requests get 503 + Retry-After + Connection: close, /readyz is 503, /livez 200, and the server
    exits once nothing is in progress (well before the drain timeout)."""
    import signal
    import time

    import uvicorn

    from gateway.__main__ import DrainingServer
    from gateway.app import create_app
    from gateway.settings import GatewaySettings
    from tests.conftest import free_port
    from tests.fakes import FakeBackend

    app = create_app(GatewaySettings(retry_after_s=3), backend=FakeBackend())
    entered, release = threading.Event(), threading.Event()

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        entered.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        return {"status": "done"}

    port = free_port()
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"),
                            app.state.drain, drain_timeout_s=60)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:  # polls a condition (the server listening), bounded
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert httpx.get(f"{base}/readyz").status_code == 200
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.get, f"{base}/slow", timeout=30)
        assert entered.wait(30)
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        refused = httpx.post(f"{base}/embed_text", json={"text": "x"}, timeout=10)
        ready, live = httpx.get(f"{base}/readyz", timeout=10), httpx.get(f"{base}/livez", timeout=10)
        assert thread.is_alive() and not in_flight.done()  # still draining: the slow request holds it
        release.set()
        answer = in_flight.result(timeout=30)
    started = time.monotonic()
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - started < 10
    assert answer.status_code == 200 and answer.json() == {"status": "done"}
    assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
    assert refused.headers["connection"] == "close" and refused.json()["error"]["code"] == "shutting_down"
    assert ready.status_code == 503 and live.status_code == 200
