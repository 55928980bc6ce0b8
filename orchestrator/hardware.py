"""Which accelerators this machine has, and which serving flavour to run on them.

Detection never raises for a missing driver or tool: every probe that fails records why in
:attr:`Hardware.notes`, so ``vlmserve status`` can say *why* it fell back to the CPU. The probes are
injectable (an NVML module object, a ``run(cmd) -> stdout`` callable, sysfs/dev roots) so the logic is unit
tested without a GPU.

Order of the probes:

* NVIDIA: NVML (``pynvml`` from the ``nvidia-ml-py`` package), else ``nvidia-smi`` CSV output.
* AMD: only when ``/dev/kfd`` exists (the ROCm kernel driver); enumerated with ``rocm-smi --json``, else sysfs
  (``/sys/class/drm/card*/device`` with PCI vendor ``0x1002``).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Runner = Callable[[list[str]], str]
"""Runs a command and returns its stdout; raises (any exception) when the tool is missing or fails."""

ACCELERATORS = ("auto", "cpu", "cuda", "rocm")
NVIDIA_SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=index,name,memory.total,memory.used,uuid",
    "--format=csv,noheader,nounits",
]
ROCM_SMI_QUERY = ["rocm-smi", "--showmeminfo", "vram", "--json"]
AMD_PCI_VENDOR = "0x1002"
_MIB = 1024**2


@dataclass(frozen=True)
class Gpu:
    """One accelerator as the vendor tools number it (``index`` is the NVML / rocm-smi index)."""

    index: int
    vendor: str  # "nvidia" | "amd"
    name: str
    memory_total_bytes: int
    memory_used_bytes: int | None
    uuid: str | None = None


@dataclass(frozen=True)
class Hardware:
    """What :func:`detect` found; ``source`` says how ("nvml", "nvidia-smi", "rocm-smi", "sysfs", "none").

    When both vendors are present ``source`` joins both probes with ``+`` (e.g. ``"nvml+rocm-smi"``).
    """

    gpus: tuple[Gpu, ...]
    source: str
    notes: tuple[str, ...] = ()

    @property
    def nvidia(self) -> list[Gpu]:
        return [g for g in self.gpus if g.vendor == "nvidia"]

    @property
    def amd(self) -> list[Gpu]:
        return [g for g in self.gpus if g.vendor == "amd"]

    @property
    def vendors(self) -> set[str]:
        return {g.vendor for g in self.gpus}


class AcceleratorUnavailable(RuntimeError):
    """An explicitly requested accelerator is not present; the message says what was found and what to do."""


@dataclass(frozen=True)
class Choice:
    """How to serve on the chosen accelerator.

    ``image`` names ``docker/Dockerfile.<image>``. ``model_config_name`` is Triton's ``--model-config-name``:
    ``"embedded"`` selects the Python-backend configs (``configs/embedded.pbtxt``), ``None`` the native
    ``config.pbtxt`` (onnxruntime/TensorRT backends of the NGC image).

    ``instance_kind`` is ``KIND_CPU`` on ROCm on purpose: Triton's builds have no AMD GPU support, so Triton
    itself schedules the instances as CPU instances and the Python models place their work on the AMD GPU
    themselves (torch-ROCm, onnxruntime's MIGraphX/ROCm providers).
    """

    accelerator: str  # "cpu" | "cuda" | "rocm"
    image: str  # "cpu" | "gpu" | "rocm"
    model_config_name: str | None
    instance_kind: str  # "KIND_GPU" | "KIND_CPU"
    warnings: tuple[str, ...] = ()


_CHOICES = {
    "cpu": Choice("cpu", "cpu", "embedded", "KIND_CPU"),
    "cuda": Choice("cuda", "gpu", None, "KIND_GPU"),
    "rocm": Choice("rocm", "rocm", "embedded", "KIND_CPU"),
}


def choice_for(accelerator: str) -> Choice:
    """How to serve on ``accelerator`` (cpu, cuda, rocm) without detecting anything: for deployments rendered
    for another machine (``vlmserve deploy``)."""
    if accelerator not in _CHOICES:
        raise ValueError(f"accelerator must be one of {', '.join(_CHOICES)}, not {accelerator!r}")
    return _CHOICES[accelerator]


# ---------------------------------------------------------------------------------------------- probes


def _default_run(cmd: list[str]) -> str:
    # A wedged driver can make nvidia-smi hang for minutes; detection must not.
    return subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=True).stdout


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, subprocess.CalledProcessError):
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()
        return f"exit status {exc.returncode}" + (f" ({detail[-1]})" if detail else "")
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"timed out after {exc.timeout:g}s"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _text(value: Any) -> str:
    # Older pynvml releases return bytes for names and UUIDs.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _load_nvml(nvml: Any | None) -> tuple[Any | None, str | None]:
    if nvml is not None:
        return nvml, None
    try:
        import pynvml  # nvidia-ml-py
    except ImportError as exc:
        return None, f"pynvml not importable ({exc}); install nvidia-ml-py"
    return pynvml, None


def _probe_nvml(nvml: Any | None) -> tuple[list[Gpu] | None, str]:
    """(GPUs, note): GPUs is None when NVML itself is unusable (then try nvidia-smi)."""
    module, why = _load_nvml(nvml)
    if module is None:
        return None, f"NVML not available: {why}"
    try:
        module.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...: all mean "no NVML"
        return None, f"NVML not available: {_describe(exc)}"
    try:
        gpus = []
        for i in range(int(module.nvmlDeviceGetCount())):
            handle = module.nvmlDeviceGetHandleByIndex(i)
            memory = module.nvmlDeviceGetMemoryInfo(handle)
            try:
                uuid: str | None = _text(module.nvmlDeviceGetUUID(handle))
            except Exception:  # noqa: BLE001 - a UUID is nice to have, not worth losing the GPU over
                uuid = None
            gpus.append(Gpu(i, "nvidia", _text(module.nvmlDeviceGetName(handle)), int(memory.total),
                            int(memory.used), uuid))
        return gpus, f"NVML: {len(gpus)} NVIDIA GPU(s)"
    except Exception as exc:  # noqa: BLE001
        return None, f"NVML query failed: {_describe(exc)}"
    finally:
        with contextlib.suppress(Exception):  # shutting down a half-initialised NVML is best effort
            module.nvmlShutdown()


def _mib(field: str) -> int | None:
    field = field.strip()
    try:
        return int(float(field) * _MIB)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Parse ``nvidia-smi --query-gpu=index,name,memory.total,memory.used,uuid --format=csv,noheader,nounits``.

    ``nounits`` memory columns are MiB. Raises ValueError on a line that does not have the five columns.
    """
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 5:
            raise ValueError(f"unexpected nvidia-smi line {line!r}")
        # A GPU name may itself contain a comma: index first, then the last three columns are fixed.
        index, name, total, used, uuid = fields[0], ", ".join(fields[1:-3]), fields[-3], fields[-2], fields[-1]
        total_bytes = _mib(total)
        if total_bytes is None:
            raise ValueError(f"nvidia-smi reports no memory size in {line!r}")
        gpus.append(Gpu(int(index), "nvidia", name, total_bytes, _mib(used), uuid or None))
    return gpus


def _probe_nvidia_smi(run: Runner) -> tuple[list[Gpu] | None, str]:
    try:
        out = run(NVIDIA_SMI_QUERY)
    except Exception as exc:  # noqa: BLE001 - a missing binary or failing driver both mean "not found"
        return None, f"nvidia-smi: {_describe(exc)}"
    try:
        gpus = parse_nvidia_smi(out)
    except ValueError as exc:
        return None, f"nvidia-smi: {exc}"
    return gpus, f"nvidia-smi: {len(gpus)} NVIDIA GPU(s)"


def parse_rocm_smi(text: str) -> list[Gpu]:
    """Parse ``rocm-smi --showmeminfo vram --json``: ``{"card0": {"VRAM Total Memory (B)": "...", ...}}``."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("rocm-smi JSON is not an object")
    gpus = []
    for key, info in data.items():
        match = re.fullmatch(r"card(\d+)", key)
        if not match or not isinstance(info, dict):
            continue  # e.g. a "system" section
        total = next((v for k, v in info.items() if "total" in k.lower() and "used" not in k.lower()), None)
        used = next((v for k, v in info.items() if "used" in k.lower()), None)
        if total is None:
            continue
        name = str(info.get("Card series") or info.get("Card model") or "AMD GPU")
        gpus.append(Gpu(int(match.group(1)), "amd", name, int(total), None if used is None else int(used)))
    return sorted(gpus, key=lambda g: g.index)


def _probe_rocm_smi(run: Runner) -> tuple[list[Gpu] | None, str]:
    try:
        out = run(ROCM_SMI_QUERY)
    except Exception as exc:  # noqa: BLE001
        return None, f"rocm-smi: {_describe(exc)}"
    try:
        gpus = parse_rocm_smi(out)
    except (ValueError, TypeError) as exc:
        return None, f"rocm-smi: unreadable output ({exc})"
    if not gpus:
        return None, "rocm-smi: no GPU in its output"
    return gpus, f"rocm-smi: {len(gpus)} AMD GPU(s)"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip(), 0)
    except (OSError, ValueError):
        return None


def _probe_sysfs(sysfs_root: Path) -> tuple[list[Gpu] | None, str]:
    drm = sysfs_root / "class" / "drm"
    cards = sorted(
        (p for p in drm.glob("card*") if re.fullmatch(r"card\d+", p.name)), key=lambda p: int(p.name[4:])
    )
    gpus: list[Gpu] = []
    for card in cards:
        device = card / "device"
        try:
            vendor = (device / "vendor").read_text().strip().lower()
        except OSError:
            continue
        total = _read_int(device / "mem_info_vram_total")
        if vendor != AMD_PCI_VENDOR or total is None:
            continue  # an integrated or non-AMD display adapter
        try:
            name = (device / "product_name").read_text().strip() or "AMD GPU"
        except OSError:
            name = "AMD GPU"
        # Numbered in card order among the AMD GPUs: the order ROCm/HIP enumerates them in.
        gpus.append(Gpu(len(gpus), "amd", name, total, _read_int(device / "mem_info_vram_used")))
    if not gpus:
        return None, f"sysfs: no AMD GPU with VRAM under {drm}"
    return gpus, f"sysfs: {len(gpus)} AMD GPU(s)"


# ---------------------------------------------------------------------------------------------- public


def detect(
    *,
    nvml: Any | None = None,
    run: Runner | None = None,
    sysfs_root: Path = Path("/sys"),
    dev_root: Path = Path("/dev"),
) -> Hardware:
    """Find the NVIDIA and AMD GPUs of this machine; never raises for a missing driver (see the notes)."""
    run = run or _default_run
    gpus: list[Gpu] = []
    sources: list[str] = []
    notes: list[str] = []

    nvidia, note = _probe_nvml(nvml)
    if nvidia is not None:
        sources.append("nvml")
    else:
        smi, smi_note = _probe_nvidia_smi(run)
        note = f"{note}; {smi_note}"
        if smi is not None:
            nvidia = smi
            sources.append("nvidia-smi")
    notes.append(note)
    gpus.extend(nvidia or [])

    if (dev_root / "kfd").exists():
        amd, amd_note = _probe_rocm_smi(run)
        if amd is not None:
            sources.append("rocm-smi")
        else:
            amd, sysfs_note = _probe_sysfs(sysfs_root)
            amd_note = f"{amd_note}; {sysfs_note}"
            if amd is not None:
                sources.append("sysfs")
        notes.append(amd_note)
        gpus.extend(amd or [])
    else:
        notes.append(f"AMD: {dev_root / 'kfd'} absent (no ROCm kernel driver)")

    return Hardware(tuple(gpus), "+".join(sources) or "none", tuple(notes))


def gpu_memory_by_pid(nvml: Any | None = None) -> dict[int, int]:
    """GPU bytes used per process id, summed over all NVIDIA devices; ``{}`` when NVML is unavailable.

    Processes in another PID namespace (other containers) show up with the PIDs NVML reports for them.
    """
    module, _ = _load_nvml(nvml)
    if module is None:
        return {}
    try:
        module.nvmlInit()
    except Exception:  # noqa: BLE001
        return {}
    usage: dict[int, int] = {}
    try:
        for i in range(int(module.nvmlDeviceGetCount())):
            handle = module.nvmlDeviceGetHandleByIndex(i)
            for proc in module.nvmlDeviceGetComputeRunningProcesses(handle):
                used = getattr(proc, "usedGpuMemory", None)
                if used is None:  # NVML reports "not available" e.g. under some virtualisation
                    continue
                usage[int(proc.pid)] = usage.get(int(proc.pid), 0) + int(used)
    except Exception:  # noqa: BLE001 - a half answer is worse than none for a status table
        return {}
    finally:
        with contextlib.suppress(Exception):
            module.nvmlShutdown()
    return usage


def choose(requested: str, hardware: Hardware, fallback: bool = False) -> Choice:
    """The serving flavour for ``--accelerator requested`` on ``hardware``.

    ``auto`` prefers CUDA, then ROCm, then the CPU. An explicitly requested accelerator that is absent raises
    :class:`AcceleratorUnavailable`, or with ``fallback`` returns the CPU choice with a warning.
    """
    if requested not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {requested!r}; valid values: {', '.join(ACCELERATORS)}")
    if requested == "auto":
        if hardware.nvidia:
            extra = ("AMD GPU(s) present too; using NVIDIA (pass --accelerator rocm to use them)",)
            return _with_warnings(_CHOICES["cuda"], extra if hardware.amd else ())
        if hardware.amd:
            return _CHOICES["rocm"]
        return _CHOICES["cpu"]
    if requested == "cpu":
        return _CHOICES["cpu"]
    vendor, label = ("nvidia", "NVIDIA") if requested == "cuda" else ("amd", "AMD")
    if vendor in hardware.vendors:
        return _CHOICES[requested]
    keys = ("NVML", "nvidia-smi") if requested == "cuda" else ("AMD", "rocm-smi", "sysfs")
    found = "; ".join(n for n in hardware.notes if any(k in n for k in keys)) or "no probe notes"
    message = (
        f"--accelerator {requested} requested but no {label} GPU was found ({found}). "
        "Use --accelerator cpu, or --fallback to fall back to CPU"
    )
    if not fallback:
        raise AcceleratorUnavailable(message)
    return _with_warnings(_CHOICES["cpu"], (f"no {label} GPU found ({found}); falling back to CPU (--fallback)",))


def _with_warnings(choice: Choice, warnings: tuple[str, ...]) -> Choice:
    if not warnings:
        return choice
    return Choice(choice.accelerator, choice.image, choice.model_config_name, choice.instance_kind,
                  choice.warnings + warnings)
