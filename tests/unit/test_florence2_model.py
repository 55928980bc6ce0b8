"""Florence-2 model logic without a server: task table, region parsing, validation, reference post-processing.

Post-processing is checked on hand-written generations with known coordinates (random weights cannot show it),
through the checkpoint's own ``Florence2Processor.post_process_generation``.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmserve.model_repository import common
from vlmserve.model_repository.florence2 import Florence2Pipeline, Job
from vlmserve.model_repository.florence2_engine import Cancelled, Florence2Engine, StepScheduler
from vlmserve.model_repository.florence2_tasks import TASKS, UnknownTask, find_task, region_to_loc_tokens


def png(w: int = 100, h: int = 80) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (0, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pipeline(tiny_repo: Path) -> Florence2Pipeline:
    encoder = common.OnnxEncoder(tiny_repo / "florence2_vision/1/model.onnx")
    return Florence2Pipeline(tiny_repo / "florence2/1/checkpoint", encoder, default_max_new_tokens=8)


def test_task_table_has_every_task_once() -> None:
    assert len({t.name for t in TASKS}) == len({t.token for t in TASKS}) == 14
    assert find_task("object_detection") is find_task("<OD>") is find_task("<od>")
    assert find_task("  Caption ").token == "<CAPTION>"
    with pytest.raises(UnknownTask, match="valid tasks: caption"):
        find_task("detect_everything")


@pytest.mark.parametrize(("text", "expected"), [
    ("10,20,50,60", "<loc_100><loc_250><loc_500><loc_750>"),
    ("[0, 0, 100, 80]", "<loc_0><loc_0><loc_999><loc_999>"),
    ("<loc_1><loc_2><loc_3><loc_4>", "<loc_1><loc_2><loc_3><loc_4>"),
])
def test_region_to_loc_tokens(text: str, expected: str) -> None:
    assert region_to_loc_tokens(text, 100, 80) == expected


@pytest.mark.parametrize(("text", "match"), [
    ("10,20,50", "region must be"), ("a,b,c,d", "region must be"), ("50,20,10,60", "x1 < x2"),
    ("10,20,500,60", "<= 100"),
])
def test_region_errors_say_what_is_wrong(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        region_to_loc_tokens(text, 100, 80)


def _job(pipeline: Florence2Pipeline, task: str, size=(1000, 800)) -> Job:
    return Job(0, find_task(task), find_task(task).token, Image.new("RGB", size), 8, 1)


def test_post_processing_boxes_to_pixels(pipeline) -> None:
    out = pipeline.parse(_job(pipeline, "<OD>"),
                         "</s><s>car<loc_100><loc_250><loc_500><loc_750>dog<loc_0><loc_0><loc_999><loc_999></s>")
    assert out["task"] == "object_detection" and out["image_size"] == [1000, 800]
    assert out["result"]["labels"] == ["car", "dog"]
    assert out["result"]["bboxes"][0] == pytest.approx([100, 200, 500, 600], abs=1)
    assert out["result"]["bboxes"][1] == pytest.approx([0, 0, 999, 799], abs=1)
    assert "</s>" not in out["text"] and "<loc_100>" in out["text"]


def test_post_processing_quad_boxes_polygons_grounding(pipeline) -> None:
    ocr = pipeline.parse(_job(pipeline, "ocr_with_region", (1000, 1000)),
                         "</s><s>HELLO<loc_100><loc_100><loc_200><loc_100><loc_200><loc_150><loc_100><loc_150></s>")
    assert ocr["result"]["labels"] == ["HELLO"]
    assert ocr["result"]["quad_boxes"][0] == pytest.approx([100, 100, 200, 100, 200, 150, 100, 150], abs=1)

    seg = pipeline.parse(_job(pipeline, "referring_expression_segmentation", (500, 500)),
                         "</s><s><loc_100><loc_100><loc_200><loc_100><loc_200><loc_200><loc_100><loc_200></s>")
    assert seg["result"]["polygons"][0][0] == pytest.approx([50, 50, 100, 50, 100, 100, 50, 100], abs=1)

    grounding = pipeline.parse(_job(pipeline, "phrase_grounding", (1000, 1000)),
                               "</s><s>a red car<loc_10><loc_20><loc_30><loc_40></s>")
    assert grounding["result"] == {"bboxes": [pytest.approx([10, 20, 30, 40], abs=1)], "labels": ["a red car"]}

    ovd = pipeline.parse(_job(pipeline, "open_vocabulary_detection", (1000, 1000)),
                         "</s><s>car<loc_10><loc_20><loc_30><loc_40></s>")
    assert ovd["result"]["bboxes_labels"] == ["car"] and ovd["result"]["polygons"] == []

    caption = pipeline.parse(_job(pipeline, "caption"), "</s><s>a cat on a chair</s>")
    assert caption["result"] == "a cat on a chair"


def test_job_validation(pipeline) -> None:
    job = pipeline.job(0, png(), "region_to_category", "10,20,50,60", None, None)
    assert job.prompt == "<REGION_TO_CATEGORY><loc_100><loc_250><loc_500><loc_750>"
    assert (job.max_new_tokens, job.num_beams) == (8, 3)
    assert pipeline.job(0, png(), "caption", "ignored", 4, 1).prompt == "<CAPTION>"
    with pytest.raises(common.InputError, match="needs TEXT"):
        pipeline.job(0, png(), "phrase_grounding", None, None, None)
    with pytest.raises(common.InputError, match="unknown task"):
        pipeline.job(0, png(), "<NOPE>", None, None, None)
    with pytest.raises(common.InputError, match="MAX_NEW_TOKENS must be 1..1024"):
        pipeline.job(0, png(), "caption", None, 5000, None)
    with pytest.raises(common.InputError, match="NUM_BEAMS"):
        pipeline.job(0, png(), "caption", None, None, 0)
    with pytest.raises(common.InputError, match="not a decodable image"):
        pipeline.job(0, b"nope", "caption", None, None, None)


def test_run_mixed_tasks_and_settings_in_one_batch(pipeline) -> None:
    jobs = [
        pipeline.job(0, png(), "<OD>", None, 4, 3),
        pipeline.job(1, png(64, 64), "phrase_grounding", "a red car", 4, 3),
        pipeline.job(2, png(30, 90), "caption", None, 6, 1),
    ]
    results = pipeline.run(jobs)
    assert sorted(results) == [0, 1, 2]
    assert results[0]["task"] == "object_detection" and isinstance(results[0]["result"], dict)
    assert results[1]["image_size"] == [64, 64]
    assert isinstance(results[2]["result"], str)
    assert np.all([isinstance(r["text"], str) for r in results.values()])


# ------------------------------------------------------------------------------------- step scheduling (engine)


class StepClock:
    """The scheduler's clock for these tests: one unit per decode step, so service counts steps, not time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingScheduler(StepScheduler):
    def step(self, ticket) -> None:
        assert isinstance(self.clock, StepClock)
        self.clock.now += 1
        super().step(ticket)


