"""Orchestrator logic without a server: launch planning, container specs, image context, CLI output and errors.

The Docker Engine and real GPUs are not needed here (tests/e2e runs the docker launcher for real); detection is
replaced by fixed ``Hardware`` values so the tests mean the same on a machine with a GPU.
"""

from __future__ import annotations

import http.server
import inspect
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.fakes import FakeLauncher
from vlmserve import paths
from vlmserve.orchestrator import cli as orchestrator_cli
from vlmserve.orchestrator import container, hardware, images
from vlmserve.orchestrator.hardware import Gpu, Hardware
from vlmserve.orchestrator.launch import plan_launch
from vlmserve.orchestrator.launcher import Launcher, StartupError
from vlmserve.orchestrator.launchers import LAUNCHERS
from vlmserve.orchestrator.launchers.docker import DockerLauncher
from vlmserve.orchestrator.settings import OrchestratorSettings, deprecated_env

GIB = 2**30
NONE = Hardware((), "none", ("NVML not available: test",))
H100 = Hardware((Gpu(0, "nvidia", "NVIDIA H100", 80 * GIB, 1 * GIB),), "nvml")
MI300 = Hardware((Gpu(0, "amd", "AMD Instinct MI300X", 192 * GIB, 0),), "rocm-smi")
EXAMPLE_PLAN = paths.PROJECT_ROOT / "docker" / "gpu-plan.example.yaml"
runner = CliRunner()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with one Python model named like the seed example's (florence2)."""
    repo = tmp_path / "repository"
    (repo / "florence2" / "1").mkdir(parents=True)
    (repo / "florence2" / "config.pbtxt").write_text(
        'name: "florence2"\nbackend: "python"\nmax_batch_size: 8\n'
        'instance_group [ { count: 1 kind: KIND_CPU } ]\n'
    )
    return repo


def settings(tmp_path: Path, repo: Path | None = None, **kw) -> OrchestratorSettings:
    return OrchestratorSettings(state_dir=tmp_path / "state", repository=repo or tmp_path / "repository", **kw)


# -- launch planning ---------------------------------------------------------------------------------------


def test_launch_without_plan_uses_the_image_flavour(tmp_path: Path) -> None:
    launch = plan_launch(settings(tmp_path, accelerator="auto"), detected=H100, in_image=True)
    assert launch.choice.accelerator == "cuda" and launch.rendered is None
    assert launch.model_config_name(launch.choice.model_config_name) is None  # NGC image: native config.pbtxt
    # Triton still learns the chosen accelerator (the Python models place their work by it on ROCm).
    assert launch.triton_args() == [] and launch.env() == {"VLMSERVE_ACCELERATOR": "cuda"}


def test_launch_renders_the_seed_plan_on_a_gpu(tmp_path: Path, repo: Path) -> None:
    s = settings(tmp_path, repo, accelerator="cuda", gpu_plan=EXAMPLE_PLAN)
    launch = plan_launch(s, detected=H100)
    assert launch.model_config_name("embedded") == "vlmserve-plan"
    planned = (repo / "florence2" / "configs" / "vlmserve-plan.pbtxt").read_text()
    assert '"gpu_memory_fraction"' in planned and "KIND_GPU" in planned and "gpus: 0" in planned
    # Triton's load gate sees everything planned on the device (vLLM's 0.55 included).
    assert launch.triton_args() == ["--model-load-gpu-limit=0:0.800"]
    assert launch.rendered is not None and launch.rendered.external_hints["vllm"] == "--gpu-memory-utilization 0.55"


def test_launch_on_cpu_validates_the_plan_but_does_not_apply_it(tmp_path: Path, repo: Path) -> None:
    launch = plan_launch(settings(tmp_path, repo, gpu_plan=EXAMPLE_PLAN), detected=NONE)
    assert launch.choice.accelerator == "cpu" and launch.plan is not None and launch.rendered is None
    assert any("not applied" in w for w in launch.warnings)
    assert not (repo / "florence2" / "configs").exists()


def test_launch_rejects_an_overcommitted_plan(tmp_path: Path, repo: Path) -> None:
    from vlmserve.orchestrator.memory import PlanError

    with pytest.raises(PlanError, match="vllm 0.55 \\+ florence2 0.45"):
        plan_launch(settings(tmp_path, repo, accelerator="cuda"), budgets=["vllm=0.55:external", "florence2=0.45"],
                    detected=H100)


# -- docker container specs ----------------------------------------------------------------------------


