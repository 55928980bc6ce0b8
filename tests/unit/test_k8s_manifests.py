"""`vlmserve deploy k8s`: the manifests validate strictly against the Kubernetes API schemas of every supported
version, the committed kustomize layout (docker/k8s) is what the renderer writes, and what a schema cannot see
holds: probes name real ports and paths, selectors match labels, the memory plan reaches the Triton pod, and the
HPAs' custom metrics are the ones the prometheus-adapter rules produce from metrics our services export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import Version, all_versions, major_minor
from typer.testing import CliRunner

from vlmserve import paths
from vlmserve.cli import app
from vlmserve.gateway.metrics import Metrics
from vlmserve.orchestrator import memory
from vlmserve.orchestrator.container import PROBES
from vlmserve.orchestrator.deploy import k8s, spec
from vlmserve.orchestrator.triton import EXIT_TIMEOUT_S

COMMITTED = paths.PROJECT_ROOT / "docker" / "k8s"
SERVICEMONITOR_SCHEMA = COMMITTED / "schemas" / "servicemonitor-monitoring-v1.json"
OLDEST = "1.29"
VERSIONS = sorted({major_minor(v) for v in all_versions() if Version(major_minor(v)) >= Version(OLDEST)}, key=Version)

PLAN = """
reserve: 0.05
devices: {0: 80GiB, 1: 80GiB}
services:
  - {name: vllm, external: true, budget: 0.5, device: 0}
  - {name: florence2, budget: 0.25, devices: [0, 1]}
  - {name: siglip_embed_image, budget: 8GiB, device: 1}
"""


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    path.write_text(PLAN)
    return path


def variants(plan_file: Path) -> dict[str, spec.Replica]:
    return {"cpu": spec.prepare("cpu"), "gpu": spec.prepare("gpu"), "rocm": spec.prepare("rocm"),
            "gpu+plan": spec.prepare("gpu", plan_file), "rocm+plan": spec.prepare("rocm", plan_file)}


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    pod = deployment["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------------------------------- schemas


def test_versions_cover_1_29_to_the_latest_bundled() -> None:
    assert VERSIONS[0] == OLDEST and len(VERSIONS) >= 5, VERSIONS
    assert VERSIONS[-1] == major_minor(kubernetes_validate.utils.latest_version())


@pytest.mark.parametrize("version", VERSIONS)
def test_every_variant_validates_strictly(version: str, plan_file: Path) -> None:
    for name, replica in variants(plan_file).items():
        docs = k8s.render(replica)
        kinds = {d["kind"] for d in docs}
        assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "HorizontalPodAutoscaler",
                "PersistentVolumeClaim"} <= kinds, (name, kinds)
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_strict_validation_catches_a_misspelt_field() -> None:
    deployment = one(k8s.render(spec.prepare("cpu")), "Deployment", k8s.TRITON)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_service_monitors_validate_against_the_vendored_crd_schema() -> None:
    schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    monitors = k8s.service_monitors()
    assert {m["metadata"]["name"] for m in monitors} == {k8s.TRITON, k8s.GATEWAY}
    for monitor in monitors:
        validator.validate(monitor)
    typo = json.loads(json.dumps(monitors[0]))
    typo["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(typo)


# ---------------------------------------------------------------------------------------------- committed layout


def test_committed_layout_is_what_the_renderer_writes(tmp_path: Path) -> None:
    written = {p.relative_to(tmp_path).as_posix() for p in k8s.write_tree(k8s.kustomize_layout(), tmp_path)}
    committed = {p.relative_to(COMMITTED).as_posix() for p in COMMITTED.rglob("*.yaml")}
    assert committed == written, "docker/k8s is stale: run `vlmserve deploy k8s --kustomize docker/k8s`"
    for rel in sorted(written):
        assert (COMMITTED / rel).read_text() == (tmp_path / rel).read_text(), \
            f"docker/k8s/{rel} is stale: run `vlmserve deploy k8s --kustomize docker/k8s`"


def kustomize_resources(folder: Path) -> list[dict[str, Any]]:
    """What `kubectl apply -k folder` applies for kustomizations that only list resources (ours do)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) == {"apiVersion", "kind", "resources"}, kustomization
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = folder / resource
        docs += kustomize_resources(path) if path.is_dir() else list(yaml.safe_load_all(path.read_text()))
    return docs


