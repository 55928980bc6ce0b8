"""``vlmserve export``: build (or refresh) a model repository for a model set."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from export import chat, florence2, siglip, tiny
from export.progress import Progress
from export.repository import ExportOptions, fingerprint, read_stamp, write_stamp
from export.runtime_choice import SELECTION_VERSION
from export.sources import resolve_source
from vlmserve import paths
from vlmserve.host import cpu_info

# family -> recipe module; adding a family = a recipe + its Triton models + a gateway route module.
RECIPES: dict = {"siglip": siglip, "florence2": florence2, "qwen2vl": chat.qwen2vl, "smolvlm2": chat.smolvlm2}
# Opt-in families: exported only when asked for (`--family`), never part of a default set.
OPTIONAL_RECIPES: dict = {"deepseek_ocr": chat.deepseek_ocr}
MODEL_SETS = ("tiny", "hub", "perf")
# perf: real architectures at real sizes with random weights (export/perf.py), for benchmarks offline. The
# default perf families; smolvlm2 has a perf model too, built and exported only when asked for (--family
# smolvlm2), since it adds another ~1 GB checkpoint and a 512 px SigLIP ONNX export to every perf run.
PERF_FAMILIES = ["siglip", "florence2"]


def tiny_source(family: str, progress: Progress) -> Path:
    """The tiny checkpoint for ``family``, built on first use (offline, fixed seed)."""
    out = paths.tiny_models_dir() / family
    if not (out / "config.json").exists() or not tiny.is_tiny(out):
        with progress.step(f"building tiny random {family} checkpoint"):
            tiny.TINY_BUILDERS[family](out)
    return out


def export_family(
    family: str,
    source: str | Path,
    repo: Path,
    options: ExportOptions,
    progress: Progress,
    force: bool = False,
) -> dict[str, Any]:
    """Export one family into ``repo`` unless the stamp says it is already up to date."""
    recipe = {**RECIPES, **OPTIONAL_RECIPES}[family]
    source_dir = resolve_source(source)
    weights = "random" if tiny.is_tiny(source_dir) else "pretrained"
    from export.perf import is_perf

    kind = "perf" if is_perf(source_dir) else "tiny"
    source_name = f"vlmserve/{kind}-{family}" if weights == "random" else str(source)
    # The runtime choice depends on this host's CPU and on how export chooses: either changing re-exports.
    host = {"selection": SELECTION_VERSION, "isa": cpu_info().fingerprint()}
    fp = fingerprint(recipe.RECIPE_VERSION, source_dir, options, {"source": source_name, **host})
    stamp = read_stamp(repo, family)
    complete = all((repo / m / "config.pbtxt").exists() for m in recipe.MODELS)
    if not force and stamp and stamp.get("fingerprint") == fp and complete:
        progress.info(f"[dim]{family}: up to date ({source_name}), nothing to do[/dim]")
        return {**stamp, "skipped": True}
    progress.info(f"[bold]{family}[/bold]: exporting {source_name} ({weights} weights) into {repo}")
    start = time.monotonic()
    report = recipe.export(source_dir, repo, options, weights, source_name, progress)
    stamp = {
        "fingerprint": fp,
        "family": family,
        "source": source_name,
        "weights": weights,
        "options": asdict(options),
        "seconds": round(time.monotonic() - start, 1),
        **report,
    }
    write_stamp(repo, family, stamp)
    return {**stamp, "skipped": False}


def export_model_set(
    model_set: str,
    repo: Path | None = None,
    options: ExportOptions | None = None,
    sources: dict[str, str] | None = None,
    families: list[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, dict[str, Any]]:
    """Export every family of ``model_set`` (``tiny``: offline random models; ``hub``: real checkpoints)."""
    if model_set not in MODEL_SETS:
        raise ValueError(f"unknown model set {model_set!r}; choose one of {', '.join(MODEL_SETS)}")
    progress = progress or Progress()
    options = options or ExportOptions()
    repo = (repo or paths.repository_dir(model_set)).resolve()
    repo.mkdir(parents=True, exist_ok=True)
    reports = {}
    known = {**RECIPES, **OPTIONAL_RECIPES}
    for family in families or (PERF_FAMILIES if model_set == "perf" else list(RECIPES)):
        if family not in known:
            raise ValueError(f"unknown model family {family!r}; choose from {', '.join(known)}")
        if model_set == "tiny":
            if family not in tiny.TINY_BUILDERS:
                raise ValueError(f"{family} has no tiny model (it needs real weights): use --set hub")
            source: str | Path = tiny_source(family, progress)
        elif model_set == "perf":
            from export.perf import PERF_BUILDERS, perf_source

            if family not in PERF_BUILDERS:
                raise ValueError(f"{family} has no perf model; perf covers {', '.join(PERF_BUILDERS)}")
            source = perf_source(family, progress)
        else:
            source = (sources or {}).get(family) or known[family].DEFAULT_MODEL
        reports[family] = export_family(family, source, repo, options, progress, force)
    return reports
