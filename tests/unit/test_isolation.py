"""A failure in batched compute fails only the request(s) that cause it: the batch is retried request by request."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from vlmserve.model_repository import common


@dataclass
class FakeResponse:
    output_tensors: list = field(default_factory=list)
    error: object = None


class FakeError:
    def __init__(self, message: str, code: object = None) -> None:
        self.message = message


@pytest.fixture
def pb(monkeypatch):
    fake = SimpleNamespace(Tensor=lambda name, value: (name, value), InferenceResponse=FakeResponse,
                           TritonError=FakeError)
    monkeypatch.setattr(common, "pb_utils", fake)
    return fake


def poisoned_compute(calls: list[int]):
    def compute(rows: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(rows))
        if np.isnan(rows).any():
            raise RuntimeError("poisoned row")
        return {"OUT": rows * 2}
    return compute


def test_poisoned_row_fails_alone_and_the_others_get_their_own_rows(pb) -> None:
    requests = [np.array([[1.0]]), np.array([[2.0], [3.0]]), np.array([[np.nan]]), np.array([[4.0]])]
    calls: list[int] = []
    responses = common.run_batched(requests, lambda r: r, poisoned_compute(calls))
    assert calls == [5, 1, 2, 1, 1]  # the batch once, then each request alone
    assert responses[2].error is not None and "poisoned row" in responses[2].error.message
    for i in (0, 1, 3):
        assert responses[i].error is None
        (name, value), = responses[i].output_tensors
        assert name == "OUT" and np.array_equal(value, requests[i] * 2)


def test_a_healthy_batch_runs_once(pb) -> None:
    calls: list[int] = []
    responses = common.run_batched([np.array([[1.0]]), np.array([[2.0]])], lambda r: r, poisoned_compute(calls))
    assert calls == [2] and all(r.error is None for r in responses)


def test_retry_singly_covers_every_item_once() -> None:
    def run(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return [x + 1 for x in items]

    assert common.retry_singly([1, 2], run) == [([1, 2], [2, 3])]
    results = common.retry_singly([1, 13, 2], run)
    assert [group for group, _ in results] == [[1], [13], [2]]
    assert results[0][1] == [2] and results[2][1] == [3]
    assert isinstance(results[1][1], ValueError)
    (group, error), = common.retry_singly([13], run)  # one item: no retry, its own error
    assert group == [13] and isinstance(error, ValueError)
