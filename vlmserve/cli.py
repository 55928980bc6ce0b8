"""The ``vlmserve`` command line."""

from __future__ import annotations

from pathlib import Path

import typer

from orchestrator import cli as orchestrator_cli

app = typer.Typer(help="vlmserve: vision-language models behind NVIDIA Triton.", no_args_is_help=True)
# The orchestrator's verbs and its sub-groups (``image build``) are vlmserve's own.
app.registered_commands.extend(orchestrator_cli.app.registered_commands)
app.registered_groups.extend(orchestrator_cli.app.registered_groups)


@app.command()
def export(
    model_set: str = typer.Option("tiny", "--set", help="tiny (offline random), hub (real checkpoints) or perf "
                                  "(real sizes, random weights: benchmarks)"),
    repo: Path | None = typer.Option(None, "--repo", help="model repository to write (default: per set)"),
    siglip_model: str | None = typer.Option(None, "--siglip-model", help="Hub id or local dir (hub set)"),
    florence2_model: str | None = typer.Option(None, "--florence2-model", help="Hub id or local dir (hub set)"),
    family: list[str] | None = typer.Option(None, "--family", help="only these families (repeatable), e.g. "
                                            "--family deepseek_ocr --deepseek-ocr-model DIR (opt-in, hub set)"),
    deepseek_ocr_model: str | None = typer.Option(None, "--deepseek-ocr-model", help="DeepSeek-OCR dir or id"),
    device: str = typer.Option("cpu", help="cpu or cuda: instance kind written into the configs"),
    int8: bool = typer.Option(False, "--int8", help="also export dynamic-int8 SigLIP towers (models *_int8)"),
    runtime: str = typer.Option("auto", "--runtime", help="CPU runtime of the encoders: auto (the fastest "
                                "faithful one, timed on this host), onnxruntime or openvino"),
    precision: str = typer.Option("auto", "--precision", help="CPU precision of the encoders: auto, fp32 or bf16 "
                                  "(bf16 only where its cosine to the fp32 reference is >= 0.999)"),
    force: bool = typer.Option(False, help="re-export even when up to date"),
) -> None:
    """Export checkpoints to ONNX (parity-checked) and write the Triton model repository."""
    from export.onnx_utils import FidelityError, ParityError
    from export.repository import ExportOptions
    from export.run import export_model_set
    from export.sources import SourceError

    if device not in ("cpu", "cuda"):
        raise typer.BadParameter("device must be cpu or cuda")
    try:
        given = {"siglip": siglip_model, "florence2": florence2_model, "deepseek_ocr": deepseek_ocr_model}
        sources = {k: v for k, v in given.items() if v}
        options = ExportOptions(device=device, int8=int8, runtime=runtime, precision=precision)
        export_model_set(model_set, repo, options, sources=sources,
                         families=family or None, force=force)
    except (ParityError, FidelityError, SourceError, ValueError) as exc:
        orchestrator_cli.console.print(f"[red]export failed:[/red] {exc}")
        raise typer.Exit(1) from None


def _export_and_run(model_set: str, siglip_model: str | None = None, florence2_model: str | None = None) -> None:
    export(model_set=model_set, repo=None, siglip_model=siglip_model, florence2_model=florence2_model,
           family=None, deepseek_ocr_model=None, device="cpu", int8=False, runtime="auto", precision="auto",
           force=False)
    orchestrator_cli.run(model_set=model_set, repo=None, accelerator=None, fallback=None, plan=None, budget=None,
                         reserve=None)


@app.command()
def demo() -> None:
    """Offline demo: build the tiny models if missing and serve them (Ctrl-C stops)."""
    _export_and_run("tiny")


@app.command()
def serve(
    siglip_model: str = typer.Option("google/siglip-base-patch16-224", "--siglip-model",
                                     envvar="VLMSERVE_SIGLIP_MODEL", help="Hub id or local checkpoint dir"),
    florence2_model: str = typer.Option("florence-community/Florence-2-base", "--florence2-model",
                                        envvar="VLMSERVE_FLORENCE2_MODEL", help="Hub id or local checkpoint dir"),
) -> None:
    """Serve real checkpoints (from the Hub or the local HF cache)."""
    _export_and_run("hub", siglip_model, florence2_model)


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
    chat_structured_share: float = typer.Option(0.5, help="share of JSON-schema requests in the mixed chat "
                                                          "scenario (vlmserve only; 0 skips it)"),
    repeats: int = typer.Option(3, help="rounds: every scenario runs this many times (median and range)"),
    model_set: str = typer.Option("perf", "--set", help="perf (real sizes) or tiny (a quick check of the harness)"),
) -> None:
    """Benchmark vlmserve against the one-request-at-a-time baselines on the perf models (offline)."""
    from loadtests.bench import run_bench

    path = run_bench(name, users, duration, florence_users, florence_duration, max_new_tokens, florence, chat,
                     chat_duration_s=chat_duration, chat_max_tokens=chat_max_tokens,
                     chat_structured_share=chat_structured_share, repeats=repeats,
                     model_set=model_set,
                     log=lambda m: orchestrator_cli.console.print(f"[cyan]bench[/cyan] {m}"))
    orchestrator_cli.console.print(path.with_suffix(".md").read_text())
