"""`vlmserve deploy swarm` on a real Docker Engine: two gateway+Triton replicas on the tiny SigLIP models behind
the nginx balancer, Locust load through it, one gateway and one Triton replica killed mid-load.

Checked: every request either succeeds or is refused cleanly (429/503 with Retry-After; nothing else, no
connection errors), Swarm reschedules both killed replicas, load spreads over all gateway replicas again
afterwards (per-replica request counts from each replica's own /metrics), the Triton replicas export the
series the Kubernetes HPA scales on, and the tear-down leaves nothing (the engine leaves swarm mode again
when this test put it there). The figures are printed (pytest -s) and written to the test's tmp folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from vlmserve.orchestrator.deploy import spec, swarm

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = Path(__file__).with_name("swarm_locustfile.py")
REPLICAS = 2
USERS = 4  # Locust users: at most this many requests are in flight when the replicas are killed
GATEWAY = spec.NAME + "-gateway"
TRITON = spec.NAME + "-triton"
MAX_LOAD_S = 300  # a bound only: the test stops Locust (SIGTERM) once it has seen what it checks

if importlib.util.find_spec("locust") is None:
    pytest.skip("locust is not installed: pip install -e '.[loadtest]'", allow_module_level=True)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    return subprocess.run([sys.executable, "-m", "vlmserve.orchestrator", "deploy", "swarm", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def wait_for(what: str, check, timeout_s: float, interval_s: float = 1.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")


def healthy(client, project: str, service: str) -> list[Any]:
    """The service's running containers, when there are REPLICAS of them and all report healthy."""
    found = swarm.running_containers(client, project, service)
    for c in found:
        c.reload()
    ok = [c for c in found if c.attrs["State"].get("Health", {}).get("Status") == "healthy"]
    return ok if len(ok) == REPLICAS == len(found) else []


def requests_served(container) -> float:
    """The gateway's own count of /embed_text requests (all statuses), from its /metrics."""
    text = swarm.scrape(container, spec.gateway_port())
    return sum(float(m) for m in re.findall(r'^vlmserve_requests_total\{[^}]*route="/embed_text"[^}]*\} (\S+)$',
                                             text, re.M))


def counts(client, project: str) -> dict[str, float]:
    return {c.name: requests_served(c) for c in swarm.running_containers(client, project, GATEWAY)}


