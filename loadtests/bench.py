"""``vlmserve bench``: vlmserve vs the one-request-at-a-time baseline, same load, same machine, one run.

Scenarios (each a headless Locust run, back to back):
  siglip-baseline / siglip-vlmserve / siglip-vlmserve-int8: ``POST /embed`` with one image, N users;
  siglip-direct: the same request straight to Triton (gateway overhead = gateway vs direct latency);
  florence-baseline / florence-vlmserve: Florence-2 ``caption`` via ``POST /infer``, M users.
Writes ``loadtests/reports/<name>.{json,md,png}``. Models: the ``perf`` set (real sizes, random weights).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from vlmserve import paths

REPORTS = paths.PROJECT_ROOT / "loadtests" / "reports"
USERS_FILE = paths.PROJECT_ROOT / "loadtests" / "bench_users.py"


@dataclass
class Scenario:
    name: str
    user_class: str
    host: str
    users: int
    duration_s: int
    env: dict[str, str]


def gemm_gflops(n: int = 2048, repeats: int = 8) -> dict[str, float]:
    """Best fp32 GEMM rate of this machine with torch and with ONNX Runtime (default threads).

    Both are measured because their kernels differ (ORT's MLAS uses the widest SIMD the CPU has): the
    larger one is the ceiling the encoder is compared with.
    """
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    def best_of(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return 2 * n**3 / best / 1e9

    a, b = torch.randn(n, n), torch.randn(n, n)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    an, bn = a.numpy(), b.numpy()
    return {"torch": best_of(lambda: a @ b), "onnxruntime": best_of(lambda: session.run(None, {"a": an, "b": bn})),
            "numpy": best_of(lambda: np.matmul(an, bn))}


def siglip_vision_gflop(config_dir: Path) -> float:
    """FLOPs (multiply-add = 2) of one image through the SigLIP vision tower, from its config."""
    from transformers import AutoConfig

    vc = AutoConfig.from_pretrained(config_dir).vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    d, f, layers = vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers
    per_layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * f
    patch = n * d * 3 * vc.patch_size**2
    head = 2 * n * d * d + 2 * d * d + 2 * d * f  # attention-pool head: k/v over patches, one query, MLP
    return 2 * (layers * per_layer + patch + head) / 1e9


def run_locust(s: Scenario, out: Path) -> dict[str, Any]:
    prefix = out / s.name
    env = dict(os.environ, **s.env)
    cmd = [sys.executable, "-m", "locust", "-f", str(USERS_FILE), s.user_class, "--headless", "-u", str(s.users),
           "-r", str(s.users), "-t", f"{s.duration_s}s", "--host", s.host, "--csv", str(prefix), "--only-summary",
           "--stop-timeout", "120"]
    subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, timeout=s.duration_s + 600)
    with open(f"{prefix}_stats.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    requests = int(row["Request Count"])
    return {
        "scenario": s.name, "users": s.users, "duration_s": s.duration_s, "requests": requests,
        "failures": int(row["Failure Count"]), "rps": float(row["Requests/s"]),
        "p50_ms": float(row["50%"]), "p95_ms": float(row["95%"]), "p99_ms": float(row["99%"]),
        "avg_ms": float(row["Average Response Time"]),
    }


def _wait(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not healthy after {timeout:.0f}s")


def run_bench(name: str = "cpu-perf", users: int = 16, duration_s: int = 45, florence_users: int = 8,
              florence_duration_s: int = 150, max_new_tokens: int = 32, florence: bool = True,
              log=print) -> Path:
    from export.progress import Progress
    from export.repository import ExportOptions
    from export.run import export_model_set
    from orchestrator.ports import free_port
    from orchestrator.process import ProcessRuntime
    from orchestrator.settings import OrchestratorSettings

    out = REPORTS / name
    out.mkdir(parents=True, exist_ok=True)
    repo = paths.repository_dir("perf")
    log("building/exporting the perf model set (real sizes, random weights; first run takes minutes)")
    stamps = export_model_set("perf", repo=repo, options=ExportOptions(int8=True), progress=Progress())
    siglip_dir = paths.state_dir() / "perf-models" / "siglip"
    florence_dir = paths.state_dir() / "perf-models" / "florence2"

    log("measuring the GEMM ceiling")
    gemms = gemm_gflops()
    gemm = max(gemms.values())
    gflop_per_image = siglip_vision_gflop(siglip_dir)

    settings = OrchestratorSettings(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                                    gateway_port=free_port(), repository=repo,
                                    state_dir=paths.state_dir() / "bench", ready_timeout_s=900)
    runtime = ProcessRuntime(settings, log=log)
    baseline_port = free_port()
    results: list[dict[str, Any]] = []
    timing_log = out / "florence_timing.jsonl"
    timing_log.unlink(missing_ok=True)
    florence_stats: dict[str, Any] = {}
    baseline = subprocess.Popen(
        [sys.executable, "-m", "loadtests.baseline.server", "--siglip", str(siglip_dir), "--florence2",
         str(florence_dir), "--port", str(baseline_port)],
        cwd=paths.PROJECT_ROOT, stdout=open(out / "baseline.log", "w"), stderr=subprocess.STDOUT,
    )
    try:
        _wait(f"http://127.0.0.1:{baseline_port}/health", 900, baseline)
        runtime.start()
        gw, base = settings.gateway_url, f"http://127.0.0.1:{baseline_port}"
        scenarios = [
            Scenario("siglip-baseline", "EmbedUser", base, users, duration_s, {}),
            Scenario("siglip-vlmserve", "EmbedUser", gw, users, duration_s, {}),
            Scenario("siglip-vlmserve-int8", "EmbedUser", gw, users, duration_s,
                     {"VLMSERVE_BENCH_MODEL": "siglip_embed_image_int8"}),
            Scenario("siglip-direct", "DirectEmbedUser", settings.triton_http_url, users, duration_s, {}),
        ]
        if florence:
            tokens = {"VLMSERVE_BENCH_MAX_NEW_TOKENS": str(max_new_tokens)}
            scenarios += [
                Scenario("florence-baseline", "CaptionUser", base, florence_users, florence_duration_s, tokens),
                Scenario("florence-vlmserve", "CaptionUser", gw, florence_users, florence_duration_s,
                         {**tokens, "VLMSERVE_BENCH_TIMING_LOG": str(timing_log)}),
            ]
        for s in scenarios:
            log(f"running {s.name}: {s.users} users for {s.duration_s}s against {s.host}")
            results.append(run_locust(s, out))
            log(f"  {results[-1]['rps']:.2f} req/s, p95 {results[-1]['p95_ms']:.0f} ms, "
                f"{results[-1]['failures']} failures")
        if florence:
            stats = httpx.get(f"{settings.triton_http_url}/v2/models/florence2/stats").json()["model_stats"][0]
            florence_stats["batch_sizes"] = {str(b["batch_size"]): b["compute_infer"]["count"]
                                             for b in stats["batch_stats"]}
            lines = timing_log.read_text().splitlines() if timing_log.exists() else []
            timings = [json.loads(line) for line in lines]
            if timings:
                vision = [t["preprocess_and_vision_ms"] for t in timings]
                florence_stats["mean_vision_ms_per_batch"] = sum(vision) / len(vision)
                florence_stats["mean_generate_ms_per_batch"] = sum(t["generate_ms"] for t in timings) / len(timings)
        siglip_stats = httpx.get(f"{settings.triton_http_url}/v2/models/siglip_embed_image/stats").json()
        s0 = siglip_stats["model_stats"][0]
        siglip_batches = {str(b["batch_size"]): b["compute_infer"]["count"] for b in s0["batch_stats"]}
    finally:
        runtime.stop()
        baseline.terminate()
        baseline.wait(timeout=30)

    by = {r["scenario"]: r for r in results}
    derived: dict[str, Any] = {
        "gemm_gflops": gemm,
        "gemm_gflops_by_library": gemms,
        "siglip_vision_gflop_per_image": gflop_per_image,
        "compute_ceiling_images_per_s": gemm / gflop_per_image,
        "siglip_batch_sizes": siglip_batches,
        "florence": florence_stats,
    }

    def ratio(a: str, b: str, key: str = "rps") -> float | None:
        return by[a][key] / by[b][key] if a in by and b in by and by[b][key] else None

    derived["siglip_fp32_vs_baseline"] = ratio("siglip-vlmserve", "siglip-baseline")
    derived["siglip_int8_vs_baseline"] = ratio("siglip-vlmserve-int8", "siglip-baseline")
    derived["siglip_fp32_share_of_ceiling"] = by["siglip-vlmserve"]["rps"] / derived["compute_ceiling_images_per_s"]
    derived["gateway_overhead_share"] = (
        1 - by["siglip-direct"]["avg_ms"] / by["siglip-vlmserve"]["avg_ms"] if by["siglip-vlmserve"]["avg_ms"] else None
    )
    if florence:
        derived["florence_vs_baseline"] = ratio("florence-vlmserve", "florence-baseline")
    report = {
        "name": name, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                  "python": platform.python_version()},
        "settings": {"users": users, "duration_s": duration_s, "florence_users": florence_users,
                     "florence_duration_s": florence_duration_s, "max_new_tokens": max_new_tokens},
        "int8_min_cosine": stamps.get("siglip", {}).get("int8_min_cosine"),
        "results": results, "derived": derived,
        "command": f"vlmserve bench --name {name} --users {users} --duration {duration_s} "
                   f"--florence-users {florence_users} --florence-duration {florence_duration_s}",
    }
    json_path = REPORTS / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=2))
    (REPORTS / f"{name}.md").write_text(render_markdown(report))
    render_chart(report, REPORTS / f"{name}.png")
    return json_path


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def render_markdown(report: dict[str, Any]) -> str:
    d = report["derived"]
    lines = [
        f"# vlmserve bench: {report['name']}",
        "",
        f"Command: `{report['command']}` on {report['machine']['platform']} ({report['machine']['cpus']} CPUs).",
        "Models: the `perf` set (real architectures and sizes, random weights). Both servers ran on the same",
        "machine, back to back, with the same Locust load.",
        "",
        "| scenario | users | requests | failures | req/s | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['scenario']} | {r['users']} | {r['requests']} | {r['failures']} | {r['rps']:.2f} | "
                     f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} |")
    lines += [
        "",
        "| derived | value |",
        "|---|---|",
        f"| SigLIP fp32 throughput vs baseline | {_fmt(d.get('siglip_fp32_vs_baseline'))}x |",
        f"| SigLIP int8 throughput vs baseline | {_fmt(d.get('siglip_int8_vs_baseline'))}x |",
        f"| int8 vs fp32 min cosine (vision, text) | {report.get('int8_min_cosine')} |",
        f"| GEMM ceiling (2048² fp32, best of torch/onnxruntime/numpy) | {d['gemm_gflops']:.0f} GFLOP/s "
        f"({', '.join(f'{k} {v:.0f}' for k, v in d['gemm_gflops_by_library'].items())}) |",
        f"| SigLIP vision FLOPs per image | {d['siglip_vision_gflop_per_image']:.1f} GFLOP |",
        f"| compute ceiling | {d['compute_ceiling_images_per_s']:.2f} images/s |",
        f"| SigLIP fp32 share of the ceiling | {_fmt(100 * d['siglip_fp32_share_of_ceiling'], '.0f')}% |",
        f"| gateway overhead (1 - direct/gateway mean latency) | "
        f"{_fmt(None if d['gateway_overhead_share'] is None else 100 * d['gateway_overhead_share'], '.1f')}% |",
        f"| SigLIP batch sizes formed by Triton (size: executions) | {d['siglip_batch_sizes']} |",
    ]
    if "florence_vs_baseline" in d:
        f = d["florence"]
        lines += [
            f"| Florence-2 caption throughput vs baseline | {_fmt(d.get('florence_vs_baseline'))}x |",
            f"| Florence-2 batch sizes (size: executions) | {f.get('batch_sizes')} |",
            f"| Florence-2 per batch: preprocess+vision / generate | "
            f"{_fmt(f.get('mean_vision_ms_per_batch'), '.0f')} ms / "
            f"{_fmt(f.get('mean_generate_ms_per_batch'), '.0f')} ms |",
        ]
    return "\n".join(lines) + "\n"


def render_chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["scenario"] for r in results]
    axes[0].barh(names, [r["rps"] for r in results], color="#4c72b0")
    axes[0].set_xlabel("requests/s (higher is better)")
    axes[1].barh(names, [r["p95_ms"] for r in results], color="#dd8452")
    axes[1].set_xlabel("p95 latency ms (lower is better)")
    for ax in axes:
        ax.invert_yaxis()
    fig.suptitle(f"vlmserve bench: {report['name']} ({report['machine']['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
