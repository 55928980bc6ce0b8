"""The ``vlmserve`` command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from vlmserve.orchestrator import cli as orchestrator_cli

app = typer.Typer(help="vlmserve: vision-language models behind NVIDIA Triton.", no_args_is_help=True)
# The orchestrator's verbs and its sub-groups (``image build``) are vlmserve's own.
app.registered_commands.extend(orchestrator_cli.app.registered_commands)
app.registered_groups.extend(orchestrator_cli.app.registered_groups)


def _sources(pairs: list[str] | None, env: bool) -> dict[str, str]:
    """``--model FAMILY=SOURCE`` flags over ``VLMSERVE_<FAMILY>_MODEL`` variables (``env``) per family."""
    from vlmserve.families import families, family

    sources = {s.name: os.environ[s.env_var] for s in families().values() if env and os.environ.get(s.env_var)}
    for pair in pairs or []:
        name, sep, source = pair.partition("=")
        if not sep or not source:
            raise typer.BadParameter(f"--model takes FAMILY=SOURCE (a Hub id or a local dir), got {pair!r}")
        try:
            sources[family(name.strip()).name] = source.strip()
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return sources


ModelOpt = typer.Option(None, "--model", help="FAMILY=SOURCE: the checkpoint (Hub id or local dir) of a family in "
                        "the hub set, repeatable, e.g. --model siglip=google/siglip-large-patch16-384; "
                        "`vlmserve families` lists the families")


@app.command()
def export(
    model_set: str = typer.Option("tiny", "--set", help="tiny (offline random), hub (real checkpoints) or perf "
                                  "(real sizes, random weights: benchmarks)"),
    repo: Path | None = typer.Option(None, "--repo", help="model repository to write (default: per set)"),
    model: list[str] | None = ModelOpt,
    family: list[str] | None = typer.Option(None, "--family", help="only these families (repeatable), e.g. "
                                            "--family deepseek_ocr --model deepseek_ocr=DIR (opt-in, hub set)"),
    device: str = typer.Option("cpu", help="cpu or cuda: instance kind written into the configs"),
    int8: bool = typer.Option(False, "--int8", help="also export dynamic-int8 SigLIP towers (models *_int8)"),
    runtime: str = typer.Option("auto", "--runtime", help="CPU runtime of the encoders: auto (the fastest "
                                "faithful one, timed on this host), onnxruntime or openvino"),
    precision: str = typer.Option("auto", "--precision", help="CPU precision of the encoders: auto, fp32 or bf16 "
                                  "(bf16 only where its cosine to the fp32 reference is >= 0.999)"),
    chat_engine: str = typer.Option("auto", "--chat-engine", help="decoder engine of SmolVLM2: auto (llama.cpp "
                                    "where its bindings are installed, faithful and faster; else torch), torch or "
                                    "llamacpp (builds the bindings if missing)"),
    force: bool = typer.Option(False, help="re-export even when up to date"),
) -> None:
    """Export checkpoints to ONNX (parity-checked) and write the Triton model repository."""
    _export(model_set, repo, _sources(model, env=False), family, device, int8, runtime, precision, force, chat_engine)


def _export(model_set: str, repo: Path | None, sources: dict[str, str], families: list[str] | None = None,
            device: str = "cpu", int8: bool = False, runtime: str = "auto", precision: str = "auto",
            force: bool = False, chat_engine: str = "auto") -> None:
    from vlmserve.export.onnx_utils import FidelityError, ParityError
    from vlmserve.export.repository import ExportOptions
    from vlmserve.export.run import export_model_set
    from vlmserve.export.sources import SourceError

    if device not in ("cpu", "cuda"):
        raise typer.BadParameter("device must be cpu or cuda")
    try:
        options = ExportOptions(device=device, int8=int8, runtime=runtime, precision=precision,
                                chat_engine=chat_engine)
        export_model_set(model_set, repo, options, sources=sources, families=families or None, force=force)
    except (ParityError, FidelityError, SourceError, ValueError) as exc:
        orchestrator_cli.console.print(f"[red]export failed:[/red] {exc}")
        raise typer.Exit(1) from None


def _export_and_run(model_set: str, sources: dict[str, str] | None = None) -> None:
    _export(model_set, None, sources or {})
    orchestrator_cli.run(model_set=model_set, repo=None, accelerator=None, fallback=None, plan=None, budget=None,
                         reserve=None, name="process", deprecated=None)


@app.command()
def demo() -> None:
    """Offline demo: build the tiny models if missing and serve them (Ctrl-C stops)."""
    _export_and_run("tiny")


@app.command()
def serve(model: list[str] | None = ModelOpt) -> None:
    """Serve real checkpoints (from the Hub or the local HF cache).

    Each family's default checkpoint is in `vlmserve families`; override one with --model FAMILY=SOURCE or the
    environment variable VLMSERVE_<FAMILY>_MODEL (e.g. VLMSERVE_SIGLIP_MODEL).
    """
    _export_and_run("hub", _sources(model, env=True))


@app.command("families")
def list_families(as_json: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """The model families this vlmserve serves: surfaces, default checkpoints, tiny/perf models."""
    import json

    from rich.table import Table

    from vlmserve.families import SURFACES, families

    rows: list[dict[str, Any]] = [
        {"family": s.name, "title": s.title, "surfaces": list(s.surfaces), "default_for": list(s.default_for),
         "default_source": s.default_source, "env": s.env_var, "tiny": s.tiny is not None,
         "perf": s.perf is not None, "in_default_set": s.in_default_set, "tasks": list(s.tasks)}
        for s in families().values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="model families")
    for col in ("family", "surfaces (default for)", "default checkpoint", "tiny", "perf"):
        table.add_column(col)
    for r in rows:
        surfaces = ", ".join(f"{x}*" if x in r["default_for"] else x for x in r["surfaces"])
        table.add_row(r["family"] + ("" if r["in_default_set"] else " (opt-in)"), surfaces, r["default_source"],
                      "yes" if r["tiny"] else "-", "yes" if r["perf"] else "-")
    orchestrator_cli.console.print(table)
    orchestrator_cli.console.print("* the family answering a surface when a request names no model. Surfaces: " +
                                   "; ".join(f"{k}: {v}" for k, v in SURFACES.items()))


@app.command()
def bench(
    name: str = typer.Option("cpu-perf", help="report name: loadtests/reports/<name>.{md,json,png}"),
    users: int = typer.Option(16, help="concurrent users for the SigLIP scenarios"),
    duration: int = typer.Option(30, help="seconds per SigLIP scenario and round"),
    florence_users: int = typer.Option(8, help="concurrent users for the Florence-2 scenarios"),
    florence_duration: int = typer.Option(90, help="seconds per Florence-2 scenario and round"),
    max_new_tokens: int = typer.Option(32, help="Florence-2 caption length (random weights never stop early)"),
    florence: bool = typer.Option(True, help="include the Florence-2 scenarios"),
    chat: bool = typer.Option(True, help="include the SmolVLM2 chat scenarios"),
    chat_duration: int = typer.Option(40, help="seconds per chat scenario and round"),
    chat_max_tokens: int = typer.Option(32, help="output tokens per chat request"),
    chat_users: str = typer.Option("1,8", help="comma-separated user counts of the chat scenarios"),
    chat_think: float = typer.Option(0.0, help="also run every chat load staggered: each user waits an "
                                     "exponential think time of this mean (s) before each request (0: lockstep only)"),
    chat_baseline: bool = typer.Option(True, help="run the chat scenarios against the torch baseline too"),
    siglip: bool = typer.Option(True, help="include the SigLIP scenarios (and the GEMM ceilings, raw encoder and "
                                "fidelity measurements)"),
    llama_cpp: bool = typer.Option(False, "--llama-cpp", help="add llama.cpp's llama-server as a chat peer, on the "
                                   "same checkpoint (first run: builds it from PyPI's llama-cpp-python sdist, "
                                   "~8 min on 2 cores, and converts the model; cached in the state dir)"),
    llama_cpp_outtype: str = typer.Option("auto", help="GGUF type for llama.cpp: auto (vlmserve's decoder "
                                          "precision: f32 or bf16), f32, bf16, f16, q8_0"),
    llama_cpp_threads: int = typer.Option(0, help="llama-server -t/-tb (0: one per CPU)"),
    chat_structured_share: float = typer.Option(0.5, help="share of JSON-schema requests in the mixed chat "
                                                          "scenario (vlmserve only; 0 skips it)"),
    repeats: int = typer.Option(3, help="rounds: every scenario runs this many times (median and range)"),
    model_set: str = typer.Option("perf", "--set", help="perf (real sizes) or tiny (a quick check of the harness)"),
) -> None:
    """Benchmark vlmserve against the one-request-at-a-time baselines on the perf models (offline)."""
    from vlmserve.loadtests.bench import run_bench

    try:
        chat_user_counts = tuple(int(n) for n in chat_users.split(",") if n.strip())
    except ValueError:
        raise typer.BadParameter(f"--chat-users takes comma-separated integers, got {chat_users!r}") from None
    if not chat_user_counts or min(chat_user_counts) < 1:
        raise typer.BadParameter("--chat-users needs at least one count, each >= 1")
    if llama_cpp_outtype not in ("auto", "f32", "bf16", "f16", "q8_0"):
        raise typer.BadParameter("--llama-cpp-outtype: auto, f32, bf16, f16 or q8_0")
    if llama_cpp and not chat:
        raise typer.BadParameter("--llama-cpp is a chat peer: drop --no-chat")
    path = run_bench(name, users, duration, florence_users, florence_duration, max_new_tokens, florence, chat,
                     chat_users=chat_user_counts, chat_duration_s=chat_duration, chat_max_tokens=chat_max_tokens,
                     chat_structured_share=chat_structured_share, repeats=repeats,
                     model_set=model_set, siglip=siglip, chat_think_s=chat_think, chat_baseline=chat_baseline,
                     llama_cpp=llama_cpp, llama_cpp_outtype=llama_cpp_outtype,
                     llama_cpp_threads=llama_cpp_threads or None,
                     log=lambda m: orchestrator_cli.console.print(f"[cyan]bench[/cyan] {m}"))
    orchestrator_cli.console.print(path.with_suffix(".md").read_text())
