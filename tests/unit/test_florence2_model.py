"""Florence-2 model logic without a server: task table, region parsing, validation, reference post-processing.

Post-processing is checked on hand-written generations with known coordinates (random weights cannot show it),
through the checkpoint's own ``Florence2Processor.post_process_generation``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_repository import runtime
from model_repository.florence2 import Florence2Pipeline, Job
from model_repository.florence2_tasks import TASKS, UnknownTask, find_task, region_to_loc_tokens


def png(w: int = 100, h: int = 80) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (0, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pipeline(tiny_repo: Path) -> Florence2Pipeline:
    encoder = runtime.OnnxEncoder(tiny_repo / "florence2_vision/1/model.onnx")
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
    with pytest.raises(runtime.InputError, match="needs TEXT"):
        pipeline.job(0, png(), "phrase_grounding", None, None, None)
    with pytest.raises(runtime.InputError, match="unknown task"):
        pipeline.job(0, png(), "<NOPE>", None, None, None)
    with pytest.raises(runtime.InputError, match="MAX_NEW_TOKENS must be 1..1024"):
        pipeline.job(0, png(), "caption", None, 5000, None)
    with pytest.raises(runtime.InputError, match="NUM_BEAMS"):
        pipeline.job(0, png(), "caption", None, None, 0)
    with pytest.raises(runtime.InputError, match="not a decodable image"):
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
