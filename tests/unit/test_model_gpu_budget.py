"""The model-side half of the GPU memory plan: torch fraction and onnxruntime arena cap (no GPU needed)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from model_repository import runtime


def config(**params: str) -> dict[str, Any]:
    return {"name": "m", "parameters": {k: {"string_value": v} for k, v in params.items()}}


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
    runtime.apply_gpu_budget(CPU_ARGS, config(gpu_memory_fraction="0.25"))
    runtime.apply_gpu_budget(GPU_ARGS, config())  # no parameter: behaviour unchanged
    assert fake_torch == []


def test_apply_gpu_budget_sets_the_fraction_on_the_instance_device(fake_torch: list) -> None:
    runtime.apply_gpu_budget(GPU_ARGS, config(gpu_memory_fraction="0.25"))
    assert fake_torch == [("fraction", 0.25, 1)]
    with pytest.raises(ValueError, match=r"gpu_memory_fraction must be in \(0, 1\]"):
        runtime.apply_gpu_budget(GPU_ARGS, config(gpu_memory_fraction="1.5"))


def test_torch_device_selects_the_instance_gpu(fake_torch: list) -> None:
    assert runtime.torch_device(CPU_ARGS) == "cpu"
    assert runtime.torch_device(GPU_ARGS) == "cuda"
    assert fake_torch == [("device", 1)]


def test_gpu_mem_limit_parameter() -> None:
    assert runtime.gpu_mem_limit(config()) is None
    assert runtime.gpu_mem_limit(config(gpu_mem_limit="4294967296")) == 4 * 2**30
    with pytest.raises(ValueError, match="must be > 0"):
        runtime.gpu_mem_limit(config(gpu_mem_limit="0"))


CUDA_AVAILABLE = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("use_gpu, device, limit, available, expected", [
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
    assert runtime.providers(use_gpu, device, limit, available) == expected


def test_onnx_encoder_on_cpu_ignores_the_gpu_limit(tiny_repo: Path) -> None:
    encoder = runtime.OnnxEncoder(tiny_repo / "siglip_vision/1/model.onnx", use_gpu=False, gpu_mem_limit=2**30)
    assert encoder.providers == ["CPUExecutionProvider"]
    assert encoder.session.get_providers() == ["CPUExecutionProvider"]
