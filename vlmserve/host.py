"""What this host's CPU can do: model name and the ISA extensions that decide which kernels are fast.

Hosts differ from one machine to the next (an AVX2-only EPYC, an AVX-512 + BF16 EPYC, a Xeon with AMX), and
the fastest precision/runtime differs with them: export times the candidates on the host it runs on, and the
benchmark names the host in every report. Linux only (``/proc/cpuinfo``); elsewhere the flags are empty.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# The /proc/cpuinfo flags that change which kernels ONNX Runtime, OpenVINO and oneDNN pick, widest last.
ISA_FLAGS = (
    "avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8",
)


@dataclass(frozen=True)
class CpuInfo:
    model: str
    cores: int
    isa: tuple[str, ...] = field(default_factory=tuple)

    @property
    def has_bf16(self) -> bool:
        """Native bf16 dot products (AVX512-BF16 or AMX-BF16): bf16 inference is faster than fp32 here."""
        return "avx512_bf16" in self.isa or "amx_bf16" in self.isa

    @property
    def has_vnni(self) -> bool:
        """int8 dot products without the int16 saturation of plain AVX2/AVX-512 (VNNI or AMX-INT8)."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(self.isa))

    @property
    def summary(self) -> str:
        """e.g. ``AMD EPYC (2 cores; avx2 avx512f avx512_vnni avx512_bf16)``."""
        return f"{self.model} ({self.cores} cores; {' '.join(self.isa) or 'no AVX2'})"

    def fingerprint(self) -> str:
        """Changes when the kernels a runtime may pick change: part of the export's up-to-date check."""
        return hashlib.sha256(" ".join(self.isa).encode()).hexdigest()[:16]


def parse_cpuinfo(text: str) -> CpuInfo:
    model, flags, cores = "", set[str](), 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "processor":
            cores += 1
    return CpuInfo(model or platform.processor() or "unknown CPU", cores, tuple(f for f in ISA_FLAGS if f in flags))


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    try:
        return parse_cpuinfo(cpuinfo.read_text())
    except OSError:
        return CpuInfo(platform.processor() or "unknown CPU", 0)


# ---------------------------------------------------------------------------------------------- serve-time check

# Read instead of /proc/cpuinfo when set: a test (or an operator rehearsing a move to other nodes) fakes the CPU.
CPUINFO_ENV = "VLMSERVE_CPUINFO"
# What a precision needs natively (any one flag): without it OpenVINO/oneDNN/torch emulate bf16 (slow) or fail.
PRECISION_ISA = {"bf16": ("avx512_bf16", "amx_bf16")}


def serving_cpu() -> CpuInfo:
    """This host's CPU as the serving side sees it: ``$VLMSERVE_CPUINFO`` (a cpuinfo file) or ``/proc/cpuinfo``."""
    return cpu_info(Path(os.environ.get(CPUINFO_ENV) or "/proc/cpuinfo"))


def missing_isa(precision: str, cpu: CpuInfo) -> str | None:
    """The ISA ``precision`` needs and ``cpu`` lacks (e.g. ``avx512_bf16 or amx_bf16``); None when it runs here."""
    needs = PRECISION_ISA.get(precision)
    return " or ".join(needs) if needs and not set(needs) & set(cpu.isa) else None


class IsaError(ValueError):
    """No runtime/precision recorded at export runs on this CPU: the model refuses to load."""


@dataclass(frozen=True)
class ServeChoice:
    """What a model serves with on this CPU; ``warnings`` name each fallback from export's choice and why."""

    runtime: str
    precision: str
    decoder_precision: str
    warnings: tuple[str, ...] = ()


def serve_choice(params: Mapping[str, str], cpu: CpuInfo) -> ServeChoice:
    """Re-check export's CPU choice (config parameters ``runtime``/``precision``/``runtime_faithful``/
    ``decoder_precision``) against ``cpu``.

    The encoder runs the first of the faithful candidates export recorded (``runtime_faithful``, fastest first;
    the choice alone in repositories exported before it was recorded) whose ISA this CPU has; a torch decoder in
    bf16 falls back to fp32, the reference it was fenced against. Raises :class:`IsaError` naming the missing
    ISA when no recorded candidate runs here.
    """
    runtime, precision = params.get("runtime") or "onnxruntime", params.get("precision") or "fp32"
    chosen = f"{runtime}/{precision}"
    recorded = [c.strip() for c in (params.get("runtime_faithful") or chosen).split(",") if c.strip()]
    if chosen not in recorded:
        recorded.insert(0, chosen)
    warnings: list[str] = []
    usable = [c for c in recorded if missing_isa(c.partition("/")[2], cpu) is None]
    if not usable:
        raise IsaError(f"{chosen} (export's choice) needs {missing_isa(precision, cpu)}, which this CPU lacks "
                       f"({cpu.summary}), and no faithful candidate recorded at export runs here (recorded: "
                       f"{', '.join(recorded)}): re-export on a host like this one (vlmserve export), or serve "
                       f"from a CPU with that ISA")
    if usable[0] != chosen:
        warnings.append(f"{chosen} (export's choice) needs {missing_isa(precision, cpu)}, which this CPU lacks "
                        f"({cpu.summary}): serving {usable[0]}, the next faithful candidate recorded at export")
        runtime, _, precision = usable[0].partition("/")
    decoder = params.get("decoder_precision") or "fp32"
    if (lacking := missing_isa(decoder, cpu)) is not None:
        warnings.append(f"decoder {decoder} (export's choice) needs {lacking}, which this CPU lacks "
                        f"({cpu.summary}): decoding in fp32, the reference it was fenced against")
        decoder = "fp32"
    return ServeChoice(runtime, precision, decoder, tuple(warnings))
