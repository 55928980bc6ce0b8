"""The GPU memory plan: parsing, flags, validation against device sizes, rendered configs (golden files)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from vlmserve.orchestrator.hardware import Gpu, Hardware
from vlmserve.orchestrator.memory import (
    ENFORCEMENT,
    Amount,
    MemoryPlan,
    PlanError,
    ServiceBudget,
    enforcement_table,
    load_plan,
    parse_amount,
    parse_budget_flag,
    parse_size,
    render,
    validate,
)

GIB = 2**30
GOLDEN = Path(__file__).parent / "golden" / "plan"
EXAMPLE = Path(__file__).parents[2] / "docker" / "gpu-plan.example.yaml"
NO_GPU = Hardware((), "none")


def gpus(*sizes_gib: int) -> Hardware:
    return Hardware(tuple(Gpu(i, "nvidia", "H100", s * GIB, 0) for i, s in enumerate(sizes_gib)), "nvml")


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(("text", "expected"), [
    ("6GiB", 6 * GIB), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("80 GiB", 80 * GIB), ("2kb", 2000),
    (1024, 1024),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "match"), [
    ("6GX", r"unknown unit 'GX' in '6GX'; valid units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"),
    ("lots", "not a size"),
    ("0GiB", "must be > 0"),
])
def test_parse_size_errors(text: str, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        parse_size(text)


@pytest.mark.parametrize(("value", "expected"), [
    (0.25, Amount(fraction=0.25)), ("0.25", Amount(fraction=0.25)), (1, Amount(fraction=1.0)),
    ("2GiB", Amount(bytes=2 * GIB)),
])
def test_parse_amount(value: str | float, expected: Amount) -> None:
    assert parse_amount(value) == expected


@pytest.mark.parametrize(("value", "match"), [
    (0, "must be > 0"), (-0.1, "must be > 0"), (1.5, "more than the whole device"), ("half", "not a fraction or size"),
])
def test_parse_amount_errors(value: str | float, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        parse_amount(value)


def test_budget_flags() -> None:
    assert parse_budget_flag("florence2=0.25") == {"name": "florence2", "budget": "0.25"}
    assert parse_budget_flag("vllm=0.55:external") == {"name": "vllm", "budget": "0.55", "external": True}
    assert parse_budget_flag("siglip_vision=2GiB@1") == {
        "name": "siglip_vision", "budget": "2GiB", "device": 1, "devices": None}
    assert parse_budget_flag("chat=0.3@0,1") == {"name": "chat", "budget": "0.3", "devices": [0, 1]}
    for bad, match in [("florence2", "expected NAME=BUDGET"), ("x=0.2:internal", "unknown flag :internal"),
                       ("x=3", "more than the whole device"), ("x=0.2@a", "expected NAME=BUDGET")]:
        with pytest.raises(PlanError, match=match):
            parse_budget_flag(bad)


def test_example_plan_file_validates_on_an_80gib_device() -> None:
    plan = load_plan(EXAMPLE)
    assert [(s.name, s.budget, s.external) for s in plan.services] == [
        ("vllm", 0.55, True), ("florence2", 0.25, False)]
    resolved = validate(plan, gpus(80))
    assert [(b.service, b.device, b.fraction, b.bytes) for b in resolved.budgets] == [
        ("vllm", 0, 0.55, int(0.55 * 80 * GIB)), ("florence2", 0, 0.25, 20 * GIB)]
    assert resolved.reserve == {0: 0.05}
    assert resolved.total(0) == pytest.approx(0.80) and resolved.total(0, own_only=True) == 0.25


def test_flags_override_and_add_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"reserve": "2GiB", "devices": {"0": "80GiB", "1": "80GiB"},
                                "services": [{"name": "florence2", "budget": 0.25, "devices": [0, 1]}]}))
    plan = load_plan(path, ["florence2=0.3", "siglip_vision=2GiB@1", "vllm=0.5:external"], reserve="0.1")
    by_name = {s.name: s for s in plan.services}
    assert by_name["florence2"] == ServiceBudget(name="florence2", budget="0.3", devices=[0, 1])
    assert by_name["siglip_vision"].device_list == [1]
    assert by_name["vllm"].external
    assert plan.reserve == "0.1" and plan.device_sizes() == {0: 80 * GIB, 1: 80 * GIB}


def test_plan_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  - name: a\n    budget: 0.2\n  - name: a\n    budget: 0.1\n")
    with pytest.raises(PlanError, match="duplicate service"):
        load_plan(bad)
    bad.write_text("services:\n  - name: a\n    budget: 0\n")
    with pytest.raises(PlanError, match=r"services\.0\.budget: budget must be > 0"):
        load_plan(bad)
    bad.write_text("services: [unclosed\n")
    with pytest.raises(PlanError, match="not valid YAML"):
        load_plan(bad)
    bad.write_text("services:\n  - name: a\n    budget: 3TX\n")
    with pytest.raises(PlanError, match="unknown unit 'TX'"):
        load_plan(bad)
    with pytest.raises(PlanError, match="given twice"):
        load_plan(None, ["a=0.1", "a=0.2"])
    with pytest.raises(PlanError, match="cannot read plan"):
        load_plan(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------------- validation


def test_overcommit_lists_the_breakdown() -> None:
    plan = load_plan(EXAMPLE, ["siglip=0.20"])
    with pytest.raises(PlanError) as info:
        validate(plan, gpus(80))
    assert "device 0: vllm 0.55 + florence2 0.25 + siglip 0.20 = 1.00 > 0.95 (1 - reserve 0.05)" in str(info.value)


def test_absolute_budgets_and_reserve_resolve_against_the_device() -> None:
    plan = load_plan(None, ["a=20GiB", "b=0.5"], reserve="4GiB")
    resolved = validate(plan, gpus(80))
    assert [(b.fraction, b.bytes) for b in resolved.budgets] == [(0.25, 20 * GIB), (0.5, 40 * GIB)]
    assert resolved.reserve == {0: 0.05}
    with pytest.raises(PlanError, match=r"device 0: a 0.50 \+ b 0.50 = 1.00 > 0.90 \(1 - reserve 0.10\)"):
        validate(plan, gpus(40))


def test_unknown_device() -> None:
    with pytest.raises(PlanError, match=r"service 'a': device 2 does not exist \(devices: 0, 1\)"):
        validate(load_plan(None, ["a=0.2@2"]), gpus(80, 80))


def test_absolute_budget_needs_a_device_size() -> None:
    plan = load_plan(None, ["a=6GiB"])
    with pytest.raises(PlanError, match="absolute budget 6GiB needs the size of device 0"):
        validate(plan, NO_GPU)
    # Sizes given in the plan stand in for a missing GPU.
    resolved = validate(MemoryPlan(devices={0: "24GiB"}, services=plan.services), NO_GPU)
    assert resolved.budgets[0].fraction == 0.25


def test_fractions_validate_without_gpu() -> None:
    resolved = validate(load_plan(EXAMPLE), NO_GPU)
    assert [b.bytes for b in resolved.budgets] == [None, None]
    assert [r.cells() for r in resolved.rows()] == [
        ["vllm", "0", "0.55", "?", "yes", "the service itself (cooperative)"],
        ["florence2", "0", "0.25", "?", "no", "not rendered"],
    ]


# ---------------------------------------------------------------------------------------------- rendering

ORT_NATIVE = """
name: "siglip_vision"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [ { name: "pixel_values" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] } ]
output [ { name: "image_embeds" data_type: TYPE_FP32 dims: [ 32 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
optimization { execution_accelerators { gpu_execution_accelerator [
  { name: "tensorrt" parameters { key: "precision_mode" value: "FP16" }
                     parameters { key: "max_workspace_size_bytes" value: "4294967296" } },
  { name: "cuda" } ] } }
parameters { key: "gpu_mem_limit" value { string_value: "2147483648" } }
parameters { key: "family" value { string_value: "siglip" } }
"""
ORT_EMBEDDED = """
name: "siglip_vision"
backend: "python"
max_batch_size: 32
input [ { name: "pixel_values" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] } ]
output [ { name: "image_embeds" data_type: TYPE_FP32 dims: [ 32 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters { key: "onnx_file" value { string_value: "model.onnx" } }
"""
PYTHON = """
name: "florence2"
backend: "python"
max_batch_size: 8
input [ { name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "RESULT" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "runner" value { string_value: "onnxruntime" } }
"""
UNBUDGETED = """
name: "qwen2vl"
backend: "python"
max_batch_size: 0
input [ { name: "MESSAGES" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repository"
    for model, native, embedded in [("siglip_vision", ORT_NATIVE, ORT_EMBEDDED), ("florence2", PYTHON, None),
                                    ("qwen2vl", UNBUDGETED, None)]:
        (repo / model / "1").mkdir(parents=True)
        (repo / model / "config.pbtxt").write_text(native)
        if embedded:
            (repo / model / "configs").mkdir()
            (repo / model / "configs" / "embedded.pbtxt").write_text(embedded)
    (repo / ".vlmserve-export-tiny.json").write_text("{}")  # not a model
    return repo


PLAN = ["vllm=0.55:external", "florence2=0.25", "siglip_vision=8GiB@0,1"]


def check_golden(path: Path, golden_name: str) -> None:
    text = path.read_text()
    # What we write must load as Triton's own ModelConfig schema.
    text_format.Parse(text, model_config_pb2.ModelConfig())
    golden = GOLDEN / golden_name
    if os.environ.get("VLMSERVE_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text(), f"{path} differs from {golden} (VLMSERVE_UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize(("flavour", "base"), [("native", None), ("embedded", "embedded")])
def test_render_matches_golden(repo: Path, flavour: str, base: str | None) -> None:
    resolved = validate(load_plan(None, PLAN), gpus(80, 80))
    rendered = render(resolved, repo, base)
    assert rendered.config_name == "vlmserve-plan"
    assert sorted(p.relative_to(repo).as_posix() for p in rendered.files) == [
        f"{m}/configs/vlmserve-plan.pbtxt" for m in ("florence2", "qwen2vl", "siglip_vision")]
    for model in ("florence2", "qwen2vl", "siglip_vision"):
        check_golden(repo / model / "configs" / "vlmserve-plan.pbtxt", f"{flavour}__{model}.pbtxt")

    # Triton gates loads on the device's whole used memory, so the limit includes the external vLLM.
    assert rendered.triton_args == ["--model-load-gpu-limit=0:0.900", "--model-load-gpu-limit=1:0.100"]
    assert rendered.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert rendered.external_hints == {"vllm": "--gpu-memory-utilization 0.55"}
    rows = {(r.service, r.device): r.cells() for r in rendered.rows()}
    assert rows[("siglip_vision", 1)] == [
        "siglip_vision", "1", "0.10", "8.0 GiB", "no",
        "onnxruntime gpu_mem_limit 4.0 GiB / 2 instances" if flavour == "native"
        else "torch memory fraction 0.05 / 2 instances + onnxruntime gpu_mem_limit 4.0 GiB"]
    assert rows[("vllm", 0)][-1] == "vllm itself (cooperative): --gpu-memory-utilization 0.55"


def test_render_native_knobs(repo: Path) -> None:
    render(validate(load_plan(None, PLAN), gpus(80, 80)), repo, None)
    config = text_format.Parse((repo / "siglip_vision/configs/vlmserve-plan.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    # 8 GiB per device shared by 2 instances; TensorRT's workspace capped at half an instance's share.
    assert config.parameters["gpu_mem_limit"].string_value == str(4 * GIB)
    trt = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.parameters["max_workspace_size_bytes"] == str(2 * GIB)
    assert [(g.kind, list(g.gpus)) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, [0, 1])]
    # The sources are left alone.
    assert (repo / "siglip_vision/config.pbtxt").read_text() == ORT_NATIVE


def test_render_mps_and_physical_devices(repo: Path) -> None:
    plan = MemoryPlan(mps=True, services=[ServiceBudget(name="florence2", budget="12GiB", device=1),
                                          ServiceBudget(name="siglip_vision", budget=0.05, device=1)])
    rendered = render(validate(plan, gpus(80, 80)), repo, "embedded")
    # Device 1 alone is not 0..n-1: CUDA_VISIBLE_DEVICES would renumber it to 0, so it stays unset.
    assert rendered.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "1=16G"}
    assert any("CUDA_VISIBLE_DEVICES left unset" in n for n in rendered.notes)
    assert rendered.triton_args == ["--model-load-gpu-limit=1:0.200"]


def test_render_rocm_keeps_cpu_instances(repo: Path) -> None:
    rendered = render(validate(load_plan(None, ["florence2=0.25"]), gpus(80)), repo, "embedded",
                      instance_kind="KIND_CPU")
    config = text_format.Parse((repo / "florence2/configs/vlmserve-plan.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.parameters["gpu_memory_fraction"].string_value == "0.25"
    assert rendered.files


def test_render_unknown_model(repo: Path) -> None:
    with pytest.raises(PlanError, match="budget for florence3: not a model of .* models: florence2, qwen2vl, "
                                        "siglip_vision"):
        render(validate(load_plan(None, ["florence3=0.2"]), gpus(80)), repo, None)


def test_enforcement_table_separates_enforcing_from_cooperative_knobs() -> None:
    assert {k for k, v in ENFORCEMENT.items() if not v.enforces} == {
        "model_load_gpu_limit", "vllm", "cuda_visible_devices"}
    assert {k for k, v in ENFORCEMENT.items() if v.level == "hard"} == {"mig", "mps"}  # docs/platform.md, "Exports"
    assert enforcement_table().count("\n") == len(ENFORCEMENT) + 1
