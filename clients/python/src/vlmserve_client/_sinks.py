"""The outputs of ``vlmserve-client``: what is already done (for resuming), results written as they come, and
the errors file. Every format survives a killed run: a torn last line or rows without an index entry are cut
off when the output is opened again, so the next run appends to a consistent file.

- ``.npy`` (embeddings): float32 rows in a ``.npy`` whose header is rewritten in place as rows are appended
  (``numpy.load`` reads it; no numpy needed here), plus ``STEM.index.jsonl``: one line per row,
  ``{"path", "row", "size", "mtime"}``.
- ``.jsonl``: one JSON object per file: ``{"path", "size", "mtime", ...result}``.
- ``.parquet`` (needs the ``parquet`` extra, pyarrow): results are written as complete part files under
  ``FILE.parts/`` while the run goes, and merged into ``FILE`` at the end (a run killed before the merge leaves the
  parts, which the next run reads and merges).

Failures go to ``STEM.errors.jsonl``: ``{"path", "size", "mtime", "reason", "status", "transient"}``. On the next
run, permanent failures of unchanged files are skipped; transient ones (429/503 after every retry, no answer)
are tried again.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import struct
import sys
import time
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Protocol

__all__ = ["Failure", "Record", "Sink", "open_sink", "output_paths"]


@dataclass
class Record:
    """A result: an embedding (list of floats) or a dict of fields (caption/OCR)."""

    path: str
    size: int
    mtime: float
    value: Any


@dataclass
class Failure:
    path: str
    size: int | None
    mtime: float | None
    reason: str
    status: int | None = None
    transient: bool = False


class Sink(Protocol):
    done: dict[str, tuple[int, float]]  # path -> (size, mtime) of what the output holds
    known_bad: dict[str, tuple[int, float]]  # permanent failures of a previous run

    def write(self, records: list[Record]) -> None: ...

    def write_errors(self, failures: list[Failure]) -> None: ...

    def close(self) -> None: ...


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file; a torn last line (a killed writer) is cut off the file so appends stay valid."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    out = []
    for line in data.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def _stamp(obj: dict[str, Any]) -> tuple[int, float] | None:
    try:
        return int(obj["size"]), float(obj["mtime"])
    except (KeyError, TypeError, ValueError):
        return None


def _write_lines(f: IO[bytes], objs: list[dict[str, Any]]) -> None:
    if objs:
        f.write(b"".join(json.dumps(o, ensure_ascii=False).encode("utf-8") + b"\n" for o in objs))
        f.flush()


def output_paths(out: str, command: str) -> dict[str, Path]:
    """The files an ``--out`` value stands for: ``format``-specific ``data`` (and ``index``), and ``errors``."""
    path = Path(out)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".jsonl"):
        stem = path.with_suffix("")
        data = path
    elif command == "embed":
        stem = path.with_suffix("") if suffix == ".npy" else path
        data = Path(str(stem) + ".npy")
    else:  # caption/ocr write JSONL unless asked for Parquet
        stem = path
        data = Path(str(stem) + ".jsonl")
    paths = {"data": data, "errors": Path(str(stem) + ".errors.jsonl")}
    if data.suffix == ".npy":
        paths["index"] = Path(str(stem) + ".index.jsonl")
    return paths


class _ErrorsFile:
    """``STEM.errors.jsonl``: kept permanent failures of earlier runs are rewritten, transient ones dropped (the
    files are tried again), new failures appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.known_bad: dict[str, tuple[int, float]] = {}
        kept = []
        for obj in read_jsonl(path):
            stamp = _stamp(obj)
            if not obj.get("transient") and stamp is not None and isinstance(obj.get("path"), str):
                self.known_bad[obj["path"]] = stamp
                kept.append(obj)
        if path.exists():
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("wb") as f:
                _write_lines(f, kept)
            os.replace(tmp, path)
        self._file: IO[bytes] | None = None

    def write(self, failures: list[Failure]) -> None:
        if not failures:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
        _write_lines(self._file, [asdict(f) for f in failures])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --- .npy + index -------------------------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = 128  # magic, version, length and the padded dict: room for any shape, 64-byte aligned
_DESCR = "<f4"


def _npy_header(rows: int, dim: int, total: int = _NPY_HEADER) -> bytes:
    text = f"{{'descr': '{_DESCR}', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    if 10 + len(text) + 1 > total:
        raise ValueError("the .npy header has no room for the new shape; write to a new --out")
    text = text.ljust(total - 10 - 1) + "\n"
    return _NPY_MAGIC + b"\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def _read_npy_header(f: IO[bytes]) -> tuple[int, int, int]:
    """(rows, dim, data offset) of a 2-D float32 ``.npy``."""
    head = f.read(10)
    if len(head) < 10 or not head.startswith(_NPY_MAGIC) or head[6] != 1:
        raise ValueError("not a version 1 .npy file")
    (length,) = struct.unpack("<H", head[8:10])
    meta = ast.literal_eval(f.read(length).decode("latin1"))
    shape = meta.get("shape")
    if meta.get("descr") != _DESCR or meta.get("fortran_order") or not isinstance(shape, tuple) or len(shape) != 2:
        raise ValueError(f"not a 2-D little-endian float32 array: {meta}")
    return int(shape[0]), int(shape[1]), 10 + length


