"""The Grafana dashboard of a vlmserve deployment, built with ``grafana-foundation-sdk`` (typed builders, no
hand-written JSON), over the Prometheus series the stack exports: the gateway's ``/metrics``, Triton's metrics port
(``nv_*``) and the chat models' own series (``vlmserve_chat_*``, cache counters) that Triton exports beside them.

``python -m vlmserve.orchestrator.deploy.dashboard [path]`` writes it (default: the committed
``docker/k8s/monitoring/grafana-dashboard.json``, which the monitoring kustomization ships as a ConfigMap that
Grafana's dashboard sidecar picks up). ``tests/integration/test_dashboard.py`` checks that the committed file is
what this module builds and that every query names only series the real stack exports.

``grafana-foundation-sdk`` is a development dependency (``vlmserve[dev]``): nothing at run time imports this.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from vlmserve import paths

DEFAULT_PATH = paths.PROJECT_ROOT / "docker" / "k8s" / "monitoring" / "grafana-dashboard.json"
UID = "vlmserve-requests"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# (row title, [(panel title, unit, [(PromQL, legend)])]): time series panels.
Panel = tuple[str, str, list[tuple[str, str]]]
LAYOUT: list[tuple[str, list[Panel]]] = [
    ("Gateway", [
        ("Requests/s by route and status", "reqps", [
            ('sum by (route, status) (rate(vlmserve_requests_total{route!="unmatched"}[$__rate_interval]))',
             "{{route}} {{status}}")]),
        ("Rejected (429 overload, 503 unavailable)/s", "reqps", [
            ("sum by (route, status) (rate(vlmserve_rejected_total[$__rate_interval]))", "{{route}} {{status}}")]),
        ("Errors/s by route, model and status", "reqps", [
            ("sum by (route, model, status) (rate(vlmserve_errors_total[$__rate_interval]))",
             "{{route}} {{model}} {{status}}")]),
        ("Latency p50 / p95 / p99 by route", "s", [
            (f"histogram_quantile({q}, sum by (route, le) "
             "(rate(vlmserve_request_latency_seconds_bucket[$__rate_interval])))", f"{{{{route}}}} p{int(q * 100)}")
            for q in (0.5, 0.95, 0.99)]),
        ("Requests in flight", "short", [
            ("sum(vlmserve_requests_in_flight)", "in flight")]),
        ("Items sent to Triton/s by model", "short", [
            ("sum by (model) (rate(vlmserve_inference_items_total[$__rate_interval]))", "{{model}}")]),
    ]),
    ("Triton", [
        ("Queue time per request by model", "µs", [
            ("sum by (model) (rate(nv_inference_queue_duration_us[$__rate_interval])) / "
             "clamp_min(sum by (model) (rate(nv_inference_request_success[$__rate_interval])), 1e-9)",
             "{{model}}")]),
        ("Compute time per request by model", "µs", [
            ("sum by (model) (rate(nv_inference_compute_infer_duration_us[$__rate_interval])) / "
             "clamp_min(sum by (model) (rate(nv_inference_request_success[$__rate_interval])), 1e-9)",
             "{{model}}")]),
        ("Batch size (inferences per execution) by model", "short", [
            ("sum by (model) (rate(nv_inference_count[$__rate_interval])) / "
             "clamp_min(sum by (model) (rate(nv_inference_exec_count[$__rate_interval])), 1e-9)", "{{model}}")]),
        ("Successes and failures/s by model", "reqps", [
            ("sum by (model) (rate(nv_inference_request_success[$__rate_interval]))", "{{model}} ok"),
            ("sum by (model) (rate(nv_inference_request_failure[$__rate_interval]))", "{{model}} failed")]),
    ]),
    ("Chat engine", [
        ("Rows running / waiting by model", "short", [
            ("sum by (model, state) (vlmserve_chat_rows)", "{{model}} {{state}}")]),
        ("Requests admitted (running + queued) by model", "short", [
            ("sum by (model) (vlmserve_chat_admitted)", "{{model}}")]),
        ("Tokens/s by model", "short", [
            ("sum by (model, kind) (rate(vlmserve_chat_tokens_total[$__rate_interval]))", "{{model}} {{kind}}")]),
        ("Queue wait before prefill (s per s)", "s", [
            ("sum by (model) (rate(vlmserve_chat_queue_seconds_total[$__rate_interval]))", "{{model}}")]),
        ("Image feature cache hit ratio", "percentunit", [
            ("sum by (model) (rate(vlmserve_image_cache_hits_total[$__rate_interval])) / clamp_min("
             "sum by (model) (rate(vlmserve_image_cache_hits_total[$__rate_interval])) + "
             "sum by (model) (rate(vlmserve_image_cache_misses_total[$__rate_interval])), 1e-9)", "{{model}}")]),
        ("Prefix (KV) cache hit ratio", "percentunit", [
            ("sum by (model) (rate(vlmserve_prefix_cache_hits_total[$__rate_interval])) / clamp_min("
             "sum by (model) (rate(vlmserve_prefix_cache_hits_total[$__rate_interval])) + "
             "sum by (model) (rate(vlmserve_prefix_cache_misses_total[$__rate_interval])), 1e-9)", "{{model}}")]),
    ]),
]


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    source = DataSourceRef(type_val=DATASOURCE["type"], uid=DATASOURCE["uid"])
    board = (dashboard.Dashboard("vlmserve: requests, Triton, chat engine").uid(UID)
             .tags(["vlmserve", "triton"]).refresh("30s").time("now-1h", "now").timezone("browser")
             .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")))
    panel_id = 0
    for row, panels in LAYOUT:
        panel_id += 1
        board = board.with_row(dashboard.Row(row).id(panel_id))
        for title, unit, queries in panels:
            panel_id += 1
            panel = timeseries.Panel().id(panel_id).title(title).unit(unit).datasource(source).height(8).span(12)
            for i, (expr, legend) in enumerate(queries):
                panel = panel.with_target(prometheus.Dataquery().expr(expr).legend_format(legend)
                                          .ref_id(chr(ord("A") + i)))
            board = board.with_panel(panel)
    result: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    return result


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    return [t["expr"] for p in board.get("panels", []) for t in p.get("targets", []) if t.get("expr")]


_FUNCTIONS = {"sum", "rate", "by", "histogram_quantile", "clamp_min", "avg", "max", "min", "irate", "increase",
              "without", "on", "ignoring", "le", "avg_over_time", "count"}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (identifiers outside ``{...}`` and ``[...]``, less
    functions, keywords, ``by (...)`` label lists and Grafana variables)."""
    text = re.sub(r"\{[^}]*\}", " ", expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    names = set(re.findall(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text))  # not inside numbers (1e-9)
    return {n for n in names if n not in _FUNCTIONS and not n.startswith("__")}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else DEFAULT_PATH
    path.write_text(render())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
