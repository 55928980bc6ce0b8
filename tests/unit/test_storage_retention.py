"""Retention of images stored by /v1/predict in the local store: by age, then by total size (oldest first)."""

from __future__ import annotations

import os
from pathlib import Path

from vlmserve.gateway.storage import LocalStore, new_key

NOW = 1_800_000_000.0


def stored(root: Path, age_s: float, size: int) -> str:
    key = new_key("png")
    path = root / key
    path.write_bytes(b"x" * size)
    os.utime(path, (NOW - age_s, NOW - age_s))
    return key


def test_old_objects_go_first_then_the_oldest_until_the_rest_fit(tmp_path: Path) -> None:
    ancient = stored(tmp_path, 10_000, 10)
    old = stored(tmp_path, 500, 40)
    middle = stored(tmp_path, 300, 40)
    new = stored(tmp_path, 10, 40)
    foreign = tmp_path / "notes.txt"  # not one of our keys: never touched
    foreign.write_text("keep me")
    os.utime(foreign, (0, 0))
    store = LocalStore(tmp_path, max_age_s=3600, max_total_bytes=90)

    removed = store.sweep(now=NOW)
    assert set(removed) == {ancient, old}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([middle, new, "notes.txt"])
    assert store.sweep(now=NOW) == []


def test_no_limits_keeps_everything_and_a_missing_folder_is_fine(tmp_path: Path) -> None:
    key = stored(tmp_path, 10**9, 10**6)
    assert LocalStore(tmp_path).sweep(now=NOW) == []
    assert (tmp_path / key).exists()
    assert LocalStore(tmp_path / "absent", max_age_s=1).sweep(now=NOW) == []
