"""The Batch API's own logic: input validation, the store's leases and retention, and batch priority (the
header, the chat PARAMETERS, the engine's queue order). The API itself is tested on the real stack
(tests/integration/test_batches.py)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from vlmserve.api.openai import GenerationParameters
from vlmserve.gateway.batches import BatchStore, Line, validate_input
from vlmserve.gateway.chat import with_priority
from vlmserve.gateway.limits import PRIORITY_HEADER, InFlightLimit, Interactive, batch_priority
from vlmserve.model_repository.chat import parse_params

CHAT = "/v1/chat/completions"


def write(tmp_path: Path, lines: list[object]) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def line(custom_id: str, url: str = CHAT) -> dict[str, object]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"messages": []}}


def test_valid_input_keeps_line_numbers_and_skips_blank_lines(tmp_path) -> None:
    lines, errors = validate_input(write(tmp_path, [line("a"), "", line("b")]), CHAT, 10)
    assert errors == []
    assert [(x.line, x.custom_id) for x in lines] == [(1, "a"), (3, "b")]


def test_every_bad_line_is_named_and_nothing_is_kept(tmp_path) -> None:
    lines, errors = validate_input(write(tmp_path, [line("a"), line("a"), "[1]", line("c", "/v1/embeddings")]),
                                   CHAT, 10)
    assert lines == []
    assert [(e["code"], e["line"]) for e in errors] == [
        ("duplicate_custom_id", 2), ("invalid_json_line", 3), ("mismatched_url", 4)]


def test_empty_and_oversized_inputs_fail(tmp_path) -> None:
    assert validate_input(write(tmp_path, [""]), CHAT, 10)[1][0]["code"] == "empty_file"
    lines, errors = validate_input(write(tmp_path, [line("a"), line("b"), line("c")]), CHAT, 2)
    assert errors[0]["code"] == "too_many_requests"


def _store_with_batch(tmp_path: Path) -> tuple[BatchStore, str]:
    store = BatchStore(tmp_path / "batches")
    store.root.mkdir(parents=True)
    source = write(tmp_path, [line("a"), line("b")])
    file_id = store.add_file(source, "in.jsonl", "batch", None)["id"]
    return store, store.add_batch(CHAT, file_id, "24h", None, 2, [])["id"]


def test_a_lease_is_held_until_it_runs_out(tmp_path) -> None:
    store, batch_id = _store_with_batch(tmp_path)
    assert store.claim("one", lease_s=0.3)["id"] == batch_id
    assert store.claim("two", lease_s=0.3) is None  # held by "one"
    assert store.renew(batch_id, "one", 0.3) == "validating"
    time.sleep(0.4)
    assert store.claim("two", lease_s=5)["id"] == batch_id  # "one" died: "two" takes over
    assert store.renew(batch_id, "one", 5) is None  # and "one" learns it lost it


def test_finished_lines_count_once_and_survive_a_new_store(tmp_path) -> None:
    store, batch_id = _store_with_batch(tmp_path)
    store.record(batch_id, Line(1, "a", {}), 200, {"ok": 1}, None, "req-1")
    store.record(batch_id, Line(1, "a", {}), 200, {"ok": 2}, None, "req-2")  # a second answer is ignored
    store.record(batch_id, Line(2, "b", {}), 400, {"error": {}}, None, "req-3")
    store.close()
    again = BatchStore(tmp_path / "batches")
    assert again.done_lines(batch_id) == {1, 2}
    assert again.batch(batch_id)["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert [r["request_id"] for r in again.results(batch_id)] == ["req-1", "req-3"]


def test_retention_removes_finished_batches_and_their_files_only(tmp_path) -> None:
    store, batch_id = _store_with_batch(tmp_path)
    input_id = store.batch(batch_id)["input_file_id"]
    assert store.sweep(max_age_s=0, now=time.time() + 10) == 0  # still active: kept, input included
    store.set_status(batch_id, "completed")
    assert store.sweep(max_age_s=3600) == 0  # finished just now
    assert store.sweep(max_age_s=3600, now=time.time() + 7200) == 2  # the batch and its input file
    assert store.batch(batch_id) is None and store.file(input_id) is None
    assert not store.file_path(input_id).exists()


def test_the_priority_header_marks_the_request_and_its_chat_parameters() -> None:
    seen: list[bool] = []

    async def app(scope, receive, send) -> None:
        seen.append(batch_priority.get())
        seen.append(with_priority(GenerationParameters(max_tokens=2)).priority == "batch")

    interactive = Interactive()
    limit = InFlightLimit(app, {"chat": 4}, {CHAT: "chat"}, retry_after_s=1, interactive=interactive)
    for headers in ([(PRIORITY_HEADER, b"batch")], [(PRIORITY_HEADER, b"urgent")], []):
        scope = {"type": "http", "path": CHAT, "method": "POST", "headers": headers}
        asyncio.run(limit(scope, None, None))
        if headers == [(PRIORITY_HEADER, b"batch")]:
            assert not interactive.busy("chat", quiet_s=60)  # a batch request is not interactive traffic
    assert seen == [True, True, False, False, False, False]
    assert interactive.busy("chat", quiet_s=60) and not interactive.busy("chat", quiet_s=0)
    assert not interactive.busy("embeddings", quiet_s=60)


def test_the_model_reads_the_priority_and_refuses_unknown_ones() -> None:
    assert parse_params(b'{"priority": "batch"}', 8, 64).priority == "batch"
    assert parse_params(b"{}", 8, 64).priority == "interactive"
    with pytest.raises(Exception, match="priority"):
        parse_params(b'{"priority": "urgent"}', 8, 64)


def test_a_batch_past_its_window_expires_keeping_what_finished(tmp_path) -> None:
    """A line that gets 200 is kept; lines that only ever get 503 (a model that never loads) are retried until the
    window closes; then the batch is ``expired`` and every line is in the output or the error file."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from vlmserve.gateway.batches import BatchRunner
    from vlmserve.gateway.settings import GatewaySettings

    app = FastAPI()
    app.state.interactive = Interactive()
    calls: list[str] = []

    @app.post("/v1/embeddings")
    async def embeddings(body: dict) -> JSONResponse:
        calls.append(body["input"])
        if body["input"] == "ok":
            return JSONResponse({"object": "list", "data": []})
        return JSONResponse({"error": {"message": "loading"}}, 503, headers={"Retry-After": "0"})

    settings = GatewaySettings(batch_dir=str(tmp_path / "batches"), batch_lease_s=0.6)
    store = BatchStore(tmp_path / "batches")
    store.root.mkdir(parents=True)
    lines = [{"custom_id": name, "method": "POST", "url": "/v1/embeddings", "body": {"input": name}}
             for name in ("ok", "never-1", "never-2")]
    file_id = store.add_file(write(tmp_path, lines), "in.jsonl", "batch", None)["id"]
    batch_id = store.add_batch("/v1/embeddings", file_id, "24h", None, 3, [])["id"]
    # A window of 2-3 s (whole seconds, as stored): several retries of the 503s before it closes.
    store.set_status(batch_id, "validating", only_from=("validating",), expires_at=int(time.time()) + 3)

    async def run() -> None:
        runner = BatchRunner(store, app, settings)
        await runner.run(store.claim(runner.owner, runner.lease_s))
        await runner.client.aclose()

    asyncio.run(run())
    batch = store.batch(batch_id)
    assert batch["status"] == "expired" and batch["expired_at"]
    assert calls.count("ok") == 1 and calls.count("never-1") > 1  # retried, not failed at the first 503
    output = [json.loads(x) for x in store.file_path(batch["output_file_id"]).read_text().splitlines()]
    errors = [json.loads(x) for x in store.file_path(batch["error_file_id"]).read_text().splitlines()]
    assert [x["custom_id"] for x in output] == ["ok"]
    assert sorted(x["custom_id"] for x in errors) == ["never-1", "never-2"]
    assert all((x["response"] or {}).get("status_code") == 503 or x["error"]["code"] == "batch_expired"
               for x in errors)


