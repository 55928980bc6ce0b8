"""Bulk work for the ``vlmserve-client`` command: find image files, send them with bounded concurrency (several per
request where the route takes several), retry 429/503 after their ``Retry-After``, and write the results
incrementally so that a killed run leaves a usable output that the next run resumes.

The requests themselves go through the package's async clients (:class:`AsyncEmbeddingsClient`,
:class:`AsyncFlorence2Client`, :class:`AsyncOcrClient`); this module adds only the scheduling and the files.
Outputs (``sinks``) live in :mod:`vlmserve_client._sinks`.
"""

from __future__ import annotations

import asyncio
import functools
import glob
import os
import random
import re
import sys
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Protocol, TypeVar

import httpx

from vlmserve_client._core import ServiceInfo, _AsyncClient, _Call, image_reference, json_body
from vlmserve_client._sinks import Failure, Record, Sink
from vlmserve_client.embeddings import AsyncEmbeddingsClient, Vector
from vlmserve_client.errors import VlmserveError
from vlmserve_client.florence2 import AsyncFlorence2Client
from vlmserve_client.ocr import AsyncOcrClient

__all__ = [
    "IMAGE_EXTENSIONS",
    "Backend",
    "Item",
    "Progress",
    "RunStats",
    "find_images",
    "is_transient",
    "plan",
    "run",
    "with_retries",
]

# What a folder walk or a glob picks up (a file named on the command line is taken whatever its name).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})
# Statuses worth another try later: overload (429), unavailable/loading (503), upstream trouble (502, 504);
# ``None`` is a gateway that could not be reached or timed out.
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
# The gateway's route group of each command: /info may report its in-flight cap as ``max_inflight_<group>``.
ROUTE_GROUPS = {"embed": "embeddings", "caption": "florence", "ocr": "chat"}
FALLBACK_CONCURRENCY = 4
FALLBACK_BATCH = 16

_T = TypeVar("_T")


# --- finding the files ------------------------------------------------------------------------------------


def _walk(folder: str, found: set[str]) -> None:
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden folders (.git, .thumbnails, ...)
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.add(os.path.abspath(os.path.join(root, name)))


