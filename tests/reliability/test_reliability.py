"""The stack under faults, overload and hostile input (real Triton + gateway on the tiny models)."""

from __future__ import annotations

import base64
import http.server
import io
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from PIL import Image

from tests.reliability.conftest import CHAOS, CHAT_CAP, FIGURES, SUPERVISOR_LOG

pytestmark = pytest.mark.integration

# Every PIL mode a client can send (and a file format that stores it), at a size transformers used to misread
# as channels-first (1 pixel high).
MODES = [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
         ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"), ("RGB", "JPEG")]


def encoded(mode: str, fmt: str, size: tuple[int, int] = (5, 1)) -> str:
    image = Image.new("RGB", size, (200, 40, 90)).convert(mode if mode not in ("I;16", "I", "F") else "L")
    if mode in ("I;16", "I", "F"):
        image = image.convert(mode) if mode != "I;16" else Image.new("I;16", size, 30000)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def route_calls(b64: str) -> dict[str, tuple[str, dict]]:
    uri = f"data:image/png;base64,{b64}"
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                                      {"type": "image_url", "image_url": {"url": uri}}]}],
            "max_tokens": 2}
    return {
        "embed": ("/embed", {"images": [b64]}),
        "florence /infer": ("/infer", {"image_base64": b64, "task": "caption", "max_new_tokens": 2}),
        "chat qwen2vl": ("/v1/chat/completions", {**chat, "model": "qwen2vl"}),
        "chat smolvlm2": ("/v1/chat/completions", {**chat, "model": "smolvlm2"}),
        "/v1/ocr": ("/v1/ocr", {"image": b64, "max_tokens": 2}),
        "/v1/describe_region": ("/v1/describe_region", {"image": b64, "box": "0,0,1,1", "max_tokens": 2}),
    }


def test_every_image_mode_on_every_route(rstack) -> None:
    failures = []
    with httpx.Client(base_url=rstack.settings.gateway_url, timeout=120) as gw:
        for mode, fmt in MODES:
            for route, (path, body) in route_calls(encoded(mode, fmt)).items():
                r = gw.post(path, json=body)
                if r.status_code != 200:
                    failures.append(f"{mode} {route}: {r.status_code} {r.text[:200]}")
    FIGURES["image modes x routes"] = {"modes": " ".join(m for m, _ in MODES), "routes": 6,
                                       "non-200 answers": len(failures)}
    assert not failures, "\n".join(failures)


