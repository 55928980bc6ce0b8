"""Resolve client image references (data URI, base64, URL, local path) into validated bytes.

This module deliberately avoids torch: it only checks that the bytes are an image
PIL can open, within size and pixel limits, so bad input is rejected with a clear
HTTP status before any model work starts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import os
import re
import socket
import urllib.parse
import warnings
from dataclasses import dataclass
from typing import TypeAlias

import httpx
from PIL import Image, UnidentifiedImageError
from pydantic.json_schema import JsonDict

from vlmserve import telemetry
from vlmserve.families.contract import DEFAULT_MAX_PIXELS
from vlmserve.gateway.errors import DomainError

__all__ = [
    "EXAMPLE_IMAGE",
    "IMAGE_REF_SCHEMA",
    "ImageInputError",
    "ImagePolicy",
    "check_url_allowed",
    "decode_base64_image",
    "fetch_url",
    "resolve_image",
    "validate_image_bytes",
]

_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_WINDOWS_PATH_RE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")
_IMAGE_EXT_RE = re.compile(
    r"\.(?:png|jpe?g|gif|webp|bmp|tiff?|ico|ppm|pgm|pbm|tga|heic|heif|avif)$",
    re.IGNORECASE,
)
# Standard and urlsafe alphabets mixed; padding is stripped before matching.
_B64_BODY_RE = re.compile(r"[A-Za-z0-9+/\-_]*")
_B64_URLSAFE_TO_STD = str.maketrans("-_", "+/")
_PIL_PIXELS_RE = re.compile(r"\((\d+) pixels\)")
# NAT64 well-known prefix: addresses in it are routed to the embedded IPv4 address.
_NAT64_NET = ipaddress.IPv6Network("64:ff9b::/96")
_MAX_DETAIL_CHARS = 200
_ACCEPTED_FORMS = (
    "send a data URI (data:image/<fmt>;base64,...), base64 image data, an http(s) URL or a file path"
)


# A 32x32 PNG as base64: the example image of the OpenAPI schema. "Try it out" then sends a request that runs, and
# schema-driven fuzzers (schemathesis) reach past image decoding with it.
EXAMPLE_IMAGE = ("iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAK0lEQVR42u3NQQEAQAQAMC6NiCKKdSX4bQWW0xWX"
                 "XhwTCAQCgUAgEAgEWz6b/gGoTIbtSQAAAABJRU5ErkJggg==")
# What the schema can state of an image reference (JSON Schema cannot say "decodes as an image"): a non-empty
# string. Use as ``json_schema_extra`` of a str field; resolve_image enforces it (400).
IMAGE_REF_SCHEMA: JsonDict = {"minLength": 1, "examples": [EXAMPLE_IMAGE]}


class ImageInputError(DomainError):
    """Bad client input for an image reference.

    ``status`` is the HTTP status to answer with (400, 413, 415 or 422) and
    ``message`` tells the client what to fix; it never contains a traceback.
    """

    code = "invalid_image"


@dataclass(frozen=True)
class ImagePolicy:
    """Limits and permissions applied while resolving image references.

    ``max_bytes`` caps the encoded size (after base64 decoding or download),
    ``max_pixels`` caps width*height (decompression bombs), ``url_allowlist``
    holds hostnames, IPs or CIDRs that may be fetched even when they are
    private/loopback, and ``local_dir`` is the only folder local paths may
    point into (``None`` refuses all local paths).
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    fetch_timeout_s: float = 10.0
    allow_urls: bool = True
    url_allowlist: tuple[str, ...] = ()
    local_dir: str | None = None
    max_redirects: int = 3