class NpySink:
    def __init__(self, data: Path, index: Path, errors: Path) -> None:
        self.data_path, self.index_path = data, index
        self.errors = _ErrorsFile(errors)
        self.known_bad = self.errors.known_bad
        self.rows = self.dim = 0
        self.offset = _NPY_HEADER
        self.done: dict[str, tuple[int, float]] = {}
        entries = read_jsonl(index)
        valid = []
        for i, obj in enumerate(entries):
            if obj.get("row") != i or _stamp(obj) is None or not isinstance(obj.get("path"), str):
                break
            valid.append(obj)
        if data.exists():
            with data.open("rb") as f:
                _, self.dim, self.offset = _read_npy_header(f)
            stored = (data.stat().st_size - self.offset) // (4 * self.dim) if self.dim else 0
            valid = valid[:stored]
            self.rows = len(valid)
            # rows without an index entry, or a torn row (a killed run): cut off, header updated
            with data.open("r+b") as f:
                f.truncate(self.offset + self.rows * 4 * self.dim)
                self._put_header(f)
        else:
            valid = []
        if len(valid) != len(entries):
            tmp = index.with_name(index.name + ".tmp")
            with tmp.open("wb") as f:
                _write_lines(f, valid)
            os.replace(tmp, index)
        for obj in valid:
            stamp = _stamp(obj)
            assert stamp is not None
            self.done[obj["path"]] = stamp
        self._data: IO[bytes] | None = None
        self._index: IO[bytes] | None = None

    def _put_header(self, f: IO[bytes]) -> None:
        f.seek(0)
        f.write(_npy_header(self.rows, self.dim, self.offset))
        f.flush()

    def write(self, records: list[Record]) -> None:
        if not records:
            return
        dims = {len(r.value) for r in records}
        if self.dim == 0:
            self.dim = dims.pop() if len(dims) == 1 else 0
        if dims - {self.dim} or self.dim == 0:
            raise ValueError(f"vectors of {sorted(dims)} dimensions do not fit {self.data_path} "
                             f"({self.dim} dimensions); write to a new --out")
        if self._data is None:
            self.data_path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.data_path.exists()
            self._data = self.data_path.open("w+b" if new else "r+b")
            if new:
                self._put_header(self._data)
            self._index = self.index_path.open("ab")
        assert self._index is not None
        rows = array("f", (x for r in records for x in r.value))
        if sys.byteorder == "big":
            rows.byteswap()
        # the rows, then the header that counts them, then their index lines: a kill between two steps leaves
        # rows the index does not list, which the next open cuts off
        self._data.seek(0, os.SEEK_END)
        self._data.write(rows.tobytes())
        self._data.flush()
        first = self.rows
        self.rows += len(records)
        self._put_header(self._data)
        _write_lines(self._index, [{"path": r.path, "row": first + i, "size": r.size, "mtime": r.mtime}
                                   for i, r in enumerate(records)])
        for r in records:
            self.done[r.path] = (r.size, r.mtime)

    def write_errors(self, failures: list[Failure]) -> None:
        self.errors.write(failures)

    def close(self) -> None:
        for f in (self._data, self._index):
            if f is not None:
                f.close()
        self._data = self._index = None
        self.errors.close()


# --- JSONL --------------------------------------------------------------------------------------------------


def _row(record: Record) -> dict[str, Any]:
    value = record.value if isinstance(record.value, dict) else {"embedding": record.value}
    return {"path": record.path, "size": record.size, "mtime": record.mtime, **value}


class JsonlSink:
    def __init__(self, data: Path, errors: Path) -> None:
        self.data_path = data
        self.errors = _ErrorsFile(errors)
        self.known_bad = self.errors.known_bad
        self.done: dict[str, tuple[int, float]] = {}
        for obj in read_jsonl(data):
            stamp = _stamp(obj)
            if stamp is not None and isinstance(obj.get("path"), str):
                self.done[obj["path"]] = stamp
        self._file: IO[bytes] | None = None

    def write(self, records: list[Record]) -> None:
        if not records:
            return
        if self._file is None:
            self.data_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.data_path.open("ab")
        _write_lines(self._file, [_row(r) for r in records])
        for r in records:
            self.done[r.path] = (r.size, r.mtime)

    def write_errors(self, failures: list[Failure]) -> None:
        self.errors.write(failures)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.errors.close()