def find_images(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """The image files that ``args`` name, as sorted absolute paths, and the arguments that matched nothing.

    A folder is walked recursively (image extensions only, hidden entries left out); an existing file is taken as
    is; anything else is a glob (``**`` recurses), whose folders are walked and whose files are filtered by
    extension. Each file appears once."""
    found: set[str] = set()
    unmatched: list[str] = []
    for arg in args:
        if os.path.isdir(arg):
            _walk(arg, found)
        elif os.path.isfile(arg):
            found.add(os.path.abspath(arg))
        else:
            matches = glob.glob(os.path.expanduser(arg), recursive=True)
            for match in matches:
                if os.path.isdir(match):
                    _walk(match, found)
                elif os.path.splitext(match)[1].lower() in IMAGE_EXTENSIONS:
                    found.add(os.path.abspath(match))
            if not matches:
                unmatched.append(arg)
    return sorted(found), unmatched


@dataclass
class Item:
    """One file to process: its absolute path, size and mtime (what resuming compares), and its bytes once read."""

    path: str
    size: int
    mtime: float
    data: bytes = field(default=b"", repr=False)


def _same(stamp: tuple[int, float] | None, item: Item) -> bool:
    return stamp is not None and stamp[0] == item.size and abs(stamp[1] - item.mtime) < 1e-6


def plan(paths: Iterable[str], done: dict[str, tuple[int, float]],
         known_bad: dict[str, tuple[int, float]]) -> tuple[list[Item], int, int, list[Failure]]:
    """Split ``paths`` into what to send, the number already done (same path, size and mtime in the output), the
    number skipped as known bad (a permanent error in the errors file, file unchanged) and the files that cannot
    be stat'ed. A file that changed since it was done is sent again (its new result is appended; the last entry
    for a path wins)."""
    todo: list[Item] = []
    skipped_done = skipped_bad = 0
    failures: list[Failure] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            failures.append(Failure(path, None, None, f"cannot read: {exc.strerror or exc}"))
            continue
        item = Item(path, st.st_size, st.st_mtime)
        if _same(done.get(path), item):
            skipped_done += 1
        elif _same(known_bad.get(path), item):
            skipped_bad += 1
        else:
            todo.append(item)
    return todo, skipped_done, skipped_bad, failures


# --- retries ----------------------------------------------------------------------------------------------


def is_transient(exc: BaseException) -> bool:
    """True for errors a later try may not meet: 429, 502, 503, 504, no answer (connection error, timeout)."""
    return isinstance(exc, VlmserveError) and (exc.status_code is None or exc.status_code in TRANSIENT_STATUSES)


async def with_retries(send: Callable[[], Awaitable[_T]], max_retries: int, *,
                       sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                       on_retry: Callable[[VlmserveError, float], None] | None = None,
                       max_backoff: float = 30.0) -> _T:
    """``await send()``; on a transient error, wait (its ``Retry-After`` when the server sent one, else an
    exponential backoff with jitter) and try again, at most ``max_retries`` more times. Other errors, and the
    last transient one, are raised."""
    attempt = 0
    while True:
        try:
            return await send()
        except VlmserveError as exc:
            if not is_transient(exc) or attempt >= max_retries:
                raise
            if exc.retry_after is not None:
                delay = exc.retry_after + random.uniform(0, 0.25)  # spread the clients a cap turned away together
            else:
                delay = min(max_backoff, 0.5 * 2 ** attempt) * random.uniform(0.75, 1.25)
            if on_retry is not None:
                on_retry(exc, delay)
            attempt += 1
            await sleep(delay)


# --- what each command sends --------------------------------------------------------------------------------


class Backend(Protocol):
    """Sends a group of images (bytes) and returns one result per image, in order; raises :class:`VlmserveError`."""

    batch_size: int

    async def send(self, images: list[bytes]) -> list[Any]: ...


def _openai_vectors(response: httpx.Response) -> list[Vector]:
    body = json_body(response)
    try:
        data = sorted(body["data"], key=lambda d: int(d.get("index", 0)))
        return [[float(x) for x in d["embedding"]] for d in data]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise VlmserveError(f"malformed embeddings answer ({exc!r}): {body!r:.200}",
                            status_code=response.status_code) from exc


@dataclass
class EmbedBackend:
    """``POST /embed`` (``api="vlmserve"``) or ``POST /v1/embeddings`` with ``"modality": "image"`` (``"openai"``)."""

    client: AsyncEmbeddingsClient
    batch_size: int
    model: str | None = None
    api: str = "vlmserve"

    async def send(self, images: list[bytes]) -> list[Any]:
        if self.api == "vlmserve":
            vectors = await self.client.embed_images(images, model=self.model)
        else:
            body: dict[str, Any] = {"input": [image_reference(i) for i in images], "modality": "image",
                                    "encoding_format": "float"}
            if self.model is not None:
                body["model"] = self.model
            vectors = await self.client._execute(_Call("POST", "/v1/embeddings", _openai_vectors, json=body))
        if len(vectors) != len(images):
            raise VlmserveError(f"sent {len(images)} images, got {len(vectors)} vectors")
        return vectors


@dataclass
class CaptionBackend:
    """Florence-2's caption tasks through ``POST /infer/upload``, one image per request."""

    client: AsyncFlorence2Client
    task: str = "<CAPTION>"
    max_new_tokens: int | None = None
    batch_size: int = 1

    async def send(self, images: list[bytes]) -> list[Any]:
        out = []
        for image in images:
            result = await self.client.run(self.task, image, max_new_tokens=self.max_new_tokens)
            text = result.result if isinstance(result.result, str) else result.text
            out.append({"text": text.strip(), "model": result.model or "florence2"})
        return out


@dataclass
class OcrBackend:
    """``POST /ocr`` (a chat model reads the text), one image per request."""

    client: AsyncOcrClient
    language: str = "auto"
    model: str | None = None
    max_tokens: int | None = None
    batch_size: int = 1

    async def send(self, images: list[bytes]) -> list[Any]:
        out = []
        for image in images:
            result = await self.client.ocr(image, self.language, model=self.model, max_tokens=self.max_tokens)
            out.append({"text": result.text, "language": result.language, "model": result.model})
        return out


def _inflight_cap(info: ServiceInfo | None, group: str) -> int | None:
    # ``limits.max_inflight_<group>``, or ``limits.max_inflight.<group>``
    if info is None:
        return None
    if f"max_inflight_{group}" in info.limits:
        return info.limits[f"max_inflight_{group}"]
    raw = info.raw.get("limits")
    nested = raw.get("max_inflight") if isinstance(raw, dict) else None
    value = nested.get(group) if isinstance(nested, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def choose_limits(info: ServiceInfo | None, command: str, concurrency: int | None,
                  batch_size: int | None) -> tuple[int, int]:
    """(concurrency, images per request). Concurrency: ``concurrency`` when given, else 4, or a quarter of the
    gateway's in-flight cap for the command's route group when that is less (``/info``'s
    ``limits.max_inflight_<group>`` or ``limits.max_inflight.<group>``; the groups are ``embeddings``,
    ``florence`` and ``chat``). More in flight does not go faster on a busy server: on a 2-core CPU with a full-size
    SigLIP, 16 requests of 16 images filled Triton's queue (retries) and gave 3.3 images/s against 3.7-3.9 with
    1-8. Images per request (embeddings only): ``batch_size`` when given, else ``limits.max_items`` capped at 16."""
    limits = info.limits if info is not None else {}
    if concurrency is None:
        cap = _inflight_cap(info, ROUTE_GROUPS[command])
        concurrency = min(FALLBACK_CONCURRENCY, max(1, cap // 4)) if cap else FALLBACK_CONCURRENCY
    if command != "embed":
        return concurrency, 1
    max_items = limits.get("max_items")
    if batch_size is None:
        batch_size = min(FALLBACK_BATCH, max_items) if max_items else FALLBACK_BATCH
    elif max_items:
        batch_size = min(batch_size, max_items)
    return max(1, concurrency), max(1, batch_size)


# --- progress ---------------------------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A dependency-free progress bar on ``stream``: redrawn in place (``\\r``) at most 10 times a second on a
    terminal, one line every ``interval`` seconds (and at the end) otherwise. Shows done/total, failures,
    images per second and the ETA."""

    def __init__(self, total: int, stream: IO[str] | None = None, *, tty: bool | None = None,
                 interval: float = 5.0, enabled: bool = True) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.enabled = enabled
        self.done = self.failed = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._drawn = False

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return (self.done + self.failed) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        count = self.done + self.failed
        rate = self.rate
        eta = _clock((self.total - count) / rate) if rate > 0 else "?"
        pct = 100.0 * count / self.total if self.total else 100.0
        width = 24
        filled = int(width * count / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        failed = f", {self.failed} failed" if self.failed else ""
        return f"[{bar}] {count}/{self.total} {pct:3.0f}%{failed}  {rate:.1f} images/s  ETA {eta}"

    def update(self, done: int = 0, failed: int = 0) -> None:
        self.done += done
        self.failed += failed
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < (0.1 if self.tty else self.interval):
            return
        self._last = now
        self._draw()

    def _draw(self) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self._drawn = True
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if not self.enabled:
            return
        self._draw()
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


# --- the run ----------------------------------------------------------------------------------------------


@dataclass
class RunStats:
    found: int = 0
    skipped_done: int = 0
    skipped_bad: int = 0
    done: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    elapsed_s: float = 0.0
    failed_before: int = 0  # failures counted before the run (files that vanished between the walk and the stat)
    stopped: str | None = None  # why the run stopped early (the server stayed unavailable), if it did
    left: int = 0  # files not sent because the run stopped early

    @property
    def rate(self) -> float:
        return (self.done + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        return (f"done {self.done}, skipped {self.skipped_done + self.skipped_bad} "
                f"({self.skipped_done} already done, {self.skipped_bad} known bad), failed {self.failed}, "
                f"{self.rate:.1f} images/s ({self.done + self.failed} in {self.elapsed_s:.1f} s, "
                f"{self.requests} requests, {self.retries} retries)"
                + (f"; stopped early with {self.left} left, the server stayed unavailable ({self.stopped})"
                   if self.stopped else ""))


_INDEX = re.compile(r"\[(\d+)\]$")


def _bad_index(exc: VlmserveError, n: int) -> int | None:
    # /embed names the image it refused: param "images[3]" (/v1/embeddings too, or "input[3]")
    match = _INDEX.search(exc.param or "")
    if match and int(match.group(1)) < n:
        return int(match.group(1))
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, VlmserveError):
        return exc.message if exc.status_code is None else f"{exc.status_code}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _failure(item: Item, exc: BaseException) -> Failure:
    status = exc.status_code if isinstance(exc, VlmserveError) else None
    return Failure(item.path, item.size, item.mtime, _reason(exc), status=status, transient=is_transient(exc))


class _Runner:
    def __init__(self, backend: Backend, sink: Sink, progress: Progress, stats: RunStats, concurrency: int,
                 max_retries: int, max_request_bytes: int | None) -> None:
        self.backend = backend
        self.sink = sink
        self.progress = progress
        self.stats = stats
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.max_request_bytes = max_request_bytes
        self.results: dict[int, tuple[list[Record], list[Failure]]] = {}
        self.next_seq = 0
        # Set when a request still met 429/503/no answer after every retry: the server is down or saturated, so
        # the run stops sending (what is done stays written; the next run resumes).
        self.stopped: str | None = None
        # Batches read but not yet written: bounds memory, and keeps the output in input order.
        self.window = asyncio.Semaphore(2 * concurrency + 2)

    def _retried(self, exc: VlmserveError, delay: float) -> None:
        self.stats.retries += 1

    async def _send(self, images: list[bytes]) -> list[Any]:
        self.stats.requests += 1
        return await self.backend.send(images)

    async def process(self, items: list[Item]) -> tuple[list[Record], list[Failure]]:
        """Send ``items``; a refused batch is split (the image the gateway names is dropped, else one by one) so
        that one bad file fails alone."""
        values: dict[int, Any] = {}
        failures: list[Failure] = []
        groups: list[list[int]] = [list(range(len(items)))]
        while groups:
            group = groups.pop(0)
            images = [items[i].data for i in group]
            try:
                result = await with_retries(functools.partial(self._send, images), self.max_retries,
                                            on_retry=self._retried)
            except Exception as exc:  # a VlmserveError, or a local one (e.g. encoding the image)
                if is_transient(exc) or len(group) == 1:
                    failures.extend(_failure(items[i], exc) for i in group)
                    if is_transient(exc) and self.stopped is None:
                        self.stopped = _reason(exc)
                    continue
                bad = _bad_index(exc, len(group)) if isinstance(exc, VlmserveError) else None
                if bad is None:
                    groups[:0] = [[i] for i in group]
                else:
                    failures.append(_failure(items[group[bad]], exc))
                    rest = group[:bad] + group[bad + 1:]
                    if rest:
                        groups.insert(0, rest)
                continue
            values.update(zip(group, result))
        records = [Record(items[i].path, items[i].size, items[i].mtime, values[i]) for i in sorted(values)]
        return records, failures

    def _write_ready(self) -> None:
        while self.next_seq in self.results:
            records, failures = self.results.pop(self.next_seq)
            self.sink.write(records)
            self.sink.write_errors(failures)
            self.stats.done += len(records)
            self.stats.failed += len(failures)
            self.progress.update(len(records), len(failures))
            self.next_seq += 1
            self.window.release()

    async def _read(self, item: Item) -> Failure | None:
        try:
            item.data = await asyncio.to_thread(Path(item.path).read_bytes)
        except OSError as exc:
            return Failure(item.path, item.size, item.mtime, f"cannot read: {exc.strerror or exc}")
        if not item.data:
            return Failure(item.path, item.size, item.mtime, "empty file")
        if self.max_request_bytes is not None and _encoded_size(item) > self.max_request_bytes:
            return Failure(item.path, item.size, item.mtime,
                           f"too large: {item.size} bytes (the gateway takes requests up to "
                           f"{self.max_request_bytes} bytes)")
        return None

    async def _produce(self, items: list[Item], queue: asyncio.Queue[tuple[int, list[Item], list[Failure]] | None],
                       ) -> None:
        seq = 0
        batch: list[Item] = []
        bad: list[Failure] = []
        batch_bytes = 0

        async def emit() -> None:
            nonlocal seq, batch, bad, batch_bytes
            await self.window.acquire()
            await queue.put((seq, batch, bad))
            seq += 1
            batch, bad, batch_bytes = [], [], 0

        for item in items:
            if self.stopped is not None:
                break
            failure = await self._read(item)
            if failure is not None:
                bad.append(failure)
                if len(bad) >= 64:
                    await emit()
                continue
            size = _encoded_size(item)
            if batch and self.max_request_bytes is not None and batch_bytes + size > self.max_request_bytes:
                await emit()
            batch.append(item)
            batch_bytes += size
            if len(batch) >= self.backend.batch_size:
                await emit()
        if batch or bad:
            await emit()
        for _ in range(self.concurrency):
            await queue.put(None)

    async def _work(self, queue: asyncio.Queue[tuple[int, list[Item], list[Failure]] | None]) -> None:
        while True:
            job = await queue.get()
            if job is None:
                return
            seq, batch, bad = job
            if self.stopped is not None:  # not sent: left for the next run
                batch = []
            records, failures = await self.process(batch) if batch else ([], [])
            for item in batch:
                item.data = b""  # sent: free the bytes
            self.results[seq] = (records, bad + failures)
            self._write_ready()

    async def run(self, items: list[Item]) -> None:
        queue: asyncio.Queue[tuple[int, list[Item], list[Failure]] | None] = asyncio.Queue(maxsize=self.concurrency)
        tasks = [asyncio.create_task(self._work(queue)) for _ in range(self.concurrency)]
        producer = asyncio.create_task(self._produce(items, queue))
        try:
            await asyncio.gather(producer, *tasks)
        finally:
            for task in (producer, *tasks):
                task.cancel()
            await asyncio.gather(producer, *tasks, return_exceptions=True)


def _encoded_size(item: Item) -> int:
    # what the image weighs in a JSON body (base64 data URI) or a multipart upload, with some room for the rest
    return (len(item.data) + 2) // 3 * 4 + 256


async def run(backend: Backend, sink: Sink, items: list[Item], *, concurrency: int, max_retries: int,
              progress: Progress, stats: RunStats, max_request_bytes: int | None = None) -> RunStats:
    """Process ``items`` with ``concurrency`` requests in flight and write every result and failure to ``sink``,
    in input order. ``stats`` is updated as results are written (and returned). When a request still meets a
    transient error after ``max_retries``, no new request is sent (``stats.stopped`` says why)."""
    runner = _Runner(backend, sink, progress, stats, concurrency, max_retries, max_request_bytes)
    start = time.monotonic()
    try:
        await runner.run(items)
    finally:
        stats.elapsed_s = time.monotonic() - start
        stats.stopped = runner.stopped
        stats.left = len(items) - stats.done - stats.failed + stats.failed_before
        progress.finish()
    return stats


async def fetch_info(client: _AsyncClient, max_retries: int) -> ServiceInfo | None:
    """``GET /info`` (retried while the gateway is unavailable); ``None`` when the server has no such route (a
    non-vlmserve OpenAI-compatible server). An unreachable server or a refused key raises."""
    try:
        return await with_retries(client.info, max_retries)
    except VlmserveError as exc:
        if exc.status_code in (404, 405):
            return None
        raise