def test_container_specs_are_labelled_published_on_loopback_and_restarted(tmp_path: Path, repo: Path,
                                                                            monkeypatch) -> None:
    monkeypatch.setenv("VLMSERVE_GATEWAY_API_KEYS", '["k"]')
    monkeypatch.setenv("VLMSERVE_GATEWAY_PORT", "9999")  # the container's own port stays 8080
    s = settings(tmp_path, repo, project="p1", http_port=18000, gateway_port=18080)
    rt = DockerLauncher(s, launch=plan_launch(s, detected=NONE, in_image=True), client=object())
    triton, gateway = rt.spec("triton"), rt.spec("gateway")
    assert triton["name"] == "p1-triton" and triton["image"] == "vlmserve:cpu"
    assert triton["labels"] == {"io.vlmserve.managed": "true", "io.vlmserve.project": "p1",
                                "io.vlmserve.service": "triton", "io.vlmserve.accelerator": "cpu"}
    assert triton["init"] is True and triton["restart_policy"]["Name"] == "on-failure"
    assert triton["ports"]["8000/tcp"] == ("127.0.0.1", 18000)
    assert triton["volumes"][str(repo.resolve())] == {"bind": "/models", "mode": "ro"}
    assert triton["environment"]["VLMSERVE_MODEL_CONFIG_NAME"] == "embedded"
    assert "device_requests" not in triton and "devices" not in triton
    assert gateway["ports"] == {"8080/tcp": ("127.0.0.1", 18080)}
    env = gateway["environment"]
    assert env["VLMSERVE_GATEWAY_TRITON_URL"] == "p1-triton:8000" and env["VLMSERVE_GATEWAY_API_KEYS"] == '["k"]'
    assert "VLMSERVE_GATEWAY_PORT" not in env
    with pytest.raises(ValueError, match="unknown service"):
        rt.spec("redis")


def test_gpu_and_rocm_containers_get_their_devices(tmp_path: Path, repo: Path) -> None:
    s = settings(tmp_path, repo, accelerator="cuda", gpu_plan=EXAMPLE_PLAN)
    cuda = DockerLauncher(s, launch=plan_launch(s, in_image=True, detected=H100), client=object())
    spec = cuda.spec("triton")
    assert spec["image"] == "vlmserve:gpu" and spec["labels"]["io.vlmserve.accelerator"] == "cuda"
    assert spec["device_requests"][0]["Capabilities"] == [["gpu"]]
    assert spec["environment"]["VLMSERVE_MODEL_CONFIG_NAME"] == "vlmserve-plan"
    assert "--model-load-gpu-limit=0:0.800" in spec["environment"]["VLMSERVE_TRITON_EXTRA_ARGS"]
    s = settings(tmp_path, repo, accelerator="rocm")
    rocm = DockerLauncher(s, launch=plan_launch(s, in_image=True, detected=MI300), client=object()).spec("triton")
    assert rocm["image"] == "vlmserve:rocm" and "/dev/kfd:/dev/kfd:rwm" in rocm["devices"]
    assert rocm["group_add"] == ["video"]
    assert rocm["environment"]["VLMSERVE_ACCELERATOR"] == "rocm"


# -- images ----------------------------------------------------------------------------------------------


