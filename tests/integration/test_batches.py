"""OpenAI's Batch API on the real stack, driven with the official ``openai`` SDK: a chat batch with good and bad
lines, an embeddings batch, validation failures, cancel, a SIGKILLed gateway resuming its batch, and interactive
requests served while a batch runs."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from vlmserve.orchestrator.ports import free_port

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def client(stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.gateway}/v1", api_key="unused", max_retries=0)


def chat_line(custom_id: str, text: str = "Say hi", max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    body = {"model": "smolvlm2", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **extra}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def upload(client: OpenAI, tmp_path: Path, lines: list[Any], name: str = "requests.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with path.open("rb") as handle:
        return client.files.create(file=handle, purpose="batch").id


def wait(client: OpenAI, batch_id: str, until: tuple[str, ...] = ("completed", "failed", "cancelled", "expired"),
         timeout_s: float = 180) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout_s}s")


def chat_batch_under_way(client: OpenAI, tmp_path: Path, lines: int, max_tokens: int, completed: int) -> Any:
    """A chat batch of ``lines`` stories, once at least ``completed`` of them are done."""
    rows = [chat_line(f"r{i}", f"Tell story {i}", max_tokens=max_tokens) for i in range(lines)]
    batch = client.batches.create(input_file_id=upload(client, tmp_path, rows), endpoint=CHAT,
                                  completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < completed and time.monotonic() < deadline:
        time.sleep(0.1)
    return batch


def jsonl(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    return [] if file_id is None else [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_chat_batch_good_and_bad_lines(client, tmp_path) -> None:
    lines = [chat_line("a"), chat_line("b", max_tokens=-1), chat_line("c", "Describe a cat", max_tokens=6),
             chat_line("d", stream=True), chat_line("e", model="gpt-nope")]
    file_id = upload(client, tmp_path, lines)
    assert client.files.retrieve(file_id).purpose == "batch"
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h",
                                  metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    done = wait(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 2, 3)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    output, errors = jsonl(client, done.output_file_id), jsonl(client, done.error_file_id)
    assert [x["custom_id"] for x in output] == ["a", "c"]
    for entry in output:
        assert entry["response"]["status_code"] == 200 and entry["error"] is None
        assert entry["response"]["body"]["object"] == "chat.completion"
        assert entry["response"]["body"]["usage"]["completion_tokens"] <= 6
    codes = {x["custom_id"]: x["response"]["status_code"] for x in errors}
    assert codes == {"b": 400, "d": 400, "e": 404}
    assert errors[0]["response"]["body"]["error"]["param"] == "max_tokens"
    # Listed, newest first, with the cursor the SDK pages by.
    assert any(b.id == batch.id for b in client.batches.list(limit=5))
    assert {f.purpose for f in client.files.list(purpose="batch_output")} == {"batch_output"}


def test_embeddings_batch(client, tmp_path) -> None:
    lines = [{"custom_id": f"t{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "siglip", "input": [f"a photo of thing {i}", "hello"]}} for i in range(6)]
    done = wait(client, client.batches.create(input_file_id=upload(client, tmp_path, lines),
                                              endpoint="/v1/embeddings", completion_window="24h").id)
    assert done.status == "completed" and done.request_counts.completed == 6
    output = jsonl(client, done.output_file_id)
    assert [x["custom_id"] for x in output] == [f"t{i}" for i in range(6)]
    direct = client.embeddings.create(model="siglip", input=["a photo of thing 3", "hello"])
    batched = output[3]["response"]["body"]["data"]
    assert [round(v, 5) for v in batched[0]["embedding"]] == [round(v, 5) for v in direct.data[0].embedding]


@pytest.mark.parametrize(("bad", "code"), [
    ("{not json", "invalid_json_line"),
    (chat_line("x") | {"url": "/v1/embeddings"}, "mismatched_url"),
    (chat_line("a"), "duplicate_custom_id"),
    ({"custom_id": "x", "method": "GET", "url": CHAT, "body": {}}, "invalid_request"),
    ({"method": "POST", "url": CHAT, "body": {}}, "missing_required_parameter"),
])
def test_validation_fails_the_batch_and_runs_nothing(client, tmp_path, bad, code) -> None:
    file_id = upload(client, tmp_path, [chat_line("a"), bad, chat_line("z")])
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert batch.status == "failed" and batch.failed_at
    assert [(e.code, e.line) for e in batch.errors.data] == [(code, 2)]
    assert batch.request_counts.total == 0 and batch.output_file_id is None
    time.sleep(1)  # nothing picks it up later either
    assert client.batches.retrieve(batch.id).status == "failed"


def test_bad_requests_change_nothing(client, tmp_path) -> None:
    before = len(client.batches.list(limit=100).data)
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=upload(client, tmp_path, [chat_line("a")]), endpoint="/v1/nope",
                              completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    # Over the stack's batch_max_file_bytes (1 MiB here): refused with OpenAI's error shape, nothing stored.
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.jsonl", b"x" * (1024 * 1024 + 1)), purpose="batch")
    assert caught.value.status_code == 413 and caught.value.body["code"] == "file_too_large"
    assert len(client.batches.list(limit=100).data) == before
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_cancel_keeps_finished_lines(client, tmp_path) -> None:
    # Far more lines than can finish before the cancel lands, however fast this host is.
    batch = chat_batch_under_way(client, tmp_path, 400, max_tokens=48, completed=2)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait(client, batch.id, until=("cancelled",))
    assert done.cancelled_at and done.cancelling_at
    output, errors = jsonl(client, done.output_file_id), jsonl(client, done.error_file_id)
    assert 2 <= len(output) < 400 and len(output) == done.request_counts.completed
    assert sorted(x["custom_id"] for x in output + errors) == sorted(f"r{i}" for i in range(400))
    assert {x["error"]["code"] for x in errors} == {"batch_cancelled"}
    # A finished batch stays as it is.
    assert client.batches.cancel(batch.id).status == "cancelled"
    # Its input may go now; the output stays readable.
    assert client.files.delete(done.input_file_id).deleted
    assert jsonl(client, done.output_file_id) == output


def test_interactive_requests_are_served_while_a_batch_runs(client, tmp_path) -> None:
    lines = [chat_line(f"r{i}", f"Tell story {i}", max_tokens=32) for i in range(400)]
    batch = client.batches.create(input_file_id=upload(client, tmp_path, lines), endpoint=CHAT,
                                  completion_window="24h")
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).status != "in_progress" and time.monotonic() < deadline:
        time.sleep(0.1)
    # The batch holds at most batch_share of the chat cap: interactive requests get in (no 429) and finish.
    for _ in range(3):
        reply = client.chat.completions.create(model="smolvlm2", max_tokens=4,
                                               messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].finish_reason in ("stop", "length")
    assert client.batches.retrieve(batch.id).status == "in_progress"  # the batch was still running meanwhile
    client.batches.cancel(batch.id)
    wait(client, batch.id, until=("cancelled",))


def _start_gateway(stack, storage: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "VLMSERVE_GATEWAY_PORT": str(port),
           "VLMSERVE_GATEWAY_TRITON_URL": stack.triton_http.removeprefix("http://"),
           "VLMSERVE_GATEWAY_TRITON_GRPC_URL": stack.triton_grpc, "VLMSERVE_GATEWAY_STORAGE_DIR": str(storage),
           "VLMSERVE_GATEWAY_BATCH_LEASE_S": "2", "VLMSERVE_GATEWAY_BATCH_POLL_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "vlmserve.gateway"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("the second gateway did not become ready")


def test_sigkill_mid_batch_loses_and_redoes_no_finished_line(stack, tmp_path) -> None:
    storage, port = tmp_path / "storage", free_port()
    gateway = _start_gateway(stack, storage, port)
    try:
        sdk = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        batch = chat_batch_under_way(sdk, tmp_path, 400, max_tokens=8, completed=5)
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(10)
        with sqlite3.connect(storage / "batches" / "batches.sqlite3") as db:
            before = dict(db.execute("SELECT custom_id, request_id FROM results WHERE batch_id = ?", (batch.id,)))
        assert 5 <= len(before) < 400
        gateway = _start_gateway(stack, storage, port)
        done = wait(sdk, batch.id, timeout_s=600)
        assert done.status == "completed" and done.request_counts.completed == 400
        output = jsonl(sdk, done.output_file_id)
        assert [x["custom_id"] for x in output] == [f"r{i}" for i in range(400)]  # each line exactly once
        after = {x["custom_id"]: x["response"]["request_id"] for x in output}
        assert {k: after[k] for k in before} == before  # the lines finished before the kill were not run again
    finally:
        gateway.kill()
        gateway.wait(10)
