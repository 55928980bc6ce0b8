from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import io
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import local_http_server
from vlmserve.gateway.images import (
    ImageInputError,
    ImagePolicy,
    check_url_allowed,
    decode_base64_image,
    resolve_image,
    validate_image_bytes,
)

DEFAULT = ImagePolicy()


# --- helpers -------------------------------------------------------------------------


def make_png(size: tuple[int, int] = (4, 3), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color=0).save(buf, format="PNG")
    return buf.getvalue()


def make_jpeg(size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color=(200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)


def make_bilevel_png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of all zeros: huge declared size, tiny file (built row by row)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def expect_error(status: int, func: Callable[[], Any]) -> ImageInputError:
    with pytest.raises(ImageInputError) as info:
        func()
    err = info.value
    assert err.status == status, err.message
    assert err.message == str(err)
    assert "Traceback" not in err.message
    return err


def resolve_error(status: int, ref: str, policy: ImagePolicy = DEFAULT, **kw: Any) -> str:
    return expect_error(status, lambda: run(resolve_image(ref, policy, **kw))).message


def url_error(url: str, policy: ImagePolicy = DEFAULT) -> str:
    return expect_error(400, lambda: run(check_url_allowed(url, policy))).message


# --- base64 / data URI ---------------------------------------------------------------


def test_data_uri_png() -> None:
    png = make_png()
    assert run(resolve_image(f"data:image/png;base64,{b64(png)}", DEFAULT)) == png


def test_data_uri_case_and_extra_params() -> None:
    png = make_png()
    ref = f"DATA:Image/PNG;name=x.png;BASE64,{b64(png)}"
    assert run(resolve_image(ref, DEFAULT)) == png


def test_bare_base64_jpeg_not_mistaken_for_path() -> None:
    jpeg = make_jpeg()
    ref = b64(jpeg)
    assert ref.startswith("/9j/")
    assert run(resolve_image(ref, DEFAULT)) == jpeg


def test_urlsafe_unpadded_whitespace_base64() -> None:
    png = make_png((5, 5))
    encoded = base64.urlsafe_b64encode(png).decode("ascii").rstrip("=")
    wrapped = "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60))
    assert decode_base64_image(f"  {wrapped}\n", DEFAULT) == png
    assert run(resolve_image(f"data:image/png;base64,\n{wrapped}", DEFAULT)) == png


def test_percent_encoded_data_uri() -> None:
    png = make_png()
    quoted = b64(png).replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    assert decode_base64_image(f"data:image/png;base64,{quoted}", DEFAULT) == png


@pytest.mark.parametrize("bad", ["not base64!!", "abc$def", "QUJD=QUJD", "QUJDR"])
def test_invalid_base64(bad: str) -> None:
    msg = expect_error(400, lambda: decode_base64_image(bad, DEFAULT)).message
    assert "invalid base64" in msg
    assert "invalid base64" in resolve_error(400, bad)


def test_data_uri_non_image_media_type() -> None:
    msg = resolve_error(415, f"data:text/plain;base64,{b64(b'hello')}")
    assert "text/plain" in msg


def test_data_uri_not_base64_or_malformed() -> None:
    assert "base64" in resolve_error(400, "data:image/svg+xml,<svg></svg>")
    assert "malformed" in resolve_error(400, "data:image/png;base64")


def test_non_image_bytes_415() -> None:
    msg = resolve_error(415, b64(b"this is certainly not an image file" * 3))
    assert msg.startswith("not a decodable image (")
    expect_error(415, lambda: validate_image_bytes(b"GIF89a-truncated", DEFAULT))


def test_truncated_png_415() -> None:
    png = make_png((64, 64), mode="RGB")
    msg = expect_error(415, lambda: validate_image_bytes(png[: len(png) // 2], DEFAULT)).message
    assert "not a decodable image" in msg


def test_empty_inputs_400() -> None:
    expect_error(400, lambda: validate_image_bytes(b"", DEFAULT))
    resolve_error(400, "")
    resolve_error(400, "   \n")
    resolve_error(400, "data:image/png;base64,")


def test_validate_returns_size() -> None:
    assert validate_image_bytes(make_png((7, 5)), DEFAULT) == (7, 5)
    assert validate_image_bytes(make_jpeg((9, 4)), DEFAULT) == (9, 4)


# --- size and pixel limits -----------------------------------------------------------


def test_max_bytes_413() -> None:
    png = make_png((32, 32))
    policy = ImagePolicy(max_bytes=len(png) - 1)
    assert "limit" in expect_error(413, lambda: validate_image_bytes(png, policy)).message
    expect_error(413, lambda: decode_base64_image(b64(png), policy))
    resolve_error(413, f"data:image/png;base64,{b64(png)}", policy)
    # Exactly at the cap is fine.
    assert validate_image_bytes(png, ImagePolicy(max_bytes=len(png))) == (32, 32)


def test_oversized_base64_refused_before_decoding() -> None:
    policy = ImagePolicy(max_bytes=1000)
    expect_error(413, lambda: decode_base64_image("A" * 8000, policy))


def test_max_pixels_413_mentions_count_and_cap() -> None:
    png = make_png((200, 100), mode="L")
    msg = expect_error(413, lambda: validate_image_bytes(png, ImagePolicy(max_pixels=10_000))).message
    assert "20,000 pixels" in msg
    assert "10,000" in msg
    assert validate_image_bytes(png, ImagePolicy(max_pixels=20_000)) == (200, 100)


def test_pixel_bomb_over_pil_hard_limit() -> None:
    # 400M pixels: above twice PIL's default limit, so PIL itself raises
    # DecompressionBombError; it must still come out as a 413.
    bomb = make_bilevel_png_bomb(20_000, 20_000)
    assert len(bomb) < 200_000
    before_limit = Image.MAX_IMAGE_PIXELS
    before_filters = list(warnings.filters)
    msg = expect_error(413, lambda: validate_image_bytes(bomb, DEFAULT)).message
    assert "pixels" in msg
    assert "40,000,000" in msg
    msg = resolve_error(413, b64(bomb))
    assert "pixels" in msg
    assert before_limit == Image.MAX_IMAGE_PIXELS
    assert list(warnings.filters) == before_filters


def test_pixel_bomb_in_pil_warning_band() -> None:
    # ~100M pixels: PIL only warns here; with a permissive policy the warning must
    # still be turned into a 413 rather than slipping through.
    bomb = make_bilevel_png_bomb(10_000, 10_000)
    policy = ImagePolicy(max_pixels=10**9)
    msg = expect_error(413, lambda: validate_image_bytes(bomb, policy)).message
    assert "100,000,000 pixels" in msg


# --- URL checks (no network) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1/x.png", "loopback"),
        ("http://127.0.0.1:8080/x.png", "loopback"),
        ("http://10.0.0.1/x.png", "private"),
        ("http://192.168.1.5/x.png", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::1]/x.png", "loopback"),
        ("http://[::ffff:127.0.0.1]/x.png", "loopback"),
        ("http://[::ffff:a9fe:a9fe]/x.png", "link-local"),
        ("http://[64:ff9b::a00:1]/x.png", "private"),
        ("http://[fe80::1]/x.png", "link-local"),
        ("http://[fd00::1]/x.png", "private"),
        ("http://0.0.0.0/x.png", "unspecified"),
        ("http://224.0.0.1/x.png", "multicast"),
    ],
)
def test_non_global_addresses_refused(url: str, kind: str) -> None:
    msg = url_error(url)
    assert kind in msg
    assert "url_allowlist" in msg


def test_public_ip_literal_allowed() -> None:
    run(check_url_allowed("https://93.184.216.34/cat.png", DEFAULT))
    run(check_url_allowed("http://[2606:4700:4700::1111]/cat.png", DEFAULT))


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x.png", "file:///etc/passwd", "gopher://127.0.0.1/", "data:,x"]
)
def test_bad_schemes_refused(url: str) -> None:
    assert "scheme" in url_error(url)


def test_bad_schemes_refused_by_resolve_image() -> None:
    assert "scheme" in resolve_error(400, "ftp://example.com/x.png")
    assert "scheme" in resolve_error(400, "file:///etc/passwd")


def test_urls_disabled() -> None:
    policy = ImagePolicy(allow_urls=False)
    assert "disabled" in url_error("https://93.184.216.34/x.png", policy)
    assert "disabled" in resolve_error(400, "https://93.184.216.34/x.png", policy)


def test_allowlist_ip_cidr_and_mapped() -> None:
    run(check_url_allowed("http://127.0.0.1:9/x", ImagePolicy(url_allowlist=("127.0.0.1",))))
    run(check_url_allowed("http://[::1]/x", ImagePolicy(url_allowlist=("::1",))))
    run(check_url_allowed("http://[::1]/x", ImagePolicy(url_allowlist=("[::1]",))))
    cidr = ImagePolicy(url_allowlist=("10.0.0.0/8",))
    run(check_url_allowed("http://10.1.2.3/x", cidr))
    assert "private" in url_error("http://192.168.0.1/x", cidr)
    # The mapped form of an allowlisted IPv4 address is the same destination.
    run(check_url_allowed("http://[::ffff:127.0.0.1]/x", ImagePolicy(url_allowlist=("127.0.0.1",))))


def _with_fake_dns(table: dict[str, list[str]], url: str, policy: ImagePolicy) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def fake_getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
            if host not in table:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            out: list[Any] = []
            for addr in table[host]:
                if ":" in addr:
                    out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (addr, port, 0, 0)))
                else:
                    out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, port)))
            return out

        # Instance attribute shadows the method only for this private loop: no DNS traffic.
        loop.getaddrinfo = fake_getaddrinfo  # type: ignore[method-assign,assignment]
        await check_url_allowed(url, policy)

    asyncio.run(scenario())