def test_a_batch_cancelled_before_it_ran_runs_nothing(tmp_path) -> None:
    from fastapi import FastAPI

    from vlmserve.gateway.batches import BatchRunner
    from vlmserve.gateway.settings import GatewaySettings

    app = FastAPI()
    app.state.interactive = Interactive()
    calls: list[dict] = []

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> dict:
        calls.append(body)
        return {}

    store, batch_id = _store_with_batch(tmp_path)
    assert store.cancel(batch_id)["status"] == "cancelling"

    async def run() -> None:
        runner = BatchRunner(store, app, GatewaySettings(batch_dir=str(store.root)))
        await runner.run(store.claim(runner.owner, runner.lease_s))
        await runner.client.aclose()

    asyncio.run(run())
    batch = store.batch(batch_id)
    assert batch["status"] == "cancelled" and calls == [] and batch["output_file_id"] is None
    errors = store.file_path(batch["error_file_id"]).read_text().splitlines()
    assert [json.loads(x)["error"]["code"] for x in errors] == ["batch_cancelled", "batch_cancelled"]


def test_a_cancel_waits_for_the_results_being_written(tmp_path) -> None:
    """A cancel that lands while a line's result is still being committed (a slow disk: the write runs in a thread
    that cancelling its worker cannot stop) finalizes only after that write: the output file holds every line that
    request_counts counts, and output + errors name each line once."""
    from fastapi import FastAPI

    from vlmserve.gateway.batches import BatchRunner
    from vlmserve.gateway.settings import GatewaySettings

    class SlowDisk(BatchStore):
        def record(self, batch_id, *args) -> None:  # type: ignore[no-untyped-def]
            self.cancel(batch_id)  # the first write asks for the cancel (later ones find it asked), then takes its time
            time.sleep(0.8)
            super().record(batch_id, *args)

    app = FastAPI()
    app.state.interactive = Interactive()

    @app.post("/v1/embeddings")
    async def embeddings(body: dict) -> dict:
        return {"object": "list", "data": [], "input": body["input"]}

    store = SlowDisk(tmp_path / "batches")
    store.root.mkdir(parents=True)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings", "body": {"input": f"r{i}"}}
             for i in range(40)]
    file_id = store.add_file(write(tmp_path, lines), "in.jsonl", "batch", None)["id"]
    batch_id = store.add_batch("/v1/embeddings", file_id, "24h", None, len(lines), [])["id"]

    async def run() -> None:
        # Two lines at a time (the writes must leave the default thread pool free for the lease's renewal).
        settings = GatewaySettings(batch_dir=str(store.root), batch_lease_s=0.6, max_inflight_embeddings=4)
        runner = BatchRunner(store, app, settings)
        assert runner.concurrency("/v1/embeddings") == 2  # both are being written when the cancel lands
        await runner.run(store.claim(runner.owner, runner.lease_s))
        await runner.client.aclose()

    asyncio.run(run())
    batch = store.batch(batch_id)
    assert batch["status"] == "cancelled" and batch["request_counts"]["completed"] == 2
    assert batch["output_file_id"], "the lines being written when the cancel landed are missing from the output"
    output = [json.loads(x) for x in store.file_path(batch["output_file_id"]).read_text().splitlines()]
    errors = [json.loads(x) for x in store.file_path(batch["error_file_id"]).read_text().splitlines()]
    assert 1 <= len(output) < len(lines) and len(output) == batch["request_counts"]["completed"]
    assert sorted(x["custom_id"] for x in output + errors) == sorted(f"r{i}" for i in range(len(lines)))
    assert {x["error"]["code"] for x in errors} == {"batch_cancelled"}