async def resolve_image(ref: str, policy: ImagePolicy, client: httpx.AsyncClient | None = None) -> bytes:
    """Turn a client image reference into validated encoded image bytes.

    ``ref`` is a data URI (``data:image/<fmt>;base64,<b64>``), bare base64 of an
    image file, an http(s) URL, or a local filesystem path (relative paths are
    taken relative to ``policy.local_dir``). ``client`` is used for URL fetches
    when given; redirects are always followed manually so every hop is checked
    by :func:`check_url_allowed`. Raises :class:`ImageInputError` on bad input.
    """
    if not isinstance(ref, str):
        raise ImageInputError("image reference must be a string")
    head = ref.strip()[:8].lower()
    source = ("data_uri" if head.startswith("data:") else "url" if head.startswith(("http://", "https://"))
              else "other")
    # The request's intake span (tracing on): where the image came from and its size; never its bytes or URL.
    with telemetry.span("gateway", "gateway.image", **{"vlmserve.image.source": source}) as span:
        data = await _resolve_image(ref, policy, client)
        if span is not None:
            span.set_attribute("vlmserve.image.bytes", len(data))
        return data


async def _resolve_image(ref: str, policy: ImagePolicy, client: httpx.AsyncClient | None) -> bytes:
    text = ref.strip()
    if not text:
        raise ImageInputError("image reference is empty")
    head = text[:8].lower()
    if head.startswith("data:"):
        data = decode_base64_image(text, policy)
    elif head.startswith(("http://", "https://")):
        data = await _fetch_url(text, policy, client)
    elif _SCHEME_RE.match(text):
        scheme = text.split(":", 1)[0].lower()
        raise ImageInputError(
            f"unsupported image URL scheme {scheme!r}; send an http(s) URL, "
            "a data URI (data:image/<fmt>;base64,...) or base64 image data"
        )
    elif _looks_like_path(text):
        data = await _read_local_file(text, policy)
    else:
        data = decode_base64_image(text, policy)
    validate_image_bytes(data, policy)
    return data