def test_hostname_resolving_to_private_refused() -> None:
    table = {
        "images.example": ["93.184.216.34"],
        "internal.example": ["10.1.1.1"],
        "mixed.example": ["93.184.216.34", "127.0.0.1"],
        "scoped.example": ["fe80::1%eth0"],
    }
    _with_fake_dns(table, "https://images.example/cat.png", DEFAULT)
    for host, kind in [
        ("internal.example", "private"),
        ("mixed.example", "loopback"),
        ("scoped.example", "link-local"),
    ]:
        check = functools.partial(_with_fake_dns, table, f"http://{host}/x.png", DEFAULT)
        msg = expect_error(400, check).message
        assert kind in msg
        assert "url_allowlist" in msg
    by_name = ImagePolicy(url_allowlist=("Internal.Example",))
    _with_fake_dns(table, "http://internal.example./x.png", by_name)


def test_unresolvable_host_400() -> None:
    msg = expect_error(400, lambda: _with_fake_dns({}, "http://no-such-host.invalid/x.png", DEFAULT)).message
    assert "could not be resolved" in msg


def test_invalid_url_400() -> None:
    url_error("http://")
    url_error("http://[::1/x")


# --- local paths ---------------------------------------------------------------------


def test_local_paths_disabled_by_default(tmp_path: Path) -> None:
    img = tmp_path / "a.png"
    img.write_bytes(make_png())
    for ref in [str(img), "./a.png", "~/a.png", "sub/a.png", "a.png", "C:\\img\\a.png"]:
        assert "local_dir" in resolve_error(400, ref)


