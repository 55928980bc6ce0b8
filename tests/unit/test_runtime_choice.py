"""Per-host runtime/precision choice at export: host detection, candidates, fidelity floor, the written choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from vlmserve.export import runtime_choice
from vlmserve.export.onnx_utils import FidelityError
from vlmserve.host import cpu_info, parse_cpuinfo
from vlmserve.model_repository import common

AMX_XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu sse avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu sse avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8
"""
AVX2_EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse avx2 fma\n"


def test_cpuinfo_parsing_names_the_isa() -> None:
    xeon, epyc = parse_cpuinfo(AMX_XEON), parse_cpuinfo(AVX2_EPYC)
    assert xeon.model.startswith("Intel") and xeon.cores == 2
    assert {"amx_bf16", "amx_int8", "avx512_bf16"} <= set(xeon.isa) and xeon.has_bf16 and xeon.has_vnni
    assert epyc.isa == ("avx2", "fma") and not epyc.has_bf16 and not epyc.has_vnni
    assert xeon.fingerprint() != epyc.fingerprint()
    assert "amx_bf16" in xeon.summary


def test_candidates_follow_the_host_and_the_overrides() -> None:
    bf16, plain = parse_cpuinfo(AMX_XEON), parse_cpuinfo(AVX2_EPYC)
    assert ("openvino", "bf16") in runtime_choice.candidates(bf16)
    # No native bf16: OpenVINO would emulate it, slower than fp32; not a candidate unless asked for.
    assert ("openvino", "bf16") not in runtime_choice.candidates(plain)
    assert runtime_choice.candidates(plain, precision="bf16") == [("openvino", "bf16")]
    assert runtime_choice.candidates(bf16, runtime="onnxruntime") == [("onnxruntime", "fp32")]
    with pytest.raises(ValueError, match="no runtime serves"):
        runtime_choice.candidates(bf16, runtime="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="--int8"):
        runtime_choice.candidates(bf16, precision="int8")


def _tower_inputs(tiny_repo: Path) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    path = tiny_repo / "siglip_vision" / "1" / "model.onnx"
    encoder = common.OnnxEncoder(path)
    pixels = np.random.default_rng(0).standard_normal((4, *encoder.session.get_inputs()[0].shape[1:]))
    inputs = {"pixel_values": pixels.astype(np.float32)}
    return path, inputs, encoder(inputs)["image_embeds"]


def test_choice_is_the_fastest_faithful_candidate(tiny_repo: Path) -> None:
    path, inputs, reference = _tower_inputs(tiny_repo)
    report = runtime_choice.choose(path, inputs, reference, cpu=parse_cpuinfo(AMX_XEON), rounds=2)
    trials = {(c["runtime"], c["precision"]): c for c in report["candidates"]}
    assert set(trials) == {("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")}
    assert all(c["error"] is None and c["items_per_s"] > 0 for c in trials.values())
    chosen = trials[(report["runtime"], report["precision"])]
    assert chosen["min_cosine"] >= runtime_choice.FIDELITY_FLOOR
    default = trials[("onnxruntime", "fp32")]
    if (report["runtime"], report["precision"]) != ("onnxruntime", "fp32"):
        # Another runtime only wins by the margin, so timing noise cannot flip the choice.
        assert chosen["items_per_s"] >= runtime_choice.MARGIN * default["items_per_s"]
    assert default["min_cosine"] > 0.99999  # fp32 onnxruntime is the reference's own numerics


def test_a_precision_below_the_floor_is_refused(tiny_repo: Path) -> None:
    path, inputs, reference = _tower_inputs(tiny_repo)
    with pytest.raises(FidelityError, match="no candidate holds"):
        # A reference the outputs cannot match (sign flipped): every candidate fails the floor.
        runtime_choice.choose(path, inputs, -reference, runtime="onnxruntime", cpu=parse_cpuinfo(AVX2_EPYC),
                              rounds=1)


def test_openvino_encoder_matches_onnxruntime(tiny_repo: Path) -> None:
    path, inputs, reference = _tower_inputs(tiny_repo)
    fp32 = common.open_encoder(path, "openvino", "fp32")(inputs)["image_embeds"]
    bf16 = common.open_encoder(path, "openvino", "bf16")(inputs)["image_embeds"]
    assert np.max(np.abs(fp32 - reference)) < 1e-4
    assert runtime_choice.cosine_min(reference, bf16) > 0.99
    with pytest.raises(ValueError, match="unknown runtime/precision"):
        common.open_encoder(path, "openvino", "int8")


@pytest.mark.parametrize("model", ["siglip_vision", "siglip_text", "florence2_vision", "smolvlm2_vision"])
def test_openvino_keeps_the_graph_names(tiny_repo: Path, model: str) -> None:
    """OpenVINO may merge an input with an internal tensor's name; the models look tensors up by the graph's."""
    path = tiny_repo / model / "1" / "model.onnx"
    onnx_encoder, ov_encoder = common.OnnxEncoder(path), common.open_encoder(path, "openvino", "fp32")
    assert ov_encoder.input_names == onnx_encoder.input_names
    assert ov_encoder.output_names == onnx_encoder.output_names
    rng = np.random.default_rng(0)
    inputs = {}
    for spec in onnx_encoder.session.get_inputs():
        shape = [2 if not isinstance(d, int) else d for d in spec.shape]
        if "int64" in spec.type:
            inputs[spec.name] = rng.integers(0, 16, shape).astype(np.int64)
        elif "bool" in spec.type:
            inputs[spec.name] = np.ones(shape, dtype=bool)
        else:
            inputs[spec.name] = rng.standard_normal(shape).astype(np.float32)
    expected, got = onnx_encoder(inputs), ov_encoder(inputs)
    for name in onnx_encoder.output_names:
        assert np.max(np.abs(expected[name] - got[name])) < 1e-3 * max(1.0, float(np.abs(expected[name]).max()))


def test_export_writes_the_choice_next_to_the_model(tiny_repo: Path) -> None:
    for encoder, client in (("siglip_vision", "siglip_embed_image"), ("siglip_text", "siglip_embed_text")):
        report = json.loads((tiny_repo / encoder / runtime_choice.REPORT_FILE).read_text())
        assert report["host"]["isa"] == list(cpu_info().isa)  # chosen on this host, and says so
        assert report["selection_version"] == runtime_choice.SELECTION_VERSION
        for model in (encoder, client):
            text = (tiny_repo / model / "configs" / "embedded.pbtxt").read_text()
            params = text_format.Parse(text, model_config_pb2.ModelConfig()).parameters
            assert params["runtime"].string_value == report["runtime"]
            assert params["precision"].string_value == report["precision"]
            assert params["runtime_choice"].string_value.startswith(f"{report['runtime']}/{report['precision']}")


def test_smolvlm2_vision_is_chosen_by_the_language_model_fence(tiny_repo: Path) -> None:
    """SmolVLM2's tower is gated on the LM's teacher-forced logits; its own cosine is kept as a reported figure."""
    report = json.loads((tiny_repo / "smolvlm2_vision" / runtime_choice.REPORT_FILE).read_text())
    assert report["gate"] == "lm" and "photo prompts" in report["lm_fence"]
    assert report["lm_min_cosine"] >= runtime_choice.FIDELITY_FLOOR
    assert report["lm_argmax_agreement"] >= runtime_choice.ARGMAX_FLOOR and report["lm_positions"] > 0
    assert report["min_cosine"] is not None  # the tower's cosine, reported
    for c in report["candidates"]:
        assert c["gate"] == "lm" and (c["error"] is not None or c["lm_argmax_agreement"] is not None)
    text = (tiny_repo / "smolvlm2_vision" / "configs" / "embedded.pbtxt").read_text()
    line = text_format.Parse(text, model_config_pb2.ModelConfig()).parameters["runtime_choice"].string_value
    assert "LM logits cosine" in line and "tower cosine" in line
    # SigLIP's embeddings are what the user gets: its towers keep the tower-level gate.
    assert json.loads((tiny_repo / "siglip_vision" / runtime_choice.REPORT_FILE).read_text())["gate"] == "tower"


def _decoder_fakes(bf16_error: float, bf16_seconds: float):
    """generate/logits stand-ins: bf16 perturbs the logits by ``bf16_error`` and takes ``bf16_seconds``."""
    import time

    import torch

    base = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(1))

    def generate(bf16: bool):
        time.sleep(bf16_seconds if bf16 else 0.05)
        return torch.arange(10).reshape(2, 5)

    def logits(bf16: bool, ids):
        return base + bf16_error * noise if bf16 else base

    return generate, logits


