"""Accelerator detection and choice, with fake NVML / nvidia-smi / rocm-smi / sysfs (no GPU on CI)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlmserve.orchestrator import hardware
from vlmserve.orchestrator.hardware import AcceleratorUnavailable, Gpu, Hardware, choose, detect, gpu_memory_by_pid

GIB = 2**30


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


class FakeNvml:
    """The slice of the pynvml module that detection uses."""

    NVMLError = FakeNVMLError

    def __init__(self, gpus: list[tuple[str, int, int]], fail_init: bool = False,
                 processes: dict[int, list[tuple[int, int | None]]] | None = None) -> None:
        self.gpus = gpus
        self.fail_init = fail_init
        self.processes = processes or {}
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.gpus[handle][0].encode()  # old pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        _, total, used = self.gpus[handle]
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle:04d}"

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.processes.get(handle, [])]


def fake_run(outputs: dict[str, str]):
    """A ``run`` that answers by the command's program name and treats the others as missing binaries."""

    def run(cmd: list[str]) -> str:
        if cmd[0] not in outputs:
            raise FileNotFoundError(2, "No such file or directory", cmd[0])
        return outputs[cmd[0]]

    return run


NO_NVML = FakeNvml([], fail_init=True)


def test_nvml_two_gpus(tmp_path: Path) -> None:
    nvml = FakeNvml([("NVIDIA H100 80GB HBM3", 80 * GIB, 1 * GIB), ("NVIDIA H100 80GB HBM3", 80 * GIB, 0)])
    hw = detect(nvml=nvml, run=fake_run({}), sysfs_root=tmp_path, dev_root=tmp_path)
    assert hw.source == "nvml"
    assert hw.gpus == (
        Gpu(0, "nvidia", "NVIDIA H100 80GB HBM3", 80 * GIB, 1 * GIB, "GPU-0000"),
        Gpu(1, "nvidia", "NVIDIA H100 80GB HBM3", 80 * GIB, 0, "GPU-0001"),
    )
    assert hw.vendors == {"nvidia"} and len(hw.nvidia) == 2 and hw.amd == []
    assert nvml.shutdowns == 1
    assert any("kfd" in n for n in hw.notes)


def test_nvml_failure_falls_back_to_nvidia_smi(tmp_path: Path) -> None:
    csv = "0, NVIDIA A10G, 23028, 512, GPU-abc\n1, NVIDIA A10G, 23028, [N/A], GPU-def\n"
    hw = detect(nvml=NO_NVML, run=fake_run({"nvidia-smi": csv}), sysfs_root=tmp_path, dev_root=tmp_path)
    assert hw.source == "nvidia-smi"
    assert hw.gpus[0] == Gpu(0, "nvidia", "NVIDIA A10G", 23028 * 2**20, 512 * 2**20, "GPU-abc")
    assert hw.gpus[1].memory_used_bytes is None
    assert hw.notes[0].startswith("NVML not available: FakeNVMLError: NVML Shared Library Not Found; nvidia-smi: 2")


def test_parse_nvidia_smi_name_with_comma() -> None:
    (gpu,) = hardware.parse_nvidia_smi("3, Tesla V100, PCIe, 16384, 0, GPU-x\n")
    assert (gpu.index, gpu.name, gpu.memory_total_bytes) == (3, "Tesla V100, PCIe", 16 * GIB)


def test_amd_via_rocm_smi(tmp_path: Path) -> None:
    (tmp_path / "kfd").touch()
    out = json.dumps({
        "card0": {"VRAM Total Memory (B)": str(64 * GIB), "VRAM Total Used Memory (B)": "10960896"},
        "card1": {"VRAM Total Memory (B)": str(64 * GIB), "VRAM Total Used Memory (B)": "0"},
        "system": {"Driver version": "6.7"},
    })
    hw = detect(nvml=NO_NVML, run=fake_run({"rocm-smi": out}), sysfs_root=tmp_path, dev_root=tmp_path)
    assert hw.source == "rocm-smi"
    assert [(g.index, g.vendor, g.memory_total_bytes, g.memory_used_bytes) for g in hw.gpus] == [
        (0, "amd", 64 * GIB, 10960896), (1, "amd", 64 * GIB, 0)]
    assert hw.vendors == {"amd"}


def make_card(root: Path, name: str, vendor: str, total: int | None, used: int = 0) -> None:
    device = root / "class" / "drm" / name / "device"
    device.mkdir(parents=True)
    (device / "vendor").write_text(vendor + "\n")
    if total is not None:
        (device / "mem_info_vram_total").write_text(f"{total}\n")
        (device / "mem_info_vram_used").write_text(f"{used}\n")