def test_local_path_inside_allowed_dir(tmp_path: Path) -> None:
    png = make_png()
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(png)
    (tmp_path / "sub" / "b.PNG").write_bytes(png)
    policy = ImagePolicy(local_dir=str(tmp_path))
    assert run(resolve_image(str(tmp_path / "a.png"), policy)) == png
    assert run(resolve_image("a.png", policy)) == png
    assert run(resolve_image("./sub/b.PNG", policy)) == png
    assert run(resolve_image("sub/b.PNG", policy)) == png
    assert run(resolve_image("sub/../a.png", policy)) == png


def test_local_path_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "a.png").write_bytes(make_png())
    assert run(resolve_image("~/a.png", ImagePolicy(local_dir=str(tmp_path))))


def test_local_path_traversal_and_symlink_refused(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(make_png())
    (allowed / "link.png").symlink_to(secret)
    (allowed / "dirlink").symlink_to(tmp_path)
    policy = ImagePolicy(local_dir=str(allowed))
    for ref in [
        "../secret.png",
        "./../secret.png",
        str(allowed / ".." / "secret.png"),
        str(secret),
        "link.png",
        str(allowed / "link.png"),
        "dirlink/secret.png",
    ]:
        assert "outside the allowed folder" in resolve_error(400, ref, policy)


def test_allowed_dir_given_through_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.png").write_bytes(make_png())
    (tmp_path / "alias").symlink_to(real)
    policy = ImagePolicy(local_dir=str(tmp_path / "alias"))
    assert run(resolve_image(str(tmp_path / "alias" / "a.png"), policy))
    assert run(resolve_image(str(real / "a.png"), policy))


def test_local_missing_directory_and_too_large(tmp_path: Path) -> None:
    png = make_png((40, 40))
    (tmp_path / "a.png").write_bytes(png)
    (tmp_path / "d.png").mkdir()
    policy = ImagePolicy(local_dir=str(tmp_path))
    assert "not found" in resolve_error(400, "missing.png", policy)
    assert "not a regular file" in resolve_error(400, "d.png", policy)
    small = ImagePolicy(local_dir=str(tmp_path), max_bytes=len(png) - 1)
    resolve_error(413, "a.png", small)


def test_local_non_image_file_415(tmp_path: Path) -> None:
    (tmp_path / "fake.jpg").write_bytes(b"plain text, not a jpeg")
    resolve_error(415, "fake.jpg", ImagePolicy(local_dir=str(tmp_path)))


# --- real fetches from a local HTTP server (127.0.0.1 only) --------------------------

PNG_BODY = make_png((6, 6))
BIG_BODY = b"\x00" * 50_000


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path
        if path == "/img.png":
            self._send(200, PNG_BODY, {"Content-Type": "image/png"})
        elif path == "/redirect":
            self._send(302, headers={"Location": "/img.png"})
        elif path == "/redirect-abs":
            host = self.headers.get("Host", "127.0.0.1")
            self._send(301, headers={"Location": f"http://{host}/redirect"})
        elif path == "/redirect-private":
            self._send(302, headers={"Location": "http://10.255.255.1/x"})
        elif path == "/redirect-ftp":
            self._send(302, headers={"Location": "ftp://127.0.0.1/x.png"})
        elif path == "/loop":
            self._send(302, headers={"Location": "/loop"})
        elif path == "/big":
            self._send(200, BIG_BODY)
        elif path == "/big-stream":
            # No Content-Length: body delimited by connection close (HTTP/1.0).
            self.send_response(200)
            self.end_headers()
            for _ in range(10):
                self.wfile.write(BIG_BODY[:5000])
        elif path == "/text":
            self._send(200, b"hello, not an image", {"Content-Type": "text/plain"})
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, PNG_BODY)
        else:
            self._send(404, b"nope")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with local_http_server(_Handler) as port:
        yield f"http://127.0.0.1:{port}"