def _engine(pipeline, max_batch: int = 8) -> tuple[Florence2Engine, list[str]]:
    log: list[str] = []
    scheduler = CountingScheduler(4, clock=StepClock(), log=log)
    return Florence2Engine(pipeline, max_batch=max_batch, scheduler=scheduler), log


def _mixed_jobs(pipeline: Florence2Pipeline) -> list[Job]:
    return [
        pipeline.job(0, png(), "<OD>", None, 6, 3),
        pipeline.job(1, png(64, 64), "phrase_grounding", "a red car", 6, 3),
        pipeline.job(2, png(30, 90), "caption", None, 5, 1),
        pipeline.job(3, png(50, 50), "region_to_description", "5,5,40,40", 6, 3),
        pipeline.job(4, png(80, 40), "ocr", None, 5, 1),
        pipeline.job(5, png(), "more_detailed_caption", None, 9, 2),
    ]


def _without_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "timing"}


def test_step_hook_does_not_change_what_is_generated(pipeline) -> None:
    jobs = _mixed_jobs(pipeline)
    calls = []
    hooked = pipeline.run(jobs, step=lambda: calls.append(1))
    plain = pipeline.run(jobs)
    assert {i: _without_timing(r) for i, r in hooked.items()} == {i: _without_timing(r) for i, r in plain.items()}
    assert len(calls) >= 9  # after the encoders, then every decode step


