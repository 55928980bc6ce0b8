"""Pick, per exported encoder, the fastest CPU runtime/precision of this host whose fidelity holds.

The candidates are the ones the serving models can open (``vlmserve.model_repository.common.open_encoder``): ONNX
Runtime fp32 (the default, exact), OpenVINO fp32, and OpenVINO bf16 where the CPU has native bf16 (AVX512-BF16
or AMX). Each is checked against the fp32 PyTorch reference's outputs on realistic inputs (photos through the
checkpoint's own processor, natural sentences) and timed, interleaved round by round so that a busy machine
slows every candidate alike; the fastest one whose minimum cosine to the reference is >= the floor wins, and
it must beat the default by ``MARGIN`` (timing noise must not flip the choice between two equal runtimes).

A tower whose output the user never sees directly (SmolVLM2's vision encoder + connector, whose features the
language model reads) is fenced end to end instead: ``choose(..., fence=...)`` runs each candidate through
``fence`` (e.g. :class:`vlmserve.export.image_fence.SmolVLMImageFence`), which teacher-forces the language model over
image prompts with that candidate's features and compares the logits with the ones the fp32 reference tower
gives (:func:`logit_fidelity`); the candidate is faithful when the minimum per-position cosine is >= the floor
and the argmax agrees at >= ``ARGMAX_FLOOR`` of the positions (:func:`lm_faithful`). The tower-level cosine is
still measured and reported for every candidate, but no longer gates it (``"gate": "lm"`` in the report).

The report (host, every candidate's speed and cosine, the choice and why) is written next to the model as
``runtime_choice.json`` and, shortened, into the configs' parameters, where ``/v1/models`` shows it, with every
faithful candidate in speed order (``runtime_faithful``): a model served on a CPU without the choice's ISA runs
the next one it can (``vlmserve.host.serve_choice``, checked at load).
GPU exports are not timed here: their instances run ONNX Runtime's CUDA/ROCm providers (TensorRT on the NGC
image's native backend).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmserve.export.onnx_utils import FidelityError
from vlmserve.host import CpuInfo, cpu_info

# Bump when the candidates, the floors or the way of choosing change: every repository re-selects.
SELECTION_VERSION = "select-2"  # select-2: the LM-logits fence for chat vision towers
FIDELITY_FLOOR = 0.999  # min cosine to the fp32 PyTorch reference (int8 variants have their own, 0.99)
# Decoders (torch, bf16 autocast): next-token logits teacher-forced on the fp32 output must keep this cosine and
# pick the same token at this share of positions.
ARGMAX_FLOOR = 0.99
MARGIN = 1.05
ROUNDS = 5
TIME_BUDGET_S = 30.0
REPORT_FILE = "runtime_choice.json"
RUNTIME_CHOICES = ("auto", "onnxruntime", "openvino")
PRECISION_CHOICES = ("auto", "fp32", "bf16")


@dataclass
class Trial:
    runtime: str
    precision: str
    items_per_s: float | None = None
    min_cosine: float | None = None  # the tower's own output vs the fp32 reference (the gate when gate == "tower")
    error: str | None = None
    gate: str = "tower"  # "lm": faithful by the language model's teacher-forced logits (the lm_* figures)
    lm_min_cosine: float | None = None
    lm_mean_cosine: float | None = None
    lm_argmax_agreement: float | None = None
    lm_positions: int | None = None

    @property
    def name(self) -> str:
        return f"{self.runtime}/{self.precision}"

    def faithful(self, floor: float) -> bool:
        if self.error is not None:
            return False
        if self.gate == "lm":
            return self.lm_min_cosine is not None and lm_faithful(asdict(self), floor)
        return self.min_cosine is not None and self.min_cosine >= floor


def logit_fidelity(reference: Sequence[Any], got: Sequence[Any]) -> dict[str, Any]:
    """Per-position fidelity of next-token logits: ``reference``/``got`` are matching lists of ``[positions,
    vocab]`` arrays (numpy or torch; one per prompt). Returns the mean and minimum cosine over all positions,
    the share of positions whose argmax (the greedy token) agrees, and the number of positions."""
    a = np.concatenate([_numpy(r).reshape(-1, _numpy(r).shape[-1]) for r in reference]).astype(np.float64)
    b = np.concatenate([_numpy(g).reshape(-1, _numpy(g).shape[-1]) for g in got]).astype(np.float64)
    if a.shape != b.shape or not len(a):
        raise ValueError(f"logits to compare differ in shape (or are empty): {a.shape} vs {b.shape}")
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {"lm_mean_cosine": float(cosine.mean()), "lm_min_cosine": float(cosine.min()),
            "lm_argmax_agreement": float((a.argmax(1) == b.argmax(1)).mean()), "lm_positions": int(len(a))}


def lm_faithful(figures: dict[str, Any], floor: float = FIDELITY_FLOOR, argmax_floor: float = ARGMAX_FLOOR) -> bool:
    """The LM fence: minimum logits cosine >= ``floor`` and greedy (argmax) agreement >= ``argmax_floor``."""
    return figures["lm_min_cosine"] >= floor and figures["lm_argmax_agreement"] >= argmax_floor


def _numpy(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def candidates(cpu: CpuInfo, runtime: str = "auto", precision: str = "auto") -> list[tuple[str, str]]:
    """The (runtime, precision) pairs worth timing on ``cpu``, narrowed by the overrides."""
    if runtime not in RUNTIME_CHOICES:
        raise ValueError(f"--runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {runtime!r}")
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"--precision must be one of {', '.join(PRECISION_CHOICES)} (int8: --int8 adds the "
                         f"*_int8 variants), got {precision!r}")
    pairs = [("onnxruntime", "fp32"), ("openvino", "fp32")]
    if cpu.has_bf16 or precision == "bf16":
        pairs.append(("openvino", "bf16"))
    pairs = [(r, p) for r, p in pairs if runtime in ("auto", r) and precision in ("auto", p)]
    if not pairs:
        raise ValueError(f"no runtime serves {runtime}/{precision}: onnxruntime has fp32, openvino fp32 and bf16")
    return pairs


def cosine_min(reference: np.ndarray, got: np.ndarray) -> float:
    a, b = reference.reshape(len(reference), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
    return float(np.min((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)))


def choose(
    onnx_path: Path,
    inputs: dict[str, np.ndarray],
    reference: np.ndarray,
    runtime: str = "auto",
    precision: str = "auto",
    cpu: CpuInfo | None = None,
    rounds: int = ROUNDS,
    floor: float = FIDELITY_FLOOR,
    fence: Callable[[Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]], dict[str, Any]] | None = None,
    opener: Callable[[Path, str, str], Any] | None = None,
) -> dict[str, Any]:
    """Time and check every candidate on ``inputs`` (one batch); return the report with the choice.

    Without ``fence`` a candidate is faithful when its output's minimum cosine to ``reference`` is >= ``floor``.
    With it, ``fence(encoder)`` returns the candidate's :func:`logit_fidelity` figures (the language model's
    logits with this encoder's features vs with the fp32 reference's) and those gate it (:func:`lm_faithful`);
    the tower cosine is reported only. ``opener(path, runtime, precision)`` opens a candidate (default
    ``vlmserve.model_repository.common.open_encoder``; tests pass fakes).
    """
    from vlmserve.model_repository.common import open_encoder

    open_candidate = opener or open_encoder
    cpu = cpu or cpu_info()
    batch = len(next(iter(inputs.values())))
    trials: list[Trial] = []
    encoders = []
    for rt, prec in candidates(cpu, runtime, precision):
        trial = Trial(rt, prec, gate="lm" if fence is not None else "tower")
        trials.append(trial)
        try:
            encoder = open_candidate(onnx_path, rt, prec)
            out = next(iter(encoder(inputs).values()))  # also the warm-up run
            trial.min_cosine = cosine_min(reference, out)
            if fence is not None:
                figures = fence(encoder)
                for key in ("lm_min_cosine", "lm_mean_cosine", "lm_argmax_agreement", "lm_positions"):
                    setattr(trial, key, figures[key])
            encoders.append((trial, encoder))
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot load this graph is just not a candidate
            trial.error = f"{type(exc).__name__}: {exc}"[:300]
    times: dict[str, list[float]] = {t.name: [] for t, _ in encoders}
    if encoders:  # big encoders (Florence-2 at 768 px): fewer rounds, at least 2, ~TIME_BUDGET_S in all
        start = time.perf_counter()
        encoders[0][1](inputs)
        per_round = (time.perf_counter() - start) * len(encoders)
        rounds = max(2, min(rounds, int(TIME_BUDGET_S / max(per_round, 1e-9))))
    for _ in range(rounds):
        for trial, encoder in encoders:
            start = time.perf_counter()
            encoder(inputs)
            times[trial.name].append(time.perf_counter() - start)
    for trial, _ in encoders:
        trial.items_per_s = batch / statistics.median(times[trial.name])

    faithful = [t for t in trials if t.faithful(floor)]
    if not faithful:
        what = (f"the language model's teacher-forced logits cosine >= {floor} and argmax agreement >= "
                f"{ARGMAX_FLOOR} with its features vs the fp32 PyTorch tower's" if fence is not None
                else f"cosine >= {floor} to the fp32 PyTorch reference")
        raise FidelityError(f"{onnx_path.parent.parent.name}: no candidate holds {what}: "
                            + "; ".join(_describe(t) for t in trials))
    default = next((t for t in faithful if (t.runtime, t.precision) == ("onnxruntime", "fp32")), None)
    best = max(faithful, key=lambda t: t.items_per_s or 0.0)
    if default is not None and best is not default and (best.items_per_s or 0) < MARGIN * (default.items_per_s or 0):
        best = default
    reason = (f"fastest faithful candidate on {cpu.summary} at batch {batch}"
              if len(trials) > 1 else f"requested (--runtime {runtime} --precision {precision})")
    gated = {"gate": "lm", "argmax_floor": ARGMAX_FLOOR, "lm_min_cosine": best.lm_min_cosine,
             "lm_mean_cosine": best.lm_mean_cosine, "lm_argmax_agreement": best.lm_argmax_agreement,
             "lm_positions": best.lm_positions, "lm_fence": getattr(fence, "description", None)} \
        if fence is not None else {"gate": "tower"}
    return {
        "selection_version": SELECTION_VERSION,
        "runtime": best.runtime,
        "precision": best.precision,
        "items_per_s": best.items_per_s,
        "min_cosine": best.min_cosine,  # the tower's own cosine: reported (the gate only when gate == "tower")
        "fidelity_floor": floor,
        **gated,
        "batch": batch,
        "rounds": rounds,
        "host": {"cpu": cpu.model, "cores": cpu.cores, "isa": list(cpu.isa)},
        "reason": reason,
        "candidates": [asdict(t) for t in trials],
    }


def _describe(t: Trial) -> str:
    if t.error:
        return f"{t.name} failed ({t.error})"
    if t.gate == "lm" and t.lm_min_cosine is not None and t.lm_argmax_agreement is not None:
        return (f"{t.name} {t.items_per_s or 0:.1f}/s LM cosine {t.lm_min_cosine:.5f} argmax "
                f"{100 * t.lm_argmax_agreement:.1f}% (tower {t.min_cosine:.5f})")
    return f"{t.name} {t.items_per_s or 0:.1f}/s cosine {t.min_cosine:.5f}"


def summary(report: dict[str, Any]) -> str:
    """One line for the config parameters and the export progress, e.g. ``openvino/bf16: 11.2/s ...``."""
    others = [Trial(**c) for c in report["candidates"]]
    if report.get("gate") == "lm":
        fence = (f"LM logits cosine min {report['lm_min_cosine']:.5f} mean {report['lm_mean_cosine']:.5f} >= "
                 f"{report['fidelity_floor']}, argmax {100 * report['lm_argmax_agreement']:.1f}% >= "
                 f"{100 * report['argmax_floor']:.0f}% over {report['lm_positions']} positions; tower cosine "
                 f"{report['min_cosine']:.5f}, reported")
    else:
        fence = f"cosine {report['min_cosine']:.5f} >= {report['fidelity_floor']}"
    return (f"{report['runtime']}/{report['precision']} ({fence}); timed at batch {report['batch']}: "
            + ", ".join(_describe(t) for t in others))


def write_report(model_dir: Path, report: dict[str, Any]) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))


def config_params(report: dict[str, Any] | None) -> dict[str, str]:
    """The parameters the serving models read (``runtime``, ``precision``) and ``/v1/models`` shows."""
    if report is None:
        return {}
    return {"runtime": report["runtime"], "precision": report["precision"], "runtime_choice": summary(report),
            "runtime_faithful": ",".join(faithful_candidates(report))}


def faithful_candidates(report: dict[str, Any]) -> list[str]:
    """The choice, then every other candidate that passed the fence, fastest first: what a serving host whose CPU
    lacks the choice's ISA (a repository exported on an AMX host, served from an AVX2 node) falls back to."""
    chosen = f"{report['runtime']}/{report['precision']}"
    others = sorted((Trial(**c) for c in report["candidates"]), key=lambda t: -(t.items_per_s or 0.0))
    return [chosen, *(t.name for t in others if t.name != chosen and t.faithful(report["fidelity_floor"]))]


