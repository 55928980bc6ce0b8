"""Bounded video decode (vlmserve.model_repository.chat.decode_video): duration, decoded frames, pixels per frame and
wall
time each refuse with an error naming the limit; sampled frames held in memory stay bounded."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from vlmserve.model_repository import common
from vlmserve.model_repository.chat import VideoLimits, decode_video, parse_messages


def mp4(frames: int, fps: int = 10, size: tuple[int, int] = (64, 48)) -> bytes:
    """A real MPEG-4 clip made with PyAV."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            image = Image.new("RGB", size, (i * 7 % 255, 100, 200))
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


CLIP = mp4(40)  # 4 s at 10 fps, 64x48


def test_within_limits_frames_are_spread_over_the_clip() -> None:
    frames = decode_video(CLIP, 10.0, 4)  # every frame is a sampling point: the held list is thinned as it fills
    assert len(frames) == 4
    times = [t for t, _ in frames]
    assert times[0] == 0.0 and times[-1] >= 3.0 and times == sorted(times)
    assert all(img.mode == "RGB" and img.size == (64, 48) for _, img in frames)


@pytest.mark.parametrize(("limits", "names"), [
    (VideoLimits(max_seconds=1.0), "max_video_seconds"),
    (VideoLimits(max_decoded_frames=5), "max_video_decoded_frames"),
    (VideoLimits(max_pixels=64 * 48 - 1), "max_pixels"),
    (VideoLimits(max_decode_s=0.0), "max_video_decode_s"),
])
def test_each_limit_refuses_with_its_name(limits: VideoLimits, names: str) -> None:
    with pytest.raises(common.InputError, match=names):
        decode_video(CLIP, 1.0, 4, limits)


def test_limits_reach_the_chat_input_parser() -> None:
    raw = json.dumps([{"role": "user", "content": [
        {"type": "video", "data": base64.b64encode(CLIP).decode()}, {"type": "text", "text": "what happens?"}]}])
    with pytest.raises(common.InputError, match="max_video_seconds"):
        parse_messages(raw.encode(), 1.0, 4, 16, video_limits=VideoLimits(max_seconds=2.0))
    assert len([p for p in parse_messages(raw.encode(), 1.0, 4, 16)[0]["content"] if p["type"] == "image"]) == 4
