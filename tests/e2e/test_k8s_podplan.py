"""The Triton pod's init container of `vlmserve deploy k8s --plan` really renders the plan, run as the pod runs it:
its exact command from the rendered manifest, in the vlmserve image, non-root, read-only root filesystem, the
shared repository read-only, the plan mounted like the ConfigMap (no Kubernetes here: Docker runs the container).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from vlmserve.orchestrator import memory
from vlmserve.orchestrator.deploy import k8s, spec

pytestmark = pytest.mark.e2e

PLAN = """
devices: {0: 16GiB}
services:
  - {name: vllm, external: true, budget: 0.5}
  - {name: siglip_embed_image, budget: 0.25}
  - {name: siglip_vision, budget: 2GiB}
"""


@pytest.mark.parametrize(("variant", "config_source", "kind"), [("rocm", "embedded", "KIND_CPU"),
                                                          ("gpu", "native", "KIND_GPU")])
def test_init_container_renders_the_plan_in_the_image(docker_client, cpu_image: str, tiny_repo: Path,
                                                      tmp_path: Path, variant: str, config_source: str,
                                                      kind: str) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    docs = k8s.render(spec.prepare(variant, plan))
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    pod = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == k8s.TRITON)
    init = pod["spec"]["template"]["spec"]["initContainers"][0]
    shipped = tmp_path / "configmap"
    shipped.mkdir()
    (shipped / spec.PLAN_FILE).write_text(configmap["data"][spec.PLAN_FILE])
    shipped.chmod(0o755)
    tmp_path.chmod(0o755)
    command = init["command"][:-1] + [
        init["command"][-1] + " && cat /models/siglip_embed_image/configs/vlmserve-plan.pbtxt"
        " && echo ===== && cat /models/siglip_vision/configs/vlmserve-plan.pbtxt"]
    output = docker_client.containers.run(
        cpu_image, entrypoint=command[0], command=command[1:], name=f"vlmk8s-podplan-{uuid.uuid4().hex[:6]}",
        remove=True, read_only=True, user=f"{k8s.UID}:{k8s.UID}", network_mode="none",
        volumes={str(tiny_repo): {"bind": "/models-src", "mode": "ro"},
                 str(shipped): {"bind": spec.PLAN_MOUNT, "mode": "ro"}},
        # Writable for the pod's user, like emptyDir volumes with the pod's fsGroup.
        tmpfs={"/models": f"uid={k8s.UID},gid={k8s.UID}", "/tmp": f"uid={k8s.UID},gid={k8s.UID}"},
        labels={"io.vlmserve.managed": "true", "io.vlmserve.project": "vlmk8s-podplan"},
    ).decode()
    assert f"wrote {len(list(tiny_repo.glob('*/config.pbtxt')))} configs" in output, output
    image_cfg, vision_cfg = (text_format.Parse(part.split(f"configs ({memory.PLAN_CONFIG_NAME})\n")[-1],
                                               model_config_pb2.ModelConfig())
                             for part in output.split("=====\n"))
    # The Python model gets the fraction (its torch/onnxruntime caps); the instances keep the image's kind.
    assert image_cfg.name == "siglip_embed_image"
    assert float(image_cfg.parameters["gpu_memory_fraction"].string_value) == pytest.approx(0.25)
    assert {g.kind for g in image_cfg.instance_group} == {model_config_pb2.ModelInstanceGroup.Kind.Value(kind)}
    # siglip_vision: in the native flavour an onnxruntime model, capped by gpu_mem_limit (2 GiB of the 16 GiB).
    vision_limit = vision_cfg.parameters["gpu_mem_limit"].string_value
    assert int(vision_limit) == 2 * 2**30, output
    base = tiny_repo / "siglip_vision" / ("config.pbtxt" if config_source == "native" else "configs/embedded.pbtxt")
    source = text_format.Parse(base.read_text(), model_config_pb2.ModelConfig())
    assert (vision_cfg.backend or vision_cfg.platform) == (source.backend or source.platform)
