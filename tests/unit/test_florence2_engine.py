"""Florence-2 step scheduling without a model: who computes when, failures, cancellation (deterministic).

The scheduler's clock is simulated here: only a step's "compute" advances it (by the step's cost), so service is
counted, not timed, and every order below is exact.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from vlmserve.model_repository.florence2_engine import Cancelled, Florence2Engine, StepScheduler


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def counting_scheduler(fair_every: int = 4) -> tuple[StepScheduler, list[str]]:
    log: list[str] = []
    return StepScheduler(fair_every, clock=Clock(), log=log), log


def compute(scheduler: StepScheduler, cost: float = 1.0) -> None:
    assert isinstance(scheduler.clock, Clock)
    scheduler.clock.now += cost


def steps(scheduler: StepScheduler, name: str, n: int, cost: float = 1.0, pause_at: int | None = None) -> None:
    """``n`` steps of ``cost``; at step ``pause_at`` wait (holding the turn) until another job is queued."""
    with scheduler.turn(name) as ticket:
        for i in range(n):
            if i == pause_at:
                while not scheduler.waiting:
                    time.sleep(0.001)
            compute(scheduler, cost)
            scheduler.step(ticket)


def test_one_holder_at_a_time_and_a_lone_holder_is_not_held_up() -> None:
    scheduler, log = counting_scheduler()
    steps(scheduler, "a", 5)
    assert log == ["a"] * 6  # entry + 5 steps, nobody to wait for


def test_a_light_job_arriving_during_a_heavy_one_goes_ahead_and_the_heavy_one_keeps_moving() -> None:
    scheduler, log = counting_scheduler(fair_every=4)
    heavy = threading.Thread(target=steps, args=(scheduler, "heavy", 200), kwargs={"pause_at": 20})
    heavy.start()
    while len(log) < 20:
        time.sleep(0.001)
    light = threading.Thread(target=steps, args=(scheduler, "light", 12))
    light.start()
    light.join(10)
    heavy.join(10)
    assert log[:21] == ["heavy"] * 21
    first, last = log.index("light"), len(log) - 1 - log[::-1].index("light")
    assert first == 21  # the light job got the very next turn
    # While it ran the heavy one got every 4th turn (fair_every): 13 light turns, 4 heavy ones.
    assert log[first:last + 1] == ["light"] * 3 + (["heavy"] + ["light"] * 3) * 3 + ["heavy", "light"]
    assert log[last + 1:] == ["heavy"] * (201 - 21 - 4)


def test_an_expensive_step_earns_a_longer_wait() -> None:
    scheduler, log = counting_scheduler(fair_every=4)
    heavy = threading.Thread(target=steps, args=(scheduler, "heavy", 100), kwargs={"pause_at": 10, "cost": 4.0})
    heavy.start()
    while len(log) < 10:
        time.sleep(0.001)
    light = threading.Thread(target=steps, args=(scheduler, "light", 30))
    light.start()
    light.join(10)
    heavy.join(10)
    first, last = log.index("light"), len(log) - 1 - log[::-1].index("light")
    during = log[first:last + 1]
    # A heavy step costs 4 light ones: it waits 3 x 4 units, i.e. 12 light steps, between its turns.
    assert during.count("heavy") == 2 and during[:12] == ["light"] * 12 and during[12] == "heavy", during


def test_equal_jobs_share_the_turns() -> None:
    scheduler, log = counting_scheduler()
    gate = threading.Barrier(2)

    def job(name: str) -> None:
        gate.wait()
        steps(scheduler, name, 40)

    threads = [threading.Thread(target=job, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # Neither waits for the other to finish: their turns interleave throughout.
    middle = log[10:60]
    assert middle.count("a") >= 15 and middle.count("b") >= 15, log


@dataclass
class FakeJob:
    index: int
    prompt: str
    max_new_tokens: int
    num_beams: int


class FakePipeline:
    """``run(jobs, step)``: one step per new token; a prompt 'boom' fails its batch."""

    batches: list[list[str]]

    def __init__(self, scheduler: StepScheduler) -> None:
        self.batches = []
        self.scheduler = scheduler

    def run(self, jobs: list[FakeJob], step=None) -> dict[int, dict[str, Any]]:
        self.batches.append([j.prompt for j in jobs])
        for _ in range(max(j.max_new_tokens for j in jobs)):
            compute(self.scheduler)
            step()
        if any(j.prompt == "boom" for j in jobs):
            raise RuntimeError("boom")
        return {j.index: {"text": j.prompt.upper(), "timing": {}} for j in jobs}


class Answers:
    def __init__(self) -> None:
        self.got: dict[str, Any] = {}
        self.order: list[str] = []
        self.lock = threading.Lock()

    def to(self, name: str):
        def done(result: Any) -> None:
            with self.lock:
                assert name not in self.got, f"{name} answered twice"
                self.got[name] = result
                self.order.append(name)
        return done


def test_engine_batches_by_settings_and_answers_each_job_once() -> None:
    scheduler, _ = counting_scheduler()
    pipeline = FakePipeline(scheduler)
    engine = Florence2Engine(pipeline, max_batch=2, scheduler=scheduler)
    answers = Answers()
    with scheduler.turn("test"):  # hold the turn: all five wait, then batch
        for i, (prompt, tokens) in enumerate([("a", 4), ("b", 4), ("c", 4), ("x", 5000), ("d", 4)]):
            engine.submit(FakeJob(0 if i % 2 else i, prompt, tokens, 1), answers.to(prompt))
    engine.join(10)
    assert {k: v["text"] for k, v in answers.got.items()} == {p: p.upper() for p in "abcxd"}
    assert sorted(pipeline.batches) == [["a", "b"], ["c", "d"], ["x"]]  # max_batch 2; never light with heavy
    assert answers.order[-1] == "x"
    assert all("queue_ms" in v["timing"] for v in answers.got.values())
    assert engine.idle()


def test_engine_failure_stays_with_the_job_that_causes_it() -> None:
    scheduler, _ = counting_scheduler()
    pipeline = FakePipeline(scheduler)
    engine = Florence2Engine(pipeline, scheduler=scheduler)
    answers = Answers()
    with scheduler.turn("test"):
        for i, prompt in enumerate(["ok1", "boom", "ok2"]):
            engine.submit(FakeJob(i, prompt, 3, 2), answers.to(prompt))
    engine.join(10)
    assert answers.got["ok1"]["text"] == "OK1" and answers.got["ok2"]["text"] == "OK2"
    assert isinstance(answers.got["boom"], RuntimeError)
    assert pipeline.batches == [["ok1", "boom", "ok2"], ["ok1"], ["boom"], ["ok2"]]  # runtime.retry_singly


def test_engine_cancellation_before_and_during_decoding() -> None:
    scheduler, _ = counting_scheduler()
    pipeline = FakePipeline(scheduler)
    engine = Florence2Engine(pipeline, scheduler=scheduler)
    answers = Answers()
    flags = {"early": True, "late": False}
    with scheduler.turn("test"):
        engine.submit(FakeJob(0, "early", 3, 1), answers.to("early"), lambda: flags["early"])
        engine.submit(FakeJob(1, "kept", 3, 1), answers.to("kept"))
    engine.join(10)
    assert isinstance(answers.got["early"], Cancelled) and answers.got["kept"]["text"] == "KEPT"
    assert pipeline.batches == [["kept"]]  # the cancelled job never ran

    calls = itertools.count()

    def late() -> bool:  # cancelled once decoding is under way
        return next(calls) > 3

    engine.submit(FakeJob(0, "late", 1000, 1), answers.to("late"), late)
    engine.join(10)
    assert isinstance(answers.got["late"], Cancelled)
    assert engine.idle()


@pytest.mark.parametrize("fair_every", [0, 1])
def test_fair_every_must_leave_room_for_priority(fair_every: int) -> None:
    with pytest.raises(ValueError, match="fair_every"):
        StepScheduler(fair_every)


def test_engine_bounds_the_batches_decoding_at_once() -> None:
    scheduler, log = counting_scheduler()
    pipeline = FakePipeline(scheduler)
    engine = Florence2Engine(pipeline, max_batch=1, scheduler=scheduler, max_active=2)
    answers = Answers()
    with scheduler.turn("test"):
        for i in range(4):
            engine.submit(FakeJob(0, f"j{i}", 5 + i, 1), answers.to(f"j{i}"))  # four settings: four batches
        deadline = time.monotonic() + 10
        while scheduler.waiting < 2 and time.monotonic() < deadline:  # two queue for their turn, two for a slot
            time.sleep(0.001)
        time.sleep(0.05)
        assert scheduler.waiting == 2
    engine.join(10)
    assert sorted(answers.got) == ["j0", "j1", "j2", "j3"]


def work_steps(scheduler: StepScheduler, name: str, n: int, work_per_step: float,
               pause_at: int | None = None) -> None:
    with scheduler.turn(name, work=n * work_per_step) as ticket:
        for i in range(n):
            if i == pause_at:
                while not scheduler.waiting:
                    time.sleep(0.001)
            compute(scheduler)
            assert ticket.work is not None
            ticket.work -= work_per_step
            scheduler.step(ticket)


@pytest.mark.parametrize(("newcomer_work", "goes_first"), [(0.1, True), (1.0, False)])
def test_with_stated_work_the_least_remaining_goes_first(newcomer_work: float, goes_first: bool) -> None:
    """Holders that state their work are served shortest-remaining first: a newcomer with as much work as an
    equal batch already under way waits for it (first come, first served) instead of preempting it."""
    scheduler, log = counting_scheduler(fair_every=1000)
    old = threading.Thread(target=work_steps, args=(scheduler, "old", 30, 1.0), kwargs={"pause_at": 10})
    old.start()
    while len(log) < 10:
        time.sleep(0.001)
    new = threading.Thread(target=work_steps, args=(scheduler, "new", 30, newcomer_work))
    new.start()
    old.join(10)
    new.join(10)
    if goes_first:
        assert log[11:42] == ["new"] * 31 and log[42:] == ["old"] * 20
    else:
        assert log[:31] == ["old"] * 31 and log[31:] == ["new"] * 31
