"""``vlmserve-client embed|caption|ocr`` (vlmserve_client.cli, .bulk, ._sinks): finding files, resume bookkeeping
(including outputs cut short by a killed run), Retry-After handling, batch splitting around a bad image, and the
whole command against a local fake gateway (a real HTTP server in a thread)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.server
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from vlmserve_client import VlmserveBadRequest, VlmserveUnavailable
from vlmserve_client._core import ServiceInfo, _service_info
from vlmserve_client._sinks import Failure, JsonlSink, NpySink, Record, open_sink, output_paths, read_jsonl
from vlmserve_client.bulk import Progress, choose_limits, find_images, plan, with_retries
from vlmserve_client.cli import main

from tests.conftest import local_http_server

DIM = 8


def png(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def vector_of(data: bytes) -> list[float]:
    digest = hashlib.sha256(data).digest()
    return [b / 255.0 for b in digest[:DIM]]


# --- finding files --------------------------------------------------------------------------------------------


def test_find_images_walks_folders_globs_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / ".hidden").mkdir()
    for name in ("a/1.PNG", "a/deep/2.jpg", "a/deep/3.webp", "a/notes.txt", "a/.x.png", "a/.hidden/4.png",
                 "b.jpeg", "c.gif", "odd.bin"):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    files, unmatched = find_images(["a", "*.jpeg", "**/*.gif", "odd.bin", "a/deep/2.jpg", "nothing*.png"])
    rel = [os.path.relpath(f, tmp_path) for f in files]
    assert rel == sorted(rel)
    assert rel == ["a/1.PNG", "a/deep/2.jpg", "a/deep/3.webp", "b.jpeg", "c.gif", "odd.bin"]
    assert all(os.path.isabs(f) for f in files)
    assert unmatched == ["nothing*.png"]


def test_plan_skips_done_and_known_bad_unless_changed(tmp_path: Path) -> None:
    paths = []
    for name in ("done", "changed", "bad", "new"):
        (tmp_path / name).write_bytes(b"12345")
        paths.append(str(tmp_path / name))
    stamp = {p: (os.stat(p).st_size, os.stat(p).st_mtime) for p in paths}
    done = {paths[0]: stamp[paths[0]], paths[1]: (4, stamp[paths[1]][1])}
    todo, skipped_done, skipped_bad, missing = plan(paths + [str(tmp_path / "gone")], done,
                                                    {paths[2]: stamp[paths[2]]})
    assert [i.path for i in todo] == [paths[1], paths[3]]
    assert (skipped_done, skipped_bad) == (1, 1)
    assert [m.path for m in missing] == [str(tmp_path / "gone")] and "cannot read" in missing[0].reason


def test_choose_limits_from_info() -> None:
    info = ServiceInfo(models=[], model=None, max_new_tokens=None, version="",
                       limits={"max_items": 8, "max_inflight_embeddings": 64, "max_inflight_florence": 32})
    assert choose_limits(info, "embed", None, None) == (4, 8)  # a quarter of 64 is 16: at most 4 by default
    assert choose_limits(info, "embed", 3, 100) == (3, 8)  # never more than max_items per request
    assert choose_limits(info, "caption", None, None) == (4, 1)
    assert choose_limits(None, "ocr", None, None) == (4, 1)
    assert choose_limits(None, "embed", None, None) == (4, 16)
    nested = {"max_items": 32, "max_inflight": {"embeddings": 40, "chat": 8}, "note": "x"}
    info = ServiceInfo(models=[], model=None, max_new_tokens=None, version="", limits={"max_items": 32},
                       raw={"limits": nested})
    assert choose_limits(info, "embed", None, None) == (4, 16) and choose_limits(info, "ocr", None, None) == (2, 1)
    assert choose_limits(info, "caption", None, None) == (4, 1)


def test_info_keeps_numeric_limits_and_tolerates_others() -> None:
    info = _service_info({"models": [], "limits": {"max_items": 32, "max_inflight": {"chat": 8}, "mode": "x",
                                                   "strict": True}})
    assert info.limits == {"max_items": 32} and info.raw["limits"]["max_inflight"] == {"chat": 8}


# --- retries --------------------------------------------------------------------------------------------------


def test_with_retries_waits_retry_after_and_is_bounded() -> None:
    slept: list[float] = []
    answers: list[BaseException | str] = [
        VlmserveBadRequest("busy", status_code=429, retry_after=2.0),
        VlmserveUnavailable("loading", status_code=503, retry_after=1.0),
        VlmserveUnavailable("no answer", code="connection_error"),
        "ok",
    ]

    async def send() -> str:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    assert asyncio.run(with_retries(send, 5, sleep=sleep)) == "ok"
    assert 2.0 <= slept[0] <= 2.25 and 1.0 <= slept[1] <= 1.25 and 1.5 <= slept[2] <= 2.5  # 0.5 * 2**2 ± 25%

    async def always_busy() -> str:
        raise VlmserveBadRequest("busy", status_code=429, retry_after=0.5)

    slept.clear()
    with pytest.raises(VlmserveBadRequest):
        asyncio.run(with_retries(always_busy, 3, sleep=sleep))
    assert len(slept) == 3

    async def bad() -> str:
        raise VlmserveBadRequest("bad image", status_code=400)

    slept.clear()
    with pytest.raises(VlmserveBadRequest):
        asyncio.run(with_retries(bad, 3, sleep=sleep))
    assert slept == []  # a 4xx other than 429 is not retried


# --- outputs --------------------------------------------------------------------------------------------------


def records(n: int, start: int = 0) -> list[Record]:
    return [Record(f"/img/{i}.png", 100 + i, 1000.5 + i, [float(i)] * DIM) for i in range(start, start + n)]


def test_npy_sink_appends_and_repairs_a_killed_run(tmp_path: Path) -> None:
    paths = output_paths(str(tmp_path / "vec.npy"), "embed")
    assert paths == {"data": tmp_path / "vec.npy", "index": tmp_path / "vec.index.jsonl",
                     "errors": tmp_path / "vec.errors.jsonl"}
    sink = NpySink(paths["data"], paths["index"], paths["errors"])
    sink.write(records(3))
    sink.write_errors([Failure("/img/bad.png", 5, 1.0, "400: cannot decode", 400)])
    sink.close()
    assert np.load(paths["data"]).shape == (3, DIM)
    # a kill after the rows but before their index lines, with a torn index line and a torn row
    with paths["data"].open("ab") as f:
        f.write(np.full((2, DIM), 9, "<f4").tobytes() + b"\x00\x01")
    with paths["index"].open("ab") as f:
        f.write(b'{"path": "/img/3.png", "ro')
    sink = NpySink(paths["data"], paths["index"], paths["errors"])
    assert set(sink.done) == {f"/img/{i}.png" for i in range(3)}
    assert sink.known_bad == {"/img/bad.png": (5, 1.0)}
    sink.write(records(2, start=3))
    sink.close()
    array = np.load(paths["data"])
    assert array.dtype == np.float32 and array.shape == (5, DIM)
    assert array[:, 0].tolist() == [0, 1, 2, 3, 4]
    index = read_jsonl(paths["index"])
    assert [(e["path"], e["row"]) for e in index] == [(f"/img/{i}.png", i) for i in range(5)]
    with pytest.raises(ValueError, match="dimensions"):
        NpySink(paths["data"], paths["index"], paths["errors"]).write([Record("/x.png", 1, 1.0, [1.0, 2.0])])


def test_jsonl_sink_cuts_a_torn_line_and_drops_transient_errors(tmp_path: Path) -> None:
    paths = output_paths(str(tmp_path / "caps"), "caption")
    assert paths["data"] == tmp_path / "caps.jsonl"
    sink = JsonlSink(paths["data"], paths["errors"])
    sink.write([Record("/a.png", 1, 2.0, {"text": "a cat", "model": "m"})])
    sink.write_errors([Failure("/b.png", 1, 2.0, "503: busy", 503, transient=True),
                       Failure("/c.png", 1, 2.0, "400: not an image", 400)])
    sink.close()
    with paths["data"].open("ab") as f:
        f.write(b'{"path": "/tor')
    sink = JsonlSink(paths["data"], paths["errors"])
    assert sink.done == {"/a.png": (1, 2.0)} and sink.known_bad == {"/c.png": (1, 2.0)}
    sink.write([Record("/d.png", 3, 4.0, {"text": "a dog", "model": "m"})])
    sink.close()
    assert [o["path"] for o in read_jsonl(paths["data"])] == ["/a.png", "/d.png"]
    assert [o["path"] for o in read_jsonl(paths["errors"])] == ["/c.png"]


def test_parquet_sink_parts_survive_a_kill_and_merge(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "vec.parquet"
    sink = open_sink(str(out), "embed")
    sink.part_rows = 2  # type: ignore[attr-defined]
    sink.write(records(3))  # one part of 3 rows written; "killed" here: no close
    assert not out.exists() and len(list((tmp_path / "vec.parquet.parts").glob("*.parquet"))) == 1
    sink = open_sink(str(out), "embed")
    assert len(sink.done) == 3
    sink.write(records(1, start=3))
    sink.close()
    table = pq.read_table(out)
    assert table.column("path").to_pylist() == [f"/img/{i}.png" for i in range(4)]
    assert np.asarray(table.column("embedding").to_pylist()).shape == (4, DIM)
    assert not (tmp_path / "vec.parquet.parts").exists()


def test_parquet_merge_killed_before_removing_its_parts_is_not_doubled(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "caps.parquet"
    sink = open_sink(str(out), "caption", parquet_part_seconds=0)
    sink.write([Record(f"/{i}.png", i, 1.0, {"text": f"t{i}", "model": "m"}) for i in range(3)])
    parts = tmp_path / "caps.parquet.parts"
    saved = {p.name: p.read_bytes() for p in parts.iterdir()}
    sink.close()
    parts.mkdir()  # as if killed after renaming the merged file over FILE, before removing the parts
    for name, data in saved.items():
        (parts / name).write_bytes(data)
    sink = open_sink(str(out), "caption")
    assert set(sink.done) == {"/0.png", "/1.png", "/2.png"}
    sink.write([Record("/3.png", 3, 1.0, {"text": "t3", "model": "m"})])
    sink.close()
    table = pq.read_table(out)
    assert table.column("path").to_pylist() == ["/0.png", "/1.png", "/2.png", "/3.png"]
    assert table.column("text").to_pylist() == ["t0", "t1", "t2", "t3"]


def test_progress_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(10, stream, tty=False, interval=0.0)
    progress.update(3)
    progress.update(1, failed=1)
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[") and "3/10" in lines[0] and "images/s" in lines[0] and "ETA" in lines[0]
    assert "5/10" in lines[-1] and "1 failed" in lines[-1]
    tty = io.StringIO()
    progress = Progress(2, tty, tty=True)
    progress.update(2)
    progress.finish()
    assert tty.getvalue().startswith("\r[") and tty.getvalue().endswith("\n")


# --- the command against a fake gateway -----------------------------------------------------------------------


class FakeGateway:
    """/info, /embed, /v1/embeddings, /infer/upload and /ocr; the first ``busy`` POSTs get 429 + Retry-After."""

    def __init__(self, busy: int = 0, max_items: int = 4, delay: float = 0.0) -> None:
        self.busy = busy
        self.delay = delay
        self.max_items = max_items
        self.requests: list[tuple[str, int]] = []  # (path, images) of every POST
        self.lock = threading.Lock()

    def answer(self, path: str, body: bytes, headers: Any) -> tuple[int, dict[str, str], Any]:
        if path == "/info":
            return 200, {}, {"models": [], "limits": {"max_items": self.max_items, "max_body_bytes": 1 << 20}}
        if path in ("/embed", "/v1/embeddings"):
            refs = json.loads(body)["images" if path == "/embed" else "input"]
            count = len(refs)
        else:
            count = 1
        time.sleep(self.delay)
        with self.lock:
            self.requests.append((path, count))
            if self.busy > 0:
                self.busy -= 1
                return 429, {"Retry-After": "0.05"}, {"error": {"message": "too many", "code": "too_many_requests"}}
        if path in ("/embed", "/v1/embeddings"):
            vectors = []
            for i, ref in enumerate(refs):
                data = base64.b64decode(ref.split(",", 1)[1])
                if not data.startswith(b"\x89PNG"):
                    key = "images" if path == "/embed" else "input"
                    return 400, {}, {"error": {"message": f"{key}[{i}]: cannot decode the image",
                                               "param": f"{key}[{i}]", "code": "invalid_image"}}
                vectors.append(vector_of(data))
            if path == "/embed":
                return 200, {}, vectors
            return 200, {}, {"object": "list", "model": "m",
                             "data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)]}
        if path == "/infer/upload":
            ok = b"\x89PNG" in body
            if not ok:
                return 400, {}, {"error": {"message": "cannot decode the image", "param": "file"}}
            return 200, {}, {"task": "caption", "task_token": "<CAPTION>", "text": "a square",
                             "result": "a square", "model": "florence2"}
        if path == "/ocr":
            return 200, {}, {"text": "HELLO", "language": json.loads(body)["language"], "model": "tiny-qwen"}
        return 404, {}, {"error": {"message": "not found"}}

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, body: bytes) -> None:
                status, headers, payload = gateway.answer(self.path, body, self.headers)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._reply(b"")

            def do_POST(self) -> None:
                self._reply(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(7):
        (folder / ("sub" if i % 2 else ".") / f"img{i}.png").write_bytes(png((30 * i, 10, 200)))
    return folder


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def summary(err: str) -> dict[str, int]:
    match = re.search(r"done (\d+), skipped (\d+) .* failed (\d+)", err)
    assert match, err
    return dict(zip(("done", "skipped", "failed"), map(int, match.groups()), strict=True))


def test_embed_npy_resume_and_retry_after(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gateway = FakeGateway(busy=2)
    out = tmp_path / "out" / "vectors.npy"
    with local_http_server(gateway.handler()) as port:
        url = f"http://127.0.0.1:{port}"
        code, err = run_cli(capsys, "embed", str(images), "--out", str(out), "--base-url", url, "--concurrency", "2")
        assert code == 0, err
        assert summary(err) == {"done": 7, "skipped": 0, "failed": 0}
        assert "2 retries" in err and "images/s" in err
        # 7 images, at most max_items=4 per request; the two 429s are retried, not failures
        embeds = [n for path, n in gateway.requests if path == "/embed"]
        assert sum(embeds) == 7 + sum(embeds[:2]) and max(embeds) <= 4
        files, _ = find_images([str(images)])
        index = read_jsonl(tmp_path / "out" / "vectors.index.jsonl")
        assert [e["path"] for e in index] == files  # input order, whatever the completion order
        array = np.load(out)
        for entry in index:
            assert np.allclose(array[entry["row"]], vector_of(Path(entry["path"]).read_bytes()))
        # a second run does nothing; a new file is the only one sent
        before = len(gateway.requests)
        code, err = run_cli(capsys, "embed", str(images), "--out", str(out), "--base-url", url)
        assert code == 0 and summary(err) == {"done": 0, "skipped": 7, "failed": 0}
        assert len(gateway.requests) == before
        (images / "new.png").write_bytes(png((1, 2, 3)))
        code, err = run_cli(capsys, "embed", str(images), "--out", str(out), "--base-url", url)
        assert summary(err) == {"done": 1, "skipped": 7, "failed": 0}
        assert gateway.requests[before:] == [("/embed", 1)]
    assert np.load(out).shape == (8, DIM)


def test_embed_bad_files_go_to_the_errors_file(images: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (images / "img3b.png").write_bytes(b"this is not a png")
    (images / "empty.png").write_bytes(b"")
    gateway = FakeGateway()
    out = tmp_path / "vectors.jsonl"
    with local_http_server(gateway.handler()) as port:
        url = f"http://127.0.0.1:{port}"
        code, err = run_cli(capsys, "embed", str(images), "--out", str(out), "--base-url", url, "--quiet")
        assert code == 1 and summary(err) == {"done": 7, "skipped": 0, "failed": 2}
        errors = {Path(e["path"]).name: e for e in read_jsonl(tmp_path / "vectors.errors.jsonl")}
        assert set(errors) == {"img3b.png", "empty.png"}
        assert errors["empty.png"]["reason"] == "empty file"
        assert errors["img3b.png"]["status"] == 400 and "cannot decode" in errors["img3b.png"]["reason"]
        assert not errors["img3b.png"]["transient"]
        rows = read_jsonl(out)
        assert len(rows) == 7 and all(len(r["embedding"]) == DIM for r in rows)
        # the known bad files are not sent again
        before = len(gateway.requests)
        code, err = run_cli(capsys, "embed", str(images), "--out", str(out), "--base-url", url, "--quiet")
        assert code == 0 and summary(err) == {"done": 0, "skipped": 9, "failed": 0}
        assert len(gateway.requests) == before


def test_embed_openai_api_and_parquet(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    gateway = FakeGateway()
    out = tmp_path / "vectors.parquet"
    with local_http_server(gateway.handler()) as port:
        code, err = run_cli(capsys, "embed", str(images), "--out", str(out), "--api", "openai", "--model", "m",
                            "--base-url", f"http://127.0.0.1:{port}/v1", "--batch-size", "3")
    assert code == 0, err
    assert {p for p, _ in gateway.requests} == {"/v1/embeddings"} and max(n for _, n in gateway.requests) == 3
    table = pq.read_table(out)
    assert table.num_rows == 7
    for path, vector in zip(table.column("path").to_pylist(), table.column("embedding").to_pylist(), strict=True):
        assert np.allclose(vector, vector_of(Path(path).read_bytes()))


@pytest.mark.parametrize("command", ["caption", "ocr"])
def test_caption_and_ocr_jsonl(command: str, images: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    gateway = FakeGateway(busy=1)
    with local_http_server(gateway.handler()) as port:
        code, err = run_cli(capsys, command, str(images), "--out", str(tmp_path / "out"),
                            "--base-url", f"http://127.0.0.1:{port}")
    assert code == 0, err
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert len(rows) == 7 and len({r["path"] for r in rows}) == 7
    assert all(r["text"] == ("a square" if command == "caption" else "HELLO") for r in rows)
    assert {p for p, _ in gateway.requests} == {"/infer/upload" if command == "caption" else "/ocr"}


def test_unreachable_server_is_a_clear_error(images: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with local_http_server(FakeGateway().handler()) as port:
        pass  # closed: nothing listens there now
    code, err = run_cli(capsys, "embed", str(images), "--out", str(tmp_path / "v.npy"), "--max-retries", "0",
                        "--base-url", f"http://127.0.0.1:{port}")
    assert code == 2 and "cannot reach" in err


def test_no_image_found_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("x")
    code, err = run_cli(capsys, "ocr", str(tmp_path), str(tmp_path / "nothing-*.png"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no image files found" in err and "matches no file" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_python_dash_m_help() -> None:
    result = subprocess.run([sys.executable, "-m", "vlmserve_client", "embed", "--help"], capture_output=True,
                            text=True, env={**os.environ}, timeout=60)
    assert result.returncode == 0 and "--out" in result.stdout and "--api" in result.stdout



@pytest.mark.parametrize("suffix", [".npy", ".jsonl", ".parquet"])
def test_a_killed_run_resumes_without_redoing_a_file(suffix: str, images: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    gateway = FakeGateway(delay=0.15)
    out = tmp_path / f"vectors{suffix}"
    written = tmp_path / ("vectors.index.jsonl" if suffix == ".npy" else "vectors.parquet.parts" if
                          suffix == ".parquet" else "vectors.jsonl")
    with local_http_server(gateway.handler()) as port:
        url = f"http://127.0.0.1:{port}"
        args = ["embed", str(images), "--out", str(out), "--base-url", url, "--concurrency", "1", "--batch-size", "1"]
        if suffix == ".parquet":  # a part file per result, so that the kill finds some written
            args += ["--flush-seconds", "0"]
        proc = subprocess.Popen([sys.executable, "-m", "vlmserve_client", *args], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (written.exists() and (
                    len(list(written.glob("*.parquet"))) >= 2 if written.is_dir() else
                    written.read_bytes().count(b"\n") >= 2)):
                time.sleep(0.02)
            proc.kill()  # SIGKILL: no cleanup of any kind
        finally:
            proc.wait(timeout=30)
        sent_before = len(gateway.requests)
        assert 2 <= sent_before < 7
        code, err = run_cli(capsys, *args)
        assert code == 0, err
        counts = summary(err)
        # every file done once: what the killed run finished is skipped, the rest sent (at most the one request the
        # kill cut short is sent again)
        assert counts["done"] + counts["skipped"] == 7 and counts["failed"] == 0
        assert counts["done"] <= 7 - sent_before + 1
    files, _ = find_images([str(images)])
    if suffix == ".npy":
        index = read_jsonl(tmp_path / "vectors.index.jsonl")
        vectors = np.load(out)
        assert [e["row"] for e in index] == list(range(7)) and vectors.shape == (7, DIM)
        rows = {e["path"]: vectors[e["row"]] for e in index}
    elif suffix == ".jsonl":
        rows = {r["path"]: np.asarray(r["embedding"]) for r in read_jsonl(out)}
        assert len(read_jsonl(out)) == 7
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        assert table.num_rows == 7 and not (tmp_path / "vectors.parquet.parts").exists()
        rows = dict(zip(table.column("path").to_pylist(), map(np.asarray, table.column("embedding").to_pylist()),
                        strict=True))
    assert sorted(rows) == files
    assert all(np.allclose(v, vector_of(Path(p).read_bytes())) for p, v in rows.items())


def test_a_server_that_stays_busy_stops_the_run_and_the_next_run_finishes(
        images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gateway = FakeGateway(busy=10_000)
    out = tmp_path / "vectors.npy"
    with local_http_server(gateway.handler()) as port:
        args = ["embed", str(images), "--out", str(out), "--base-url", f"http://127.0.0.1:{port}",
                "--concurrency", "1", "--batch-size", "2", "--max-retries", "2"]
        code, err = run_cli(capsys, *args)
        assert code == 2 and "stopped early with 5 left" in err and "429: too many" in err, err
        assert len(gateway.requests) == 3  # one batch, tried three times; nothing sent after it
        errors = read_jsonl(tmp_path / "vectors.errors.jsonl")
        assert len(errors) == 2 and all(e["transient"] and e["status"] == 429 for e in errors)
        gateway.busy = 0
        code, err = run_cli(capsys, *args)
        assert code == 0 and summary(err) == {"done": 7, "skipped": 0, "failed": 0}, err
    assert read_jsonl(tmp_path / "vectors.errors.jsonl") == []  # transient failures are tried again, then dropped
    assert np.load(out).shape == (7, DIM)
