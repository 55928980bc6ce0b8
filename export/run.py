"""``vlmserve export``: build (or refresh) a model repository for a model set."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vlmserve import paths
from vlmserve.export import tiny
from vlmserve.export.progress import Progress
from vlmserve.export.repository import ExportOptions, fingerprint, read_stamp, write_stamp
from vlmserve.export.runtime_choice import SELECTION_VERSION
from vlmserve.export.sources import resolve_source
from vlmserve.families import FamilySpec, families, family
from vlmserve.families.spec import load
from vlmserve.host import cpu_info

# tiny: offline random models (make demo, tests); hub: real checkpoints; perf: real architectures at real sizes
# with random weights (export/perf.py), for benchmarks offline. Which families each set holds: their specs.
MODEL_SETS = ("tiny", "hub", "perf")


def default_families(model_set: str) -> list[str]:
    """The families ``model_set`` exports when no ``--family`` is given."""
    specs = families().values()
    if model_set == "perf":
        return [s.name for s in specs if s.in_default_perf]
    if model_set == "tiny":
        return [s.name for s in specs if s.in_default_set and s.tiny]
    return [s.name for s in specs if s.in_default_set]


def tiny_source(spec: FamilySpec, progress: Progress) -> Path:
    """The tiny checkpoint for ``spec``, built on first use (offline, fixed seed)."""
    if spec.tiny is None:
        raise ValueError(f"{spec.name} has no tiny model (it needs real weights): use --set hub")
    out = paths.tiny_models_dir() / spec.name
    if not (out / "config.json").exists() or not tiny.is_tiny(out):
        with progress.step(f"building tiny random {spec.name} checkpoint"):
            load(spec.tiny)(out)
    return out


def export_family(
    name: str,
    source: str | Path,
    repo: Path,
    options: ExportOptions,
    progress: Progress,
    force: bool = False,
) -> dict[str, Any]:
    """Export one family into ``repo`` unless the stamp says it is already up to date."""
    recipe = family(name).load_recipe()
    source_dir = resolve_source(source)
    weights = "random" if tiny.is_tiny(source_dir) else "pretrained"
    from vlmserve.export.perf import is_perf

    kind = "perf" if is_perf(source_dir) else "tiny"
    source_name = f"vlmserve/{kind}-{name}" if weights == "random" else str(source)
    # The runtime choice depends on this host's CPU and on how export chooses: either changing re-exports.
    host = {"selection": SELECTION_VERSION, "isa": cpu_info().fingerprint()}
    fp = fingerprint(recipe.RECIPE_VERSION, source_dir, options, {"source": source_name, **host})
    stamp = read_stamp(repo, name)
    complete = all((repo / m / "config.pbtxt").exists() for m in recipe.MODELS)
    if not force and stamp and stamp.get("fingerprint") == fp and complete:
        progress.info(f"[dim]{name}: up to date ({source_name}), nothing to do[/dim]")
        return {**stamp, "skipped": True}
    progress.info(f"[bold]{name}[/bold]: exporting {source_name} ({weights} weights) into {repo}")
    start = time.monotonic()
    report = recipe.export(source_dir, repo, options, weights, source_name, progress)
    stamp = {
        "fingerprint": fp,
        "family": name,
        "source": source_name,
        "weights": weights,
        "options": asdict(options),
        "seconds": round(time.monotonic() - start, 1),
        **report,
    }
    write_stamp(repo, name, stamp)
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
    for name in families or default_families(model_set):
        spec = family(name)
        if model_set == "tiny":
            source: str | Path = tiny_source(spec, progress)
        elif model_set == "perf":
            from vlmserve.export.perf import perf_source

            source = perf_source(spec, progress)
        else:
            source = (sources or {}).get(name) or spec.default_source
        reports[name] = export_family(name, source, repo, options, progress, force)
    return reports