LOCAL = ImagePolicy(url_allowlist=("127.0.0.1",), fetch_timeout_s=5.0)


def fetch(url: str, policy: ImagePolicy = LOCAL) -> tuple[bytes | ImageInputError, list[str]]:
    """Fetch through a recording client; returns the result (or error) and the URLs requested."""
    seen: list[str] = []

    async def record(request: httpx.Request) -> None:
        seen.append(str(request.url))

    async def scenario() -> bytes | ImageInputError:
        # trust_env=False: proxy variables must not route test traffic off this machine.
        async with httpx.AsyncClient(trust_env=False, event_hooks={"request": [record]}) as client:
            try:
                return await resolve_image(url, policy, client)
            except ImageInputError as exc:
                return exc

    return asyncio.run(scenario()), seen


def fetch_error(status: int, url: str, policy: ImagePolicy = LOCAL) -> tuple[str, list[str]]:
    result, seen = fetch(url, policy)
    assert isinstance(result, ImageInputError), result
    assert result.status == status, result.message
    assert "Traceback" not in result.message
    assert all(u.startswith("http://127.0.0.1:") for u in seen), seen
    return result.message, seen


def test_fetch_ok(server: str) -> None:
    result, seen = fetch(f"{server}/img.png")
    assert result == PNG_BODY
    assert seen == [f"{server}/img.png"]


