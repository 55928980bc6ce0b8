"""Video intake (gateway/media.py): which files are taken as the containers the chat models decode.

The headers below are the first bytes of files FFmpeg muxes (PyAV 18, 16x16 MPEG-4/VP8): what a camera or an
encoder writes, not made-up signatures.
"""

from __future__ import annotations

import asyncio
import base64
import io

import pytest

from vlmserve.gateway.images import ImageInputError, ImagePolicy
from vlmserve.gateway.media import resolve_video, video_container

MP4 = b"\x00\x00\x00\x1cftypisom\x00\x00\x02\x00isomiso2mp41\x00\x00\x00\x08free\x00\x00\x00 "
MOV = b"\x00\x00\x00\x14ftypqt  \x00\x00\x02\x00qt  \x00\x00\x00\x08wide\x00\x00\x00 mdat\x00\x00\x01\xb3"
M4V = b"\x00\x00\x00\x1cftypM4V \x00\x00\x02\x00M4V isomiso2\x00\x00\x00\x08free\x00\x00\x00 "
WEBM = (b"\x1aE\xdf\xa3\x9fB\x86\x81\x01B\xf7\x81\x01B\xf2\x81\x04B\xf3\x81\x08B\x82\x84webm"
        b"B\x87\x81\x02B\x85\x81\x02\x18S\x80g")
MKV = (b"\x1aE\xdf\xa3\xa3B\x86\x81\x01B\xf7\x81\x01B\xf2\x81\x04B\xf3\x81\x08B\x82\x88matroska"
       b"B\x87\x81\x04B\x85\x81\x02")
AVI = b"RIFF\xa6\x16\x00\x00AVI LIST\xec\x11\x00\x00hdrlavih8\x00\x00\x00@B\x0f\x00\x00\x00\x00\x00"
# ISO BMFF as well, but a still image (an iPhone HEIC photo's ftyp box): not a video.
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(16)
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00"


@pytest.mark.parametrize(("data", "container"), [
    (MP4, "mp4"), (MOV, "mp4"), (M4V, "mp4"), (WEBM, "webm"), (MKV, "webm"),
    (AVI, None), (HEIC, None), (PNG, None), (b"", None), (b"plain bytes, no video", None),
    (b"\x1a\x45\xdf\xa3" + bytes(20), None),  # an EBML magic without a WebM/Matroska doctype
])
def test_video_container_from_real_headers(data: bytes, container: str | None) -> None:
    assert video_container(data) == container
    assert video_container(data + bytes(100_000)) == container  # the rest of the file does not matter


def test_files_muxed_by_ffmpeg_are_recognised() -> None:
    av = pytest.importorskip("av")  # the models extra; the gateway itself never imports it
    np = pytest.importorskip("numpy")

    def mux(fmt: str, codec: str) -> bytes:
        buf = io.BytesIO()
        with av.open(buf, "w", format=fmt) as out:
            stream = out.add_stream(codec, rate=1)
            stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            for packet in [*stream.encode(frame), *stream.encode()]:
                out.mux(packet)
        return buf.getvalue()

    cases = {("mp4", "mpeg4"): "mp4", ("mov", "mpeg4"): "mp4", ("ipod", "mpeg4"): "mp4",
             ("webm", "libvpx"): "webm", ("matroska", "mpeg4"): "webm", ("avi", "mpeg4"): None}
    for (fmt, codec), container in cases.items():
        assert video_container(mux(fmt, codec)) == container, fmt


@pytest.mark.parametrize("data", [AVI, HEIC, PNG])
def test_a_file_that_is_not_a_chat_video_is_415(data: bytes) -> None:
    uri = "data:video/mp4;base64," + base64.b64encode(data).decode()
    with pytest.raises(ImageInputError) as err:
        asyncio.run(resolve_video(uri, ImagePolicy()))
    assert err.value.status == 415 and "not a supported video" in err.value.message


@pytest.mark.parametrize("data", [MP4, MOV, M4V, WEBM, MKV])
def test_a_chat_video_is_taken_as_sent(data: bytes) -> None:
    uri = "data:video/mp4;base64," + base64.b64encode(data).decode()
    assert asyncio.run(resolve_video(uri, ImagePolicy())) == data