class HeldImageServer:
    """Serves one PNG, but only after ``release`` is set; counts arrivals (the gateway fetching it)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.arrived = threading.Semaphore(0)
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
        png, outer = buf.getvalue(), self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.arrived.release()
                outer.release.wait(60)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/held.png"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


def test_inflight_cap_gives_429_with_retry_after_and_other_groups_carry_on(rstack) -> None:
    held = HeldImageServer()
    gateway = rstack.settings.gateway_url
    body = {"model": "qwen2vl", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": held.url}}]}]}
    try:
        with ThreadPoolExecutor(CHAT_CAP) as pool:
            running = [pool.submit(httpx.post, f"{gateway}/v1/chat/completions", json=body, timeout=120)
                       for _ in range(CHAT_CAP)]
            for _ in range(CHAT_CAP):  # both requests are inside the gateway, fetching the held image
                assert held.arrived.acquire(timeout=60)
            start = time.perf_counter()
            over = httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=30)
            rejection_s = time.perf_counter() - start
            other = httpx.post(f"{gateway}/embed_text", json={"text": "another group"}, timeout=60)
            held.release.set()
            done = [f.result() for f in running]
    finally:
        held.close()
    assert over.status_code == 429, over.text
    assert over.headers["retry-after"] == "2" and over.json()["error"]["type"] == "rate_limit_error"
    assert other.status_code == 200
    assert [r.status_code for r in done] == [200] * CHAT_CAP
    metrics = httpx.get(f"{gateway}/metrics").text
    assert 'vlmserve_rejected_total{route="/v1/chat/completions",status="429"}' in metrics
    FIGURES["in-flight cap (chat)"] = {"cap": CHAT_CAP, "rejection status": over.status_code,
                                       "rejection latency ms": round(rejection_s * 1000, 1),
                                       "held requests completed": len(done)}


def test_a_full_triton_queue_is_429_with_retry_after(rstack) -> None:
    """Triton's own queue policy, not the gateway's cap: florence2 is reloaded through the model control API with
    its served config changed to max_queue_size 1 and a 0.5 s batching delay, so that requests wait in its queue.
    A burst then gets Triton's "Exceeds maximum queue size" as 429 queue_full + Retry-After, the rest 200. The
    original config is loaded back afterwards."""
    import json

    triton, gateway = rstack.settings.triton_http_url, rstack.settings.gateway_url
    config = httpx.get(f"{triton}/v2/models/florence2/config", timeout=30).json()
    batching = config["dynamic_batching"]
    tight = {**config, "dynamic_batching": {
        **batching, "max_queue_delay_microseconds": 500_000, "preferred_batch_size": [config["max_batch_size"]],
        "default_queue_policy": {**batching["default_queue_policy"], "max_queue_size": 1}}}
    load = f"{triton}/v2/repository/models/florence2/load"
    assert httpx.post(load, json={"parameters": {"config": json.dumps(tight)}}, timeout=300).status_code == 200
    body = {"image_base64": encoded("RGB", "PNG", (32, 32)), "task": "caption", "max_new_tokens": 2}
    try:
        with ThreadPoolExecutor(6) as pool:
            started = time.perf_counter()
            answers = list(pool.map(lambda _: (httpx.post(f"{gateway}/infer", json=body, timeout=120),
                                               time.perf_counter() - started), range(6)))
    finally:
        # Back to the served config: a load without one keeps the override (Triton sees no change on disk).
        assert httpx.post(load, json={"parameters": {"config": json.dumps(config)}}, timeout=300).status_code == 200
    statuses = Counter(r.status_code for r, _ in answers)
    rejected = [(r, s) for r, s in answers if r.status_code == 429]
    assert set(statuses) <= {200, 429} and statuses[200] >= 1 and rejected, statuses
    for r, _ in rejected:
        assert r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"] == "2", r.text
    served = httpx.get(f"{triton}/v2/models/florence2/config", timeout=30).json()
    assert served["dynamic_batching"] == batching  # the original policy is back
    FIGURES["Triton queue full (florence2, max_queue_size 1)"] = {
        "answers to a burst of 6": dict(statuses),
        "slowest rejection ms": round(1000 * max(s for _, s in rejected), 1)}


def _stub_of(triton_pid: int, model: str) -> psutil.Process:
    for child in psutil.Process(triton_pid).children(recursive=True):
        try:
            if any(f"/{model}/" in arg for arg in child.cmdline()) and "stub" in child.name():
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no Python stub process for {model} under Triton {triton_pid}")


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_stub_then_wait_for_200(gateway: str, triton_pid: int, model: str) -> dict:
    stub = _stub_of(triton_pid, model)
    stub.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _alive(stub):  # Triton may not reap it: a zombie counts as dead
        assert time.monotonic() < deadline
        time.sleep(0.1)
    killed = time.monotonic()
    statuses: Counter[int] = Counter()
    # Named: a 200 from another family's embed_text model (the default moving during the reload) is no recovery.
    first = httpx.post(f"{gateway}/embed_text", json={"text": "during", "model": model}, timeout=60)
    statuses[first.status_code] += 1
    assert first.status_code == 503 and "retry-after" in first.headers, first.text
    others = httpx.post(f"{gateway}/infer", json={"image_base64": encoded("RGB", "PNG"), "task": "caption",
                                                   "max_new_tokens": 2}, timeout=120)
    assert others.status_code == 200
    deadline = killed + 180
    while True:  # polls a condition (the reload finishing), bounded
        r = httpx.post(f"{gateway}/embed_text", json={"text": "after", "model": model}, timeout=60)
        statuses[r.status_code] += 1
        if r.status_code == 200:
            break
        assert r.status_code == 503 and "retry-after" in r.headers, r.text
        assert time.monotonic() < deadline, "the model was not reloaded within 180 s"
        time.sleep(0.5)
    assert _stub_of(triton_pid, model).pid != stub.pid
    return {"seconds until 200 again": round(time.monotonic() - killed, 1), "answers while reloading": dict(statuses),
            "other model during reload": others.status_code}


# Issue 12: this used to answer 503 for good in a full `make test`. Triton's load API does nothing for a loaded model
# whose files did not change since Triton read them. Run alone, the first reload worked by accident: the stub writes
# 1/__pycache__/ after Triton read the timestamps, which looks like a change; in a full run a stack started earlier
# on the same repository had written it already, so every "reload" returned at once and the dead stub stayed. The
# healer unloads, then loads. The second kill covers that case in any test order (the files are unchanged then).
# Issue 23: the reload is the supervisor's, next to its Triton (orchestrator/heal.py), not the gateway's.
def test_dead_python_stub_is_503_then_reloaded_while_others_answer(rstack) -> None:
    gateway, triton_pid = rstack.settings.gateway_url, rstack.services["triton"].pid
    model = "siglip_embed_text"
    assert httpx.post(f"{gateway}/embed_text", json={"text": "before"}, timeout=60).status_code == 200
    first = _kill_stub_then_wait_for_200(gateway, triton_pid, model)
    again = _kill_stub_then_wait_for_200(gateway, triton_pid, model)
    healed = [line for line in SUPERVISOR_LOG if line.startswith(f"model {model} reloaded")]
    assert len(healed) == 2, SUPERVISOR_LOG
    FIGURES["python stub killed (siglip_embed_text)"] = {
        **first, "second kill: seconds until 200 again": again["seconds until 200 again"],
        "second kill: answers while reloading": again["answers while reloading"]}


CHAT_MODELS = ("qwen2vl", "smolvlm2")


def chat_load(rstack) -> dict[str, float]:
    """The chat models' load gauges from Triton's metrics: ``<model> admitted|running|waiting`` -> value."""
    text = httpx.get(f"http://{rstack.settings.host}:{rstack.settings.metrics_port}/metrics", timeout=10).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        for model in CHAT_MODELS:
            if f'model="{model}"' not in line:
                continue
            if line.startswith("vlmserve_chat_admitted{"):
                found[f"{model} admitted"] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("vlmserve_chat_rows{"):
                state = "running" if 'state="running"' in line else "waiting"
                found[f"{model} {state}"] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("nv_inference_pending_request_count{"):
                found[f"{model} pending"] = float(line.rsplit(" ", 1)[1])
    return found


def wait_chat_idle(rstack, timeout_s: float = 120) -> dict[str, float]:
    """Poll (bounded) until every chat model's admitted count, rows and Triton pending count are back at 0."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = chat_load(rstack)
        if all(f"{m} admitted" in load for m in CHAT_MODELS) and not any(load.values()):
            return load
        assert time.monotonic() < deadline, f"chat load not back to 0 after the clients left: {load}"
        time.sleep(0.5)


