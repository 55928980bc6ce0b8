"""The bench's arithmetic: medians and ranges over rounds, ratios against the stronger baseline."""

from __future__ import annotations

from loadtests.bench import derive, render_markdown, summarise


def _run(scenario: str, rps: float, round_no: int, **extra) -> dict:
    return {"scenario": scenario, "round": round_no, "users": 16, "duration_s": 30, "requests": int(rps * 30),
            "failures": 0, "rps": rps, "p50_ms": 1000 / rps, "p95_ms": 1500 / rps, "p99_ms": 2000 / rps,
            "avg_ms": 1100 / rps, **extra}


def _report(results: list[dict]) -> dict:
    return {
        "name": "t", "command": "vlmserve bench", "results": results, "summary": summarise(results),
        "machine": {"cpu": "Test CPU", "isa": ["avx2", "avx512_bf16"], "cpus": 2, "platform": "linux"},
        "settings": {"model_set": "perf", "repeats": 3, "chat_users": [1, 8]},
        "runtime_choice": {"siglip_vision": {"runtime": "openvino", "precision": "bf16", "min_cosine": 0.99997,
                                             "items_per_s": 10.0, "candidates": []}},
        "ceilings_gflops": {"fp32": {"torch": 150.0, "onnxruntime": 200.0}, "bf16": {"torch": 400.0}},
        "siglip_vision_gflop_per_image": 40.0,
        "raw_images_per_s": {"vlmserve": 10.0, "baseline-fp32": 4.0, "baseline-bf16": 5.0},
    }


def test_medians_ranges_and_the_stronger_baseline() -> None:
    results = []
    for r, (fp32, bf16, ours, direct) in enumerate([(3.0, 6.0, 9.0, 9.5), (3.2, 5.0, 8.0, 8.4), (2.8, 5.5, 8.5, 9.0)]):
        results += [_run("siglip-baseline-fp32", fp32, r), _run("siglip-baseline-bf16", bf16, r),
                    _run("siglip-vlmserve", ours, r), _run("siglip-direct", direct, r)]
        results += [_run("chat-baseline-fp32-8u", 0.5, r, tokens_per_s=10.0, ttft_p50_ms=900, ttft_p95_ms=1500),
                    _run("chat-vlmserve-1u", 1.0, r, tokens_per_s=20.0, ttft_p50_ms=400, ttft_p95_ms=500),
                    _run("chat-vlmserve-8u", 2.0, r, tokens_per_s=60.0, ttft_p50_ms=600, ttft_p95_ms=700)]
    report = _report(results)
    s = report["summary"]["siglip-baseline-bf16"]
    assert s["rounds"] == 3 and s["rps"] == 5.5 and s["rps_range"] == [5.0, 6.0]
    d = derive(report)
    # bf16 autocast is the stronger baseline here: the ratio is against it, not against fp32.
    assert d["siglip_stronger_baseline"] == "siglip-baseline-bf16"
    assert d["siglip_vs_stronger_baseline"] == 8.5 / 5.5
    assert d["siglip_vs_baseline_fp32"] == 8.5 / 3.0
    # The chosen precision's ceiling (bf16), not the fp32 one.
    assert d["ceiling_gflops_for_precision"] == 400.0 and d["ceiling_images_per_s"] == 10.0
    assert d["siglip_share_of_ceiling"] == 0.85
    assert d["served_over_raw"]["vlmserve"] == 0.85
    assert abs(d["gateway_overhead_throughput"] - (1 - 8.5 / 9.0)) < 1e-12
    assert d["chat_tokens_per_s_vs_stronger_baseline"] == 6.0
    assert d["chat_ttft_p95_loaded_over_idle_p50"] == 700 / 400
    report["derived"] = d
    text = render_markdown(report)
    assert "Test CPU" in text and "avx512_bf16" in text and "5.50 (5.00–6.00)" in text