def test_fetch_follows_redirects_checking_each_hop(server: str) -> None:
    result, seen = fetch(f"{server}/redirect-abs")
    assert result == PNG_BODY
    assert seen == [f"{server}/redirect-abs", f"{server}/redirect", f"{server}/img.png"]


def test_fetch_with_own_client(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert run(resolve_image(f"{server}/redirect", LOCAL)) == PNG_BODY


def test_fetch_refused_without_allowlist(server: str) -> None:
    msg, seen = fetch_error(400, f"{server}/img.png", DEFAULT)
    assert "loopback" in msg
    assert "url_allowlist" in msg
    assert seen == []


def test_redirect_to_private_host_refused_before_connecting(server: str) -> None:
    msg, seen = fetch_error(400, f"{server}/redirect-private")
    assert "10.255.255.1" in msg
    assert "private" in msg
    assert seen == [f"{server}/redirect-private"]


def test_redirect_to_other_scheme_refused(server: str) -> None:
    msg, _ = fetch_error(400, f"{server}/redirect-ftp")
    assert "scheme" in msg


def test_too_many_redirects(server: str) -> None:
    msg, seen = fetch_error(400, f"{server}/loop", ImagePolicy(url_allowlist=("127.0.0.1",), max_redirects=2))
    assert "redirects" in msg
    assert len(seen) == 3


def test_fetch_http_error_status(server: str) -> None:
    msg, _ = fetch_error(400, f"{server}/missing.png")
    assert msg == "fetching URL failed: HTTP 404"


def test_fetch_too_large(server: str) -> None:
    small = ImagePolicy(url_allowlist=("127.0.0.1",), max_bytes=10_000)
    fetch_error(413, f"{server}/big", small)
    fetch_error(413, f"{server}/big-stream", small)


def test_fetch_non_image_415(server: str) -> None:
    fetch_error(415, f"{server}/text")


def test_fetch_timeout(server: str) -> None:
    policy = ImagePolicy(url_allowlist=("127.0.0.1",), fetch_timeout_s=0.3)
    msg, _ = fetch_error(400, f"{server}/slow", policy)
    assert "timed out" in msg


def test_fetch_connection_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The port was just released, so nothing listens there.
    msg, _ = fetch_error(400, f"http://127.0.0.1:{port}/x.png")
    assert msg.startswith("fetching image URL failed (")


def test_no_torch_import() -> None:
    # A fresh interpreter, since other tests in the session may load torch themselves.
    import vlmserve.gateway.images

    root = Path(vlmserve.gateway.images.__file__).resolve().parents[1]
    code = "import sys, vlmserve.gateway.images; sys.exit('torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