def select_for_export(repo: Path, name: str, module, onnx_path: Path, inputs: dict[str, np.ndarray], options,
                      progress, fence=None) -> dict[str, Any] | None:
    """Export's step for one encoder: reference outputs from ``module`` (fp32 torch), the choice, its report.

    ``fence`` (see :func:`choose`): a callable that fences a candidate by the language model's logits.
    None on GPU exports (nothing is timed; the configs keep onnxruntime/fp32).
    """
    import torch

    if options.device != "cpu":
        return None
    how = "timing candidates, fenced on the language model's logits" if fence is not None else "timing candidates"
    with progress.step(f"choosing the CPU runtime for {name} ({how})") as step:
        with torch.no_grad():
            reference = module(*[torch.from_numpy(v) for v in inputs.values()]).numpy()
        report = choose(onnx_path, inputs, reference, options.runtime, options.precision, fence=fence)
        write_report(repo / name, report)
        step.detail = summary(report)
    return report


def choose_decoder(generate, logits, precision: str = "auto", cpu: CpuInfo | None = None, rounds: int = 2,
                   floor: float = FIDELITY_FLOOR) -> dict[str, Any]:
    """fp32 or bf16 autocast for a torch decoder (what ``generate`` runs): timed interleaved, fenced on logits.

    ``generate(bf16: bool)`` runs one realistic batched generation and returns the token ids; ``logits(bf16,
    ids)`` returns next-token logits [rows, positions, vocab] teacher-forced on ``ids`` (the fp32 output), so
    both precisions are compared at the same positions. bf16 is a candidate only with native bf16 (or asked
    for); it wins when faithful (min cosine >= ``floor``, argmax agreement >= ``ARGMAX_FLOOR``) and faster by
    ``MARGIN``. The share of tokens a free-running generation reproduces is reported, not fenced: with random
    weights the logits are nearly flat and beam search flips on near-ties.
    """
    import torch

    if precision not in PRECISION_CHOICES:
        raise ValueError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    cpu = cpu or cpu_info()
    modes = [False] if precision == "fp32" or not (cpu.has_bf16 or precision == "bf16") else [False, True]
    if precision == "bf16":
        modes = [True]
    with torch.no_grad():
        reference_ids = generate(False)
        seconds: dict[bool, list[float]] = {bf16: [] for bf16 in modes}
        outputs = {}
        for _ in range(rounds):
            for bf16 in modes:
                start = time.perf_counter()
                outputs[bf16] = generate(bf16)
                seconds[bf16].append(time.perf_counter() - start)
        trials: dict[bool, dict[str, Any]] = {
            bf16: {"precision": "bf16" if bf16 else "fp32", "seconds": statistics.median(seconds[bf16])}
            for bf16 in modes}
        expected = logits(False, reference_ids).float()
        for bf16, trial in trials.items():
            got = logits(bf16, reference_ids).float()
            trial["min_cosine"] = float(torch.nn.functional.cosine_similarity(expected, got, dim=-1).min())
            trial["argmax_agreement"] = float((expected.argmax(-1) == got.argmax(-1)).float().mean())
            same = outputs[bf16].shape == reference_ids.shape
            trial["free_running_token_match"] = float((outputs[bf16] == reference_ids).float().mean()) if same else 0.0
    faithful = [t for t in trials.values() if t["min_cosine"] >= floor and t["argmax_agreement"] >= ARGMAX_FLOOR]
    if not faithful:
        raise FidelityError(f"decoder: no precision holds cosine >= {floor} and argmax agreement >= {ARGMAX_FLOOR}: "
                            + "; ".join(f"{t['precision']} cosine {t['min_cosine']:.5f} argmax "
                                        f"{t['argmax_agreement']:.3f}" for t in trials.values()))
    best = min(faithful, key=lambda t: t["seconds"])
    fp32 = trials.get(False)
    if fp32 in faithful and best is not fp32 and best["seconds"] * MARGIN > fp32["seconds"]:
        best = fp32
    return {"selection_version": SELECTION_VERSION, "precision": best["precision"], "fidelity_floor": floor,
            "argmax_floor": ARGMAX_FLOOR, "host": {"cpu": cpu.model, "cores": cpu.cores, "isa": list(cpu.isa)},
            "candidates": list(trials.values())}


def decoder_summary(report: dict[str, Any]) -> str:
    return f"decoder {report['precision']}; timed: " + ", ".join(
        f"{t['precision']} {t['seconds']:.2f}s cosine {t['min_cosine']:.5f} argmax {t['argmax_agreement']:.3f} "
        f"free-running {t['free_running_token_match']:.2f}" for t in report["candidates"])
