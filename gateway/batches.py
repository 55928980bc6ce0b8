"""OpenAI's Batch API: uploaded files, batches and the runner that works through them.

State lives in one SQLite database beside the files, in ``<storage dir>/batches`` (``batch_dir`` overrides it):
the storage dir is the volume every replica of a multi-replica deployment shares, so any gateway replica serves
any batch. A batch is worked by one replica at a time, the one holding its lease (``owner``, ``lease_until``,
renewed while it runs); a replica that dies leaves the lease to run out, and the next runner to look takes the
batch over. Every finished line is committed to the database as it finishes, so a restart (SIGKILL included)
loses no finished line and redoes none: only the lines that were in flight run again.

The lines run through the gateway's own app, in-process (``httpx.ASGITransport``): the same validation, limits
and answers as the public route, with the header ``X-Vlmserve-Priority: batch``. That header lowers the request
below interactive traffic (``vlmserve.gateway.limits.batch_priority``): Triton's dynamic batchers queue it behind
interactive requests and the chat engine admits interactive rows first. A batch runs at most
``batch_share`` of its route group's in-flight cap at once, and one line at a time while the group has
interactive requests in progress or had one in the last ``batch_yield_s`` (the gateway's own CPU, parsing and
encoding, is shared too: on the tiny models it, not Triton, is what a busy batch takes from interactive requests).
A 429/503 (the caps are full of interactive work, a model is loading) is retried after its Retry-After, until
the batch expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from vlmserve import telemetry
from vlmserve.gateway.errors import APIError, error_body
from vlmserve.gateway.limits import Interactive
from vlmserve.gateway.settings import GatewaySettings

log = logging.getLogger("vlmserve.gateway")

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/embeddings": "embeddings", "/v1/completions": "chat"}
PRIORITY_HEADER = "X-Vlmserve-Priority"
WINDOWS = {"24h": 24 * 3600}
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("failed", "completed", "expired", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL,
    status TEXT NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER, total INTEGER NOT NULL DEFAULT 0,
    metadata TEXT, errors TEXT, output_file_id TEXT, error_file_id TEXT,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER, expired_at INTEGER,
    cancelling_at INTEGER, cancelled_at INTEGER, owner TEXT, lease_until REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, status_code INTEGER,
    body TEXT, error TEXT, request_id TEXT NOT NULL, PRIMARY KEY (batch_id, line)
);
"""
_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
          "cancelled_at")


def batch_root(settings: GatewaySettings) -> Path:
    """Where batch state and files live: ``batch_dir``, else ``<storage dir>/batches`` (the storage dir is the
    shared volume of a multi-replica deployment), else ``<state dir>/storage/batches``."""
    if settings.batch_dir:
        return Path(settings.batch_dir)
    if settings.storage_dir:
        return Path(settings.storage_dir) / "batches"
    from vlmserve.paths import state_dir

    return state_dir() / "storage" / "batches"


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _line_id() -> str:
    """A line's request id: OpenAI's ``batch_req_`` shape, and the X-Request-ID of the line's request."""
    return _new_id("batch_req_")


@dataclass(frozen=True)
class Line:
    """One validated request line of an input file (``line`` counts from 1, as OpenAI's errors do)."""

    line: int
    custom_id: str
    body: dict[str, Any]