def test_amd_via_sysfs_when_rocm_smi_missing(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "kfd").touch()
    sysfs = tmp_path / "sys"
    make_card(sysfs, "card0", "0x8086", None)  # an Intel iGPU: skipped
    make_card(sysfs, "card1", "0x1002", 192 * GIB, 5 * GIB)
    make_card(sysfs, "card2", "0x1002", 192 * GIB)
    (sysfs / "class" / "drm" / "card1-DP-1").mkdir()  # a connector, not a card
    hw = detect(nvml=NO_NVML, run=fake_run({}), sysfs_root=sysfs, dev_root=tmp_path / "dev")
    assert hw.source == "sysfs"
    assert [(g.index, g.memory_total_bytes, g.memory_used_bytes) for g in hw.amd] == [
        (0, 192 * GIB, 5 * GIB), (1, 192 * GIB, 0)]
    assert "rocm-smi: not found" in hw.notes[1]


def test_no_accelerator(tmp_path: Path) -> None:
    def failing(cmd: list[str]) -> str:
        raise subprocess.CalledProcessError(9, cmd, stderr="NVIDIA-SMI has failed\n")

    hw = detect(nvml=NO_NVML, run=failing, sysfs_root=tmp_path, dev_root=tmp_path)
    assert hw == Hardware((), "none", hw.notes)
    assert "nvidia-smi: exit status 9 (NVIDIA-SMI has failed)" in hw.notes[0]
    assert hw.vendors == set()


def test_kfd_without_any_enumerable_gpu_is_none(tmp_path: Path) -> None:
    (tmp_path / "kfd").touch()
    hw = detect(nvml=NO_NVML, run=fake_run({"rocm-smi": "not json"}), sysfs_root=tmp_path, dev_root=tmp_path)
    assert hw.source == "none"
    assert "rocm-smi: unreadable output" in hw.notes[1] and "sysfs: no AMD GPU" in hw.notes[1]


def test_gpu_memory_by_pid() -> None:
    nvml = FakeNvml([("a", GIB, 0), ("b", GIB, 0)],
                    processes={0: [(10, 100), (11, None)], 1: [(10, 50), (12, 7)]})
    assert gpu_memory_by_pid(nvml) == {10: 150, 12: 7}
    assert gpu_memory_by_pid(NO_NVML) == {}


NVIDIA = Hardware((Gpu(0, "nvidia", "H100", 80 * GIB, 0),), "nvml")
AMD = Hardware((Gpu(0, "amd", "MI300X", 192 * GIB, 0),), "rocm-smi")
BOTH = Hardware(NVIDIA.gpus + AMD.gpus, "nvml+rocm-smi")
NONE = Hardware((), "none", ("NVML not available: Driver Not Loaded; nvidia-smi: not found",
                             "AMD: /dev/kfd absent (no ROCm kernel driver)"))


@pytest.mark.parametrize(("requested", "hw", "expected"), [
    ("auto", NVIDIA, ("cuda", "gpu", None, "KIND_GPU")),
    ("auto", AMD, ("rocm", "rocm", "embedded", "KIND_CPU")),
    ("auto", NONE, ("cpu", "cpu", "embedded", "KIND_CPU")),
    ("auto", BOTH, ("cuda", "gpu", None, "KIND_GPU")),
    ("cpu", NVIDIA, ("cpu", "cpu", "embedded", "KIND_CPU")),
    ("cuda", NVIDIA, ("cuda", "gpu", None, "KIND_GPU")),
    ("rocm", AMD, ("rocm", "rocm", "embedded", "KIND_CPU")),
    ("rocm", BOTH, ("rocm", "rocm", "embedded", "KIND_CPU")),
])
def test_choose(requested: str, hw: Hardware, expected: tuple) -> None:
    choice = choose(requested, hw)
    assert (choice.accelerator, choice.image, choice.model_config_name, choice.instance_kind) == expected
    assert bool(choice.warnings) == (hw is BOTH and requested == "auto")


def test_choose_absent_accelerator_raises_with_what_was_found() -> None:
    with pytest.raises(AcceleratorUnavailable) as info:
        choose("cuda", NONE)
    assert str(info.value) == (
        "--accelerator cuda requested but no NVIDIA GPU was found (NVML not available: Driver Not Loaded; "
        "nvidia-smi: not found). Use --accelerator cpu, or --fallback to fall back to CPU"
    )
    with pytest.raises(AcceleratorUnavailable, match=r"no AMD GPU was found \(AMD: /dev/kfd absent"):
        choose("rocm", NONE)


def test_choose_fallback_warns() -> None:
    choice = choose("rocm", NONE, fallback=True)
    assert choice.accelerator == "cpu" and choice.model_config_name == "embedded"
    assert len(choice.warnings) == 1 and "falling back to CPU" in choice.warnings[0]


def test_choose_invalid_request() -> None:
    with pytest.raises(ValueError, match="unknown accelerator 'gpu'; valid values: auto, cpu, cuda, rocm"):
        choose("gpu", NONE)