# --- Parquet ------------------------------------------------------------------------------------------------


class ParquetSink:
    """Parts of at most ``part_rows`` rows (or ``part_seconds`` old) under ``FILE.parts/``, each written to a
    temporary name then renamed (a part is complete or absent); ``close`` merges ``FILE`` and the parts into a new
    ``FILE`` (renamed over it) and removes the parts."""

    def __init__(self, data: Path, errors: Path, command: str, part_rows: int = 1024,
                 part_seconds: float = 30.0) -> None:
        try:
            import pyarrow as pa  # the ``parquet`` extra
            import pyarrow.compute as pc
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("Parquet output needs pyarrow: pip install 'vlmserve-client[parquet]'") from None
        self.pa, self.pc, self.pq = pa, pc, pq
        self.data_path = data
        self.parts_dir = data.with_name(data.name + ".parts")
        self.errors = _ErrorsFile(errors)
        self.known_bad = self.errors.known_bad
        fields = [("path", pa.string()), ("size", pa.int64()), ("mtime", pa.float64())]
        if command == "embed":
            fields.append(("embedding", pa.list_(pa.float32())))
        else:
            fields += [("text", pa.string()), ("model", pa.string())]
            if command == "ocr":
                fields.append(("language", pa.string()))
        self.schema = pa.schema(fields)
        self.part_rows, self.part_seconds = part_rows, part_seconds
        self.buffer: list[Record] = []
        self.buffered_since = time.monotonic()
        self.done: dict[str, tuple[int, float]] = {}
        for tmp in self.parts_dir.glob("*.tmp") if self.parts_dir.is_dir() else []:
            tmp.unlink()
        self.parts = sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.is_dir() else []
        for source in self._sources():
            table = pq.read_table(source, columns=["path", "size", "mtime"])
            for path, size, mtime in zip(*(table.column(c).to_pylist() for c in ("path", "size", "mtime"))):
                self.done[path] = (int(size), float(mtime))

    def _sources(self) -> list[Path]:
        return ([self.data_path] if self.data_path.exists() else []) + self.parts

    def _table(self, records: list[Record]) -> Any:
        rows = [_row(r) for r in records]
        columns = {name: [row.get(name) for row in rows] for name in self.schema.names}
        return self.pa.Table.from_pydict(columns, schema=self.schema)

    def write(self, records: list[Record]) -> None:
        if not self.buffer:
            self.buffered_since = time.monotonic()
        self.buffer.extend(records)
        for r in records:
            self.done[r.path] = (r.size, r.mtime)
        if len(self.buffer) >= self.part_rows or time.monotonic() - self.buffered_since >= self.part_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        number = int(self.parts[-1].stem.split("-")[1]) + 1 if self.parts else 0
        part = self.parts_dir / f"part-{number:06d}.parquet"
        tmp = part.with_name(part.name + ".tmp")
        self.pq.write_table(self._table(self.buffer), tmp)
        os.replace(tmp, part)
        self.parts.append(part)
        self.buffer = []

    def write_errors(self, failures: list[Failure]) -> None:
        self.errors.write(failures)

    def close(self) -> None:
        self.flush()
        self.errors.close()
        if not self.parts:
            return
        tmp = self.data_path.with_name(self.data_path.name + ".tmp")
        seen: set[tuple[str, int, float]] = set()
        with self.pq.ParquetWriter(tmp, self.schema) as writer:
            for source in self._sources():
                for batch in self.pq.ParquetFile(source).iter_batches(batch_size=4096):
                    keys = zip(*(batch.column(c).to_pylist() for c in ("path", "size", "mtime")))
                    keep = []
                    for key in keys:  # a part already merged by a run killed before removing it
                        keep.append(key not in seen)
                        seen.add(key)
                    table = self.pa.Table.from_batches([batch]).cast(self.schema)
                    writer.write_table(self.pc.filter(table, self.pa.array(keep)) if not all(keep) else table)
        os.replace(tmp, self.data_path)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.parts = []


def open_sink(out: str, command: str, parquet_part_seconds: float = 30.0) -> Sink:
    """The sink for ``--out``: ``.parquet`` → Parquet, ``.jsonl`` → JSONL, else ``.npy`` + index (embeddings) or
    JSONL (caption/OCR)."""
    paths = output_paths(out, command)
    data = paths["data"]
    if data.suffix.lower() == ".parquet":
        return ParquetSink(data, paths["errors"], command, part_seconds=parquet_part_seconds)
    if data.suffix == ".npy":
        return NpySink(data, paths["index"], paths["errors"])
    return JsonlSink(data, paths["errors"])
