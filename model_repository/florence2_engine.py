"""Florence-2 decode scheduling: no request waits behind another request's work for longer than its own.

Triton hands ``florence2`` dynamic batches; decoding a batch with one ``generate`` holds every request until the
longest one is done (a 1024-token, 8-beam request kept an 8-token caption for seconds). Here the model's
``execute`` only validates requests and hands the jobs to a :class:`Florence2Engine`, which answers each one
through its Triton response sender when it is done:

* Jobs are batched by their generation settings (``max_new_tokens``, ``num_beams``), as the static path always
  did, so a light request never shares a ``generate`` with a heavy one. A batch is formed when its worker gets
  its first turn (``window_s`` after its first job arrived, at the earliest), from every job with those settings
  that arrived by then (up to ``max_batch``).
* Each batch runs HF ``generate`` in its own thread, unchanged (same tokens as the static path, greedy and beam),
  but a :class:`StepScheduler` lets only one batch compute at a time and takes the turn back after every decode
  step (a stopping criterion that never stops: ``Florence2Pipeline.run(step=...)``).
* The next turn goes to the batch whose requests have the least work left by their settings (new tokens left x
  beams; ties to the oldest): a request that arrives while a heavy one runs goes ahead of it, so it waits at
  most about as long as its own work, and batches of equal settings go first come, first served. A batch that
  has waited ``fair_every - 1`` times its last step gets the next turn, so heavy requests keep moving (with
  at least ``1 / fair_every`` of the time) under a steady stream of light ones.

At most ``max_active`` batches decode at once (each holds its key/value cache until it is done); further
batches wait for one of them to finish. Failures stay with their request: a batch whose ``generate`` raises is
run again job by job (``common.retry_singly``). Cancelled requests are dropped before their batch starts, and
a batch whose requests were all cancelled stops at its next step.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from vlmserve.model_repository import common

log = logging.getLogger("vlmserve.florence2")


class Cancelled(Exception):
    """The request was cancelled by its client before it was answered."""


@dataclass(eq=False)
class Ticket:
    """One batch's place in the :class:`StepScheduler`."""

    name: str
    seq: int
    service: float = 0.0  # clock units computed so far
    work: float | None = None  # the holder's estimate of its remaining work (see StepScheduler)
    last_cost: float = 0.0  # its last turn
    turns: int = 0
    waiting_since: float = 0.0


class StepScheduler:
    """Lets one holder compute at a time; holders give the turn back after each step (:meth:`step`).

    The next turn: a waiting holder that has waited at least ``fair_every - 1`` times its own last turn (the one
    waiting longest), else the one with the least remaining ``work`` (when holders state it; else the least
    service so far), ties to the oldest. ``clock`` measures service (seconds
    by default; tests pass a counter). ``log``, when given, records the name of every turn's holder.
    """

    def __init__(self, fair_every: int = 4, clock: Callable[[], float] = time.perf_counter,
                 log: list[str] | None = None) -> None:
        if fair_every < 2:
            raise ValueError("fair_every must be >= 2")
        self.fair_every = fair_every
        self.clock = clock
        self.log = log
        self._cond = threading.Condition()
        self._holder: Ticket | None = None
        self._waiting: list[Ticket] = []
        self._seq = itertools.count()
        self._started = 0.0

    @contextmanager
    def turn(self, name: str = "", work: float | None = None) -> Iterator[Ticket]:
        """Hold the turn (waiting for it first) for the body; :meth:`step` inside gives others a turn.

        ``work``: the remaining work, in any unit shared by all holders; the holder updates ``ticket.work``.
        """
        ticket = Ticket(name, next(self._seq), work=work)
        with self._cond:
            ticket.waiting_since = self.clock()
            self._waiting.append(ticket)
            if self._holder is None:
                self._grant()
            self._wait_for(ticket)
        try:
            yield ticket
        finally:
            with self._cond:
                self._charge(ticket)
                self._grant()

    def step(self, ticket: Ticket) -> None:
        """One step done: let the next turn's holder (possibly ``ticket`` again) compute, then continue."""
        with self._cond:
            self._charge(ticket)
            ticket.waiting_since = self.clock()
            self._waiting.append(ticket)
            self._grant()
            self._wait_for(ticket)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def _charge(self, ticket: Ticket) -> None:
        if self._holder is not ticket:
            raise RuntimeError(f"{ticket.name!r} does not hold the turn")
        cost = self.clock() - self._started
        ticket.service += cost
        ticket.last_cost = cost
        ticket.turns += 1
        self._holder = None

    def _grant(self) -> None:
        if not self._waiting:
            return
        now = self.clock()
        starved = [t for t in self._waiting
                   if t.turns and now - t.waiting_since >= (self.fair_every - 1) * t.last_cost]
        if starved:
            pick = min(starved, key=lambda t: (t.waiting_since, t.seq))
        else:
            pick = min(self._waiting, key=lambda t: (t.service if t.work is None else t.work, t.seq))
        self._waiting.remove(pick)
        self._holder = pick
        if self.log is not None:
            self.log.append(pick.name)
        self._started = self.clock()
        self._cond.notify_all()

    def _wait_for(self, ticket: Ticket) -> None:
        while self._holder is not ticket:
            self._cond.wait()


@dataclass(eq=False)
class Entry:
    """A submitted job and where its answer goes: ``done(result dict | exception)``, called exactly once."""

    job: Any  # florence2.Job
    done: Callable[[Any], None]
    cancelled: Callable[[], bool] = lambda: False
    submitted: float = field(default_factory=time.perf_counter)

    def is_cancelled(self) -> bool:
        try:
            return bool(self.cancelled())
        except Exception:  # noqa: BLE001 - a broken probe must not fail the batch
            return False