def decode_base64_image(data: str, policy: ImagePolicy) -> bytes:
    """Decode a ``data:image/...;base64,`` URI or bare base64 into bytes.

    Whitespace is ignored, padding is optional and the urlsafe alphabet is
    accepted. Raises :class:`ImageInputError` (400 for invalid base64, 415 for
    a non-image data URI media type, 413 when the decoded size exceeds
    ``policy.max_bytes``). The result is not yet checked to be an image.
    """
    payload = data.strip()
    if payload[:5].lower() == "data:":
        payload = _data_uri_payload(payload)
    if "%" in payload:
        # Data URIs copied from URLs may be percent-encoded; '%' is never valid base64.
        payload = urllib.parse.unquote(payload)
    cleaned = "".join(payload.split())
    if not cleaned:
        raise ImageInputError("image data is empty")
    # Refuse oversized payloads before allocating the decoded copy.
    if (len(cleaned.rstrip("=")) * 3) // 4 > policy.max_bytes:
        raise ImageInputError(_too_large_message(None, policy.max_bytes), status=413)
    body = cleaned.rstrip("=")
    if not _B64_BODY_RE.fullmatch(body):
        raise ImageInputError(f"invalid base64 image data (unexpected characters); {_ACCEPTED_FORMS}")
    if len(body) % 4 == 1:
        raise ImageInputError(f"invalid base64 image data (impossible length); {_ACCEPTED_FORMS}")
    std = body.translate(_B64_URLSAFE_TO_STD)
    try:
        decoded = base64.b64decode(std + "=" * (-len(std) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(f"invalid base64 image data ({_describe(exc)}); {_ACCEPTED_FORMS}") from None
    if not decoded:
        raise ImageInputError("image data is empty")
    if len(decoded) > policy.max_bytes:
        raise ImageInputError(_too_large_message(len(decoded), policy.max_bytes), status=413)
    return decoded


def validate_image_bytes(data: bytes, policy: ImagePolicy) -> tuple[int, int]:
    """Check that ``data`` is an image PIL can decode, within the policy limits.

    Reads the size from the header (lazy ``Image.open``), enforces
    ``policy.max_bytes`` and ``policy.max_pixels``, then runs ``img.verify()``.
    Returns ``(width, height)``. Raises :class:`ImageInputError`: 400 when
    empty, 413 when too large or too many pixels, 415 when not a decodable
    image. PIL's decompression-bomb checks are turned into 413 as well,
    without touching the global ``Image.MAX_IMAGE_PIXELS``.
    """
    if not data:
        raise ImageInputError("image data is empty")
    if len(data) > policy.max_bytes:
        raise ImageInputError(_too_large_message(len(data), policy.max_bytes), status=413)
    with warnings.catch_warnings():
        # Local only: PIL warns (rather than raises) for images between its limit and
        # twice its limit; those must be refused like any other bomb.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                _check_pixels(width, height, policy)
                img.verify()
        except ImageInputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            match = _PIL_PIXELS_RE.search(str(exc))
            count = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
            raise ImageInputError(
                f"image has {count}; the limit is {policy.max_pixels:,} pixels "
                "(possible decompression bomb); send a smaller image",
                status=413,
            ) from None
        except UnidentifiedImageError:
            raise ImageInputError("not a decodable image (unrecognized image format)", status=415) from None
        except Exception as exc:  # noqa: BLE001 - PIL plugins raise many exception types
            raise ImageInputError(f"not a decodable image ({_describe(exc)})", status=415) from None
    return width, height


async def check_url_allowed(url: str, policy: ImagePolicy) -> None:
    """Refuse URLs that are not http(s) or that point at non-public addresses.

    The host is resolved with the running event loop's ``getaddrinfo``; if any
    resolved address is private, loopback, link-local, reserved, multicast or
    unspecified (IPv4-mapped/NAT64/6to4 IPv6 forms are unwrapped first), the
    URL is refused with :class:`ImageInputError` (400) unless the hostname or
    that address matches ``policy.url_allowlist`` (exact hostname, IP, or
    CIDR). An unresolvable host is also a 400.
    """
    if not policy.allow_urls:
        raise ImageInputError(
            "image URLs are disabled on this server (allow_urls is off); "
            "send the image as a data URI or base64 instead"
        )
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ImageInputError(f"invalid image URL ({_describe(exc)})") from None
    await _check_parsed_url(parsed, policy)


# --- URL fetching -------------------------------------------------------------------


async def _check_parsed_url(url: httpx.URL, policy: ImagePolicy) -> _IPAddress:
    """Check ``url`` and return the one address to connect to (every resolved address was judged).

    The fetch connects to exactly this address (see :func:`_pinned`): resolving again at connect time would let
    a DNS answer with TTL 0 pass the check with a public address and then connect to 127.0.0.1 or
    169.254.169.254 (DNS rebinding).
    """
    # Works on httpx's own parse of the URL so the host checked here is exactly the
    # host httpx will connect to (no parser differential between check and fetch).
    if url.scheme not in ("http", "https"):
        raise ImageInputError(f"unsupported image URL scheme {url.scheme!r}; only http and https are allowed")
    try:
        host = url.raw_host.decode("ascii").rstrip(".").lower()
    except UnicodeDecodeError:
        raise ImageInputError("invalid image URL (bad host name)") from None
    if not host:
        raise ImageInputError("invalid image URL (no host)")
    allowed_hosts, allowed_nets = _parse_allowlist(policy.url_allowlist)
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = await _resolve_host(host, port)
    if host in allowed_hosts:
        return addresses[0]
    for address in addresses:
        effective = _unwrap_ipv6(address)
        kind = _non_global_kind(effective)
        if kind is None:
            continue
        if any(candidate in net for candidate in {address, effective} for net in allowed_nets):
            continue
        raise ImageInputError(
            f"image URL host {host!r} resolves to a {kind} address ({effective}), which "
            "is not allowed; if this host is trusted, add the host name, address or a "
            "CIDR containing it to the url_allowlist setting"
        )
    return addresses[0]


def _pinned(url: httpx.URL, address: _IPAddress) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
    """``url`` rewritten to connect to ``address``, with the Host header and TLS SNI of the original host.

    TLS certificates are still verified against the original host name (httpcore uses ``sni_hostname`` as
    the server name it checks).
    """
    host = url.host
    headers = {"Host": url.netloc.decode("ascii")}
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    return url.copy_with(host=str(address)), headers, extensions


async def _resolve_host(host: str, port: int) -> list[_IPAddress]:
    try:
        # Literal IPs need no lookup (and must work on hosts without IPv6 support).
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise ImageInputError(f"image URL host {host!r} could not be resolved ({_describe(exc)})") from None
    addresses: list[_IPAddress] = []
    for info in infos:
        raw = str(info[4][0]).split("%", 1)[0]  # drop IPv6 zone ids like fe80::1%eth0
        try:
            addresses.append(ipaddress.ip_address(raw))
        except ValueError:
            continue
    if not addresses:
        raise ImageInputError(f"image URL host {host!r} could not be resolved")
    return addresses


def _unwrap_ipv6(address: _IPAddress) -> _IPAddress:
    # These IPv6 forms are delivered to an embedded IPv4 address, so judge that one.
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64_NET:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.sixtofour is not None:
            return address.sixtofour
    return address


def _non_global_kind(address: _IPAddress) -> str | None:
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified:
        return "unspecified"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_private:
        return "private"
    if address.is_reserved:
        return "reserved"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "private"
    if not address.is_global:
        return "reserved"
    return None


def _parse_allowlist(entries: tuple[str, ...]) -> tuple[set[str], list[_IPNetwork]]:
    hosts: set[str] = set()
    nets: list[_IPNetwork] = []
    for entry in entries:
        item = entry.strip()
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item.strip("[]"), strict=False))
        except ValueError:
            hosts.add(item.rstrip(".").lower())
    return hosts, nets


