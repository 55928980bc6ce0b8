"""DNS rebinding: the gateway connects to the address it checked, on every hop, with the Host header and TLS SNI
of the original host name.

A resolver that answers differently on successive calls stands in for a TTL-0 DNS answer; real local HTTP(S)
servers on 127.0.0.1 record what reached them.
"""

from __future__ import annotations

import asyncio
import datetime
import http.server
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import local_http_server
from vlmserve.gateway.images import ImageInputError, ImagePolicy, resolve_image
from vlmserve.gateway.media import resolve_video

PUBLIC = "93.184.216.34"  # outside every private/reserved range; nothing here can reach it
UNROUTED = "10.255.255.1"


class FlipResolver:
    """``socket.getaddrinfo`` whose answers for a name change from call to call (the last one repeats)."""

    def __init__(self, real, answers: dict[str, list[str]]) -> None:
        self.real = real
        self.answers = {name: list(seq) for name, seq in answers.items()}
        self.calls: dict[str, int] = {}

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002 - socket's signature
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return self.real(host, port, family, type, proto, flags)
        seq = self.answers[name]
        self.calls[name] = self.calls.get(name, 0) + 1
        address = seq.pop(0) if len(seq) > 1 else seq[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port or 0)))]


@pytest.fixture
def png(tmp_path: Path) -> bytes:
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    return path.read_bytes()


class Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]]
    routes: dict[str, tuple[int, dict[str, str], bytes]]

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        sni = getattr(self.connection, "vlm_sni", None)
        self.seen.append({"path": self.path, "host": self.headers.get("Host", ""), "sni": sni or ""})
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _serve(tls: ssl.SSLContext | None) -> Iterator[tuple[int, type[Recorder]]]:
    handler = type("Handler", (Recorder,), {"seen": [], "routes": {}})
    with local_http_server(handler, tls) as port:
        yield port, handler


@pytest.fixture
def http_server() -> Iterator[tuple[int, type[Recorder]]]:
    yield from _serve(None)


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _policy(**kw) -> ImagePolicy:
    return ImagePolicy(fetch_timeout_s=5.0, **kw)


def test_rebinding_to_loopback_after_the_check_never_reaches_loopback(monkeypatch, http_server, png) -> None:
    port, handler = http_server
    handler.routes["/x.png"] = (200, {"Content-Type": "image/png"}, png)
    resolver = FlipResolver(socket.getaddrinfo, {"rebind.test": [PUBLIC, "127.0.0.1"]})
    monkeypatch.setattr(socket, "getaddrinfo", resolver)

    with pytest.raises(ImageInputError) as err:
        asyncio.run(resolve_image(f"http://rebind.test:{port}/x.png", _policy()))
    assert err.value.status == 400
    assert handler.seen == []  # the second (loopback) answer was never used to connect
    assert resolver.calls["rebind.test"] == 1  # resolved once: for the check


def test_the_checked_address_is_used_with_the_original_host_header(monkeypatch, http_server, png) -> None:
    port, handler = http_server
    handler.routes["/x.png"] = (200, {"Content-Type": "image/png"}, png)
    # The check sees 127.0.0.1 (allow-listed); a second lookup would give an unreachable address.
    resolver = FlipResolver(socket.getaddrinfo, {"rebind.test": ["127.0.0.1", UNROUTED]})
    monkeypatch.setattr(socket, "getaddrinfo", resolver)

    data = asyncio.run(resolve_image(f"http://rebind.test:{port}/x.png", _policy(url_allowlist=("127.0.0.1/32",))))
    assert data == png
    assert handler.seen == [{"path": "/x.png", "host": f"rebind.test:{port}", "sni": ""}]
    assert resolver.calls["rebind.test"] == 1


def test_every_redirect_hop_is_checked_and_pinned(monkeypatch, http_server, png) -> None:
    port, handler = http_server
    handler.routes["/start"] = (302, {"Location": f"http://hop.test:{port}/x.png"}, b"")
    handler.routes["/x.png"] = (200, {"Content-Type": "image/png"}, png)
    handler.routes["/evil"] = (302, {"Location": f"http://evil.test:{port}/x.png"}, b"")
    resolver = FlipResolver(socket.getaddrinfo, {"first.test": ["127.0.0.1", UNROUTED],
                                                 "hop.test": ["127.0.0.1", UNROUTED],
                                                 "evil.test": ["127.0.0.1"]})
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    policy = _policy(url_allowlist=("first.test", "hop.test"))

    assert asyncio.run(resolve_image(f"http://first.test:{port}/start", policy)) == png
    assert [(s["path"], s["host"]) for s in handler.seen] == [("/start", f"first.test:{port}"),
                                                             ("/x.png", f"hop.test:{port}")]
    # A hop to a host that is not allow-listed and resolves to loopback is refused before any connection.
    handler.seen.clear()
    monkeypatch.setattr(socket, "getaddrinfo", FlipResolver(socket.getaddrinfo.real, {  # type: ignore[attr-defined]
        "first.test": ["127.0.0.1", UNROUTED], "evil.test": ["127.0.0.1"]}))
    with pytest.raises(ImageInputError, match="loopback"):
        asyncio.run(resolve_image(f"http://first.test:{port}/evil", policy))
    assert [s["path"] for s in handler.seen] == ["/evil"]


def test_video_urls_are_pinned_too(monkeypatch, http_server) -> None:
    port, handler = http_server
    mp4 = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 32
    handler.routes["/clip.mp4"] = (200, {"Content-Type": "video/mp4"}, mp4)
    monkeypatch.setattr(socket, "getaddrinfo", FlipResolver(socket.getaddrinfo, {"v.test": [PUBLIC, "127.0.0.1"]}))
    with pytest.raises(ImageInputError) as err:
        asyncio.run(resolve_video(f"http://v.test:{port}/clip.mp4", _policy()))
    assert err.value.status == 400 and "video URL" in err.value.message
    assert handler.seen == []

    monkeypatch.setattr(socket, "getaddrinfo", FlipResolver(socket.getaddrinfo, {"v.test": ["127.0.0.1", UNROUTED]}))
    data = asyncio.run(resolve_video(f"http://v.test:{port}/clip.mp4", _policy(url_allowlist=("127.0.0.1",))))
    assert data == mp4
    assert handler.seen[-1]["host"] == f"v.test:{port}"


def test_https_keeps_sni_and_verifies_the_certificate_of_the_host_name(monkeypatch, tmp_path, png) -> None:
    cert, key = _self_signed(tmp_path, "tls.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    def remember_sni(sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sock.vlm_sni = name  # type: ignore[attr-defined]

    server_ctx.sni_callback = remember_sni  # type: ignore[assignment]
    client_ctx = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(socket, "getaddrinfo", FlipResolver(socket.getaddrinfo, {"tls.test": ["127.0.0.1", UNROUTED]}))
    for port, handler in _serve(server_ctx):
        handler.routes["/x.png"] = (200, {"Content-Type": "image/png"}, png)

        async def fetch(url: str) -> bytes:
            async with httpx.AsyncClient(verify=client_ctx) as client:
                return await resolve_image(url,
                                           _policy(url_allowlist=("127.0.0.1",)), client)

        assert asyncio.run(fetch(f"https://tls.test:{port}/x.png")) == png
        assert handler.seen == [{"path": "/x.png", "host": f"tls.test:{port}", "sni": "tls.test"}]
