"""``vlmserve bench``: vlmserve vs the one-request-at-a-time baselines, same load, same machine, one run.

Baselines (``loadtests/baseline/server.py``): transformers eager in fp32, and — where the CPU has native bf16
(AVX512-BF16 or AMX) — the same server under ``torch.autocast(bfloat16)``, which is what a user on such a host
would run instead. Every ratio is taken against the **stronger** of the two.

Scenarios (headless Locust runs; every scenario is repeated ``repeats`` times, interleaved round by round, and
reported as median with min–max spread):
  siglip: ``POST /embed`` with one photo, N users, against each baseline, vlmserve (the runtime export chose for
    this host), vlmserve int8, and straight to Triton (gateway overhead);
  florence: Florence-2 ``caption`` via ``POST /infer``, M users;
  chat: SmolVLM2 streaming ``/v1/chat/completions`` at each of ``chat_users``: output tokens/s, TTFT, inter-token
    latency; lockstep (closed loop, no think time) and, with ``chat_think_s`` > 0, staggered (exponential think
    times: Poisson arrivals per user); and vlmserve at the most users with a share of the requests asking for
    JSON-schema output (constrained decoding rows mixed into the same batch): tokens/s mixed vs free.
  llama.cpp (``llama_cpp=True``, opt-in): ``llama-server`` on the same checkpoint's text model (GGUF, built and
    converted once by ``export/llamacpp.py``) as a third chat target, same ChatUser load; every ratio
    vlmserve/llama.cpp is reported per scenario.
Also measured in the same run: the host's CPU and ISA, GEMM ceilings per precision, each encoder alone
("raw"), resident memory per Triton model, and the served embeddings' cosine to the transformers reference.
Writes ``<out>/<name>.{json,md,png}``. Models: the ``perf`` set (real sizes, random weights).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from vlmserve import paths
from vlmserve.host import CpuInfo, cpu_info
from vlmserve.loadtests.image_ttft import image_chat_ttft
from vlmserve.orchestrator.lifetime import die_with_parent, sigterm_exits

REPORTS = paths.PROJECT_ROOT / "loadtests" / "reports"
USERS_FILE = paths.PROJECT_ROOT / "loadtests" / "bench_users.py"
GEMM_N = 2048
CHAT_REQUEST = "chat completion"  # Locust names used by bench_users.ChatUser
CHAT_METRICS = {"ttft": "chat TTFT", "itl": "chat ITL", "tokens": "chat tokens", "structured": "chat structured",
                "deltas": "chat deltas", "stopped_early": "chat stopped early"}
# The chat prompt every chat scenario sends (ChatUser's VLMSERVE_BENCH_CHAT_PROMPT), set here so that the
# llama.cpp tokenizer check covers the very prompt the load uses.
CHAT_PROMPT = "Describe this picture in as much detail as you can, then tell a long story about it."
LLAMA_CPP = "llama.cpp"  # the system name of llama-server in scenario names: chat-llama.cpp-8u
STAGGERED = "-staggered"  # suffix of the staggered (Poisson arrivals) chat scenarios


@dataclass
class Scenario:
    name: str
    workload: str  # siglip | florence | chat
    user_class: str
    host: str
    users: int
    duration_s: int
    env: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- ceilings


def _best_rate(fn, flop: float, repeats: int = 6) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flop / best / 1e9


def gemm_ceilings(cpu: CpuInfo, n: int = GEMM_N) -> dict[str, dict[str, float]]:
    """Best GEMM rate (GFLOP/s, GOP/s for int8) per precision and library on this host.

    fp32: torch, ONNX Runtime (MLAS) and numpy; bf16 (only with native bf16): torch (oneDNN) and OpenVINO;
    int8: ONNX Runtime's MatMulInteger (u8 x s8, what the dynamic-int8 towers run).
    """
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    flop = 2 * n**3

    def onnx_matmul(op: str, a_type: int, b_type: int, out_type: int) -> bytes:
        graph = helper.make_graph(
            [helper.make_node(op, ["a", "b"], ["c"])], "gemm",
            [helper.make_tensor_value_info("a", a_type, [n, n]), helper.make_tensor_value_info("b", b_type, [n, n])],
            [helper.make_tensor_value_info("c", out_type, [n, n])],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    fp32_session = ort.InferenceSession(onnx_matmul("MatMul", TensorProto.FLOAT, TensorProto.FLOAT,
                                                    TensorProto.FLOAT), providers=["CPUExecutionProvider"])
    out: dict[str, dict[str, float]] = {
        "fp32": {
            "torch": _best_rate(lambda: ta @ tb, flop),
            "onnxruntime": _best_rate(lambda: fp32_session.run(None, {"a": a, "b": b}), flop),
            "numpy": _best_rate(lambda: a @ b, flop),
        }
    }
    if cpu.has_bf16:
        import openvino as ov

        ha, hb = ta.bfloat16(), tb.bfloat16()
        with tempfile.TemporaryDirectory() as tmp:
            onnx_file = Path(tmp) / "gemm.onnx"
            onnx_file.write_bytes(onnx_matmul("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT))
            compiled = ov.Core().compile_model(str(onnx_file), "CPU", {"INFERENCE_PRECISION_HINT": "bf16",
                                                                       "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        out["bf16"] = {"torch": _best_rate(lambda: ha @ hb, flop),
                       "openvino": _best_rate(lambda: request.infer({"a": a, "b": b}), flop)}
    qa = rng.integers(0, 255, (n, n), dtype=np.uint8)
    qb = rng.integers(-64, 64, (n, n), dtype=np.int8)
    int8_session = ort.InferenceSession(onnx_matmul("MatMulInteger", TensorProto.UINT8, TensorProto.INT8,
                                                    TensorProto.INT32), providers=["CPUExecutionProvider"])
    out["int8"] = {"onnxruntime": _best_rate(lambda: int8_session.run(None, {"a": qa, "b": qb}), flop)}
    return out


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


def raw_siglip(repo: Path, checkpoint: Path, cpu: CpuInfo, batch: int = 8, rounds: int = 4) -> dict[str, float]:
    """Images/s of the vision tower alone: vlmserve's chosen runtime at ``batch`` (what Triton batches), and
    torch eager at batch 1 (what the one-request-at-a-time baselines run), fp32 and bf16 autocast."""
    import torch
    from transformers import AutoImageProcessor, SiglipModel

    from vlmserve.export import photos
    from vlmserve.model_repository.common import open_encoder

    processor = AutoImageProcessor.from_pretrained(checkpoint)
    pixels = processor(images=photos.photos(batch), return_tensors="np")["pixel_values"].astype(np.float32)
    choice = json.loads((repo / "siglip_vision" / "runtime_choice.json").read_text())
    encoder = open_encoder(repo / "siglip_vision" / "1" / "model.onnx", choice["runtime"], choice["precision"])
    int8 = open_encoder(repo / "siglip_vision_int8" / "1" / "model.onnx", "onnxruntime", "int8")
    model = SiglipModel.from_pretrained(checkpoint).eval()
    one = torch.from_numpy(pixels[:1])

    def per_s(fn, items: int) -> float:
        fn()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return items / statistics.median(times)

    out = {"vlmserve": per_s(lambda: encoder({"pixel_values": pixels}), batch),
           "vlmserve-int8": per_s(lambda: int8({"pixel_values": pixels}), batch)}
    with torch.no_grad():
        out["baseline-fp32"] = per_s(lambda: model.get_image_features(pixel_values=one), 1)
        if cpu.has_bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out["baseline-bf16"] = per_s(lambda: model.get_image_features(pixel_values=one), 1)
    return out


# ---------------------------------------------------------------------------------------------- running


def run_locust(s: Scenario, out: Path, round_no: int) -> dict[str, Any]:
    prefix = out / f"{s.name}-r{round_no}"
    env = dict(os.environ, **s.env)
    cmd = [sys.executable, "-m", "locust", "-f", str(USERS_FILE), s.user_class, "--headless", "-u", str(s.users),
           "-r", str(s.users), "-t", f"{s.duration_s}s", "--host", s.host, "--csv", str(prefix), "--only-summary",
           "--stop-timeout", "120"]
    subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, timeout=s.duration_s + 600,
                   preexec_fn=die_with_parent())
    with open(f"{prefix}_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    main = rows.get(CHAT_REQUEST) if s.workload == "chat" else rows.get("Aggregated")
    if main is None:
        raise RuntimeError(f"{s.name}: Locust reported no requests (see {prefix}_stats.csv)")
    result: dict[str, Any] = {
        "scenario": s.name, "round": round_no, "users": s.users, "duration_s": s.duration_s,
        "requests": int(main["Request Count"]), "failures": int(main["Failure Count"]),
        "rps": float(main["Requests/s"]), "p50_ms": float(main["50%"]), "p95_ms": float(main["95%"]),
        "p99_ms": float(main["99%"]), "avg_ms": float(main["Average Response Time"]),
    }
    if s.workload == "chat":
        ttft, itl, tokens = (rows.get(CHAT_METRICS[k]) for k in ("ttft", "itl", "tokens"))
        if ttft and tokens:
            count = int(tokens["Request Count"])
            result.update({
                "ttft_p50_ms": float(ttft["50%"]), "ttft_p95_ms": float(ttft["95%"]),
                "itl_p50_ms": float(itl["50%"]) if itl else None, "itl_p95_ms": float(itl["95%"]) if itl else None,
                "output_tokens": count * float(tokens["Average Content Size"]),
            })
            # Over the run's wall time (Locust's rate includes requests finishing after -t), not over -t.
            result["tokens_per_s"] = result["output_tokens"] * result["rps"] / max(result["requests"], 1)
            structured = rows.get(CHAT_METRICS["structured"])
            if structured:
                result["structured_requests"] = int(structured["Request Count"])
            deltas = rows.get(CHAT_METRICS["deltas"])
            if deltas and result["output_tokens"]:
                result["deltas_per_token"] = (int(deltas["Request Count"]) * float(deltas["Average Content Size"])
                                              / result["output_tokens"])
            stopped = rows.get(CHAT_METRICS["stopped_early"])
            result["stopped_early"] = int(stopped["Request Count"]) if stopped else 0
    return result


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


def model_rss(triton_pid: int) -> dict[str, int]:
    """Resident bytes per Triton model: its Python backend stub process(es), found by the model path."""
    import psutil

    out: dict[str, int] = {}
    try:
        children = psutil.Process(triton_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            cmd = child.cmdline()
            rss = child.memory_info().rss
        except psutil.Error:
            continue
        model_file = next((c for c in cmd if c.endswith("model.py")), None)
        if model_file:
            name = Path(model_file).parent.parent.name
            out[name] = out.get(name, 0) + rss
    return out


def _checkpoints(model_set: str) -> Path:
    return paths.state_dir() / "perf-models" if model_set == "perf" else paths.tiny_models_dir()


def chat_scenarios(targets: dict[str, str], chat_users: tuple[int, ...], duration_s: int, max_tokens: int,
                   think_s: float = 0.0, extra: dict[str, dict[str, Any]] | None = None) -> list[Scenario]:
    """The chat scenarios: per user count, lockstep then (``think_s`` > 0) staggered, every target side by side
    (so a round runs vlmserve and its peers back to back on the same load). ``extra``: per target, JSON fields
    added to every request body (llama-server's ``ignore_eos``)."""
    # Text-only prompts: decoding is what this scenario measures. (With an image, SmolVLM2 splits it into
    # 512 px tiles and the vision prefill of one request takes tens of seconds on 2 cores.)
    env = {"VLMSERVE_BENCH_MAX_NEW_TOKENS": str(max_tokens), "VLMSERVE_BENCH_CHAT_IMAGE": "none",
           "VLMSERVE_BENCH_CHAT_PROMPT": CHAT_PROMPT}
    modes = [("", 0.0)] + ([(STAGGERED, think_s)] if think_s > 0 else [])
    out = []
    for n in chat_users:
        for suffix, think in modes:
            for system, url in targets.items():
                s_env = dict(env, VLMSERVE_BENCH_THINK_S=str(think))
                if extra and extra.get(system):
                    s_env["VLMSERVE_BENCH_CHAT_EXTRA"] = json.dumps(extra[system])
                out.append(Scenario(f"chat-{system}-{n}u{suffix}", "chat", "ChatUser", url, n, duration_s, s_env))
    return out


def _llama_outtype(outtype: str, repo: Path) -> str:
    """``auto``: the precision vlmserve's SmolVLM2 decoder serves in (its export's decoder_choice.json)."""
    if outtype != "auto":
        return outtype
    choice = repo / "smolvlm2" / "decoder_choice.json"
    precision = json.loads(choice.read_text()).get("precision", "fp32") if choice.exists() else "fp32"
    return {"fp32": "f32", "bf16": "bf16"}.get(precision, "f32")


@sigterm_exits()  # SIGTERM (a time limit) ends the bench like Ctrl-C: the cleanup in its `finally` runs
def run_bench(name: str = "cpu-perf", users: int = 16, duration_s: int = 30, florence_users: int = 8,
              florence_duration_s: int = 90, max_new_tokens: int = 32, florence: bool = True, chat: bool = True,
              chat_users: tuple[int, ...] = (1, 8), chat_duration_s: int = 40, chat_max_tokens: int = 32,
              chat_structured_share: float = 0.5, repeats: int = 3, model_set: str = "perf",
              out_dir: Path = REPORTS, log=print, siglip: bool = True, chat_think_s: float = 0.0,
              chat_baseline: bool = True, llama_cpp: bool = False, llama_cpp_outtype: str = "auto",
              llama_cpp_threads: int | None = None) -> Path:
    from vlmserve.export.progress import Progress
    from vlmserve.export.repository import ExportOptions
    from vlmserve.export.run import export_model_set
    from vlmserve.orchestrator.launchers.process import ProcessLauncher
    from vlmserve.orchestrator.ports import free_port, stack_ports
    from vlmserve.orchestrator.settings import OrchestratorSettings

    cpu = cpu_info()
    log(f"host: {cpu.summary}")
    load_start = os.getloadavg()
    out = out_dir / name
    out.mkdir(parents=True, exist_ok=True)
    repo = paths.repository_dir(model_set)
    if llama_cpp and not chat:
        raise ValueError("--llama-cpp is a chat peer: it needs the chat scenarios")
    families = ((["siglip"] if siglip else []) + (["florence2"] if florence else [])
                + (["smolvlm2"] if chat else []))
    log(f"exporting the {model_set} model set ({', '.join(families)}; the first run takes minutes)")
    stamps = export_model_set(model_set, repo=repo, options=ExportOptions(int8=True), families=families,
                              progress=Progress())
    checkpoints = _checkpoints(model_set)

    ceilings: dict[str, dict[str, float]] = {}
    raw: dict[str, float] = {}
    gflop_per_image = None
    if siglip:
        log("measuring GEMM ceilings and the encoders alone")
        ceilings = gemm_ceilings(cpu)
        raw = raw_siglip(repo, checkpoints / "siglip", cpu)
        gflop_per_image = siglip_vision_gflop(checkpoints / "siglip")
    llama_binary = llama_gguf = None
    if llama_cpp:
        from vlmserve.export import llamacpp as llamacpp_build
        from vlmserve.loadtests import llamacpp

        llama_binary, llama_build = llamacpp_build.ensure_server(log)
        llama_outtype = _llama_outtype(llama_cpp_outtype, repo)
        llama_gguf = llamacpp_build.ensure_gguf(checkpoints / "smolvlm2", llama_outtype, log)
    choices = {m: json.loads((repo / m / "runtime_choice.json").read_text())
               for m in ("siglip_vision", "siglip_text", "florence2_vision", "smolvlm2_vision")
               if (repo / m / "runtime_choice.json").exists()}

    settings = OrchestratorSettings(**stack_ports(), repository=repo,
                                    state_dir=paths.state_dir() / "bench", ready_timeout_s=900)
    launcher = ProcessLauncher(settings, log=log)
    baselines: dict[str, tuple[subprocess.Popen, str]] = {}
    model_args = ["--siglip", str(checkpoints / "siglip")] if siglip else []
    if florence:
        model_args += ["--florence2", str(checkpoints / "florence2")]
    if chat:
        model_args += ["--smolvlm2", str(checkpoints / "smolvlm2")]
    results: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    llama = None
    try:
        for system, flags in [("baseline-fp32", []), ("baseline-bf16", ["--bf16"])]:
            if system == "baseline-bf16" and not cpu.has_bf16:
                continue
            if not siglip and not florence and not chat_baseline:
                break
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "vlmserve.loadtests.baseline.server", *model_args, "--port", str(port), *flags],
                # The log file outlives this block: the server writes to it until it is stopped.
                cwd=paths.PROJECT_ROOT, stdout=open(out / f"{system}.log", "w"),  # noqa: SIM115
                stderr=subprocess.STDOUT, preexec_fn=die_with_parent(),
            )
            baselines[system] = (proc, f"http://127.0.0.1:{port}")
        for proc, url in baselines.values():
            _wait(f"{url}/health", 900, proc)
        image_dir = out / "images"
        image_dir.mkdir(exist_ok=True)
        os.environ["VLMSERVE_GATEWAY_LOCAL_IMAGE_DIR"] = str(image_dir)  # inherited by the gateway process
        try:
            launcher.start()
        finally:
            os.environ.pop("VLMSERVE_GATEWAY_LOCAL_IMAGE_DIR")
        gw = settings.gateway_url
        targets = {system: url for system, (_, url) in baselines.items()} | {"vlmserve": gw}
        scenarios: list[Scenario] = []
        if siglip:
            scenarios += [Scenario(f"siglip-{system}", "siglip", "EmbedUser", url, users, duration_s)
                          for system, url in targets.items()]
            scenarios += [
                Scenario("siglip-vlmserve-int8", "siglip", "EmbedUser", gw, users, duration_s,
                         {"VLMSERVE_BENCH_MODEL": "siglip_embed_image_int8"}),
                Scenario("siglip-direct", "siglip", "DirectEmbedUser", settings.triton_http_url, users,
                         duration_s),
            ]
        if florence:
            tokens = {"VLMSERVE_BENCH_MAX_NEW_TOKENS": str(max_new_tokens)}
            scenarios += [Scenario(f"florence-{system}", "florence", "CaptionUser", url, florence_users,
                                   florence_duration_s, tokens) for system, url in targets.items()]
        if chat:
            chat_targets = targets if chat_baseline else {"vlmserve": gw}
            request_extra = {}
            if llama_cpp:
                assert llama_binary is not None and llama_gguf is not None  # built above
                llama = llamacpp.start_server(llama_binary, llama_gguf, free_port(), max(chat_users),
                                              llama_cpp_threads or os.cpu_count() or 2, out / "llama-server.log")
                log(f"llama.cpp: {' '.join(llama.command)}")
                _wait(f"{llama.url}/health", 300, llama.proc)
                extra["llama_cpp"] = {
                    "build": llama_build, "gguf": str(llama_gguf), "outtype": llama_outtype,
                    "gguf_bytes": llama_gguf.stat().st_size, "command": llama.command,
                    "request_extra": llamacpp.REQUEST_EXTRA,
                    "tokenizer_check": llamacpp.check_tokenizer(llama.url, checkpoints / "smolvlm2", CHAT_PROMPT),
                    "prompt_tokens": {"vlmserve": llamacpp.prompt_tokens(gw, CHAT_PROMPT),
                                      LLAMA_CPP: llamacpp.prompt_tokens(llama.url, CHAT_PROMPT)},
                }
                log(f"llama.cpp: tokenizer check {extra['llama_cpp']['tokenizer_check']}, prompt tokens "
                    f"{extra['llama_cpp']['prompt_tokens']}")
                chat_targets = chat_targets | {LLAMA_CPP: llama.url}
                request_extra[LLAMA_CPP] = llamacpp.REQUEST_EXTRA
            chat_env = {"VLMSERVE_BENCH_MAX_NEW_TOKENS": str(chat_max_tokens), "VLMSERVE_BENCH_CHAT_IMAGE": "none",
                        "VLMSERVE_BENCH_CHAT_PROMPT": CHAT_PROMPT}
            scenarios += chat_scenarios(chat_targets, chat_users, chat_duration_s, chat_max_tokens, chat_think_s,
                                        request_extra)
            if chat_structured_share > 0:
                # vlmserve only: the baselines have no constrained decoding.
                scenarios.append(Scenario(
                    f"chat-vlmserve-mixed-{chat_users[-1]}u", "chat", "ChatUser", gw, chat_users[-1],
                    chat_duration_s, {**chat_env, "VLMSERVE_BENCH_STRUCTURED_SHARE": str(chat_structured_share)}))
        for round_no in range(1, repeats + 1):
            for s in scenarios:
                log(f"round {round_no}/{repeats}: {s.name}: {s.users} users for {s.duration_s}s against {s.host}")
                results.append(run_locust(s, out, round_no))
                r = results[-1]
                log(f"  {r['rps']:.2f} req/s, p95 {r['p95_ms']:.0f} ms, {r['failures']} failures"
                    + (f", {r['tokens_per_s']:.1f} tokens/s" if r.get("tokens_per_s") is not None else ""))
        if chat:
            # One user: a never-seen 1024x768 JPEG, then the same request again (image and prefix caches).
            extra["image_chat_ttft"] = image_chat_ttft(gw)
            log(f"image chat TTFT: {extra['image_chat_ttft']}")
        batched = (["siglip_embed_image"] if siglip else []) + (["florence2"] if florence else [])
        extra["triton_batch_sizes"] = _batch_sizes(settings.triton_http_url, batched)
        triton = launcher.running().get("triton")
        extra["model_rss_bytes"] = model_rss(triton.pid) if triton else {}
        if llama is not None:
            extra["llama_cpp"]["rss_bytes"] = _rss(llama.proc.pid)
        if siglip:
            extra["fidelity"] = _fidelity(gw, checkpoints / "siglip", image_dir, log)
    finally:
        # Stopped (SIGTERM, Ctrl-C): nothing to wait for, stop at once. Anything this misses dies with the bench.
        interrupted = isinstance(sys.exc_info()[1], (SystemExit, KeyboardInterrupt))
        if llama is not None:
            llama.stop()
        launcher.stop(timeout_s=2.0 if interrupted else None)
        for proc, _ in baselines.values():
            if interrupted:
                proc.kill()
            else:
                proc.terminate()
            proc.wait(timeout=30)

    report = {
        "name": name,
        "machine": {"cpu": cpu.model, "isa": list(cpu.isa), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "loadavg_1m": {"start": load_start[0], "end": os.getloadavg()[0]}},
        "settings": {"model_set": model_set, "users": users, "duration_s": duration_s,
                     "florence_users": florence_users, "florence_duration_s": florence_duration_s,
                     "max_new_tokens": max_new_tokens, "chat_users": list(chat_users),
                     "chat_duration_s": chat_duration_s, "chat_max_tokens": chat_max_tokens,
                     "chat_structured_share": chat_structured_share, "repeats": repeats,
                     "chat_think_s": chat_think_s, "siglip": siglip, "llama_cpp": llama_cpp},
        "runtime_choice": {m: {k: c[k] for k in ("runtime", "precision", "items_per_s", "min_cosine", "candidates")}
                           for m, c in choices.items()},
        # SmolVLM2's decode engine as export chose it on this host (export/chat_engine_choice.py), with its why.
        "chat_engine_choice": (json.loads((repo / "smolvlm2" / "engine_choice.json").read_text())
                               if (repo / "smolvlm2" / "engine_choice.json").exists() else None),
        "int8_min_cosine": stamps.get("siglip", {}).get("int8_min_cosine"),
        "ceilings_gflops": ceilings,
        "raw_images_per_s": raw,
        "siglip_vision_gflop_per_image": gflop_per_image,
        "results": results,
        "summary": summarise(results),
        **extra,
        "command": f"vlmserve bench --name {name} --users {users} --duration {duration_s} --florence-users "
                   f"{florence_users} --florence-duration {florence_duration_s} --chat-duration {chat_duration_s} "
                   f"--chat-users {','.join(map(str, chat_users))} --chat-max-tokens {chat_max_tokens} "
                   f"--chat-think {chat_think_s:g} "
                   f"--chat-structured-share {chat_structured_share} --repeats {repeats}"
                   + ("" if siglip else " --no-siglip") + ("" if florence else " --no-florence")
                   + ("" if chat else " --no-chat") + ("" if chat_baseline else " --no-chat-baseline")
                   + (f" --llama-cpp --llama-cpp-outtype {llama_cpp_outtype}" if llama_cpp else "")
                   + (f" --llama-cpp-threads {llama_cpp_threads}" if llama_cpp and llama_cpp_threads else ""),
    }
    report["derived"] = derive(report)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=2))
    (out_dir / f"{name}.md").write_text(render_markdown(report))
    render_chart(report, out_dir / f"{name}.png")
    return json_path