class BatchStore:
    """Files and batches in SQLite (one connection, serialised: every call is short and runs in a thread)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                (self.root / "files").mkdir(parents=True, exist_ok=True)
                # Rollback journal, not WAL: WAL needs shared memory, which a shared network volume lacks.
                db = sqlite3.connect(self.root / "batches.sqlite3", timeout=30, check_same_thread=False,
                                     isolation_level=None)
                db.row_factory = sqlite3.Row
                db.executescript(_SCHEMA)
                self._db = db
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @property
    def exists(self) -> bool:
        """Whether any file or batch was ever stored here (until then, nothing is created on disk)."""
        return (self.root / "batches.sqlite3").exists()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # --- files ---------------------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.root / "files" / file_id

    def add_file(self, source: Path, filename: str, purpose: str, expires_at: int | None) -> dict[str, Any]:
        """Move the finished upload (or output) ``source`` into the store under a new id."""
        file_id = _new_id("file-")
        size = source.stat().st_size
        with self._tx() as db:
            os.replace(source, self.file_path(file_id))
            db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                       (file_id, filename, purpose, size, int(time.time()), expires_at))
        return self.file(file_id) or {}

    def file(self, file_id: str) -> dict[str, Any] | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return None if row is None else _file_object(row)

    def files(self, purpose: str | None, order: str, limit: int, after: str | None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM files WHERE 1", []
        if purpose:
            sql, args = sql + " AND purpose = ?", [purpose]
        direction = "ASC" if order == "asc" else "DESC"
        if after:
            sql += (f" AND (created_at, id) {'>' if direction == 'ASC' else '<'} "
                    "(SELECT created_at, id FROM files WHERE id = ?)")
            args.append(after)
        sql += f" ORDER BY created_at {direction}, id {direction} LIMIT ?"
        with self._tx() as db:
            return [_file_object(r) for r in db.execute(sql, (*args, limit)).fetchall()]

    def delete_file(self, file_id: str) -> bool:
        with self._tx() as db:
            used = db.execute(f"SELECT 1 FROM batches WHERE input_file_id = ? AND status IN {ACTIVE}",
                              (file_id,)).fetchone()
            if used:
                raise APIError(409, f"file {file_id} is the input of a batch in progress; cancel the batch first",
                               code="file_in_use", param="file_id")
            gone = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        self.file_path(file_id).unlink(missing_ok=True)
        return bool(gone)

    # --- batches -------------------------------------------------------------------------------------------

    def add_batch(self, endpoint: str, input_file_id: str, window: str, metadata: dict[str, str] | None,
                  total: int, errors: list[dict[str, Any]]) -> dict[str, Any]:
        now = int(time.time())
        batch_id = _new_id("batch_")
        failed = bool(errors)
        with self._tx() as db:
            db.execute(
                "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, created_at, "
                "expires_at, total, metadata, errors, failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (batch_id, endpoint, input_file_id, window, "failed" if failed else "validating", now,
                 now + WINDOWS[window], 0 if failed else total, json.dumps(metadata) if metadata else None,
                 json.dumps(errors) if failed else None, now if failed else None))
        return self.batch(batch_id) or {}

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
            return None if row is None else _batch_object(db, row)

    def batches(self, limit: int, after: str | None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM batches", []
        if after:
            sql += " WHERE (created_at, id) < (SELECT created_at, id FROM batches WHERE id = ?)"
            args.append(after)
        with self._tx() as db:
            rows = db.execute(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit)).fetchall()
            return [_batch_object(db, r) for r in rows]

    def cancel(self, batch_id: str) -> dict[str, Any] | None:
        """``in_progress``/``validating`` → ``cancelling`` (its runner stops new work and finalises); a batch in a
        final state stays as it is (OpenAI answers the batch as it is)."""
        with self._tx() as db:
            db.execute("UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ? "
                       "AND status IN ('validating', 'in_progress')", (int(time.time()), batch_id))
        return self.batch(batch_id)

    def claim(self, owner: str, lease_s: float) -> dict[str, Any] | None:
        """Take the oldest active batch nobody holds (or whose holder's lease ran out), for ``lease_s``."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(f"SELECT * FROM batches WHERE status IN {ACTIVE} AND (owner IS NULL OR owner = ? "
                             "OR lease_until < ?) ORDER BY created_at, id LIMIT 1", (owner, now)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE batches SET owner = ?, lease_until = ? WHERE id = ?", (owner, now + lease_s, row["id"]))
            return dict(row)

    def renew(self, batch_id: str, owner: str, lease_s: float) -> str | None:
        """Extend the lease; returns the batch's status, None if the lease was lost (another replica took it)."""
        with self._tx() as db:
            row = db.execute("SELECT status, owner FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None or row["owner"] != owner:
                return None
            db.execute("UPDATE batches SET lease_until = ? WHERE id = ?", (time.time() + lease_s, batch_id))
            return str(row["status"])

    def set_status(self, batch_id: str, status: str, *, only_from: tuple[str, ...] = ACTIVE, **fields: Any) -> None:
        column = f"{status}_at"
        stamp = {column: int(time.time())} if column in _TIMES else {}
        values = {"status": status, **stamp, **fields}
        assigns = ", ".join(f"{k} = ?" for k in values)
        with self._tx() as db:
            db.execute(f"UPDATE batches SET {assigns} WHERE id = ? AND status IN ({','.join('?' * len(only_from))})",
                       (*values.values(), batch_id, *only_from))

    def done_lines(self, batch_id: str) -> set[int]:
        with self._tx() as db:
            return {r[0] for r in db.execute("SELECT line FROM results WHERE batch_id = ?", (batch_id,))}

    def record(self, batch_id: str, line: Line, status_code: int | None, body: Any, error: dict[str, Any] | None,
               request_id: str) -> None:
        """One finished line, committed at once (a restart never redoes it)."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (batch_id, line.line, line.custom_id, status_code,
                        None if body is None else json.dumps(body), None if error is None else json.dumps(error),
                        request_id))

    def results(self, batch_id: str) -> list[sqlite3.Row]:
        with self._tx() as db:
            return db.execute("SELECT * FROM results WHERE batch_id = ? ORDER BY line", (batch_id,)).fetchall()

    def sweep(self, max_age_s: float | None, now: float | None = None) -> int:
        """Retention, as the stored images': batches finished more than ``max_age_s`` ago go, with their input,
        output and error files and their lines; so do files past their ``expires_at`` that no active batch
        reads. Returns how many batches and files were removed."""
        now = time.time() if now is None else now
        removed = 0
        with self._tx() as db:
            doomed_files: list[str] = []
            if max_age_s is not None:
                old = db.execute(
                    f"SELECT * FROM batches WHERE status IN {TERMINAL} AND COALESCE(completed_at, failed_at, "
                    "expired_at, cancelled_at, created_at) < ?", (now - max_age_s,)).fetchall()
                for row in old:
                    doomed_files += [f for f in (row["input_file_id"], row["output_file_id"], row["error_file_id"])
                                     if f]
                    db.execute("DELETE FROM results WHERE batch_id = ?", (row["id"],))
                    db.execute("DELETE FROM batches WHERE id = ?", (row["id"],))
                removed += len(old)
            doomed_files += [r[0] for r in db.execute(
                f"SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at < ? AND id NOT IN "
                f"(SELECT input_file_id FROM batches WHERE status IN {ACTIVE})", (now,))]
            for file_id in set(doomed_files):
                removed += db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
                self.file_path(file_id).unlink(missing_ok=True)
        return removed


def _file_object(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "expires_at": row["expires_at"], "filename": row["filename"], "purpose": row["purpose"],
            "status": "processed", "status_details": None}


def _batch_object(db: sqlite3.Connection, row: sqlite3.Row) -> dict[str, Any]:
    counts = db.execute("SELECT COUNT(*), SUM(status_code BETWEEN 200 AND 299) FROM results WHERE batch_id = ?",
                        (row["id"],)).fetchone()
    finished, ok = counts[0] or 0, counts[1] or 0
    errors = json.loads(row["errors"]) if row["errors"] else None
    return {
        "id": row["id"], "object": "batch", "endpoint": row["endpoint"],
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
        "status": row["status"], "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
        "created_at": row["created_at"], "expires_at": row["expires_at"],
        **{k: row[k] for k in _TIMES},
        "request_counts": {"total": row["total"], "completed": ok, "failed": finished - ok},
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
    }


# --- validation ------------------------------------------------------------------------------------------------

def validate_input(path: Path, endpoint: str, max_requests: int) -> tuple[list[Line], list[dict[str, Any]]]:
    """The input file's lines, or OpenAI's validation errors (``code``, ``message``, ``line``, ``param``) when any
    line is malformed: then nothing runs. A line's *body* is not checked here: the route checks it when the
    line runs, and a bad one fails only its own line."""
    lines: list[Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def fail(code: str, message: str, line: int | None = None, param: str | None = None) -> None:
        if len(errors) < 100:
            errors.append({"code": code, "message": message, "param": param, "line": line})

    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except (UnicodeDecodeError, ValueError):
                fail("invalid_json_line", f"line {number} is not valid JSON", number)
                continue
            if not isinstance(item, dict):
                fail("invalid_json_line", f"line {number} is not a JSON object", number)
                continue
            custom_id, method, url, body = (item.get(k) for k in ("custom_id", "method", "url", "body"))
            if not isinstance(custom_id, str) or not custom_id:
                fail("missing_required_parameter", "custom_id must be a non-empty string", number, "custom_id")
            elif custom_id in seen:
                fail("duplicate_custom_id", f"custom_id {custom_id!r} appears more than once", number, "custom_id")
            if method != "POST":
                fail("invalid_request", f"method must be POST, got {method!r}", number, "method")
            if url != endpoint:
                fail("mismatched_url", f"url {url!r} does not match the batch's endpoint {endpoint}", number, "url")
            if not isinstance(body, dict):
                fail("missing_required_parameter", "body must be a JSON object (the request)", number, "body")
            if isinstance(custom_id, str) and custom_id:
                seen.add(custom_id)
            if not errors and isinstance(body, dict):
                lines.append(Line(number, str(custom_id), body))
    if not lines and not errors:
        fail("empty_file", "the input file holds no requests")
    if len(lines) > max_requests:
        fail("too_many_requests", f"the input file holds {len(lines)} requests; at most {max_requests} per batch")
    return ([] if errors else lines), errors


# --- the runner ------------------------------------------------------------------------------------------------

class BatchRunner:
    """Works through the active batches, one at a time per gateway, in the background of the app."""

    def __init__(self, store: BatchStore, app: Any, settings: GatewaySettings) -> None:
        self.store = store
        self.settings = settings
        self.owner = uuid.uuid4().hex
        self.lease_s = settings.batch_lease_s
        headers = {PRIORITY_HEADER: "batch"}
        if settings.api_keys:
            headers["Authorization"] = f"Bearer {settings.api_keys[0]}"
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://batch.internal",
                                        headers=headers, timeout=None)
        self.wake = asyncio.Event()
        self.interactive: Interactive = app.state.interactive
        self._writes: set[asyncio.Future[None]] = set()  # lines' results being committed (see _record)

    def concurrency(self, endpoint: str) -> int:
        cap = self.settings.inflight_caps()[ENDPOINTS[endpoint]]
        return max(1, int(cap * self.settings.batch_share))

    async def run_forever(self) -> None:
        last_sweep = 0.0
        while True:
            try:
                if self.store.exists:  # nothing on disk until a first upload
                    if time.monotonic() - last_sweep > self.settings.storage_sweep_s:
                        last_sweep = time.monotonic()
                        removed = await asyncio.to_thread(self.store.sweep, self.settings.storage_max_age_s)
                        if removed:
                            log.info("batch retention removed %d batch(es)/file(s)", removed)
                    batch = await asyncio.to_thread(self.store.claim, self.owner, self.lease_s)
                    if batch is not None:
                        await self.run(batch)
                        continue
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the runner must outlive any one batch's trouble
                log.exception("batch runner: unexpected error; retrying shortly")
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.settings.batch_poll_s)

    async def close(self) -> None:
        await self.client.aclose()
        await asyncio.to_thread(self.store.close)

    async def run(self, batch: dict[str, Any]) -> None:
        batch_id, endpoint = batch["id"], batch["endpoint"]
        lines, _ = await asyncio.to_thread(validate_input, self.store.file_path(batch["input_file_id"]), endpoint,
                                           self.settings.batch_max_requests)
        done = await asyncio.to_thread(self.store.done_lines, batch_id)
        todo = [line for line in lines if line.line not in done]
        if batch["status"] == "validating":
            await asyncio.to_thread(self.store.set_status, batch_id, "in_progress", only_from=("validating",))
        if done:
            log.info("batch %s: resuming, %d of %d lines already done", batch_id, len(done), len(lines))
        if batch["status"] in ("cancelling", "finalizing"):  # cancelled before it ran, or its runner died finalizing
            status: str | None = "cancelled" if batch["status"] == "cancelling" else "completed"
        else:
            status = await self._work(batch_id, endpoint, todo, batch["expires_at"])
        if status is None:
            return  # lease lost: another replica finishes it
        await self._finalize(batch_id, lines, status)

    async def _work(self, batch_id: str, endpoint: str, todo: list[Line], expires_at: int) -> str | None:
        """Run ``todo`` at the batch's concurrency, renewing the lease; returns the batch's final status
        (``completed``, ``cancelled``, ``expired``), or None if the lease was lost."""
        queue: asyncio.Queue[Line] = asyncio.Queue()
        for line in todo:
            queue.put_nowait(line)

        group = ENDPOINTS[endpoint]

        async def worker(index: int) -> None:
            while not queue.empty():
                # Interactive traffic in the group: every worker but the first waits until it has been quiet.
                while index and self.interactive.busy(group, self.settings.batch_yield_s):
                    await asyncio.sleep(0.05)
                if queue.empty():
                    return
                line = queue.get_nowait()
                await self._run_line(batch_id, endpoint, line, expires_at)

        workers = [asyncio.create_task(worker(i)) for i in range(min(self.concurrency(endpoint), len(todo)) or 1)]
        outcome: str | None = "completed"
        try:
            while not all(w.done() for w in workers):
                await asyncio.wait(workers, timeout=min(1.0, self.lease_s / 3))
                status = await asyncio.to_thread(self.store.renew, batch_id, self.owner, self.lease_s)
                if status is None:
                    outcome = None
                    break
                if status == "cancelling":
                    outcome = "cancelled"
                    break
                if time.time() > expires_at:
                    outcome = "expired"
                    break
            for w in workers:
                if w.done() and not w.cancelled() and w.exception() is not None:
                    raise w.exception()  # type: ignore[misc]
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            # A cancelled worker leaves its result's write running in its thread: wait for every one, so the
            # output files written next hold every line that request_counts counts.
            await asyncio.gather(*self._writes, return_exceptions=True)
        return outcome

    async def _record(self, *args: Any) -> None:
        """Commit one line's result (``BatchStore.record``). The write runs to its end even when the line's worker
        is cancelled (a thread cannot be stopped), and :meth:`_work` waits for it before the batch is finalized."""
        write = asyncio.ensure_future(asyncio.to_thread(self.store.record, *args))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        await asyncio.shield(write)

    async def _run_line(self, batch_id: str, endpoint: str, line: Line, expires_at: int) -> None:
        request_id = _line_id()
        telemetry.current.set(telemetry.RequestContext(request_id))  # this line's id in the bodies made here
        if line.body.get("stream"):
            await self._record(batch_id, line, 400, error_body(
                400, "streaming is not supported inside a batch: drop 'stream'", "invalid_request", "stream"),
                None, request_id)
            return
        while True:
            # The line's id is its request id in the gateway's and the models' logs and traces too.
            response = await self.client.post(endpoint, json=line.body,
                                              headers={telemetry.REQUEST_ID_HEADER: request_id})
            if response.status_code in (429, 503) and time.time() < expires_at:
                # The caps are full of interactive work, or a model is loading: the line waits, it did not fail.
                delay = float(response.headers.get("Retry-After") or self.settings.retry_after_s)
                await asyncio.sleep(min(max(delay, 0.2), 10.0))
                continue
            break
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"message": response.text[:500], "type": "server_error"}}
        await self._record(batch_id, line, response.status_code, body, None, request_id)

    async def _finalize(self, batch_id: str, lines: list[Line], status: str) -> None:
        if status == "completed":
            await asyncio.to_thread(self.store.set_status, batch_id, "finalizing", only_from=("in_progress",))
        output, errors = await asyncio.to_thread(self._write_outputs, batch_id, lines, status)
        await asyncio.to_thread(self.store.set_status, batch_id, status, output_file_id=output,
                                error_file_id=errors, owner=None)
        log.info("batch %s %s", batch_id, status)

    def _write_outputs(self, batch_id: str, lines: list[Line], status: str) -> tuple[str | None, str | None]:
        """The output file (2xx answers) and the error file (the rest, and the lines that never ran: cancelled
        or expired), in input order: together one line per input line."""
        results = {r["line"]: r for r in self.store.results(batch_id)}
        ok: list[str] = []
        failed: list[str] = []
        for line in lines:
            row = results.get(line.line)
            entry: dict[str, Any]
            if row is None:
                code = "batch_cancelled" if status == "cancelled" else "batch_expired"
                entry = {"id": _line_id(), "custom_id": line.custom_id, "response": None,
                         "error": {"code": code, "message": f"the batch was {status} before this request ran"}}
                failed.append(json.dumps(entry))
                continue
            entry = {"id": row["request_id"], "custom_id": row["custom_id"],
                     "response": {"status_code": row["status_code"], "request_id": row["request_id"],
                                  "body": json.loads(row["body"]) if row["body"] else None},
                     "error": json.loads(row["error"]) if row["error"] else None}
            (ok if 200 <= (row["status_code"] or 0) < 300 else failed).append(json.dumps(entry))
        return self._store_jsonl(ok, f"{batch_id}_output.jsonl"), self._store_jsonl(failed, f"{batch_id}_error.jsonl")

    def _store_jsonl(self, entries: list[str], filename: str) -> str | None:
        if not entries:
            return None
        max_age = self.settings.storage_max_age_s
        fd, tmp = tempfile.mkstemp(dir=self.store.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.writelines(entry + "\n" for entry in entries)
            return str(self.store.add_file(Path(tmp), filename, "batch_output",
                                           None if max_age is None else int(time.time() + max_age))["id"])
        finally:
            Path(tmp).unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def batch_runner(app: Any, settings: GatewaySettings) -> AsyncIterator[BatchRunner]:
    """The app's runner, running in the background for the app's lifetime."""
    runner = BatchRunner(app.state.batches, app, settings)
    app.state.batch_runner = runner
    task = asyncio.create_task(runner.run_forever())
    try:
        yield runner
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.close()
