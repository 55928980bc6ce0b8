"""The Locust suite (loadtests/locustfile.py) runs headless against the real stack: every user class, every request
name, no failures, and its SLO gate turns a broken SLO into exit code 1. No speed assertions."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"

FLORENCE_TASKS = ("caption", "object_detection", "ocr", "phrase_grounding", "region_to_category")
# (Type, Name) of every entry the suite reports.
EXPECTED = [
    ("POST", "/embed"),
    ("POST", "/embed_text"),
    ("POST", "/v1/embeddings [float]"),
    ("POST", "/v1/embeddings [base64]"),
    *[("POST", f"/infer [{t}]") for t in FLORENCE_TASKS],
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/chat/completions [stream]"),
    ("TTFT", "chat ttft"),
    ("POST", "/ocr"),
    ("POST", "/v1/ocr"),
]

if importlib.util.find_spec("locust") is None:  # find_spec, not import: importing locust monkey-patches gevent
    pytest.skip("locust is not installed: pip install -e '.[loadtest]'", allow_module_level=True)


def run_locust(stack, tmp_path: Path, *args: str, env: dict[str, str],
               run_time: str) -> tuple[subprocess.CompletedProcess, list[dict[str, str]]]:
    """``locust`` headless as a subprocess against the stack's gateway; its result and the _stats.csv rows."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "VLMSERVE_LT_"))}
    prefix = tmp_path / "run"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", stack.gateway,
           "-t", run_time, "--stop-timeout", "10", "--csv", str(prefix), "--html", str(tmp_path / "run.html"),
           "--exit-code-on-error", "1", "--only-summary", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=180)
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return proc, rows


def test_every_user_class_and_route_runs_without_failures(stack, tmp_path: Path) -> None:
    env = {
        "VLMSERVE_LT_MAX_NEW_TOKENS": "4",
        "VLMSERVE_LT_NUM_BEAMS": "1",
        "VLMSERVE_LT_FLORENCE_TASKS": ",".join(FLORENCE_TASKS),
        "VLMSERVE_LT_COVER_FIRST": "1",  # each user runs each of its tasks once first: every name shows up
        "VLMSERVE_LT_STOP_AFTER_COVER": "1",  # and the run ends there (-t is a cap: a busy host only takes longer)
        "VLMSERVE_LT_MAX_FAIL_RATIO": "0",
        # One user per class.
        **{f"VLMSERVE_LT_WEIGHT_{c}": "1" for c in ("EMBEDDINGSUSER", "FLORENCEUSER", "CHATUSER", "OCRUSER")},
    }
    proc, rows = run_locust(stack, tmp_path, "-u", "4", "-r", "4", env=env, run_time="120s")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "SLO gates passed" in output, output[-4000:]
    aggregated = next(r for r in rows if r["Name"] == "Aggregated")
    assert int(aggregated["Failure Count"]) == 0, output[-4000:]
    counts = {(r["Type"], r["Name"]): int(r["Request Count"]) for r in rows if r["Name"] != "Aggregated"}
    missing = [f"{t} {n}" for t, n in EXPECTED if counts.get((t, n), 0) < 1]
    assert not missing, f"no requests for {missing}; got {counts}"
    assert set(counts) <= set(EXPECTED), f"unexpected entries {set(counts) - set(EXPECTED)}"
    assert (tmp_path / "run.html").stat().st_size > 0


def test_tags_select_a_mix_and_a_broken_slo_fails_the_run(stack, tmp_path: Path) -> None:
    # --tags leaves only /embed_text (the other classes are not spawned, so no user errors); a p95 limit nothing
    # can meet makes the exit code 1 with the reason in the log.
    env = {"VLMSERVE_LT_MAX_P95_MS": "0.001"}
    proc, rows = run_locust(stack, tmp_path, "-u", "2", "-r", "2", "--tags", "embed_text", env=env, run_time="3s")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-4000:]
    assert "SLO gate failed: p95 latency" in output, output[-4000:]
    names = {r["Name"] for r in rows if r["Name"] != "Aggregated"}
    assert names == {"/embed_text"}, names
    assert int(next(r for r in rows if r["Name"] == "Aggregated")["Failure Count"]) == 0
    assert (tmp_path / "run_exceptions.csv").read_text().count("\n") <= 1, output[-4000:]  # header only
