"""Export stage: parity against PyTorch, the up-to-date no-op, golden config.pbtxt files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from tests.conftest import tiny_export_options
from tests.unit.test_tensors import assert_client_tensors
from vlmserve.export import onnx_utils, pbtxt
from vlmserve.export.progress import Progress
from vlmserve.export.repository import EMBEDDED_CONFIG, read_stamp
from vlmserve.export.run import export_model_set

GOLDEN = Path(__file__).parent / "golden"
# Timed on the exporting host, or (the chat engine) depending on whether llama.cpp's bindings are installed there.
HOST_DEPENDENT = ("runtime", "precision", "runtime_choice", "runtime_faithful", "decoder_precision", "decoder_choice",
                  "chat_engine", "engine_choice", "decoder_gguf", "max_batch")
CONFIG_FILES = [
    f"{m}/{c}"
    for m in ("siglip_vision", "siglip_text", "siglip_embed_image", "siglip_embed_text", "siglip2_vision",
              "siglip2_text", "siglip2_embed_image", "siglip2_embed_text", "florence2_vision", "florence2",
              "smolvlm2_vision", "smolvlm2", "qwen2vl")
    for c in ("config.pbtxt", f"configs/{EMBEDDED_CONFIG}.pbtxt")
]


def test_parity_within_tolerance_at_another_batch_size(tiny_repo: Path) -> None:
    stamp = read_stamp(tiny_repo, "siglip")
    assert stamp is not None
    for model in ("siglip_vision", "siglip_text"):
        diff = stamp["parity_max_abs_diff"][model]
        assert 0.0 <= diff <= onnx_utils.PARITY_ATOL, (model, diff)


@pytest.mark.parametrize(("family", "model"), [("florence2", "florence2_vision"), ("smolvlm2", "smolvlm2_vision")])
def test_vision_encoder_parity(tiny_repo: Path, family: str, model: str) -> None:
    stamp = read_stamp(tiny_repo, family)
    assert stamp is not None
    assert 0.0 <= stamp["parity_max_abs_diff"][model] <= onnx_utils.PARITY_ATOL


def test_onnx_has_dynamic_batch(tiny_repo: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_repo / "siglip_vision/1/model.onnx"), providers=["CPUExecutionProvider"])
    size = read_stamp(tiny_repo, "siglip")["image_size"]
    for batch in (1, 5):
        out = session.run(None, {"pixel_values": np.zeros((batch, 3, size, size), np.float32)})[0]
        assert out.shape[0] == batch


def test_parity_failure_is_loud_and_reports_the_difference(tiny_repo: Path) -> None:
    import torch
    from transformers import SiglipModel

    from vlmserve.export.siglip import _towers

    model = SiglipModel.from_pretrained(Path(os.environ["VLMSERVE_HOME"]) / "tiny-models" / "siglip").eval()
    vision, _ = _towers(model)
    with torch.no_grad():
        model.vision_model.head.mlp.fc2.bias += 0.5  # now PyTorch and the exported ONNX disagree
    size = model.config.vision_config.image_size
    with pytest.raises(onnx_utils.ParityError, match=r"max abs difference .* exceeds tolerance") as info:
        onnx_utils.validate("siglip_vision", vision, tiny_repo / "siglip_vision/1/model.onnx",
                            {"pixel_values": np.ones((3, 3, size, size), np.float32)})
    assert info.value.max_diff > onnx_utils.PARITY_ATOL


def test_reexport_is_a_noop(tiny_repo: Path) -> None:
    onnx = tiny_repo / "siglip_vision/1/model.onnx"
    before = onnx.stat().st_mtime_ns
    reports = export_model_set("tiny", repo=tiny_repo, options=tiny_export_options(), progress=Progress(quiet=True))
    assert all(r["skipped"] is True for r in reports.values()), reports.keys()
    assert onnx.stat().st_mtime_ns == before


@pytest.mark.parametrize("rel", CONFIG_FILES)
def test_rendered_configs_match_golden_and_parse(tiny_repo: Path, rel: str) -> None:
    text = (tiny_repo / rel).read_text()
    # Every config must be valid for Triton's own ModelConfig schema.
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    expected = {"florence2": 8, "florence2_vision": 8, "smolvlm2": 0, "qwen2vl": 0}.get(rel.split("/")[0], 32)
    assert config.max_batch_size == expected
    # The runtime choice is timed on the host that exports (export/runtime_choice.py): mask its values.
    keys = "|".join(HOST_DEPENDENT)
    text = re.sub(rf'(key: "(?:{keys})"\s*value \{{\s*string_value: )"[^"]*"', r'\1"<host-dependent>"', text)
    golden = GOLDEN / rel.replace("/", "__")
    if os.environ.get("VLMSERVE_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"{rel} differs from {golden} (VLMSERVE_UPDATE_GOLDEN=1 to accept)"


def test_native_config_keeps_memory_limit_top_level(tiny_repo: Path) -> None:
    config = text_format.Parse((tiny_repo / "siglip_vision/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.platform == "onnxruntime_onnx"
    assert "gpu_mem_limit" in config.parameters
    names = [a.name for a in config.optimization.execution_accelerators.gpu_execution_accelerator]
    assert names == ["tensorrt", "cuda"]
    assert all("gpu_mem_limit" not in a.parameters
               for a in config.optimization.execution_accelerators.gpu_execution_accelerator)


def test_pbtxt_renderer_goes_through_triton_model_config() -> None:
    text = pbtxt.render({"name": "m", "max_batch_size": 4, "input": [
        {"name": "a", "data_type": pbtxt.Enum("TYPE_FP32"), "dims": [3, -1], "optional": True}],
        "instance_group": [{"count": 1, "kind": pbtxt.Enum("KIND_CPU")}],
        "parameters": pbtxt.parameters({"z": 1, "a": "x"}), "backend": None})
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert (config.name, config.max_batch_size, list(config.input[0].dims)) == ("m", 4, [3, -1])
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32 and config.input[0].optional
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert {k: v.string_value for k, v in config.parameters.items()} == {"z": "1", "a": "x"}
    assert text.index('key: "a"') < text.index('key: "z"')  # map entries sorted: stable goldens
    # A misspelt field or an unknown enum fails at export, not when Triton loads the model.
    with pytest.raises(json_format.ParseError):
        pbtxt.render({"name": "m", "max_batch": 4})
    with pytest.raises(json_format.ParseError):
        pbtxt.render({"name": "m", "input": [{"name": "a", "data_type": pbtxt.Enum("TYPE_FLOAT")}]})


def test_unknown_model_set_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown model set"):
        export_model_set("huge")


def test_int8_variant_keeps_fidelity_and_is_served_beside_fp32(state_dir: Path, tmp_path: Path) -> None:
    from vlmserve.export.repository import ExportOptions

    repo = tmp_path / "repo"
    reports = export_model_set("tiny", repo=repo, options=ExportOptions(int8=True), families=["siglip"],
                               progress=Progress(quiet=True))
    cosine = reports["siglip"]["int8_min_cosine"]
    assert min(cosine.values()) >= onnx_utils.INT8_MIN_COSINE
    fp32 = (repo / "siglip_vision/1/model.onnx").stat().st_size
    int8 = (repo / "siglip_vision_int8/1/model.onnx").stat().st_size
    assert int8 < fp32
    client = text_format.Parse((repo / "siglip_embed_image_int8/configs/embedded.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert client.parameters["encoder_model"].string_value == "siglip_vision_int8"
    assert client.parameters["source_model"].string_value == "vlmserve/tiny-siglip:int8"
    # The int8 clients declare the same tensors as every client of their kind (vlmserve/families/tensors.py).
    assert assert_client_tensors(repo) == dict.fromkeys(
        ["siglip_embed_image", "siglip_embed_text", "siglip_embed_image_int8", "siglip_embed_text_int8"], 2)


def test_int8_fidelity_floor_is_enforced(tiny_repo: Path, tmp_path: Path) -> None:
    size = read_stamp(tiny_repo, "siglip")["image_size"]
    with pytest.raises(onnx_utils.FidelityError, match="min cosine"):
        onnx_utils.quantize_int8(tiny_repo / "siglip_vision/1/model.onnx", tmp_path / "m" / "1" / "model.onnx",
                                 {"pixel_values": np.ones((2, 3, size, size), np.float32)}, min_cosine=1.01)


def test_int8_weights_fit_7_bits_so_no_cpu_saturates(tiny_repo: Path, tmp_path: Path) -> None:
    """Full-range int8 weights saturate ONNX Runtime's u8 x s8 kernels on non-VNNI x86 (vpmaddubsw): the int8
    model is then only right on some CPUs. Checked on the graph, so it fails on every machine, VNNI or not."""
    import onnx
    from onnx import numpy_helper

    size = read_stamp(tiny_repo, "siglip")["image_size"]
    dst = tmp_path / "m" / "1" / "model.onnx"
    onnx_utils.quantize_int8(tiny_repo / "siglip_vision/1/model.onnx", dst,
                             {"pixel_values": np.ones((2, 3, size, size), np.float32)}, min_cosine=-1.0)
    graph = onnx.load(str(dst)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    quantized = [n.input[1] for n in graph.node if n.op_type in ("MatMulInteger", "ConvInteger")]
    assert quantized and all(w in weights for w in quantized)
    for w in quantized:
        assert weights[w].dtype == np.int8 and int(np.abs(weights[w].astype(np.int16)).max()) <= 64, w
