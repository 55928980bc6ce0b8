"""Every query of the Grafana dashboard (orchestrator/deploy/dashboard.py) names only series the real stack
exports: the gateway's /metrics and Triton's metrics port (with the chat models' own series), scraped here."""

from __future__ import annotations

import httpx
import pytest

from vlmserve.orchestrator.deploy import dashboard

pytestmark = pytest.mark.integration

SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"), "counter": ("_total",)}


def exported_names(text: str) -> set[str]:
    """Series names of a Prometheus text exposition: samples, and the families declared by # TYPE (a labelled
    family with no sample yet still exists), with their derived series."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            names.add(name)
            names.update(name + suffix for suffix in SUFFIXES.get(kind, ()))
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


def test_every_dashboard_query_names_exported_series(stack) -> None:
    # A chat request first: the chat models' series are there from their load, the gateway's labelled ones from
    # their first sample.
    r = httpx.post(f"{stack.gateway}/v1/chat/completions", timeout=120, json={
        "model": "smolvlm2", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    exported = exported_names(httpx.get(f"{stack.gateway}/metrics", timeout=10).text)
    exported |= exported_names(httpx.get(f"http://{stack.settings.host}:{stack.settings.metrics_port}/metrics",
                                         timeout=10).text)
    board = dashboard.build()
    missing = {expr: sorted(dashboard.metric_names(expr) - exported) for expr in dashboard.queries(board)}
    missing = {expr: names for expr, names in missing.items() if names}
    assert not missing, f"queries naming series the stack does not export: {missing}"
    assert len(dashboard.queries(board)) >= 15
