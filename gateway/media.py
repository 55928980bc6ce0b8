"""Video intake for chat: ``data:video/...;base64,`` URIs and http(s) URLs, checked before any model work.

URLs follow the image SSRF rules (:func:`vlmserve.gateway.images.fetch_url`: checked and pinned address on every
redirect
hop) with their own size cap. The gateway cannot decode video without heavy native libraries, so it checks the container
signature (MP4/QuickTime/M4V, WebM/Matroska; read by the ``filetype`` package) and leaves frame decoding to the model.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses

import filetype
import httpx

from vlmserve.gateway.images import ImageInputError, ImagePolicy, fetch_url

__all__ = ["resolve_video", "video_container", "video_policy"]

_FORMS = "send a data URI (data:video/mp4;base64,...) or an http(s) URL"
# The containers the chat models decode, by the media type ``filetype`` reports for the file's signature: ISO BMFF
# with a video brand (MP4, QuickTime, M4V) and EBML with a WebM or Matroska doctype. Other videos (AVI, FLV, MPEG-PS,
# WMV) and other ISO BMFF files (HEIC/AVIF images) are not taken.
_SNIFF_BYTES = 8192  # what filetype reads of a file
_CONTAINERS = {
    "video/mp4": "mp4",
    "video/quicktime": "mp4",
    "video/x-m4v": "mp4",
    "video/webm": "webm",
    "video/x-matroska": "webm",
}


def video_policy(image_policy: ImagePolicy, max_bytes: int) -> ImagePolicy:
    """The image policy's URL rules with the video size cap."""
    return dataclasses.replace(image_policy, max_bytes=max_bytes)


def video_container(data: bytes) -> str | None:
    """``"mp4"`` (MP4, MOV, M4V), ``"webm"`` (WebM, MKV) or None, from the file signature."""
    kind = filetype.video_match(bytes(data[:_SNIFF_BYTES]))
    return None if kind is None else _CONTAINERS.get(kind.mime)


async def resolve_video(ref: str, policy: ImagePolicy, client: httpx.AsyncClient | None = None) -> bytes:
    """The bytes of a video given as a data URI or an http(s) URL, within ``policy.max_bytes``.

    Raises :class:`vlmserve.gateway.images.ImageInputError` (400 bad reference or refused URL, 413 too large,
    415 not a video).
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ImageInputError(f"video URL is empty; {_FORMS}")
    text = ref.strip()
    head = text[:8].lower()
    if head.startswith("data:"):
        data = _decode_data_uri(text, policy.max_bytes)
    elif head.startswith(("http://", "https://")):
        data = await _fetch(text, policy, client)
    else:
        raise ImageInputError(f"unsupported video reference; {_FORMS}")
    if video_container(data) is None:
        raise ImageInputError("not a supported video (expected an MP4/MOV or WebM/MKV file)", status=415)
    return data


def _decode_data_uri(uri: str, max_bytes: int) -> bytes:
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise ImageInputError("malformed data URI (no comma); expected data:video/<fmt>;base64,<data>")
    params = [p.strip().lower() for p in header.split(";")]
    if not params[0].startswith("video/"):
        raise ImageInputError(f"data URI media type {params[0] or '(none)'!r} is not a video; "
                              "expected data:video/<fmt>;base64,<data>", status=415)
    if "base64" not in params[1:]:
        raise ImageInputError("data URI must be base64-encoded; expected data:video/<fmt>;base64,<data>")
    cleaned = "".join(payload.split())
    if (len(cleaned.rstrip("=")) * 3) // 4 > max_bytes:
        raise ImageInputError(_too_large(max_bytes), status=413)
    try:
        data = base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("invalid base64 video data") from None
    if not data:
        raise ImageInputError("video data is empty")
    return data


async def _fetch(url: str, policy: ImagePolicy, client: httpx.AsyncClient | None) -> bytes:
    try:
        return await fetch_url(url, policy, client, accept="video/*")
    except ImageInputError as exc:
        if exc.status == 413:
            raise ImageInputError(_too_large(policy.max_bytes), status=413) from None
        # Same rules as images; the shared messages say "image", which would mislead here.
        raise ImageInputError(exc.message.replace("image URL", "video URL").replace("the image", "the video"),
                              exc.status) from None


def _too_large(max_bytes: int) -> str:
    return f"video is too large; the limit is {max_bytes:,} bytes (max_video_bytes); send a shorter clip"