def _rss(pid: int) -> int | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def _batch_sizes(triton_url: str, models: list[str]) -> dict[str, dict[str, int]]:
    out = {}
    for model in models:
        stats = httpx.get(f"{triton_url}/v2/models/{model}/stats").json()["model_stats"][0]
        out[model] = {str(b["batch_size"]): b["compute_infer"]["count"] for b in stats["batch_stats"]}
    return out


def _fidelity(gateway: str, checkpoint: Path, local_dir: Path, log) -> dict[str, Any]:
    """Served ``/embed`` vs the transformers reference pipeline on photos of every format and mode, 224-4000 px
    (sent by path through the gateway's local image folder: the largest exceed the request body cap)."""
    from vlmserve.loadtests.fidelity import fence_images, served_vs_reference, summarise

    rows = served_vs_reference(gateway, checkpoint, fence_images(), local_dir=local_dir)
    cosines = [r["cosine"] for r in rows]
    log(f"served vs reference: min cosine {min(cosines):.5f} over {len(rows)} images")
    return {"min_cosine": min(cosines), "mean_cosine": float(np.mean(cosines)), "images": len(rows),
            "by_format_mode": summarise(rows)}


# ---------------------------------------------------------------------------------------------- summary


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per scenario: the median of each figure over the rounds, with min and max of the main one."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["scenario"], []).append(r)
    out = {}
    for scenario, runs in by.items():
        entry: dict[str, Any] = {"rounds": len(runs), "users": runs[0]["users"],
                                 "requests": sum(r["requests"] for r in runs),
                                 "failures": sum(r["failures"] for r in runs)}
        if any("stopped_early" in r for r in runs):
            entry["stopped_early"] = sum(r.get("stopped_early", 0) for r in runs)
        for key in ("rps", "p50_ms", "p95_ms", "p99_ms", "avg_ms", "tokens_per_s", "ttft_p50_ms", "ttft_p95_ms",
                    "itl_p50_ms", "itl_p95_ms", "deltas_per_token"):
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                entry[key] = statistics.median(values)
                entry[f"{key}_range"] = [min(values), max(values)]
        out[scenario] = entry
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# Chat figures compared vlmserve / llama.cpp: tokens/s above 1 means vlmserve is faster, latencies above 1 mean
# vlmserve is slower.
LLAMA_RATIO_KEYS = ("tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms")


