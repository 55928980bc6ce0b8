"""loadtests/bench_users.ChatUser headless against the baseline server's chat route on the tiny SmolVLM2: the rows
it writes (whole request, TTFT, ITL, tokens) and that they add up. No speed assertions."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

if importlib.util.find_spec("locust") is None:  # find_spec, not import: importing locust monkey-patches gevent
    pytest.skip("locust is not installed: pip install -e '.[loadtest]'", allow_module_level=True)


@pytest.fixture(scope="module")
def baseline_chat(tmp_path_factory: pytest.TempPathFactory):
    from vlmserve.export.tiny import build_tiny_smolvlm2

    model = build_tiny_smolvlm2(tmp_path_factory.mktemp("bench-chat") / "smolvlm2")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vlmserve.loadtests.baseline.server", "--smolvlm2", str(model),
                             "--device", "cpu", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the baseline server did not start"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_chat_user_reports_ttft_itl_and_tokens(baseline_chat: str, tmp_path: Path) -> None:
    prefix = tmp_path / "chat"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "VLMSERVE_BENCH_"))}
    env["VLMSERVE_BENCH_MAX_NEW_TOKENS"] = "8"
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "bench_users.py"), "ChatUser",
           "--headless", "-u", "2", "-r", "2", "-t", "8s", "--host", baseline_chat, "--csv", str(prefix),
           "--only-summary", "--stop-timeout", "30"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    assert ("POST", "chat completion") in rows, (proc.stderr[-2000:], list(rows))
    whole = rows[("POST", "chat completion")]
    ttft, itl, tokens = (rows[("METRIC", n)] for n in ("chat TTFT", "chat ITL", "chat tokens"))
    completed = int(whole["Request Count"])
    assert completed > 0 and int(whole["Failure Count"]) == 0, proc.stderr[-2000:]
    assert int(ttft["Request Count"]) == int(tokens["Request Count"]) == completed
    assert 0 < float(ttft["Average Response Time"]) <= float(whole["Average Response Time"])
    # The tiny tokenizer's text has few spaces, and TextIteratorStreamer sends whole words: deltas may all come
    # at once (ITL 0); the perf tokenizer's ids are words, one delta each.
    assert 0 <= float(itl["Average Response Time"]) < float(whole["Average Response Time"])
    assert 0 < float(tokens["Average Content Size"]) <= 8
    if ("METRIC", "chat stopped early") not in rows:  # every answer ran to max_tokens
        assert float(tokens["Average Content Size"]) == 8
