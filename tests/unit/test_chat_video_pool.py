"""Chat videos are decoded in a bounded worker pool, off Triton's execute thread, within a pixel budget per
request (max_video_pixels): the ChatModel loaded by its own ``initialize`` on the tiny Qwen2-VL, fake Triton."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest

from tests.unit.test_chat_model import FakeRequest, chat_model, fake_pb, tiny_qwen_dir  # noqa: F401 (fixtures)
from tests.unit.test_video_bounds import mp4 as bounds_mp4
from vlmserve.model_repository import chat, common


def mp4(frames: int = 4, fps: int = 1, size: tuple[int, int] = (64, 48)) -> bytes:
    """A real MPEG-4 clip (PyAV): ``frames`` frames at ``fps``."""
    return bounds_mp4(frames, fps, size)


def video_message(data: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "data": base64.b64encode(data).decode()},
                                         {"type": "text", "text": "what happens?"}]}]


def test_a_text_request_is_answered_while_a_video_decodes(fake_pb, tiny_qwen_dir, tmp_path,  # noqa: F811
                                                          monkeypatch) -> None:
    """A video whose decode is held (as a 30 s decode would be) must not hold up the next request: before, execute
    decoded it on Triton's thread and admitted nothing else until it was done."""
    started, go_on = threading.Event(), threading.Event()
    real_decode = chat.decode_video

    def slow_decode(*args, **kwargs):
        started.set()
        go_on.wait(120)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(chat, "decode_video", slow_decode)
    model = chat_model(tmp_path, tiny_qwen_dir)
    try:
        video = FakeRequest(MESSAGES=video_message(mp4()), PARAMETERS={"max_tokens": 3, "video_max_frames": 2})
        text = FakeRequest(MESSAGES=[{"role": "user", "content": "hello"}], PARAMETERS={"max_tokens": 3})
        triton_thread = threading.Thread(target=model.execute, args=([video, text],), daemon=True)
        triton_thread.start()
        assert started.wait(60), "the video decode never started"
        answered = text.sender.done.wait(60)
        video_done_early = video.sender.done.is_set()
        go_on.set()
        assert answered, "the text request waited for the video decode"
        assert not video_done_early
        error, usage = text.outcome()
        assert error is None and usage["completion_tokens"] >= 1
        error, usage = video.outcome()  # the video request still gets its own answer, once decoded
        assert error is None and usage["prompt_tokens"] > usage["completion_tokens"]
        triton_thread.join(60)
        assert not triton_thread.is_alive()
        assert model.admission.count == 0 or _drains(model)
    finally:
        go_on.set()
        model.finalize()


def _drains(model) -> bool:
    deadline = time.monotonic() + 30
    while model.admission.count and time.monotonic() < deadline:
        time.sleep(0.01)
    return model.admission.count == 0


def test_a_bad_video_is_that_request_s_400_from_the_pool(fake_pb, tiny_qwen_dir, tmp_path) -> None:  # noqa: F811
    model = chat_model(tmp_path, tiny_qwen_dir, max_video_pixels=5 * 64 * 48)
    try:
        broken = FakeRequest(MESSAGES=video_message(b"\x00\x00\x00\x18ftypmp42" + bytes(64)))
        too_many = FakeRequest(MESSAGES=video_message(mp4(frames=8)), PARAMETERS={"video_max_frames": 8})
        fits = FakeRequest(MESSAGES=video_message(mp4(frames=4)), PARAMETERS={"max_tokens": 2})
        model.execute([broken, too_many, fits])
        assert "not a decodable video" in broken.outcome()[0]
        error = too_many.outcome()[0]
        assert error is not None and "8 frames x 64x48 = 24,576 pixels" in error
        assert "the limit is 15,360 pixels of video frames per request (max_video_pixels)" in error
        assert fits.outcome()[0] is None
        assert _drains(model)  # every refused request gave its admission slot back
    finally:
        model.finalize()


def test_the_pixel_budget_counts_every_video_of_the_request() -> None:
    limits = chat.VideoLimits(max_request_pixels=6 * 64 * 48)
    clip = base64.b64encode(mp4(frames=4)).decode()
    raw = [{"role": "user", "content": [{"type": "video", "data": clip}, {"type": "video", "data": clip}]}]
    assert len(chat.decode_video(mp4(frames=4), 1.0, 8, limits)) == 4  # one fits
    with pytest.raises(common.InputError, match=r"4 frames x 64x48 = 12,288 pixels \+ 12,288 of the request's "
                                                 r"earlier videos; the limit is 18,432 .*\(max_video_pixels\)"):
        chat.parse_messages(json.dumps(raw).encode(), 1.0, 8, 16,
                            video_limits=limits)


def test_the_pixel_budget_is_checked_from_the_header_before_decoding(monkeypatch) -> None:
    """A clip whose header already says it will not fit is refused without decoding a frame."""
    decoded: list[int] = []
    check = chat._check_video_progress  # called on every decoded frame
    monkeypatch.setattr(chat, "_check_video_progress", lambda *a: decoded.append(1) or check(*a))
    with pytest.raises(common.InputError, match="max_video_pixels"):
        chat.decode_video(mp4(frames=6), 1.0, 8, chat.VideoLimits(max_request_pixels=3 * 64 * 48))
    assert not decoded
    assert len(chat.decode_video(mp4(frames=6), 1.0, 8, chat.VideoLimits())) == 6 and decoded


def test_at_most_video_workers_decodes_run_at_once(fake_pb, tiny_qwen_dir, tmp_path,  # noqa: F811
                                                   monkeypatch) -> None:
    """The pool is bounded: with video_workers 2, four videos decode two at a time, and each gets its answer."""
    lock, running, most = threading.Lock(), [0], [0]
    both, go_on = threading.Event(), threading.Event()
    real_decode = chat.decode_video

    def tracked(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            if running[0] == 2:
                both.set()
        go_on.wait(120)
        try:
            return real_decode(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(chat, "decode_video", tracked)
    model = chat_model(tmp_path, tiny_qwen_dir, video_workers=2)
    try:
        videos = [FakeRequest(MESSAGES=video_message(mp4()), PARAMETERS={"max_tokens": 2, "video_max_frames": 2})
                  for _ in range(4)]
        model.execute(videos)  # returns at once: the decodes wait in the pool
        assert both.wait(60)
        time.sleep(0.2)  # a third decode, were the pool unbounded, would have started by now
        assert most[0] == 2
        go_on.set()
        for video in videos:
            error, usage = video.outcome()
            assert error is None and usage["completion_tokens"] >= 1
        assert most[0] == 2 and _drains(model)
    finally:
        go_on.set()
        model.finalize()
