"""The bench's arithmetic: medians and ranges over rounds, ratios against the stronger baseline."""

from __future__ import annotations

from vlmserve.loadtests.bench import derive, llama_cpp_ratios, render_markdown, summarise


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


def _chat(scenario: str, round_no: int, users: int, tokens_per_s: float, ttft: float, itl: float, **extra) -> dict:
    return {**_run(scenario, tokens_per_s / 64, round_no), "users": users, "tokens_per_s": tokens_per_s,
            "ttft_p50_ms": ttft, "ttft_p95_ms": 2 * ttft, "itl_p50_ms": itl, "itl_p95_ms": 1.5 * itl,
            "stopped_early": 0, "deltas_per_token": 1.0, **extra}


def test_llama_cpp_rows_ratios_and_a_report_without_siglip() -> None:
    results = []
    for r, (ours, theirs) in enumerate([(100.0, 50.0), (90.0, 60.0), (110.0, 40.0)]):
        results += [
            _chat("chat-vlmserve-1u", r, 1, 30.0, 100, 30), _chat("chat-llama.cpp-1u", r, 1, 60.0, 50, 15),
            _chat("chat-vlmserve-8u", r, 8, ours, 400, 70), _chat("chat-llama.cpp-8u", r, 8, theirs, 200, 140),
            _chat("chat-vlmserve-8u-staggered", r, 8, 40.0, 300, 60),
            _chat("chat-llama.cpp-8u-staggered", r, 8, 40.0, 150, 120, stopped_early=1),
            _chat("chat-baseline-fp32-8u", r, 8, 10.0, 900, 40),
        ]
    report = {
        "name": "chat-llamacpp", "command": "vlmserve bench --llama-cpp --no-siglip", "results": results,
        "summary": summarise(results),
        "machine": {"cpu": "AMD EPYC", "isa": ["avx2", "fma"], "cpus": 2, "platform": "linux"},
        "settings": {"model_set": "perf", "repeats": 3, "chat_users": [1, 8], "chat_max_tokens": 64,
                     "chat_think_s": 2.0, "siglip": False, "llama_cpp": True},
        "runtime_choice": {}, "ceilings_gflops": {}, "raw_images_per_s": {},
        "siglip_vision_gflop_per_image": None,
        "llama_cpp": {"build": {"version": "0.3.36", "isa_level": "avx2", "cmake_switches": ["-DGGML_NATIVE=OFF"]},
                      "outtype": "f32", "command": ["/s/llama-server", "-np", "8"],
                      "request_extra": {"ignore_eos": True}, "tokenizer_check": {"ids_equal": True},
                      "prompt_tokens": {"vlmserve": 27, "llama.cpp": 27}},
    }
    s = report["summary"]
    assert s["chat-llama.cpp-8u"]["tokens_per_s"] == 50.0 and s["chat-llama.cpp-8u"]["tokens_per_s_range"] == [40, 60]
    assert s["chat-llama.cpp-8u-staggered"]["stopped_early"] == 3  # summed over the rounds, not a median
    d = derive(report)
    assert "siglip_stronger_baseline" not in d  # no SigLIP scenarios: no SigLIP figures, no KeyError
    ratios = d["chat_vs_llama_cpp"]
    assert list(ratios) == ["1u", "8u", "8u-staggered"]  # every load run against both, in run order
    assert ratios["8u"] == {"tokens_per_s": 100 / 50, "ttft_p50_ms": 2.0, "ttft_p95_ms": 2.0, "itl_p50_ms": 0.5}
    assert ratios["1u"]["tokens_per_s"] == 0.5 and ratios["8u-staggered"]["tokens_per_s"] == 1.0
    # The torch baseline is still the chat's stronger-baseline reference; llama.cpp is not a "baseline".
    assert d["chat_stronger_baseline"] == "chat-baseline-fp32-8u"
    report["derived"] = d
    text = render_markdown(report)
    assert "## Chat: vlmserve vs llama.cpp" in text and "AMD EPYC" in text and "avx2" in text
    assert "| 8u | 2.00x | 2.00x | 2.00x | 0.50x |" in text
    assert "| 8u-staggered | llama.cpp | 54 | 0 | 3 | 1.00 | 40.0 (40.0–40.0) | 150 / 300 | 120.0 |" in text
    assert "SigLIP" not in text


def test_no_llama_cpp_rows_without_both_sides() -> None:
    results = [_chat("chat-llama.cpp-8u", 0, 8, 50.0, 200, 140), _chat("chat-vlmserve-1u", 0, 1, 30.0, 100, 30)]
    assert llama_cpp_ratios(summarise(results)) == {}


def test_the_image_ttft_line_names_first_and_repeated() -> None:
    from vlmserve.loadtests.bench import _image_ttft_lines

    assert _image_ttft_lines({}) == []
    lines = _image_ttft_lines({"image_chat_ttft": {"image": "1024x768 JPEG", "first_ms": 9123.4,
                                                   "repeated_ms": [310.0, 290.0, 305.0], "repeated_p50_ms": 305.0}})
    assert "first time 9123 ms" in lines[1] and "again 305 ms (median of 3: 310, 290, 305)" in lines[1]