def fetch_stored_file_on_every_gateway(client, project: str, lb: str) -> dict[str, int]:
    """Store an image through the balancer (/v1/predict, store_image on: it lands on one gateway replica), then
    fetch it from inside each gateway replica (its own /files/{key} on localhost): the replicas share the volume,
    so every one answers 200 (on a per-replica folder all but one would 404)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 120, 200)).save(buf, "PNG")
    stored = httpx.post(f"{lb}/v1/predict", data={"task": "caption", "max_new_tokens": "2"},
                        files={"file": ("x.png", buf.getvalue(), "image/png")}, timeout=120)
    assert stored.status_code == 200, stored.text
    key = stored.json()["output_image_url"].rsplit("/", 1)[1]
    fetch = ("import sys, urllib.request\n"
             "try:\n"
             f"    print(urllib.request.urlopen('http://127.0.0.1:{spec.gateway_port()}/files/{key}').status)\n"
             "except urllib.error.HTTPError as e:\n"
             "    print(e.code)\n")
    answers = {}
    for container in swarm.running_containers(client, project, GATEWAY):
        result = container.exec_run(["python", "-c", fetch])
        answers[container.name] = int(result.output.decode().strip().splitlines()[-1])
    assert len(answers) == REPLICAS and set(answers.values()) == {200}, answers
    return answers


def test_swarm_replicas_survive_a_killed_replica(docker_client, cpu_image: str, tiny_repo: Path,
                                                 tmp_path: Path) -> None:
    project = f"vlmk8s-e2e-{uuid.uuid4().hex[:6]}"
    port = free_port()
    lb = f"http://127.0.0.1:{port}"
    # The SigLIP models, and Florence-2 for /v1/predict's stored files: every replica (and every rescheduled
    # one) loads them in seconds.
    repo = tmp_path / "repository"
    for model in [*tiny_repo.glob("siglip_*"), *tiny_repo.glob("florence2*")]:
        shutil.copytree(model, repo / model.name)
    os.chmod(tmp_path, 0o755)
    swarm.build_lb_image(docker_client, log=lambda m: print(f"[lb] {m}"))
    had_gwbridge = swarm.has_gwbridge()
    initialised = swarm.ensure_swarm()
    figures: dict[str, Any] = {"replicas": REPLICAS}
    try:
        up = cli("--replicas", str(REPLICAS), "--repo", str(repo), "--port", str(port), "--project", project,
                 "--image", cpu_image, "--out", str(tmp_path / "stack"), "--up")
        assert up.returncode == 0, up.stdout + up.stderr
        start = time.monotonic()
        for service in (TRITON, GATEWAY):
            wait_for(f"{REPLICAS} healthy {service} replicas", lambda s=service: healthy(docker_client, project, s),
                     300)
        wait_for("an embedding through the balancer",
                 lambda: httpx.post(f"{lb}/embed_text", json={"texts": ["hi"]}, timeout=30).status_code == 200, 60)
        figures["startup_s"] = round(time.monotonic() - start, 1)
        figures["stored file fetched through"] = fetch_stored_file_on_every_gateway(docker_client, project, lb)

        records = tmp_path / "records.json"
        load_started = time.time()
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", lb, "-u", str(USERS),
             "-r", str(USERS), "-t", f"{MAX_LOAD_S}s", "--stop-timeout", "10", "--only-summary",
             "--exit-code-on-error", "0"],
            cwd=ROOT, env={**os.environ, "VLMSERVE_SWARM_RECORDS": str(records)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            # Load reaches every gateway replica before the kill.
            before = wait_for("load on every gateway replica",
                              lambda: (lambda c: c if len(c) == REPLICAS and all(v >= 5 for v in c.values())
                                       else None)(counts(docker_client, project)), 40)
            figures["per_gateway_before_kill"] = before
            old = {s: {c.id for c in swarm.running_containers(docker_client, project, s)} for s in (GATEWAY, TRITON)}
            victims = [swarm.running_containers(docker_client, project, s)[0] for s in (GATEWAY, TRITON)]
            killed_at = time.time()
            for victim in victims:
                victim.kill()
            figures["killed"] = [v.name for v in victims]

            def rescheduled() -> bool:
                for service in (GATEWAY, TRITON):
                    current = healthy(docker_client, project, service)
                    if not current or not {c.id for c in current} - old[service]:
                        return False
                return True

            wait_for("both killed replicas rescheduled and healthy", rescheduled, 120)
            figures["rescheduled_after_s"] = round(time.time() - killed_at, 1)

            # Load spreads over all gateway replicas again, the new one included.
            base = counts(docker_client, project)
            after = wait_for("load on every gateway replica after the reschedule",
                             lambda: (lambda c: c if set(c) == set(base) and
                                      all(c[n] - base[n] >= 5 for n in c) else None)(counts(docker_client, project)),
                             90)
            figures["per_gateway_after_reschedule"] = {n: after[n] - base[n] for n in after}
            new_gateway = (set(after) - set(before))
            assert new_gateway, "the rescheduled gateway replica got no load"
            triton_text = {c.name: swarm.scrape(c, spec.triton_ports()["metrics"])
                           for c in swarm.running_containers(docker_client, project, TRITON)}
            # A little more load on the recovered stack, then Locust stops (its quitting hook writes the records).
            wait_for("more requests after the reschedule",
                     lambda: sum(counts(docker_client, project).values()) - sum(after.values()) >= 20, 60)
        finally:
            locust.terminate()
            out, _ = locust.communicate(timeout=60)
        assert locust.returncode == 0, out[-3000:]
        figures["load_s"] = round(time.time() - load_started, 1)

        rows = json.loads(records.read_text())
        statuses: dict[str, int] = {}
        for _t, status, _ra, _body in rows:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        refused = [r for r in rows if r[1] in (429, 503)]
        unclean = [r for r in rows if r[1] != 200 and not (r[1] in (429, 503) and r[2])]
        # SIGKILL ends the gateway replica mid-write: a request it was answering at that instant can be cut after
        # the balancer relayed its headers (nginx cannot retry it then; IncompleteRead). Such a request is lost to
        # the kill, not to the stack: at most one per user, a transport error, when the kill lands.
        cut = [r for r in unclean if r[1] == 0 and killed_at - 1 <= r[0] <= killed_at + 2]
        lost = [r for r in unclean if r not in cut]
        figures["cut by the kill (in flight on the killed replica)"] = len(cut)
        figures["status_counts"] = statuses
        figures["requests"] = len(rows)
        bad_times = [r[0] for r in rows if r[1] != 200]
        figures["refusal_window_s"] = round(max(bad_times) - min(bad_times), 1) if bad_times else 0.0
        figures["refusals_after_kill_s"] = sorted({round(t - killed_at, 1) for t in bad_times})[:5]
        figures["triton_requests"] = {
            n: sum(float(v) for v in re.findall(r"^nv_inference_request_success\{[^}]*\} (\S+)$", t, re.M))
            for n, t in triton_text.items()}
        print("swarm figures:", json.dumps(figures, indent=1))
        (tmp_path / "figures.json").write_text(json.dumps(figures, indent=1))
        assert not lost, f"requests lost (neither 200 nor a clean 429/503 + Retry-After): {lost[:5]}"
        assert len(cut) <= USERS, cut
        assert statuses.get("200", 0) > 50, statuses
        assert all(r[3].startswith('{"error"') for r in refused), refused[:3]
        # The series the Triton HPA's adapter rule divides (docker/k8s/monitoring) are really exported.
        for text in triton_text.values():
            assert re.search(r"^nv_inference_queue_duration_us\{", text, re.M)
            assert re.search(r"^nv_inference_request_success\{", text, re.M)
    finally:
        down = cli("--project", project, "--down")
        left = swarm.leftovers(docker_client, project)
        for volume in docker_client.volumes.list(filters={"label": f"com.docker.stack.namespace={project}"}):
            volume.remove(force=True)  # the stored files' volume: kept by `docker stack rm`, as user data
        if initialised:
            swarm.leave_swarm(remove_gwbridge=not had_gwbridge)
    assert down.returncode == 0, down.stdout + down.stderr
    assert left == [], left
    assert swarm.swarm_active() is not initialised
    assert swarm.has_gwbridge() is had_gwbridge


# Run inside a Triton container: that replica's live stubs of one model and a direct inference on its own Triton
# (its loopback, not through any gateway), as JSON.
IN_TRITON = """
import json, sys, urllib.error, urllib.request
import psutil
from vlmserve.families.tensors import EmbedTextTensors
from vlmserve.orchestrator.heal import stubs_by_model
model, port = sys.argv[1], sys.argv[2]
server = next(p for p in psutil.process_iter(["name"]) if p.info["name"] == "tritonserver")
text = {"name": EmbedTextTensors.TEXT.name, "shape": [1, 1], "datatype": "BYTES", "data": ["hi"]}
body = json.dumps({"inputs": [text]}).encode()
request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer", body,
                                 {"Content-Type": "application/json"})
