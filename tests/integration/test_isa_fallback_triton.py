"""Export's CPU runtime choice re-checked by the real Triton at load, on a faked AVX2 CPU (``VLMSERVE_CPUINFO``):
a repository that chose OpenVINO bf16 (as on an AMX host) serves the next faithful candidate with a warning in
Triton's log, or, with none recorded, refuses to load naming the missing ISA."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from vlmserve.host import CPUINFO_ENV
from vlmserve.orchestrator import triton
from vlmserve.orchestrator.ports import stack_ports
from vlmserve.orchestrator.settings import OrchestratorSettings

pytestmark = pytest.mark.integration

AVX2_EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse avx2 fma\n"


def _bf16_copy(tiny_repo: Path, repo: Path, name: str, faithful: str) -> None:
    """The tiny SigLIP vision encoder as ``name``, its served config saying export chose OpenVINO bf16."""
    shutil.copytree(tiny_repo / "siglip_vision", repo / name)
    path = repo / name / "configs" / "embedded.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    config.name = name
    for key, value in {"runtime": "openvino", "precision": "bf16", "runtime_faithful": faithful}.items():
        config.parameters[key].string_value = value
    (repo / name / "config.pbtxt").unlink()
    path.write_text(text_format.MessageToString(config))


def test_triton_serves_the_fallback_or_refuses_naming_the_isa(tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repository"
    _bf16_copy(tiny_repo, repo, "falls_back", "openvino/bf16,onnxruntime/fp32")
    _bf16_copy(tiny_repo, repo, "refuses", "")
    (tmp_path / "cpuinfo").write_text(AVX2_EPYC)
    settings = OrchestratorSettings(**stack_ports(), repository=repo, state_dir=tmp_path / "state")
    dist = triton.find_tritonserver()
    command = [a for a in triton.triton_command(settings, dist, triton.prepare_backends(dist, tmp_path / "run"))
               if a != "--load-model=*"] + ["--load-model=falls_back"]
    env = {**triton.triton_env(dist), CPUINFO_ENV: str(tmp_path / "cpuinfo")}
    log = tmp_path / "triton.log"
    url = settings.triton_http_url
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/v2/models/falls_back/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert httpx.get(f"{url}/v2/models/falls_back/ready", timeout=5).status_code == 200, log.read_text()[-3000:]
        text = log.read_text()
        warnings = [line for line in text.splitlines() if line.startswith("W") and "falls_back" in line]
        assert any("openvino/bf16 (export's choice) needs avx512_bf16 or amx_bf16" in line
                   and "serving onnxruntime/fp32" in line for line in warnings), text[-3000:]
        # It serves: one image through the fallback encoder.
        size = list(text_format.Parse((repo / "falls_back/configs/embedded.pbtxt").read_text(),
                                      model_config_pb2.ModelConfig()).input[0].dims)
        pixels = np.zeros([1, *size], dtype=np.float32)
        r = httpx.post(f"{url}/v2/models/falls_back/infer", timeout=60, json={"inputs": [
            {"name": "pixel_values", "shape": list(pixels.shape), "datatype": "FP32",
             "data": pixels.reshape(-1).tolist()}]})
        assert r.status_code == 200, r.text
        assert np.isfinite(r.json()["outputs"][0]["data"]).all()
        # No faithful candidate recorded that runs here: the load fails, naming the ISA.
        r = httpx.post(f"{url}/v2/repository/models/refuses/load", timeout=180)
        assert r.status_code == 400, r.text
        assert "avx512_bf16 or amx_bf16" in r.text and "re-export" in r.text, r.text
        assert httpx.get(f"{url}/v2/models/falls_back/ready", timeout=5).status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