class Florence2Engine:
    """Runs submitted jobs in per-settings batches under a :class:`StepScheduler` (see the module docstring).

    ``pipeline`` needs ``run(jobs, step=...) -> {job.index: result}`` (:class:`Florence2Pipeline`).
    """

    def __init__(self, pipeline: Any, max_batch: int = 8, scheduler: StepScheduler | None = None,
                 max_active: int = 16, window_s: float = 0.02) -> None:
        self.pipeline = pipeline
        self.max_batch = max(1, max_batch)
        # A new batch gathers jobs for window_s before it asks for its first turn (Triton's queue delay does the
        # same for a dynamic batch): without it, requests answered together come back one by one and decode as
        # many small batches, which costs throughput.
        self.window_s = window_s
        self.scheduler = scheduler or StepScheduler()
        # Batches decoding at once (each holds its KV cache until done); more wait for one to finish.
        self._active = threading.BoundedSemaphore(max(1, max_active))
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, int], list[Entry]] = {}
        self._forming: set[tuple[int, int]] = set()  # settings with a worker waiting for its first turn
        self._threads: set[threading.Thread] = set()

    def submit(self, job: Any, done: Callable[[Any], None], cancelled: Callable[[], bool] = lambda: False) -> None:
        key = (job.max_new_tokens, job.num_beams)
        with self._lock:
            self._pending.setdefault(key, []).append(Entry(job, done, cancelled))
            if key not in self._forming:
                self._start_worker(key)

    def idle(self) -> bool:
        with self._lock:
            return not self._threads and not any(self._pending.values())

    def join(self, timeout: float | None = None) -> None:
        """Wait until every submitted job is answered (tests, benchmarks)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                return
            for thread in threads:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("florence2 engine still busy")

    def _start_worker(self, key: tuple[int, int], gather: bool = True) -> None:  # holding self._lock
        self._forming.add(key)
        thread = threading.Thread(target=self._worker, args=(key, gather), name=f"florence2-{key[0]}x{key[1]}",
                                  daemon=True)
        self._threads.add(thread)
        thread.start()

    def _take(self, key: tuple[int, int]) -> list[Entry]:
        with self._lock:
            queue = self._pending.get(key, [])
            batch, rest = queue[:self.max_batch], queue[self.max_batch:]
            if rest:
                self._pending[key] = rest
            else:
                self._pending.pop(key, None)
            self._forming.discard(key)
            if rest:
                self._start_worker(key, gather=False)  # a full batch is already waiting
            return batch

    def _worker(self, key: tuple[int, int], gather: bool = True) -> None:
        answers: list[tuple[Entry, Any]] = []
        entries: list[Entry] = []
        try:
            if gather and self.window_s > 0:
                time.sleep(self.window_s)
            # Each request's remaining work: new tokens left x beams (shortest first). Per request, not per
            # batch: eight captions decoding together are eight light requests, not one heavy one.
            beams = key[1]
            with self._active, self.scheduler.turn(f"{key[0]}x{key[1]}", work=key[0] * beams) as ticket:
                entries = self._take(key)

                def step() -> None:
                    assert ticket.work is not None
                    ticket.work = max(0.0, ticket.work - beams)
                    self.scheduler.step(ticket)

                answers = self._run(entries, step)
        except Exception as exc:  # noqa: BLE001 - a last guard: every job gets an answer
            log.exception("florence2 batch failed")
            answered = {id(e) for e, _ in answers}
            answers += [(e, exc) for e in entries if id(e) not in answered]
        finally:
            for entry, answer in answers:
                try:
                    entry.done(answer)
                except Exception:  # noqa: BLE001
                    log.exception("florence2: sending an answer failed")
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _run(self, entries: list[Entry], step: Callable[[], None]) -> list[tuple[Entry, Any]]:
        cancelled = {id(e) for e in entries if e.is_cancelled()}  # asked once: an entry is in exactly one list
        answers: list[tuple[Entry, Any]] = [(e, Cancelled()) for e in entries if id(e) in cancelled]
        live = [e for e in entries if id(e) not in cancelled]
        if not live:
            return answers
        # Jobs from different Triton batches may share an index: number them by their row here.
        by_row = dict(enumerate(live))
        jobs = [dataclasses.replace(e.job, index=row) for row, e in by_row.items()]

        def run(group: list[Any]) -> dict[int, dict[str, Any]]:
            entries_here = [by_row[j.index] for j in group]
            if all(e.is_cancelled() for e in entries_here):
                raise Cancelled()

            def hook() -> None:
                step()
                if all(e.is_cancelled() for e in entries_here):
                    raise Cancelled()

            return self.pipeline.run(group, step=hook)

        started = time.perf_counter()
        for group, results in common.retry_singly(jobs, run):
            for job in group:
                entry = by_row[job.index]
                if isinstance(results, Exception):
                    answer: Any = Cancelled() if entry.is_cancelled() else results
                elif entry.is_cancelled():
                    answer = Cancelled()
                else:
                    answer = results[job.index]
                    timing = answer.get("timing")
                    if isinstance(timing, dict):
                        timing = dict(timing, queue_ms=round((started - entry.submitted) * 1000, 2))
                        answer["timing"] = timing
                answers.append((entry, answer))
        return answers