@pytest.mark.parametrize("variant", spec.VARIANTS)
def test_each_overlay_is_the_rendered_variant(variant: str) -> None:
    applied = kustomize_resources(COMMITTED / "overlays" / variant)
    assert applied == k8s.render(spec.prepare(variant))
    names = [(d["kind"], d["metadata"]["name"]) for d in applied]
    assert len(names) == len(set(names)), names


def test_cli_writes_one_variant_with_a_plan(tmp_path: Path, plan_file: Path) -> None:
    out = tmp_path / "gpu"
    result = CliRunner().invoke(app, ["deploy", "k8s", "--accelerator", "gpu", "--plan", str(plan_file),
                                      "--out", str(out), "--triton-max", "6"])
    assert result.exit_code == 0, result.output
    docs = kustomize_resources(out)
    assert docs == k8s.render(spec.prepare("gpu", plan_file), k8s.Scaling(triton_max=6))
    assert one(docs, "HorizontalPodAutoscaler", k8s.TRITON)["spec"]["maxReplicas"] == 6
    assert kustomize_resources(out / "monitoring") == k8s.service_monitors()


@pytest.mark.parametrize(("args", "message"), [
    (["--accelerator", "tpu"], "--accelerator must be one of cpu, gpu, rocm"),
    (["--accelerator", "cpu", "--budget", "florence2=0.2"], "needs --accelerator gpu or rocm"),
    (["--accelerator", "gpu", "--budget", "florence2=0.5@1"], "numbered 0..n-1"),
    (["--accelerator", "gpu", "--budget", "florence2=0.7", "--budget", "siglip_embed_image=0.7"], "does not fit"),
])
def test_cli_refuses_what_cannot_be_deployed(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["deploy", "k8s", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- what schemas miss


@pytest.mark.parametrize("variant", ["cpu", "gpu", "rocm", "gpu+plan"])
def test_probes_and_services_point_at_real_ports_and_paths(variant: str, plan_file: Path) -> None:
    docs = k8s.render(variants(plan_file)[variant])
    triton = one(docs, "Deployment", k8s.TRITON)["spec"]["template"]["spec"]["containers"][0]
    gateway = one(docs, "Deployment", k8s.GATEWAY)["spec"]["template"]["spec"]["containers"][0]
    for container, role in ((triton, "triton"), (gateway, "gateway")):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["port"] in ports, (role, probe)
        # Start-up is what the images' HEALTHCHECK and the orchestrator probe (orchestrator/container.py);
        # the gateway's readiness is /readyz, which turns 503 while it drains for a stop.
        ready = "/readyz" if role == "gateway" else PROBES[role]
        assert container["readinessProbe"]["httpGet"]["path"] == ready
        assert container["startupProbe"]["httpGet"]["path"] == PROBES[role]
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == spec.triton_ports()
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert [p["containerPort"] for p in gateway["ports"]] == [spec.gateway_port()]
    for name, container in ((k8s.TRITON, triton), (k8s.GATEWAY, gateway)):
        names = {p["name"] for p in container["ports"]}
        for port in one(docs, "Service", name)["spec"]["ports"]:
            assert port["targetPort"] in names
    policy = one(docs, "NetworkPolicy", k8s.TRITON)
    for rule in policy["spec"]["ingress"]:
        assert {p["port"] for p in rule["ports"]} <= {p["name"] for p in triton["ports"]}
    # The gateway reaches Triton through its Services: HTTP through the ClusterIP one, gRPC through the headless
    # one (every ready pod's address, for the channel's round_robin); the ports are those Services' ports.
    env = env_of(gateway)
    for key, name in (("VLMSERVE_GATEWAY_TRITON_URL", k8s.TRITON), ("VLMSERVE_GATEWAY_TRITON_GRPC_URL",
                                                                   k8s.TRITON_GRPC)):
        service = one(docs, "Service", name)["spec"]
        host, port = env[key].split(":")
        assert host == name and int(port) in {p["port"] for p in service["ports"]}
    assert one(docs, "Service", k8s.TRITON_GRPC)["spec"]["clusterIP"] == "None"
    assert "clusterIP" not in one(docs, "Service", k8s.TRITON)["spec"]
    assert env["VLMSERVE_GATEWAY_API_KEYS"]["secretKeyRef"]["name"] == k8s.API_KEYS_SECRET


def test_triton_gets_longer_than_its_exit_timeout_and_runs_locked_down() -> None:
    for variant in spec.VARIANTS:
        docs = k8s.render(spec.prepare(variant))
        for deployment in by_kind(docs, "Deployment"):
            pod = deployment["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for container in containers(deployment):
                security = container["securityContext"]
                assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        pod = one(docs, "Deployment", k8s.TRITON)["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > EXIT_TIMEOUT_S
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True and "/dev/shm" in mounts and "/tmp" in mounts


@pytest.mark.parametrize("variant", ["cpu", "gpu", "rocm", "gpu+plan"])
def test_selectors_match_labels(variant: str, plan_file: Path) -> None:
    docs = k8s.render(variants(plan_file)[variant])
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in by_kind(docs, "Deployment")}
    for deployment in by_kind(docs, "Deployment"):
        assert matches(deployment["spec"]["selector"]["matchLabels"], pods[deployment["metadata"]["name"]])
    for name, service in ((k8s.TRITON, k8s.TRITON), (k8s.TRITON, k8s.TRITON_GRPC), (k8s.GATEWAY, k8s.GATEWAY)):
        selected = [p for p, labels in pods.items()
                    if matches(one(docs, "Service", service)["spec"]["selector"], labels)]
        assert selected == [name]
    for name in (k8s.TRITON, k8s.GATEWAY):
        pdb = [p for p, labels in pods.items()
               if matches(one(docs, "PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"], labels)]
        assert pdb == [name]
        hpa = one(docs, "HorizontalPodAutoscaler", name)["spec"]["scaleTargetRef"]
        assert hpa["kind"] == "Deployment" and hpa["name"] in pods and hpa["name"] == name
    policy = one(docs, "NetworkPolicy", k8s.TRITON)["spec"]
    assert [p for p, labels in pods.items() if matches(policy["podSelector"]["matchLabels"], labels)] == [k8s.TRITON]
    inference = policy["ingress"][0]
    allowed = [p for p, labels in pods.items() if matches(inference["from"][0]["podSelector"]["matchLabels"], labels)]
    assert allowed == [k8s.GATEWAY] and {p["port"] for p in inference["ports"]} == {"http", "grpc"}
    # The ServiceMonitors find each Service and its port.
    services = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
    for monitor in k8s.service_monitors():
        found = [s for s in services.values() if matches(monitor["spec"]["selector"]["matchLabels"],
                                                         s["metadata"]["labels"])]
        assert len(found) == 1
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in found[0]["spec"]["ports"]}
    # Every volume a container mounts exists in its pod.
    for deployment in by_kind(docs, "Deployment"):
        volumes = {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
        for container in containers(deployment):
            assert {m["name"] for m in container["volumeMounts"]} <= volumes


def test_the_memory_plan_reaches_the_triton_pod(plan_file: Path) -> None:
    replica = spec.prepare("gpu", plan_file)
    docs = k8s.render(replica)
    deployment = one(docs, "Deployment", k8s.TRITON)
    pod = deployment["spec"]["template"]["spec"]
    triton = pod["containers"][0]
    env = env_of(triton)
    resolved = memory.validate(memory.load_plan(plan_file), replica.launch.hardware)
    args, plan_env, _ = memory.process_knobs(resolved)
    assert env["VLMSERVE_TRITON_EXTRA_ARGS"].split() == args
    assert args == ["--model-load-gpu-limit=0:0.750", "--model-load-gpu-limit=1:0.350"]
    for key, value in plan_env.items():
        assert env[key] == value
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["VLMSERVE_MODEL_CONFIG_NAME"] == memory.PLAN_CONFIG_NAME
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 2
    # The init container renders the per-model configs from the plan the ConfigMap holds, with the same code.
    configmap = one(docs, "ConfigMap", k8s.PLAN_CONFIGMAP)
    shipped = plan_file.parent / "shipped.yaml"
    shipped.write_text(configmap["data"][spec.PLAN_FILE])
    assert memory.load_plan(shipped) == memory.load_plan(plan_file)
    init = pod["initContainers"][0]
    # The NGC image serves the native config.pbtxt flavour on GPU instances (run in the image: tests/e2e).
    assert init["command"][-1].endswith(f"python -m vlmserve.orchestrator.deploy.podplan /models "
                                        f"{spec.PLAN_MOUNT}/{spec.PLAN_FILE} native KIND_GPU")
    plan_volume = next(v for v in pod["volumes"] if v["name"] == "plan")
    assert plan_volume["configMap"]["name"] == k8s.PLAN_CONFIGMAP
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert mounts[spec.PLAN_MOUNT] == "plan" and mounts["/models"] == "models"
    assert {m["mountPath"]: m["name"] for m in triton["volumeMounts"]}["/models"] == "models"
    # ROCm: Triton has no AMD support, its instances stay KIND_CPU and the models place work on the GPU.
    rocm_init = one(k8s.render(spec.prepare("rocm", plan_file)), "Deployment",
                    k8s.TRITON)["spec"]["template"]["spec"]["initContainers"][0]
    assert rocm_init["command"][-1].endswith(" embedded KIND_CPU")
    # Without a plan: no init container, the shared repository is mounted read-only as it is.
    plain = one(k8s.render(spec.prepare("gpu")), "Deployment", k8s.TRITON)["spec"]["template"]["spec"]
    assert "initContainers" not in plain
    assert env_of(plain["containers"][0])["VLMSERVE_MODEL_CONFIG_NAME"] == ""
    assert plain["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    rocm = one(k8s.render(spec.prepare("rocm")), "Deployment", k8s.TRITON)["spec"]["template"]["spec"]
    assert rocm["containers"][0]["resources"]["limits"]["amd.com/gpu"] == 1
    assert env_of(rocm["containers"][0])["VLMSERVE_ACCELERATOR"] == "rocm"
    cpu = one(k8s.render(spec.prepare("cpu")), "Deployment", k8s.TRITON)["spec"]["template"]["spec"]
    assert not {"nvidia.com/gpu", "amd.com/gpu"} & set(cpu["containers"][0]["resources"]["limits"])


def test_hpa_metrics_are_the_adapter_rules_outputs_from_exported_series() -> None:
    rules = k8s.adapter_rules()["rules"]["custom"]
    produced = {r["name"]["as"]: r for r in rules}
    docs = k8s.render(spec.prepare("cpu"))
    wanted = [m["pods"]["metric"]["name"] for hpa in by_kind(docs, "HorizontalPodAutoscaler")
              for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert sorted(wanted) == sorted(produced) == sorted([k8s.TRITON_QUEUE_METRIC, k8s.CHAT_ROWS_METRIC,
                                                         k8s.GATEWAY_INFLIGHT_METRIC])
    for rule in rules:
        series = rule["seriesQuery"].split("{")[0]
        assert re.search(rule["name"]["matches"], series)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    # Queue time per request: Triton's cumulative queue time over its successful requests.
    queue = produced[k8s.TRITON_QUEUE_METRIC]["metricsQuery"]
    assert "rate(nv_inference_queue_duration_us{" in queue and "rate(nv_inference_request_success{" in queue
    # The gateway really exports the gauge its HPA scales on.
    exported = Metrics().render().decode()
    assert re.search(rf"^{k8s.GATEWAY_INFLIGHT_METRIC} 0\.0$", exported, re.M), exported
    triton_hpa = one(docs, "HorizontalPodAutoscaler", k8s.TRITON)["spec"]["metrics"]
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in triton_hpa}
    assert targets[k8s.TRITON_QUEUE_METRIC] == {"type": "AverageValue",
                                                "averageValue": str(int(k8s.Scaling().queue_target_ms * 1000))}
    # Chat load: the chat models' rows (running + waiting) per pod, which Triton's queue time never shows for
    # decoupled models. The series the rule reads is the one the chat model exports (model_repository/chat.py).
    rows_target = str(k8s.Scaling().chat_rows_target)
    assert targets[k8s.CHAT_ROWS_METRIC] == {"type": "AverageValue", "averageValue": rows_target}
    chat_rule = produced[k8s.CHAT_ROWS_METRIC]
    assert chat_rule["seriesQuery"].startswith("vlmserve_chat_rows{")
    source = (paths.PROJECT_ROOT / "model_repository" / "chat.py").read_text()
    assert 'name="vlmserve_chat_rows"' in source and '"state": "running"' in source and '"state": "waiting"' in source


def test_gateway_replicas_share_their_files_and_drain_readiness_first() -> None:
    from vlmserve.gateway.settings import GatewaySettings

    docs = k8s.render(spec.prepare("cpu"))
    pod = one(docs, "Deployment", k8s.GATEWAY)["spec"]["template"]["spec"]
    gateway = pod["containers"][0]
    env = env_of(gateway)
    # /v1/predict's kept images: one ReadWriteMany claim mounted where the gateway stores them.
    claim = one(docs, "PersistentVolumeClaim", k8s.FILES_PVC)["spec"]
    assert claim["accessModes"] == ["ReadWriteMany"]
    volume = next(v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == k8s.FILES_PVC)
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == volume["name"])
    assert mount["mountPath"] == env["VLMSERVE_GATEWAY_STORAGE_DIR"] and not mount.get("readOnly")
    assert GatewaySettings(storage_dir=env["VLMSERVE_GATEWAY_STORAGE_DIR"]).storage_dir == k8s.FILES_MOUNT
    # A stop: preStop waits, then the gateway turns unready and serves on (drain_delay_s), then drains; the
    # grace period covers all three and a margin.
    assert gateway["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(k8s.PRESTOP_S)]
    delay = float(env["VLMSERVE_GATEWAY_DRAIN_DELAY_S"])
    assert delay > 0
    timeout = float(env["VLMSERVE_GATEWAY_DRAIN_TIMEOUT_S"])
    assert timeout == GatewaySettings().drain_timeout_s  # the gateway's own default, stated
    assert pod["terminationGracePeriodSeconds"] >= k8s.PRESTOP_S + delay + timeout + 5


def test_the_gateway_gauge_counts_requests_being_served() -> None:
    import asyncio

    from vlmserve.gateway.metrics import MetricsMiddleware

    metrics = Metrics()
    seen: list[float] = []

    def in_flight() -> float:
        return float(re.search(rf"^{k8s.GATEWAY_INFLIGHT_METRIC} (\S+)$", metrics.render().decode(), re.M)[1])

    async def app_(scope, receive, send) -> None:
        seen.append(in_flight())
        if scope["path"] == "/fail":
            raise RuntimeError("boom")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(path: str) -> None:
        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        async def send(_message: dict) -> None:
            pass

        await MetricsMiddleware(app_, metrics)({"type": "http", "method": "GET", "path": path}, receive, send)

    asyncio.run(call("/ok"))
    with pytest.raises(RuntimeError):
        asyncio.run(call("/fail"))
    assert seen == [1.0, 1.0] and in_flight() == 0.0