async def _fetch_url(url: str, policy: ImagePolicy, client: httpx.AsyncClient | None) -> bytes:
    return await fetch_url(url, policy, client, accept="image/*")


async def fetch_url(url: str, policy: ImagePolicy, client: httpx.AsyncClient | None, *, accept: str) -> bytes:
    """GET ``url`` within ``policy`` (SSRF rules and pinned address on every redirect hop, size cap, timeout).

    Shared by images and videos (:mod:`vlmserve.gateway.media`). Raises :class:`ImageInputError`.
    """
    if not policy.allow_urls:
        raise ImageInputError(
            "image URLs are disabled on this server (allow_urls is off); "
            "send the image as a data URI or base64 instead"
        )
    timeout = policy.fetch_timeout_s
    try:
        if client is None:
            async with httpx.AsyncClient(follow_redirects=False, timeout=timeout) as own:
                return await asyncio.wait_for(_fetch_with_redirects(url, policy, own, accept), timeout)
        # wait_for bounds the whole fetch: httpx timeouts are per read, so a server
        # trickling bytes could otherwise hold the request open indefinitely.
        return await asyncio.wait_for(_fetch_with_redirects(url, policy, client, accept), timeout)
    except (TimeoutError, httpx.TimeoutException):
        raise ImageInputError(
            f"fetching image URL timed out after {timeout:g}s; check the URL or send the image as base64"
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        raise ImageInputError(f"fetching image URL failed ({_describe(exc)})") from None


async def _fetch_with_redirects(url: str, policy: ImagePolicy, client: httpx.AsyncClient, accept: str) -> bytes:
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ImageInputError(f"invalid image URL ({_describe(exc)})") from None
    for _hop in range(policy.max_redirects + 1):
        address = await _check_parsed_url(current, policy)
        target, host_header, extensions = _pinned(current, address)
        async with client.stream(
            "GET",
            target,
            headers={"Accept": accept, "Accept-Encoding": "identity", **host_header},
            extensions=extensions,
            follow_redirects=False,
            timeout=policy.fetch_timeout_s,
        ) as response:
            location = response.headers.get("location")
            if response.status_code in _REDIRECT_STATUSES and location:
                try:
                    # Relative to the URL the client asked for, not to the pinned address.
                    current = current.join(location)
                except (httpx.InvalidURL, ValueError) as exc:
                    raise ImageInputError(
                        f"fetching image URL failed (invalid redirect: {_describe(exc)})"
                    ) from None
                continue
            if not 200 <= response.status_code < 300:
                raise ImageInputError(f"fetching URL failed: HTTP {response.status_code}")
            return await _read_body(response, policy)
    raise ImageInputError(f"fetching image URL failed: more than {policy.max_redirects} redirects")


async def _read_body(response: httpx.Response, policy: ImagePolicy) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise ImageInputError(_too_large_message(int(declared), policy.max_bytes), status=413)
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        # Content-Length may be absent or lie; the streamed count is authoritative.
        if len(body) > policy.max_bytes:
            raise ImageInputError(_too_large_message(None, policy.max_bytes), status=413)
    return bytes(body)


# --- local files --------------------------------------------------------------------


def _looks_like_path(text: str) -> bool:
    if text.startswith("/"):
        # Base64 of a JPEG (bytes FF D8 FF) starts with "/9j/", so a leading slash
        # alone cannot mean a path.
        return not text.startswith("/9j/")
    if text.startswith(("./", "../", ".\\", "..\\", "~")) or _WINDOWS_PATH_RE.match(text):
        return True
    # '.' never occurs in base64, so a trailing image extension means a file name.
    return _IMAGE_EXT_RE.search(text) is not None


async def _read_local_file(text: str, policy: ImagePolicy) -> bytes:
    if policy.local_dir is None:
        raise ImageInputError(
            "local image paths are disabled on this server; send a data URI, base64 or "
            "an http(s) URL (operators: set local_dir to the folder images may be read from)"
        )
    # realpath/stat/read all touch the filesystem, so keep them off the event loop.
    return await asyncio.to_thread(_read_inside_dir, text, policy.local_dir, policy.max_bytes)


def _read_inside_dir(text: str, local_dir: str, max_bytes: int) -> bytes:
    root = os.path.realpath(os.path.expanduser(local_dir))
    # Relative paths are taken relative to the allowed folder, not the server's cwd.
    candidate = os.path.join(root, os.path.expanduser(text))
    real = os.path.realpath(candidate)
    try:
        inside = os.path.commonpath([real, root]) == root
    except ValueError:  # different drives on Windows
        inside = False
    if not inside:
        raise ImageInputError(
            f"image path {text!r} is outside the allowed folder; only files inside "
            "the configured local_dir may be used"
        )
    return _read_file_capped(real, text, max_bytes)


def _read_file_capped(real: str, shown: str, max_bytes: int) -> bytes:
    try:
        info = os.stat(real)
        if not os.path.isfile(real):
            raise ImageInputError(f"image path {shown!r} is not a regular file")
        if info.st_size > max_bytes:
            raise ImageInputError(_too_large_message(info.st_size, max_bytes), status=413)
        with open(real, "rb") as handle:
            # Read one byte past the cap in case the file grew after stat().
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageInputError(f"image file {shown!r} not found") from None
    except PermissionError:
        raise ImageInputError(f"image file {shown!r} is not readable") from None
    except OSError as exc:
        raise ImageInputError(f"image file {shown!r} could not be read ({_describe(exc)})") from None
    if len(data) > max_bytes:
        raise ImageInputError(_too_large_message(None, max_bytes), status=413)
    return data


# --- helpers ------------------------------------------------------------------------


def _data_uri_payload(uri: str) -> str:
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise ImageInputError("malformed data URI (no comma); expected data:image/<fmt>;base64,<data>")
    params = [part.strip().lower() for part in header.split(";")]
    media_type = params[0]
    if not media_type.startswith("image/"):
        shown = media_type or "(none)"
        raise ImageInputError(
            f"data URI media type {shown!r} is not an image; expected data:image/<fmt>;base64,<data>",
            status=415,
        )
    if "base64" not in params[1:]:
        raise ImageInputError("data URI must be base64-encoded; expected data:image/<fmt>;base64,<data>")
    return payload


def _check_pixels(width: int, height: int, policy: ImagePolicy) -> None:
    pixels = width * height
    if pixels > policy.max_pixels:
        raise ImageInputError(
            f"image is {width}x{height} = {pixels:,} pixels; the limit is "
            f"{policy.max_pixels:,} pixels; send a smaller image",
            status=413,
        )


def _too_large_message(size: int | None, max_bytes: int) -> str:
    got = f"image is {size:,} bytes" if size is not None else "image is too large"
    return f"{got}; the limit is {max_bytes:,} bytes; send a smaller image"


def _describe(exc: BaseException) -> str:
    # One line naming the problem; str(exc) only, never a traceback.
    detail = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if len(text) > _MAX_DETAIL_CHARS:
        text = text[: _MAX_DETAIL_CHARS - 3] + "..."
    return text
