"""The model-side half of the GPU memory plan: torch fraction and onnxruntime arena cap, and the ROCm placement
(VLMSERVE_ACCELERATOR=rocm with KIND_CPU instances). No GPU and no torch.cuda needed: torch is faked."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vlmserve.families.contract import ModelParams
from vlmserve.model_repository import common


def config(**params: str) -> dict[str, Any]:
    return {"name": "m", "parameters": {k: {"string_value": v} for k, v in {"family": "x", **params}.items()}}


@pytest.fixture(autouse=True)
def no_accelerator_env(monkeypatch: pytest.MonkeyPatch):
    """Every test starts without VLMSERVE_ACCELERATOR and without the cached torch-ROCm answer."""
    monkeypatch.delenv(common.ACCELERATOR_ENV, raising=False)
    common._rocm_gpu_available.cache_clear()
    yield
    common._rocm_gpu_available.cache_clear()


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """A stand-in ``torch`` module recording the calls made to ``torch.cuda``."""
    calls: list[tuple[Any, ...]] = []
    cuda = SimpleNamespace(
        set_per_process_memory_fraction=lambda fraction, device: calls.append(("fraction", fraction, device)),
        set_device=lambda device: calls.append(("device", device)),
    )
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    return calls


GPU_ARGS = {"model_instance_kind": "GPU", "model_instance_device_id": "1"}
CPU_ARGS = {"model_instance_kind": "CPU", "model_instance_device_id": "0"}


def test_apply_gpu_budget_is_a_noop_on_cpu_instances(fake_torch: list) -> None:
    common.apply_gpu_budget(CPU_ARGS, config(gpu_memory_fraction="0.25"))
    common.apply_gpu_budget(GPU_ARGS, config())  # no parameter: behaviour unchanged
    assert fake_torch == []


def test_apply_gpu_budget_sets_the_fraction_on_the_instance_device(fake_torch: list) -> None:
    common.apply_gpu_budget(GPU_ARGS, config(gpu_memory_fraction="0.25"))
    assert fake_torch == [("fraction", 0.25, 1)]
    with pytest.raises(ValueError, match=r"invalid parameters.*gpu_memory_fraction"):
        common.apply_gpu_budget(GPU_ARGS, config(gpu_memory_fraction="1.5"))


def test_torch_device_selects_the_instance_gpu(fake_torch: list) -> None:
    assert common.torch_device(CPU_ARGS) == "cpu"
    assert common.torch_device(GPU_ARGS) == "cuda"
    assert fake_torch == [("device", 1)]


def test_gpu_mem_limit_parameter() -> None:
    assert ModelParams.from_config(config()).gpu_mem_limit is None
    assert ModelParams.from_config(config(gpu_mem_limit="4294967296")).gpu_mem_limit == 4 * 2**30
    with pytest.raises(ValueError, match=r"invalid parameters.*gpu_mem_limit"):
        ModelParams.from_config(config(gpu_mem_limit="0"))


CUDA_AVAILABLE = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(("use_gpu", "device", "limit", "available", "expected"), [
    (False, 0, None, CUDA_AVAILABLE, ["CPUExecutionProvider"]),
    (True, 0, None, ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    (True, 1, None, CUDA_AVAILABLE, [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]),
    (True, 0, 2**30, CUDA_AVAILABLE, [
        ("CUDAExecutionProvider",
         {"device_id": 0, "gpu_mem_limit": 2**30, "arena_extend_strategy": "kSameAsRequested"}),
        "CPUExecutionProvider",
    ]),
])
def test_providers(use_gpu: bool, device: int, limit: int | None, available: list[str], expected: list) -> None:
    assert common.providers(use_gpu, device, limit, available) == expected


def test_onnx_encoder_on_cpu_ignores_the_gpu_limit(tiny_repo: Path) -> None:
    encoder = common.OnnxEncoder(tiny_repo / "siglip_vision/1/model.onnx", use_gpu=False, gpu_mem_limit=2**30)
    assert encoder.providers == ["CPUExecutionProvider"]
    assert encoder.session.get_providers() == ["CPUExecutionProvider"]


# ---------------------------------------------------------------------------------------------- ROCm


def make_torch(monkeypatch: pytest.MonkeyPatch, hip: str | None, available: bool) -> list[tuple[Any, ...]]:
    """A stand-in torch build (``hip``: torch.version.hip, None for CUDA/CPU builds) that records its calls."""
    calls: list[tuple[Any, ...]] = []

    def is_available() -> bool:
        calls.append(("is_available",))
        return available

    cuda = SimpleNamespace(
        is_available=is_available,
        set_per_process_memory_fraction=lambda fraction, device: calls.append(("fraction", fraction, device)),
        set_device=lambda device: calls.append(("device", device)),
    )
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda, version=SimpleNamespace(hip=hip)))
    return calls


def test_rocm_kind_cpu_instance_is_a_gpu_instance_when_torch_rocm_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = make_torch(monkeypatch, hip="6.4.0", available=True)
    assert not common.uses_gpu(CPU_ARGS)  # no VLMSERVE_ACCELERATOR: CPU behaviour unchanged, torch not asked
    assert calls == []
    monkeypatch.setenv(common.ACCELERATOR_ENV, "rocm")
    assert common.uses_gpu(CPU_ARGS)
    assert common.torch_device(CPU_ARGS) == "cuda"  # torch-ROCm's HIP devices answer to "cuda"
    common.apply_gpu_budget(CPU_ARGS, config(gpu_memory_fraction="0.5"))
    # Device 0 of HIP_VISIBLE_DEVICES (Triton's device id for KIND_CPU instances); torch asked only once.
    assert calls == [("is_available",), ("device", 0), ("fraction", 0.5, 0)]


def test_rocm_uses_the_instance_device_id_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = make_torch(monkeypatch, hip="6.4.0", available=True)
    monkeypatch.setenv(common.ACCELERATOR_ENV, "ROCm")
    assert common.torch_device({"model_instance_kind": "CPU", "model_instance_device_id": "1"}) == "cuda"
    assert calls[-1] == ("device", 1)


@pytest.mark.parametrize(("hip", "available"), [
    ("6.4.0", False),  # torch-ROCm without a visible GPU (no /dev/kfd, HIP_VISIBLE_DEVICES empty)
    (None, True),  # a CUDA build of torch: VLMSERVE_ACCELERATOR=rocm does not turn NVIDIA GPUs on behind Triton
])
def test_rocm_without_a_usable_amd_gpu_stays_on_cpu(monkeypatch: pytest.MonkeyPatch, hip: str | None,
                                                     available: bool) -> None:
    calls = make_torch(monkeypatch, hip=hip, available=available)
    monkeypatch.setenv(common.ACCELERATOR_ENV, "rocm")
    assert not common.uses_gpu(CPU_ARGS)
    assert common.torch_device(CPU_ARGS) == "cpu"
    assert ("device", 0) not in calls


def test_rocm_without_torch_stays_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.setenv(common.ACCELERATOR_ENV, "rocm")
    assert not common.uses_gpu(CPU_ARGS)


def test_kind_gpu_is_a_gpu_instance_whatever_the_accelerator(fake_torch: list,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(common.ACCELERATOR_ENV, "cuda")
    assert common.uses_gpu(GPU_ARGS)
    assert not common.uses_gpu(CPU_ARGS)
    assert fake_torch == []  # no torch import needed to decide


ROCM_ALL = ["MIGraphXExecutionProvider", "ROCMExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(("use_gpu", "limit", "available", "expected"), [
    (True, None, ROCM_ALL, [("MIGraphXExecutionProvider", {"device_id": 0}),
                            ("ROCMExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]),
    (True, 2**30, ROCM_ALL, [
        ("MIGraphXExecutionProvider", {"device_id": 0}),
        ("ROCMExecutionProvider",
         {"device_id": 0, "gpu_mem_limit": 2**30, "arena_extend_strategy": "kSameAsRequested"}),
        "CPUExecutionProvider",
    ]),
    (True, None, ["ROCMExecutionProvider", "CPUExecutionProvider"],
     [("ROCMExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]),
    (True, None, ["MIGraphXExecutionProvider", "CPUExecutionProvider"],
     [("MIGraphXExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]),
    (True, None, ["CPUExecutionProvider"], ["CPUExecutionProvider"]),  # plain onnxruntime wheel
    (True, None, CUDA_AVAILABLE, ["CPUExecutionProvider"]),  # ROCm never picks CUDA
    (False, None, ROCM_ALL, ["CPUExecutionProvider"]),
])
def test_providers_on_rocm(monkeypatch: pytest.MonkeyPatch, use_gpu: bool, limit: int | None, available: list[str],
                           expected: list) -> None:
    monkeypatch.setenv(common.ACCELERATOR_ENV, "rocm")
    assert common.providers(use_gpu, 0, limit, available) == expected


def test_providers_without_rocm_ignore_amd_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert common.providers(True, 0, None, ROCM_ALL) == ["CPUExecutionProvider"]
    monkeypatch.setenv(common.ACCELERATOR_ENV, "cuda")
    assert common.providers(True, 0, None, ROCM_ALL + ["CUDAExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
