"""`vlmserve deploy swarm` renders a stack from the same source as the Kubernetes manifests: same container
environment and commands, dnsrr everywhere (no IPVS needed), the balancer published in host mode and pointed at
the gateway service, the gateways pointed at the Triton service (the run itself: tests/e2e/test_swarm.py)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from vlmserve.cli import app
from vlmserve.orchestrator.deploy import k8s, spec, swarm


def render(tmp_path: Path, replicas: int = 3) -> tuple[dict, str]:
    out = tmp_path / "stack"
    result = CliRunner().invoke(app, ["deploy", "swarm", "--replicas", str(replicas), "--repo", str(tmp_path),
                                      "--port", "18080", "--project", "vs-test", "--image", "vlmserve:cpu-x",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return yaml.safe_load((out / "stack.yaml").read_text()), (out / "nginx.conf").read_text()


def env_of_k8s(name: str) -> dict[str, str]:
    docs = k8s.render(spec.prepare("cpu"))
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)
    return {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            if "value" in e}


def test_stack_runs_the_kubernetes_containers(tmp_path: Path) -> None:
    stack, _ = render(tmp_path)
    services = stack["services"]
    triton, gateway = services[k8s.TRITON], services[k8s.GATEWAY]
    # Traces and JSON logs: from the deploying shell here, from the optional ConfigMap there.
    for service in (triton, gateway):
        for name in swarm.OBSERVABILITY_ENV:
            assert service["environment"].pop(name) == f"${{{name}:-}}"
    assert triton["environment"] == env_of_k8s(k8s.TRITON)
    # The same gateway environment, except gRPC: Kubernetes needs a headless Service for the channel to see every
    # Triton pod, Swarm's dnsrr service name already resolves to every replica.
    gateway_env, k8s_env = dict(gateway["environment"]), env_of_k8s(k8s.GATEWAY)
    assert gateway_env.pop("VLMSERVE_GATEWAY_TRITON_GRPC_URL") == f"{k8s.TRITON}:{spec.triton_ports()['grpc']}"
    assert k8s_env.pop("VLMSERVE_GATEWAY_TRITON_GRPC_URL").startswith(f"{k8s.TRITON_GRPC}:")
    assert gateway_env == k8s_env
    # Every gateway replica stores into one volume (/files/{key} answers on each), where the image lets it write.
    files = next(v for v in gateway["volumes"] if v["target"] == spec.FILES_MOUNT)
    assert files["type"] == "volume" and files["source"] in stack["volumes"]
    assert gateway_env["VLMSERVE_GATEWAY_STORAGE_DIR"] == spec.FILES_MOUNT
    assert float(gateway_env["VLMSERVE_GATEWAY_DRAIN_DELAY_S"]) > 0  # nginx re-resolves every second
    assert triton["command"] == ["triton"] and gateway["command"] == ["gateway"]
    assert triton["image"] == gateway["image"] == "vlmserve:cpu-x"
    for service in (triton, gateway):
        assert service["deploy"]["replicas"] == 3
        assert service["read_only"] is True
        assert {"type": "tmpfs", "target": "/tmp"} in service["volumes"]
    models = next(v for v in triton["volumes"] if v["target"] == "/models")
    assert models == {"type": "bind", "source": str(tmp_path.resolve()), "target": "/models", "read_only": True}
    shm = next(v for v in triton["volumes"] if v["target"] == "/dev/shm")
    assert shm["tmpfs"]["size"] == 2**30  # the Docker runtime's shm_size (1g)
    assert int(triton["stop_grace_period"].rstrip("s")) == spec.termination_grace_s()


def test_no_routing_mesh_is_needed(tmp_path: Path) -> None:
    stack, _ = render(tmp_path, replicas=2)
    for service in stack["services"].values():
        assert service["deploy"]["endpoint_mode"] == "dnsrr"
        for port in service.get("ports", []):
            assert port["mode"] == "host"
    assert stack["services"][swarm.LB]["ports"] == [{"target": swarm.LB_PORT, "published": 18080, "protocol": "tcp",
                                                     "mode": "host"}]
    network = "vs-test-net"
    assert stack["networks"][network]["driver"] == "overlay"
    assert all(s["networks"] == [network] for s in stack["services"].values())


def test_names_line_up(tmp_path: Path) -> None:
    stack, conf = render(tmp_path)
    services = stack["services"]
    # nginx balances over the gateway service's DNS records; the gateways reach Triton by its service name.
    assert re.search(rf"set \$gateway {k8s.GATEWAY};", conf)
    assert f"proxy_pass http://$gateway:{spec.gateway_port()};" in conf
    host, port = services[k8s.GATEWAY]["environment"]["VLMSERVE_GATEWAY_TRITON_URL"].split(":")
    assert host in services and int(port) == spec.triton_ports()["http"]
    assert f"listen {swarm.LB_PORT};" in conf and "resolver 127.0.0.11" in conf
    # No replica answering is a clean OpenAI-shaped 503 with Retry-After, never nginx's HTML 502.
    assert "error_page 502 504 = @unavailable;" in conf
    assert f"add_header Retry-After {swarm.RETRY_AFTER_S} always;" in conf
    assert re.search(r"return 503 '\{\"error\": \{\"message\"", conf)
    config = services[swarm.LB]["configs"][0]
    assert config["target"] == "/etc/nginx/nginx.conf" and config["source"] in stack["configs"]
    labels = {s: services[s]["deploy"]["labels"]["io.vlmserve.project"] for s in services}
    assert set(labels.values()) == {"vs-test"}


def test_replicas_must_be_positive(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["deploy", "swarm", "--replicas", "0", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert not (tmp_path / "x").exists()