def test_engine_answers_equal_the_static_path(pipeline) -> None:
    jobs = _mixed_jobs(pipeline)
    engine, _ = _engine(pipeline)
    answers: dict[int, dict] = {}
    with engine.scheduler.turn("test"):  # hold the turn: the jobs wait and batch by settings
        for job in jobs:
            engine.submit(job, lambda result, i=job.index: answers.__setitem__(i, result))
    engine.join(120)
    assert sorted(answers) == [j.index for j in jobs]
    # The static path for the same batches: one pipeline.run per (max_new_tokens, num_beams), greedy and beam.
    groups: dict[tuple[int, int], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.max_new_tokens, job.num_beams), []).append(job)
    for group in groups.values():
        static = pipeline.run(group)
        for job in group:
            assert _without_timing(answers[job.index]) == _without_timing(static[job.index]), job.prompt
            assert answers[job.index]["timing"]["batch_size"] == len(group)


def test_light_request_is_answered_while_a_heavy_one_decodes(pipeline) -> None:
    """A 4-token greedy caption submitted while a 200-token, 8-beam request decodes: it gets the next turn and
    is answered before the heavy one, which gets at most every 4th turn meanwhile; both answers are what the
    static path gives."""
    heavy = pipeline.job(0, png(), "more_detailed_caption", None, 200, 8)
    light = pipeline.job(0, png(40, 30), "caption", None, 4, 1)
    engine, log = _engine(pipeline)
    answers: dict[str, dict] = {}
    engine.submit(heavy, lambda result: answers.__setitem__("heavy", result))
    while log.count("200x8") < 20:  # the heavy one is decoding
        time.sleep(0.005)
    engine.submit(light, lambda result: answers.__setitem__("light", result))
    engine.join(300)
    first = log.index("4x1")
    last = len(log) - 1 - log[::-1].index("4x1")
    during = log[first:last + 1]
    light_turns = during.count("4x1")  # its first turn (encoders), then one per decode step (it may stop at EOS)
    assert light_turns >= 2
    assert during.count("200x8") <= light_turns // 3 + 1, log  # the heavy one: at most every 4th turn
    tail = log[last + 1:]
    assert tail and tail == ["200x8"] * len(tail)  # answered first; the heavy one was still decoding
    assert _without_timing(answers["light"]) == _without_timing(pipeline.run([light])[0])
    assert _without_timing(answers["heavy"]) == _without_timing(pipeline.run([heavy])[0])


def test_engine_failure_and_cancellation_stay_with_their_request(pipeline, monkeypatch) -> None:
    jobs = _mixed_jobs(pipeline)[:3]
    for job in jobs:
        job.max_new_tokens, job.num_beams = 4, 2
    real_run = pipeline.run

    def run(batch, step=None):
        if any(j.prompt.startswith("<CAPTION_TO_PHRASE_GROUNDING>") for j in batch):
            raise RuntimeError("poisoned row")
        return real_run(batch, step=step)

    monkeypatch.setattr(pipeline, "run", run)
    engine, _ = _engine(pipeline)
    answers: dict[int, object] = {}
    with engine.scheduler.turn("test"):
        for job in jobs:
            engine.submit(job, lambda result, i=job.index: answers.__setitem__(i, result),
                          cancelled=lambda i=job.index: i == 2)
    engine.join(120)
    assert isinstance(answers[1], RuntimeError) and "poisoned" in str(answers[1])
    assert isinstance(answers[2], Cancelled)
    assert answers[0]["task"] == "object_detection"  # type: ignore[index]