def test_decoder_bf16_is_chosen_only_when_faithful_and_faster() -> None:
    bf16_host, plain = parse_cpuinfo(AMX_XEON), parse_cpuinfo(AVX2_EPYC)
    report = runtime_choice.choose_decoder(*_decoder_fakes(1e-3, 0.0), cpu=bf16_host)
    assert report["precision"] == "bf16"
    bf16 = next(c for c in report["candidates"] if c["precision"] == "bf16")
    assert bf16["min_cosine"] >= runtime_choice.FIDELITY_FLOOR and bf16["argmax_agreement"] >= 0.99
    # Logits pushed far off: unfaithful, fp32 stays although bf16 is faster.
    assert runtime_choice.choose_decoder(*_decoder_fakes(2.0, 0.0), cpu=bf16_host)["precision"] == "fp32"
    # Faithful but not faster by the margin: fp32 stays.
    assert runtime_choice.choose_decoder(*_decoder_fakes(1e-3, 0.1), cpu=bf16_host)["precision"] == "fp32"
    # No native bf16: not even timed.
    report = runtime_choice.choose_decoder(*_decoder_fakes(1e-3, 0.0), cpu=plain)
    assert [c["precision"] for c in report["candidates"]] == ["fp32"]
    with pytest.raises(FidelityError):
        runtime_choice.choose_decoder(*_decoder_fakes(2.0, 0.0), precision="bf16", cpu=bf16_host)


def test_status_lists_the_choices(tiny_repo: Path) -> None:
    """`vlmserve status` shows, per model, what export chose on this host and what it timed."""
    from vlmserve.orchestrator.cli import runtime_rows

    rows = {(r["model"], r["part"]): r for r in runtime_rows(tiny_repo)}
    assert {("siglip_vision", "encoder"), ("siglip_text", "encoder"), ("florence2_vision", "encoder"),
            ("smolvlm2_vision", "encoder"),
            ("florence2", "decoder"), ("smolvlm2", "decoder")} <= set(rows)
    vision = json.loads((tiny_repo / "siglip_vision" / runtime_choice.REPORT_FILE).read_text())
    row = rows[("siglip_vision", "encoder")]
    assert (row["runtime"], row["precision"]) == (vision["runtime"], vision["precision"])
    assert "onnxruntime/fp32" in row["timed"] and float(row["min cosine"]) >= runtime_choice.FIDELITY_FLOOR