def llama_cpp_ratios(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per chat load (``8u``, ``8u-staggered``...) run against both: vlmserve's figure / llama.cpp's."""
    out = {}
    prefix = f"chat-{LLAMA_CPP}-"
    for scenario, theirs in summary.items():
        if not scenario.startswith(prefix):
            continue
        load = scenario.removeprefix(prefix)
        ours = summary.get(f"chat-vlmserve-{load}")
        if ours is not None:
            out[load] = {k: _ratio(ours.get(k), theirs.get(k)) for k in LLAMA_RATIO_KEYS}
    return out


def derive(report: dict[str, Any]) -> dict[str, Any]:
    s, raw = report["summary"], report.get("raw_images_per_s") or {}
    d: dict[str, Any] = {}

    def rps(scenario: str, key: str = "rps") -> float | None:
        return s.get(scenario, {}).get(key)

    def _strongest(scenarios: list[str], key: str) -> tuple[str | None, float | None]:
        found = [(n, v) for n in scenarios if (v := rps(n, key)) is not None]
        return max(found, key=lambda o: o[1]) if found else (None, None)

    def stronger(prefix: str, key: str = "rps") -> tuple[str | None, float | None]:
        return _strongest([f"{prefix}-{b}" for b in ("baseline-fp32", "baseline-bf16")], key)

    if raw:
        _derive_siglip(report, d, rps, stronger)
    if "florence-vlmserve" in s:
        f_name, f_base = stronger("florence")
        d["florence_stronger_baseline"] = f_name
        d["florence_vs_stronger_baseline"] = _ratio(rps("florence-vlmserve"), f_base)
    chat_users = report["settings"]["chat_users"]
    if chat_users and f"chat-vlmserve-{chat_users[-1]}u" in s:
        low, high = chat_users[0], chat_users[-1]
        c_name, c_base = _strongest([f"chat-{b}-{high}u" for b in ("baseline-fp32", "baseline-bf16")],
                                    "tokens_per_s")
        d["chat_stronger_baseline"] = c_name
        d["chat_tokens_per_s_vs_stronger_baseline"] = _ratio(rps(f"chat-vlmserve-{high}u", "tokens_per_s"), c_base)
        d["chat_ttft_p95_loaded_over_idle_p50"] = _ratio(rps(f"chat-vlmserve-{high}u", "ttft_p95_ms"),
                                                         rps(f"chat-vlmserve-{low}u", "ttft_p50_ms"))
        if f"chat-vlmserve-mixed-{high}u" in s:
            d["chat_mixed_structured_tokens_per_s_vs_free"] = _ratio(
                rps(f"chat-vlmserve-mixed-{high}u", "tokens_per_s"), rps(f"chat-vlmserve-{high}u", "tokens_per_s"))
    ratios = llama_cpp_ratios(s)
    if ratios:
        d["chat_vs_llama_cpp"] = ratios
    return d


def _derive_siglip(report: dict[str, Any], d: dict[str, Any], rps, stronger) -> None:
    raw = report["raw_images_per_s"]
    base_name, base = stronger("siglip")
    d["siglip_stronger_baseline"] = base_name
    d["siglip_vs_stronger_baseline"] = _ratio(rps("siglip-vlmserve"), base)
    d["siglip_int8_vs_stronger_baseline"] = _ratio(rps("siglip-vlmserve-int8"), base)
    d["siglip_vs_baseline_fp32"] = _ratio(rps("siglip-vlmserve"), rps("siglip-baseline-fp32"))
    choice = report["runtime_choice"].get("siglip_vision", {})
    precision = choice.get("precision", "fp32")
    ceiling = max(report["ceilings_gflops"].get(precision, report["ceilings_gflops"]["fp32"]).values())
    d["siglip_precision"] = f"{choice.get('runtime', 'onnxruntime')}/{precision}"
    d["ceiling_gflops_for_precision"] = ceiling
    d["ceiling_images_per_s"] = ceiling / report["siglip_vision_gflop_per_image"]
    d["siglip_share_of_ceiling"] = _ratio(rps("siglip-vlmserve"), d["ceiling_images_per_s"])
    d["served_over_raw"] = {
        "vlmserve": _ratio(rps("siglip-vlmserve"), raw.get("vlmserve")),
        "vlmserve-int8": _ratio(rps("siglip-vlmserve-int8"), raw.get("vlmserve-int8")),
        "baseline-fp32": _ratio(rps("siglip-baseline-fp32"), raw.get("baseline-fp32")),
        "baseline-bf16": _ratio(rps("siglip-baseline-bf16"), raw.get("baseline-bf16")),
    }
    gateway, direct = rps("siglip-vlmserve", "avg_ms"), rps("siglip-direct", "avg_ms")
    d["gateway_overhead_latency"] = 1 - direct / gateway if gateway and direct else None
    served = _ratio(rps("siglip-vlmserve"), rps("siglip-direct"))
    d["gateway_overhead_throughput"] = None if served is None else 1 - served


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _spread(entry: dict[str, Any], key: str, spec: str = ".2f") -> str:
    if key not in entry:
        return "–"
    lo, hi = entry[f"{key}_range"]
    return f"{entry[key]:{spec}} ({lo:{spec}}–{hi:{spec}})"


def render_markdown(report: dict[str, Any]) -> str:
    d, m, st = report["derived"], report["machine"], report["settings"]
    lines = [
        f"# vlmserve bench: {report['name']}",
        "",
        f"Command: `{report['command']}`.",
        f"Host: **{m['cpu']}**, {m['cpus']} CPUs, ISA: {' '.join(m['isa']) or 'no AVX2'} ({m['platform']})"
        + (f"; 1-min load average {m['loadavg_1m']['start']:.1f} at the start, {m['loadavg_1m']['end']:.1f} at the end"
           if m.get("loadavg_1m") else "") + ".",
        f"Models: the `{st['model_set']}` set (real architectures and sizes, random weights). vlmserve and the",
        "baselines ran on the same machine with the same Locust load; every scenario ran "
        f"{st['repeats']} times, interleaved; figures are medians (min–max).",
        "",
        "| scenario | users | requests | failures | req/s | p50 ms | p95 ms | tokens/s | TTFT p50 / p95 ms "
        "| ITL p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in report["summary"].items():
        ttft = (f"{e['ttft_p50_ms']:.0f} / {e['ttft_p95_ms']:.0f}" if "ttft_p50_ms" in e else "–")
        lines.append(f"| {name} | {e['users']} | {e['requests']} | {e['failures']} | {_spread(e, 'rps')} | "
                     f"{_fmt(e.get('p50_ms'), '.0f')} | {_fmt(e.get('p95_ms'), '.0f')} | "
                     f"{_spread(e, 'tokens_per_s', '.1f')} | {ttft} | {_fmt(e.get('itl_p50_ms'), '.0f')} |")
    choices = "; ".join(f"{m_}: {c['runtime']}/{c['precision']} (cosine {c['min_cosine']:.5f})"
                        for m_, c in report["runtime_choice"].items())
    lines += [
        "",
        "| derived | value |",
        "|---|---|",
        f"| runtime chosen at export (per encoder) | {choices} |",
    ]
    engine = report.get("chat_engine_choice")
    if engine:
        lines.append(f"| chat engine chosen at export (SmolVLM2) | {engine['engine']}: {engine['why']} |")
    if "siglip_stronger_baseline" in d:
        lines += _siglip_rows(report)
    lines += [
        f"| Triton batch sizes (size: executions) | {report.get('triton_batch_sizes')} |",
        "| resident memory per Triton model (MiB) | "
        + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(report.get("model_rss_bytes", {}).items())) + " |",
    ]
    if "florence_vs_stronger_baseline" in d:
        lines.append(f"| Florence-2 caption vs the stronger baseline ({d['florence_stronger_baseline']}) | "
                     f"{_fmt(d['florence_vs_stronger_baseline'])}x |")
    if d.get("chat_stronger_baseline"):
        lines += [
            f"| chat output tokens/s at {st['chat_users'][-1]} users vs the stronger baseline "
            f"({d['chat_stronger_baseline']}) | {_fmt(d['chat_tokens_per_s_vs_stronger_baseline'])}x |",
            f"| chat TTFT p95 at {st['chat_users'][-1]} users / idle TTFT p50 | "
            f"{_fmt(d['chat_ttft_p95_loaded_over_idle_p50'])}x |",
        ]
    if d.get("chat_mixed_structured_tokens_per_s_vs_free") is not None:
        lines.append(f"| chat tokens/s at {st['chat_users'][-1]} users with {100 * st['chat_structured_share']:.0f}% "
                     "JSON-schema requests / all free | "
                     f"{_fmt(d['chat_mixed_structured_tokens_per_s_vs_free'])}x |")
    if d.get("chat_vs_llama_cpp"):
        lines += _llama_cpp_section(report)
    lines += _image_ttft_lines(report)
    return "\n".join(lines) + "\n"


def _siglip_rows(report: dict[str, Any]) -> list[str]:
    d = report["derived"]
    ceilings = "; ".join(f"{p}: " + ", ".join(f"{k} {v:.0f}" for k, v in libs.items())
                         for p, libs in report["ceilings_gflops"].items())
    sor = d["served_over_raw"]
    fid = report.get("fidelity") or {}
    return [
        f"| SigLIP vs the stronger baseline ({d['siglip_stronger_baseline']}) | "
        f"{_fmt(d['siglip_vs_stronger_baseline'])}x |",
        f"| SigLIP vs baseline fp32 | {_fmt(d['siglip_vs_baseline_fp32'])}x |",
        f"| SigLIP int8 vs the stronger baseline | {_fmt(d['siglip_int8_vs_stronger_baseline'])}x |",
        f"| int8 vs fp32 min cosine (vision, text) | {report.get('int8_min_cosine')} |",
        f"| served /embed vs transformers reference (min / mean cosine, {fid.get('images', 0)} images, 224-4000 px, "
        "JPEG/PNG/WebP, RGB/RGBA/L/P/CMYK) | "
        f"{_fmt(fid.get('min_cosine'), '.5f')} / {_fmt(fid.get('mean_cosine'), '.5f')} |",
        f"| GEMM ceilings {GEMM_N}² (GFLOP/s; int8 GOP/s) | {ceilings} |",
        f"| SigLIP vision FLOPs per image | {report['siglip_vision_gflop_per_image']:.1f} GFLOP |",
        f"| ceiling for the chosen precision ({d['siglip_precision']}) | {d['ceiling_gflops_for_precision']:.0f} "
        f"GFLOP/s = {d['ceiling_images_per_s']:.1f} images/s |",
        f"| SigLIP served share of that ceiling | {_pct(d['siglip_share_of_ceiling'])} |",
        "| encoder alone, images/s (vlmserve at batch 8; baselines at batch 1) | "
        + ", ".join(f"{k} {v:.1f}" for k, v in report["raw_images_per_s"].items()) + " |",
        "| served / raw | " + ", ".join(f"{k} {_pct(v)}" for k, v in sor.items() if v is not None) + " |",
        f"| gateway overhead (1 - direct/gateway mean latency; by throughput) | "
        f"{_pct(d['gateway_overhead_latency'])}; {_pct(d['gateway_overhead_throughput'])} |",
    ]


def _image_ttft_lines(report: dict[str, Any]) -> list[str]:
    t = report.get("image_chat_ttft")
    if not t:
        return []
    return ["", f"Image chat TTFT, 1 user, {t['image']} (`loadtests/image_ttft.py`): first time "
            f"{t['first_ms']:.0f} ms; the same request again {t['repeated_p50_ms']:.0f} ms "
            f"(median of {len(t['repeated_ms'])}: "
            f"{', '.join(f'{v:.0f}' for v in t['repeated_ms'])})."]


def _llama_cpp_section(report: dict[str, Any]) -> list[str]:
    """vlmserve and llama-server side by side per chat load, and vlmserve / llama.cpp per figure."""
    s, st, info = report["summary"], report["settings"], report.get("llama_cpp") or {}
    build = info.get("build") or {}
    think = st.get("chat_think_s") or 0
    lines = [
        "",
        "## Chat: vlmserve vs llama.cpp",
        "",
        f"llama.cpp: `llama-server` from llama-cpp-python {build.get('version', '?')}'s vendored llama.cpp, ISA level "
        f"`{build.get('isa_level', '?')}` (`{' '.join(build.get('cmake_switches', []))}`), the same perf "
        f"checkpoint's text model as GGUF `{info.get('outtype', '?')}`; "
        f"command `{' '.join(Path(c).name if i < 1 else c for i, c in enumerate(info.get('command', [])))}`.",
        f"Same ChatUser load for both: text prompt, `max_tokens` {st.get('chat_max_tokens')}, temperature 0, "
        "streaming, tokens = `usage.completion_tokens` of the last chunk; llama-server also gets "
        f"`{json.dumps(info.get('request_extra', {}))}`. Lockstep: closed loop, no think time. Staggered: "
        f"exponential think time, mean {think:g} s, before each request (Poisson arrivals per waiting user).",
        f"Tokenizer check: {info.get('tokenizer_check')}; prompt tokens per server: {info.get('prompt_tokens')}.",
        "",
        "| load | system | requests | failures | stopped early | deltas/token | tokens/s | TTFT p50 / p95 ms "
        "| ITL p50 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = report["derived"]["chat_vs_llama_cpp"]
    for load in ratios:
        for system in ("vlmserve", LLAMA_CPP):
            e = s[f"chat-{system}-{load}"]
            lines.append(f"| {load} | {system} | {e['requests']} | {e['failures']} | {e.get('stopped_early', '–')} "
                         f"| {_fmt(e.get('deltas_per_token'))} | {_spread(e, 'tokens_per_s', '.1f')} | "
                         f"{_fmt(e.get('ttft_p50_ms'), '.0f')} / {_fmt(e.get('ttft_p95_ms'), '.0f')} | "
                         f"{_fmt(e.get('itl_p50_ms'), '.1f')} |")
    lines += [
        "",
        "vlmserve / llama.cpp (tokens/s above 1: vlmserve faster; latencies above 1: vlmserve slower):",
        "",
        "| load | tokens/s | TTFT p50 | TTFT p95 | ITL p50 |",
        "|---|---|---|---|---|",
    ]
    for load, r in ratios.items():
        lines.append(f"| {load} | " + " | ".join(f"{_fmt(r[k])}x" for k in LLAMA_RATIO_KEYS) + " |")
    return lines


def render_chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary = report["summary"]
    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.4 * len(names) + 2))
    rps = [summary[n]["rps"] for n in names]
    err = [[summary[n]["rps"] - summary[n]["rps_range"][0] for n in names],
           [summary[n]["rps_range"][1] - summary[n]["rps"] for n in names]]
    axes[0].barh(names, rps, xerr=err, color="#4c72b0")
    axes[0].set_xlabel("requests/s, median and range (higher is better)")
    axes[0].set_xscale("log")
    axes[1].barh(names, [summary[n]["p95_ms"] for n in names], color="#dd8452")
    axes[1].set_xlabel("p95 latency ms (lower is better)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.invert_yaxis()
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.suptitle(f"vlmserve bench: {report['name']} — {report['machine']['cpu']}, {report['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