def test_image_requirements_and_build_context(tmp_path: Path) -> None:
    reqs = images.image_requirements()
    names = {r.split(">")[0].split("=")[0].split("[")[0].split("<")[0] for r in reqs}
    assert {"torch", "onnxruntime", "transformers", "fastapi", "uvicorn", "tritonclient", "opentelemetry-sdk",
            "opentelemetry-exporter-otlp-proto-http"} <= names  # tracing works in containers too
    assert not any(r.startswith("vlmserve") for r in reqs) and "pytest" not in names  # no test deps in images
    house = tmp_path / "house"
    (house / "deps").mkdir(parents=True)
    (house / "project").mkdir()
    (house / "deps" / "requirements.txt").write_text("\n".join(reqs))
    (house / "deps" / "a-1.0-py3-none-any.whl").write_bytes(b"wheel")
    (house / "deps" / ".requirements.sha256").write_text("x")
    (house / "project" / "vlmserve-0.1.0-py3-none-any.whl").write_bytes(b"wheel")
    ctx = images.build_context("cpu", house, tmp_path / "ctx")
    assert (ctx / "Dockerfile").read_text() == (paths.PROJECT_ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert sorted(p.name for p in (ctx / "wheels").iterdir()) == ["a-1.0-py3-none-any.whl", "requirements.txt"]
    assert [p.name for p in (ctx / "project").iterdir()] == ["vlmserve-0.1.0-py3-none-any.whl"]
    with pytest.raises(ValueError, match="unknown image 'tpu'"):
        images.dockerfile("tpu")


def test_rebuild_drops_only_the_untagged_image_it_replaced() -> None:
    import docker.errors

    class FakeImages:  # the slice of docker.models.images.ImageCollection the tidy-up uses
        def __init__(self, tags, in_use=()):
            self.tags, self.in_use, self.removed = tags, set(in_use), []

        def get(self, ref):
            return type("Image", (), {"id": ref, "tags": self.tags.get(ref, [])})()

        def remove(self, ref):
            if ref in self.in_use:
                raise docker.errors.APIError("conflict", explanation="image is being used by a container")
            self.removed.append(ref)

    logs: list[str] = []
    client = type("Client", (), {})()
    client.images = FakeImages({"sha256:other": ["vlmserve:cpu-old"]}, in_use={"sha256:busy"})
    images._drop_untagged(client, "sha256:old", logs.append)       # nothing names it any more: removed
    images._drop_untagged(client, "sha256:other", logs.append)     # still tagged elsewhere: kept silently
    images._drop_untagged(client, "sha256:busy", logs.append)      # a container uses it: kept, and said why
    assert client.images.removed == ["sha256:old"]
    assert logs[0].startswith("removed the replaced image") and "being used by a container" in logs[1]


# -- the in-container entry point ------------------------------------------------------------------------


def test_container_health_probe(monkeypatch) -> None:
    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/v2/health/ready" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = str(server.server_address[1])
        monkeypatch.setenv("VLMSERVE_ROLE", "triton")
        monkeypatch.setenv("VLMSERVE_HTTP_PORT", port)
        assert container.main(["health"]) == 0
        monkeypatch.setenv("VLMSERVE_ROLE", "gateway")  # /livez is not served here
        monkeypatch.setenv("VLMSERVE_GATEWAY_PORT", port)
        assert container.main(["health"]) == 1
    finally:
        server.shutdown()
    monkeypatch.setenv("VLMSERVE_ROLE", "nonsense")
    assert container.main(["health"]) == 2
    assert container.main(["bogus"]) == 2


# -- CLI --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(hardware, "detect", lambda **kw: NONE)


def test_help_lists_every_verb() -> None:
    out = runner.invoke(orchestrator_cli.app, ["--help"]).output
    for verb in ("up", "down", "restart", "status", "health", "logs", "clean", "ensure", "start", "stop", "run",
                 "hardware", "plan", "image"):
        assert verb in out, verb


def test_absent_accelerator_fails_before_starting_anything(no_gpu, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VLMSERVE_STATE_DIR", str(tmp_path))
    result = runner.invoke(orchestrator_cli.app, ["up", "--accelerator", "cuda", "--repo", str(tmp_path)])
    assert result.exit_code == 1
    assert "no NVIDIA GPU was found" in result.output and "--fallback" in result.output
    assert not (tmp_path / "run").exists()


def test_hardware_command_without_gpu(no_gpu) -> None:
    result = runner.invoke(orchestrator_cli.app, ["hardware"])
    assert result.exit_code == 0
    assert "no GPU detected" in result.output and "accelerator: cpu  image: vlmserve:cpu" in result.output
    fallback = runner.invoke(orchestrator_cli.app, ["hardware", "--accelerator", "rocm", "--fallback"])
    assert fallback.exit_code == 0 and "falling back to CPU" in fallback.output


def test_plan_command_shows_budgets_and_rejects_overcommit(monkeypatch, tmp_path: Path, repo: Path) -> None:
    monkeypatch.setattr(hardware, "detect", lambda **kw: H100)
    # Without --render: a dry run that names each budget's knob and writes nothing.
    dry = runner.invoke(orchestrator_cli.app, ["plan", "--plan", str(EXAMPLE_PLAN), "--repo", str(repo)],
                        terminal_width=250)
    assert dry.exit_code == 0, dry.output
    assert "gpu_mem_limit" in dry.output and "dry run: --render writes" in dry.output
    assert not list(repo.glob("*/configs/vlmserve-plan.pbtxt"))
    ok = runner.invoke(orchestrator_cli.app, ["plan", "--plan", str(EXAMPLE_PLAN), "--repo", str(repo), "--render"])
    assert ok.exit_code == 0, ok.output
    assert "vllm" in ok.output and "florence2" in ok.output and "0.55" in ok.output
    assert "tritonserver --model-config-name=vlmserve-plan --model-load-gpu-limit=0:0.800" in ok.output
    assert "vllm: --gpu-memory-utilization 0.55" in ok.output
    assert len(list(repo.glob("*/configs/vlmserve-plan.pbtxt"))) == len(list(repo.glob("*/config.pbtxt")))
    bad = runner.invoke(orchestrator_cli.app, ["plan", "--plan", str(EXAMPLE_PLAN), "--budget", "florence2=0.5"])
    assert bad.exit_code == 1 and "1.05" in bad.output and "0.95" in bad.output


def test_status_with_nothing_running(no_gpu, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VLMSERVE_STATE_DIR", str(tmp_path))
    result = runner.invoke(orchestrator_cli.app, ["status", "--launcher", "process", "--json"])
    assert result.exit_code == 3
    assert json.loads(result.stdout)["services"] == []
    logs = runner.invoke(orchestrator_cli.app, ["logs", "triton", "--launcher", "process"])
    assert logs.exit_code == 1 and "no log for triton" in logs.output


# -- the launcher table and the protocol the commands use ---------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeLauncher]:
    """A typed fake launcher registered in the table under "fake", the way a new launcher is added."""
    launcher = FakeLauncher("fake", rows=[{"service": "triton", "state": "running", "health": "healthy"}])
    LAUNCHERS["fake"] = launcher
    try:
        yield launcher
    finally:
        del LAUNCHERS["fake"]


def _protocol_methods() -> dict[str, list[str]]:
    return {name: list(inspect.signature(member).parameters)[1:] for name, member in vars(Launcher).items()
            if inspect.isfunction(member) and not name.startswith("_")}


def test_every_launcher_in_the_table_implements_the_protocol(tmp_path: Path) -> None:
    # mypy checks the same statically (the table is dict[str, LauncherFactory]); this checks what it cannot see:
    # each entry's name is its key, and the commands' keyword arguments reach each method.
    assert {"process", "docker"} <= set(LAUNCHERS)
    methods = _protocol_methods()
    assert {"up", "ensure", "run_foreground", "down", "status", "logs", "clean", "available", "active"} <= set(methods)
    for key, factory in LAUNCHERS.items():
        built = factory(settings(tmp_path), log=lambda _m: None, launch=None)
        assert built.name == key and isinstance(built.in_image, bool) and built.launch is None
        for name, params in methods.items():
            signature = inspect.signature(getattr(built, name))
            assert list(signature.parameters)[:len(params)] == params, (key, name, signature)
            assert all(p.default is not inspect.Parameter.empty for p in list(signature.parameters.values())[
                len(params):]), (key, name, signature)
    assert LAUNCHERS["docker"](settings(tmp_path)).in_image and not LAUNCHERS["process"](settings(tmp_path)).in_image


def test_the_commands_pick_the_launcher_from_the_table(fake: FakeLauncher, tmp_path: Path) -> None:
    env = {"VLMSERVE_STATE_DIR": str(tmp_path)}
    up = runner.invoke(orchestrator_cli.app, ["up", "--launcher", "fake", "--accelerator", "cpu", "--set", "tiny"],
                       env=env)
    assert up.exit_code == 0, up.output
    # Planned before the start (accelerator, image), then started with the options a detached supervisor repeats.
    assert fake.calls == [("up", ["--set", "tiny", "--accelerator", "cpu"])]
    assert fake.launch is not None and fake.launch.choice.accelerator == "cpu"
    assert fake.settings is not None and fake.settings.launcher == "fake"
    status = runner.invoke(orchestrator_cli.app, ["status", "--launcher", "fake", "--json"], env=env)
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["services"] == [
        {"service": "triton", "state": "running", "health": "healthy", "launcher": "fake"}]
    fake.calls.clear()
    for args in (["ensure"], ["restart"], ["logs", "gateway", "--tail", "5"], ["down"], ["clean", "--volumes"]):
        result = runner.invoke(orchestrator_cli.app, [*args, "--launcher", "fake", "--accelerator", "cpu"]
                               if args[0] in ("ensure", "restart") else [*args, "--launcher", "fake"], env=env)
        assert result.exit_code == 0, (args, result.output)
    assert fake.calls == [("ensure", ["--accelerator", "cpu"]), ("down", None), ("up", ["--accelerator", "cpu"]),
                          ("logs", ("gateway", False, 5)), ("down", None), ("clean", True)]
    # VLMSERVE_LAUNCHER chooses it too (up/ensure/restart); `run` runs what it is told and returns its exit code.
    fake.calls.clear()
    fake.exit_code = 3
    assert runner.invoke(orchestrator_cli.app, ["ensure", "--accelerator", "cpu"],
                         env={**env, "VLMSERVE_LAUNCHER": "fake"}).exit_code == 0
    assert runner.invoke(orchestrator_cli.app, ["run", "--launcher", "fake", "--accelerator", "cpu"],
                         env=env).exit_code == 3
    assert [verb for verb, _ in fake.calls] == ["ensure", "run_foreground"]


def test_a_launcher_error_is_one_line_and_exit_1(fake: FakeLauncher, tmp_path: Path) -> None:
    fake.error = StartupError("triton exited during startup")
    result = runner.invoke(orchestrator_cli.app, ["up", "--launcher", "fake", "--accelerator", "cpu"],
                           env={"VLMSERVE_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 1 and "error: triton exited during startup" in result.output


def test_an_unknown_launcher_is_an_error_listing_the_table(fake: FakeLauncher, tmp_path: Path) -> None:
    env = {"VLMSERVE_STATE_DIR": str(tmp_path)}
    result = runner.invoke(orchestrator_cli.app, ["down", "--launcher", "kubernetes"], env=env)
    assert result.exit_code == 2 and "unknown launcher 'kubernetes'" in result.output
    assert ", ".join(LAUNCHERS) in result.output and "fake" in result.output  # the table's keys, whatever they are
    from_env = runner.invoke(orchestrator_cli.app, ["up", "--accelerator", "cpu"],
                             env={**env, "VLMSERVE_LAUNCHER": "systemd"})
    assert from_env.exit_code == 2 and "unknown launcher 'systemd'" in from_env.output
    assert "VLMSERVE_LAUNCHER" in from_env.output and fake.calls == []


def test_help_names_launcher_and_hides_the_deprecated_runtime_flag() -> None:
    for verb in ("up", "run", "down", "status", "logs", "clean", "ensure", "restart"):
        out = runner.invoke(orchestrator_cli.app, [verb, "--help"], terminal_width=200).output
        assert "--launcher" in out and "process or docker" in out, verb
        assert "--runtime" not in out, verb


def test_the_deprecated_runtime_flag_and_variable_still_work_and_warn(fake: FakeLauncher, tmp_path: Path) -> None:
    env = {"VLMSERVE_STATE_DIR": str(tmp_path)}
    flag = runner.invoke(orchestrator_cli.app, ["up", "--runtime", "fake", "--accelerator", "cpu"], env=env)
    assert flag.exit_code == 0, flag.output
    assert flag.output.count("--runtime is deprecated: use --launcher") == 1
    old_env = runner.invoke(orchestrator_cli.app, ["up", "--accelerator", "cpu"],
                            env={**env, "VLMSERVE_RUNTIME": "fake"})
    assert old_env.exit_code == 0, old_env.output
    assert "VLMSERVE_RUNTIME is deprecated: set VLMSERVE_LAUNCHER instead" in old_env.output
    assert [verb for verb, _ in fake.calls] == ["up", "up"]
    # The new name wins over the old one; --launcher over --runtime.
    both = runner.invoke(orchestrator_cli.app, ["down", "--runtime", "fake", "--launcher", "kubernetes"], env=env)
    assert both.exit_code == 2 and "unknown launcher 'kubernetes'" in both.output
    assert deprecated_env({"VLMSERVE_RUNTIME": "docker", "VLMSERVE_LAUNCHER": "fake"}) == [
        "VLMSERVE_RUNTIME is deprecated: set VLMSERVE_LAUNCHER instead (VLMSERVE_LAUNCHER wins)"]
    assert deprecated_env({"VLMSERVE_LAUNCHER": "docker"}) == []


def test_the_launcher_setting_reads_its_old_name_too(monkeypatch) -> None:
    monkeypatch.delenv("VLMSERVE_LAUNCHER", raising=False)
    monkeypatch.setenv("VLMSERVE_RUNTIME", "docker")
    assert OrchestratorSettings().launcher == "docker"
    monkeypatch.setenv("VLMSERVE_LAUNCHER", "process")
    assert OrchestratorSettings().launcher == "process"  # the new name wins
    assert OrchestratorSettings(launcher="docker").launcher == "docker"  # options over the environment
    monkeypatch.delenv("VLMSERVE_RUNTIME")
    monkeypatch.delenv("VLMSERVE_LAUNCHER")
    assert OrchestratorSettings().launcher == "process"
