"""What this host's CPU can do: model name and the ISA extensions that decide which kernels are fast.

Hosts differ from one machine to the next (an AVX2-only EPYC, an AVX-512 + BF16 EPYC, a Xeon with AMX), and
the fastest precision/runtime differs with them: export times the candidates on the host it runs on, and the
benchmark names the host in every report. Linux only (``/proc/cpuinfo``); elsewhere the flags are empty.
"""

from __future__ import annotations

import hashlib
import platform
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
