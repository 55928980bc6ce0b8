"""Export's CPU runtime choice re-checked where the model is served (a repository exported on an AMX host, served
from an AVX2 node): the next faithful candidate with a warning, or a refusal naming the missing ISA."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from vlmserve.export import runtime_choice
from vlmserve.host import CPUINFO_ENV, IsaError, parse_cpuinfo, serve_choice
from vlmserve.model_repository import common, onnx_model

AMX_XEON = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
            "flags\t\t: fpu sse avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8\n")
AVX2_EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse avx2 fma\n"
BF16_EXPORT = {"runtime": "openvino", "precision": "bf16",
               "runtime_faithful": "openvino/bf16,onnxruntime/fp32,openvino/fp32"}


def test_a_choice_the_cpu_runs_is_kept() -> None:
    choice = serve_choice({**BF16_EXPORT, "decoder_precision": "bf16"}, parse_cpuinfo(AMX_XEON))
    assert (choice.runtime, choice.precision, choice.decoder_precision, choice.warnings) == \
        ("openvino", "bf16", "bf16", ())


def test_bf16_on_an_avx2_cpu_falls_back_to_the_next_faithful_candidate() -> None:
    choice = serve_choice({**BF16_EXPORT, "decoder_precision": "bf16"}, parse_cpuinfo(AVX2_EPYC))
    assert (choice.runtime, choice.precision, choice.decoder_precision) == ("onnxruntime", "fp32", "fp32")
    encoder, decoder = choice.warnings
    assert "openvino/bf16" in encoder and "avx512_bf16 or amx_bf16" in encoder and "AMD EPYC" in encoder
    assert "serving onnxruntime/fp32" in encoder
    assert "decoder bf16" in decoder and "fp32" in decoder


def test_no_recorded_candidate_that_runs_refuses_naming_the_isa() -> None:
    # A repository exported before the faithful candidates were recorded: only the choice is known to be faithful.
    with pytest.raises(IsaError, match="needs avx512_bf16 or amx_bf16, which this CPU lacks"):
        serve_choice({"runtime": "openvino", "precision": "bf16"}, parse_cpuinfo(AVX2_EPYC))


def test_export_records_every_faithful_candidate_fastest_first() -> None:
    def trial(runtime: str, precision: str, speed: float, cosine: float) -> dict:
        return {"runtime": runtime, "precision": precision, "items_per_s": speed, "min_cosine": cosine}

    report = {"runtime": "openvino", "precision": "bf16", "fidelity_floor": 0.999, "candidates": [
        trial("onnxruntime", "fp32", 10.0, 1.0), trial("openvino", "fp32", 12.0, 1.0),
        trial("openvino", "bf16", 30.0, 0.9995), {**trial("openvino", "fp16", 50.0, 0.5)}]}
    assert runtime_choice.faithful_candidates(report) == ["openvino/bf16", "openvino/fp32", "onnxruntime/fp32"]


def _encoder_args(tiny_repo: Path, faithful: str) -> dict:
    """Triton's ``args`` for the tiny SigLIP vision encoder, its config saying export chose OpenVINO bf16."""
    config = {"name": "siglip_vision", "input": [{"name": "pixel_values"}], "output": [{"name": "image_embeds"}],
              "parameters": {k: {"string_value": v} for k, v in
                             {"family": "siglip", "role": "encoder", "runtime": "openvino", "precision": "bf16",
                              "runtime_faithful": faithful}.items() if v}}
    return {"model_config": json.dumps(config), "model_repository": str(tiny_repo / "siglip_vision"),
            "model_version": "1", "model_instance_kind": "CPU"}


def test_loading_on_a_faked_avx2_cpu_serves_the_fallback_and_warns(tiny_repo: Path, tmp_path: Path,
                                                                   monkeypatch, caplog) -> None:
    (tmp_path / "cpuinfo").write_text(AVX2_EPYC)
    monkeypatch.setenv(CPUINFO_ENV, str(tmp_path / "cpuinfo"))
    model = onnx_model.TritonPythonModel()
    with caplog.at_level(logging.WARNING, "vlmserve.models"):
        model.initialize(_encoder_args(tiny_repo, BF16_EXPORT["runtime_faithful"]))
    assert isinstance(model.encoder, common.OnnxEncoder)  # not OpenVINO bf16
    assert any("avx512_bf16 or amx_bf16" in r.getMessage() and "serving onnxruntime/fp32" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


def test_loading_on_a_faked_avx2_cpu_without_a_fallback_refuses(tiny_repo: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    (tmp_path / "cpuinfo").write_text(AVX2_EPYC)
    monkeypatch.setenv(CPUINFO_ENV, str(tmp_path / "cpuinfo"))
    with pytest.raises(IsaError, match="'siglip_vision'.*avx512_bf16 or amx_bf16"):
        onnx_model.TritonPythonModel().initialize(_encoder_args(tiny_repo, ""))


def test_loading_on_a_faked_amx_cpu_keeps_the_choice(tiny_repo: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cpuinfo").write_text(AMX_XEON)
    monkeypatch.setenv(CPUINFO_ENV, str(tmp_path / "cpuinfo"))
    model = onnx_model.TritonPythonModel()
    model.initialize(_encoder_args(tiny_repo, ""))
    assert isinstance(model.encoder, common.OpenVinoEncoder)


def test_v1_models_shows_the_fallback_and_the_refusal(tmp_path: Path, monkeypatch) -> None:
    """The gateway re-checks export's choice on its CPU (Triton's, where they share the host) for /v1/models."""
    from fastapi.testclient import TestClient

    from tests.fakes import FakeEngine
    from vlmserve.gateway.app import create_app
    from vlmserve.gateway.engines import ModelInfo
    from vlmserve.gateway.settings import GatewaySettings

    (tmp_path / "cpuinfo").write_text(AVX2_EPYC)
    monkeypatch.setenv(CPUINFO_ENV, str(tmp_path / "cpuinfo"))
    common = {"role": "client", "task": "embed_image", "runtime_choice": "timed on an AMX Xeon"}
    models = {
        "siglip_embed_image": ModelInfo.of("siglip_embed_image", True, {
            **common, "family": "siglip", "source_model": "vlmserve/tiny-siglip", **BF16_EXPORT}, 32),
        "florence2": ModelInfo.of("florence2", False, {
            **common, "family": "florence2", "task": "florence2", "source_model": "microsoft/Florence-2-base",
            "runtime": "openvino", "precision": "bf16", "decoder_precision": "bf16"}, 8),
        "siglip2_embed_image": ModelInfo.of("siglip2_embed_image", True, {
            **common, "family": "siglip2", "source_model": "google/siglip2", "runtime": "onnxruntime",
            "precision": "fp32"}, 32),
    }
    app = create_app(GatewaySettings(storage_dir=str(tmp_path / "storage")), backend=FakeEngine(models))
    with TestClient(app) as client:
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    siglip = listed["vlmserve/tiny-siglip"]["runtimes"]["siglip_embed_image"]
    assert (siglip["runtime"], siglip["precision"], siglip["served_as"]) == ("openvino", "bf16", "onnxruntime/fp32")
    assert "avx512_bf16 or amx_bf16" in siglip["isa_warnings"][0]
    assert "avx512_bf16 or amx_bf16" in listed["microsoft/Florence-2-base"]["runtimes"]["florence2"]["isa_error"]
    plain = listed["google/siglip2"]["runtimes"]["siglip2_embed_image"]
    assert not {"served_as", "isa_warnings", "isa_error"} & plain.keys()