def abandon_stream(client: httpx.Client, body: dict, events: int) -> str:
    """Open a chat stream and hang up after ``events`` events (0: right after the headers); 429 -> retried."""
    while True:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code == 429:
                time.sleep(0.2)
                continue
            assert r.status_code == 200, r.read()
            lines = r.iter_lines()
            for _ in range(events):
                if next(lines, None) is None:
                    return "finished"
            return "abandoned"


def test_abandoned_streams_leave_no_admitted_request(rstack) -> None:
    """Clients hang up at random points of their streams (some right after the headers, some mid-way), two at a
    time over both chat models (the gateway's chat cap, so the models are kept busy): afterwards every chat
    model's admitted count (vlmserve_chat_admitted), its rows and Triton's pending count are back at 0 and the
    next request answers 200. 200 streams in make chaos, 20 in make test."""
    import random

    gateway, n = rstack.settings.gateway_url, (200 if CHAOS else 20)
    rng = random.Random(23)
    plans = [(CHAT_MODELS[i % 2], rng.randrange(0, 12), rng.choice([40, 200, 400])) for i in range(n)]
    outcomes: Counter[str] = Counter()

    def run(share: list[tuple[str, int, int]]) -> None:
        with httpx.Client(base_url=gateway, timeout=120) as client:
            for model, events, max_tokens in share:
                body = {"model": model, "max_tokens": max_tokens, "stream": True,
                        "messages": [{"role": "user", "content": "count to one thousand"}]}
                outcomes[abandon_stream(client, body, events)] += 1

    started = time.monotonic()
    with ThreadPoolExecutor(CHAT_CAP) as pool:
        list(pool.map(run, [plans[i::CHAT_CAP] for i in range(CHAT_CAP)]))
    load = wait_chat_idle(rstack)
    ok = httpx.post(f"{gateway}/v1/chat/completions", timeout=60, json={
        "model": "qwen2vl", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200, ok.text
    FIGURES[f"abandoned chat streams ({n})"] = {
        **dict(outcomes), "seconds": round(time.monotonic() - started, 1),
        "admitted / rows / pending after": sum(load.values()), "next request": ok.status_code}


@pytest.mark.skipif(not CHAOS, reason="make chaos only (VLMSERVE_CHAOS=1): restarts Triton, minutes")
def test_kill_triton_under_load_only_200_or_503_then_recovers(rstack) -> None:
    gateway = rstack.settings.gateway_url
    stop = threading.Event()  # rstack's supervisor restarts Triton
    answers: list[tuple[float, int, bool]] = []

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{gateway}/embed_text", json={"text": "load"})
                    answers.append((time.monotonic(), r.status_code, "retry-after" in r.headers))
                except httpx.TransportError:
                    answers.append((time.monotonic(), -1, False))

    workers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        while len(answers) < 20:
            time.sleep(0.1)
        killed = time.monotonic()
        os.kill(rstack.services["triton"].pid, signal.SIGKILL)
        deadline = killed + 300
        while not any(t > killed and s == 200 for t, s, _ in answers[-5:]) or \
                not [a for a in answers if a[0] > killed and a[1] != 200]:
            assert time.monotonic() < deadline, "no recovery within 300 s"
            time.sleep(0.2)
        recovered = min(t for t, s, _ in answers if t > killed and s == 200
                        and all(s2 == 200 for t2, s2, _ in answers if t2 > t))
        time.sleep(3)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    during = [a for a in answers if killed < a[0] <= recovered]
    after = [a for a in answers if a[0] > recovered]
    assert all(s in (200, 503) for _, s, _ in during), Counter(s for _, s, _ in during)
    assert all(has for _, s, has in during if s == 503)
    assert after and all(s == 200 for _, s, _ in after)
    FIGURES["kill -9 Triton under load"] = {
        "outage s": round(recovered - killed, 1), "answers during outage": dict(Counter(s for _, s, _ in during)),
        "answers after recovery": dict(Counter(s for _, s, _ in after))}


def test_schemathesis_over_the_whole_schema_finds_no_5xx(rstack, tmp_path) -> None:
    """Every operation of /openapi.json, all phases, a fixed seed and a cap on examples: never a 5xx."""
    import subprocess
    import sys
    from pathlib import Path

    examples = 25 if CHAOS else 2
    report = tmp_path / "schemathesis.json"
    cli = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [str(cli), "run", f"{rstack.settings.gateway_url}/openapi.json", "--checks", "not_a_server_error",
         "--seed", "20261201", "--generation-deterministic", "--max-examples", str(examples), "--workers", "1",
         "--request-timeout", "120", "--no-color", "--report", "ndjson", "--report-ndjson-path", str(report)],
        capture_output=True, text=True, timeout=1500, env={**os.environ, "NO_COLOR": "1"}, cwd=tmp_path,
    )
    tail = run.stdout[-3000:]
    summary = [line for line in run.stdout.splitlines() if "passed" in line or "failed" in line][-3:]
    FIGURES["schemathesis"] = {"seed": 20261201, "max examples per operation": examples,
                               "exit code": run.returncode, "summary": " / ".join(s.strip() for s in summary)}
    assert run.returncode == 0, tail + run.stderr[-2000:]
    # The schema states every constraint JSON Schema can express. What it cannot ("decodes as an image") leaves
    # the operations that take an image rejecting generated data; any other operation listed is a schema gap.
    mismatch = run.stdout.partition("Schema validation mismatch")[2].partition("\n\n")[2].partition("\n\n")[0]
    listed = {line.strip()[2:] for line in mismatch.splitlines() if line.strip().startswith("- ")}
    FIGURES["schemathesis"]["operations warned as rejecting generated data"] = sorted(listed) or "none"
    if CHAOS:  # with 2 examples per operation (make test) a warning is the luck of two draws; 25 make it a rate
        assert listed <= IMAGE_OPERATIONS, listed - IMAGE_OPERATIONS


IMAGE_OPERATIONS = {"POST /embed", "POST /infer", "POST /infer/upload", "POST /ocr", "POST /v1/describe_region",
                    "POST /v1/ocr", "POST /v1/predict"}


def _rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its children (Triton's Python stubs)."""
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total


def test_soak_at_saturation_loses_nothing_and_memory_stays_flat(rstack) -> None:
    """10 min in make chaos, 20 s in make test: every request answered (200, or 429 + Retry-After at the caps),
    no 5xx, no transport error, while 30% of the chat streams are abandoned mid-way; afterwards the chat models'
    admitted counts are back at 0; the gateway's RSS grows < 5% after a warm-up (< 10% in the 20-s run)."""
    gateway, seconds = rstack.settings.gateway_url, (600 if CHAOS else 20)
    gw_pid, triton_pid = rstack.services["gateway"].pid, rstack.services["triton"].pid
    image = encoded("RGB", "PNG", (32, 32))
    calls = [("/embed_text", {"text": "soak"}), ("/embed", {"images": [image]}),
             ("/infer", {"image_base64": image, "task": "caption", "max_new_tokens": 2}),
             ("/v1/chat/completions", {"model": "smolvlm2", "max_tokens": 16, "stream": True,
                                       "messages": [{"role": "user", "content": "hi"}]})]
    answers: Counter[str] = Counter()
    stop = threading.Event()

    def worker(i: int) -> None:
        with httpx.Client(base_url=gateway, timeout=120) as client:
            n = i
            while not stop.is_set():
                path, body = calls[n % len(calls)]
                n += 1
                try:
                    if body.get("stream") and n % 10 < 3:  # 30% of the chat streams: hang up after 2 events
                        with client.stream("POST", path, json=body) as r:
                            if r.status_code == 200:
                                lines = r.iter_lines()
                                next(lines, None), next(lines, None)
                                answers["200 abandoned"] += 1
                                continue
                            r.read()
                    else:
                        r = client.post(path, json=body)
                    ok = r.status_code == 200 or (r.status_code == 429 and "retry-after" in r.headers)
                    answers["200" if r.status_code == 200 else ("429" if ok else f"bad {r.status_code}")] += 1
                except httpx.TransportError as exc:
                    answers[f"lost {type(exc).__name__}"] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(min(10, seconds / 4))  # warm-up: caches, arenas and batch shapes settle before the baseline
    base_gw, base_triton = psutil.Process(gw_pid).memory_info().rss, _rss(triton_pid)
    before = sum(answers.values())
    time.sleep(seconds)
    end_gw, end_triton = psutil.Process(gw_pid).memory_info().rss, _rss(triton_pid)
    stop.set()
    for t in threads:
        t.join(180)
    measured = sum(answers.values()) - before
    load = wait_chat_idle(rstack)
    FIGURES[f"soak ({seconds} s, 6 clients, 30% of chat streams abandoned)"] = {
        "answers": dict(answers), "requests/s in the measured window": round(measured / seconds, 1),
        "chat admitted / rows / pending after": sum(load.values()),
        "gateway RSS growth %": round(100 * (end_gw - base_gw) / base_gw, 1),
        "triton+stubs RSS growth %": round(100 * (end_triton - base_triton) / base_triton, 1)}
    assert not [k for k in answers if not k.startswith(("200", "429"))], dict(answers)
    assert answers["200"] > 0 and answers["200 abandoned"] > 0
    assert end_gw < (1.05 if CHAOS else 1.10) * base_gw, FIGURES


def test_sigterm_drains_in_flight_requests_then_exits(rstack) -> None:
    """Last in this module: stops the stack through the orchestrator's own stop path (SIGTERM to the gateway,
    then Triton). A request in flight when SIGTERM arrives completes with 200; new requests meanwhile get 503 +
    Retry-After (not a refused connection) and /readyz 503; the gateway exits within the grace period."""
    held = HeldImageServer()
    gateway = rstack.settings.gateway_url
    body = {"model": "qwen2vl", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": held.url}}]}]}
    gateway_service = rstack.services["gateway"]
    rstack.halt_supervision()  # a stop on purpose: nothing may restart what it ends
    try:
        with ThreadPoolExecutor(2) as pool:
            in_flight = pool.submit(httpx.post, f"{gateway}/v1/chat/completions", json=body, timeout=120)
            assert held.arrived.acquire(timeout=60)  # the request is inside the gateway
            started = time.monotonic()
            stopping = pool.submit(rstack.stop)
            deadline = started + 30
            while True:  # polls a condition (the gateway draining), bounded
                ready = httpx.get(f"{gateway}/readyz", timeout=5)
                if ready.status_code == 503:
                    break
                assert time.monotonic() < deadline, "the gateway did not start draining after SIGTERM"
                time.sleep(0.1)
            refused = httpx.post(f"{gateway}/embed_text", json={"text": "during the drain"}, timeout=10)
            held.release.set()
            answer = in_flight.result(timeout=120)
            stopped = stopping.result(timeout=120)
            elapsed = time.monotonic() - started
    finally:
        held.close()
    assert answer.status_code == 200, answer.text
    assert refused.status_code == 503 and "retry-after" in refused.headers, refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    assert "gateway" in stopped and not gateway_service.alive()
    # Nothing restarted it: no tritonserver of this stack is left once the stop returned.
    run_dir = str(rstack.settings.run_path)  # this stack's own (its --backend-directory is under it)
    left = [p.pid for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "tritonserver" and run_dir in " ".join(p.info["cmdline"] or [])]
    assert not left, f"tritonserver still running after the stop: {left}"
    assert elapsed < rstack.settings.stop_timeout_s + 15
    FIGURES["SIGTERM drain (process launcher)"] = {"in-flight request": answer.status_code,
                                                  "new request while draining": refused.status_code,
                                                  "stop took s": round(elapsed, 1)}