try:
    status = urllib.request.urlopen(request, timeout=30).status
except urllib.error.HTTPError as exc:
    status = exc.code
except OSError:
    status = 0
print(json.dumps({"stubs": sorted(stubs_by_model(server.pid).get(model, ())), "infer": status}))
"""


def replica_state(container, model: str) -> dict[str, Any]:
    result = container.exec_run(["python", "-c", IN_TRITON, model, str(spec.triton_ports()["http"])])
    assert result.exit_code == 0, result.output.decode()[-2000:]
    return dict(json.loads(result.output.decode().strip().splitlines()[-1]))


def test_swarm_heals_a_dead_stub_inside_one_triton_replica_while_the_other_answers(
        docker_client, cpu_image: str, tiny_repo: Path, tmp_path: Path) -> None:
    """Issue 23: the stub watcher beside each Triton (orchestrator/heal.py, run by the container entrypoint) reloads
    a model whose Python stub died in ITS replica; the other replica is never unloaded and answers throughout, and
    the balancer answers only 200 or 503 + Retry-After meanwhile."""
    project = f"vlmheal-e2e-{uuid.uuid4().hex[:6]}"
    port = free_port()
    lb = f"http://127.0.0.1:{port}"
    model = "siglip_embed_text"
    repo = tmp_path / "repository"
    for path in tiny_repo.glob("siglip_*"):
        shutil.copytree(path, repo / path.name)
    os.chmod(tmp_path, 0o755)
    swarm.build_lb_image(docker_client, log=lambda m: print(f"[lb] {m}"))
    had_gwbridge = swarm.has_gwbridge()
    initialised = swarm.ensure_swarm()
    figures: dict[str, Any] = {}
    try:
        up = cli("--replicas", str(REPLICAS), "--repo", str(repo), "--port", str(port), "--project", project,
                 "--image", cpu_image, "--out", str(tmp_path / "stack"), "--up")
        assert up.returncode == 0, up.stdout + up.stderr
        for service in (TRITON, GATEWAY):
            wait_for(f"{REPLICAS} healthy {service} replicas", lambda s=service: healthy(docker_client, project, s),
                     300)
        wait_for("an embedding through the balancer", lambda: httpx.post(
            f"{lb}/embed_text", json={"text": "hi", "model": model}, timeout=30).status_code == 200, 60)
        broken, other = swarm.running_containers(docker_client, project, TRITON)
        before = {c.name: replica_state(c, model) for c in (broken, other)}
        assert all(s["infer"] == 200 and len(s["stubs"]) == 1 for s in before.values()), before
        victim = before[broken.name]["stubs"][0]
        assert broken.exec_run(["python", "-c", f"import os; os.kill({victim}, 9)"]).exit_code == 0
        killed = time.monotonic()
        other_answers: list[int] = []
        balancer: dict[str, int] = {}

        def healed() -> bool:
            other_answers.append(replica_state(other, model)["infer"])
            r = httpx.post(f"{lb}/embed_text", json={"text": "during", "model": model}, timeout=30)
            assert r.status_code == 200 or (r.status_code == 503 and "retry-after" in r.headers), r.text
            balancer[str(r.status_code)] = balancer.get(str(r.status_code), 0) + 1
            now = replica_state(broken, model)
            return now["infer"] == 200 and len(now["stubs"]) == 1 and now["stubs"] != [victim]

        wait_for(f"{model} reloaded inside {broken.name}", healed, 120, interval_s=0.5)
        figures["healed_after_s"] = round(time.monotonic() - killed, 1)
        figures["other replica's answers meanwhile"] = other_answers
        figures["balancer answers meanwhile"] = balancer
        after_other = replica_state(other, model)
        logs = {c.name: c.logs().decode(errors="replace") for c in (broken, other)}
        print("swarm heal figures:", json.dumps(figures, indent=1))
        assert all(status == 200 for status in other_answers), other_answers
        assert after_other["stubs"] == before[other.name]["stubs"], "the healthy replica's model was reloaded"
        assert f"model {model} reloaded" in logs[broken.name], logs[broken.name][-3000:]
        assert f"model {model} reloaded" not in logs[other.name], logs[other.name][-3000:]
        wait_for("200 through the balancer after the heal", lambda: httpx.post(
            f"{lb}/embed_text", json={"text": "after", "model": model}, timeout=30).status_code == 200, 30)
    finally:
        down = cli("--project", project, "--down")
        left = swarm.leftovers(docker_client, project)
        if initialised:
            swarm.leave_swarm(remove_gwbridge=not had_gwbridge)
    assert down.returncode == 0, down.stdout + down.stderr
    assert left == [], left
