"""The committed Grafana dashboard is what orchestrator/deploy/dashboard.py builds (grafana-foundation-sdk); its
queries against the real stack's series: tests/integration/test_dashboard.py."""

from __future__ import annotations

import json

from vlmserve.orchestrator.deploy import dashboard


def test_the_committed_dashboard_is_the_generated_one() -> None:
    committed = dashboard.DEFAULT_PATH.read_text()
    assert committed == dashboard.render(), (
        "docker/k8s/monitoring/grafana-dashboard.json is stale: run `python -m vlmserve.orchestrator.deploy.dashboard`")


def test_every_panel_has_a_query_and_a_unique_id() -> None:
    board = json.loads(dashboard.render())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) == sum(len(p) for _, p in dashboard.LAYOUT)
    assert all(p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in panels)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert board["uid"] == dashboard.UID


def test_metric_names_of_a_query() -> None:
    expr = ('histogram_quantile(0.95, sum by (route, le) (rate(vlmserve_request_latency_seconds_bucket'
            '{route!="x"}[$__rate_interval]))) / clamp_min(sum by (model) (nv_inference_count), 1e-9)')
    assert dashboard.metric_names(expr) == {"vlmserve_request_latency_seconds_bucket", "nv_inference_count"}
