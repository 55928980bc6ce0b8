"""Chat responses as the Triton chat models send them (the tensors of ``vlmserve.families.tensors.ChatTensors``)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from vlmserve.families.tensors import ChatTensors

USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "batch_size": 1}


def resp(text: str, finish: str = "", usage: dict[str, int] | None = None, index: int = 0,
         logprobs: list[dict[str, Any]] | None = None) -> dict[str, np.ndarray]:
    """One Triton response of the chat contract."""
    t = ChatTensors
    return {
        t.TEXT.name: t.TEXT.pack_one(text),
        t.FINISH_REASON.name: t.FINISH_REASON.pack_one(finish),
        t.USAGE.name: t.USAGE.pack_one(json.dumps(usage) if usage else ""),
        t.INDEX.name: t.INDEX.pack_one(index),
        t.LOGPROBS.name: t.LOGPROBS.pack_one(json.dumps(logprobs) if logprobs else ""),
    }
