"""The tensors of the client-facing Triton models, one declaration per kind of model: name, Triton data type, dims.

Export writes the configs' ``input``/``output`` blocks from these (:meth:`TensorSpec.config`), the Triton models read
their inputs and name their outputs with them, the gateway packs requests with them (:meth:`TensorSpec.pack`), and
Triton direct users can read the same names in ``docs/triton.md``. No tensor name is written anywhere else.

Every client-facing model is batched per request row: a request holds ``[1]`` (or ``[n, 1]`` rows) of each input.
Torch-free and Triton-free: imported by the gateway, the Triton stubs and export.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

__all__ = ["TensorSpec", "EmbedImageTensors", "EmbedTextTensors", "FlorenceTensors", "ChatTensors"]

DataType = Literal["TYPE_STRING", "TYPE_FP32", "TYPE_INT32"]
_NUMPY: dict[str, Any] = {"TYPE_STRING": np.object_, "TYPE_FP32": np.float32, "TYPE_INT32": np.int32}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, Triton data type, dims per row (``-1``: set per model, e.g. the embedding
    width) and whether a request may leave it out."""

    name: str
    dtype: DataType
    dims: tuple[int, ...] = (1,)
    optional: bool = False

    @property
    def numpy_dtype(self) -> Any:
        """The numpy dtype Triton's clients and the Python backend use for it (``object`` for strings)."""
        return _NUMPY[self.dtype]

    def config(self, dims: Sequence[int] | None = None) -> dict[str, Any]:
        """The ``ModelConfig`` entry (a dict for ``json_format.ParseDict``); ``dims`` fills a ``-1`` width."""
        entry: dict[str, Any] = {"name": self.name, "data_type": self.dtype, "dims": list(dims or self.dims)}
        if self.optional:
            entry["optional"] = True
        return entry

    def pack(self, values: Sequence[Any]) -> np.ndarray:
        """Rows ``[n, 1]`` of this input (strings are encoded UTF-8; bytes pass as they are)."""
        if self.dtype == "TYPE_STRING":
            rows = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
            return np.array(rows, dtype=np.object_).reshape(len(rows), 1)
        return np.array(list(values), dtype=self.numpy_dtype).reshape(len(values), 1)

    def pack_one(self, value: Any) -> np.ndarray:
        """One value for a model that does not batch requests (``max_batch_size`` 0: the decoupled chat models):
        its ``[1]`` input."""
        return self.pack([value]).reshape(1)

    def first_text(self, outputs: Mapping[str, np.ndarray]) -> str:
        """This output's first element as text, UTF-8 decoded (``""`` when ``outputs`` lack it or it is empty)."""
        array = outputs.get(self.name)
        if array is None or array.size == 0:
            return ""
        value = np.asarray(array).reshape(-1)[0]
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class _Tensors:
    """The tensors of one kind of model; subclasses list them in ``inputs`` and ``outputs``."""

    inputs: ClassVar[tuple[TensorSpec, ...]]
    outputs: ClassVar[tuple[TensorSpec, ...]]

    @classmethod
    def output_names(cls) -> list[str]:
        return [t.name for t in cls.outputs]

    @classmethod
    def input_names(cls) -> set[str]:
        return {t.name for t in cls.inputs}


class EmbedImageTensors(_Tensors):
    """``<family>_embed_image``: encoded image bytes in, an L2-normalised embedding out."""

    IMAGE = TensorSpec("IMAGE", "TYPE_STRING")
    EMBEDDING = TensorSpec("EMBEDDING", "TYPE_FP32", (-1,))
    inputs = (IMAGE,)
    outputs = (EMBEDDING,)


class EmbedTextTensors(_Tensors):
    """``<family>_embed_text``: UTF-8 text in, an embedding and the number of tokens it used out."""

    TEXT = TensorSpec("TEXT", "TYPE_STRING")
    EMBEDDING = TensorSpec("EMBEDDING", "TYPE_FP32", (-1,))
    NUM_TOKENS = TensorSpec("NUM_TOKENS", "TYPE_INT32")
    inputs = (TEXT,)
    outputs = (EMBEDDING, NUM_TOKENS)


class FlorenceTensors(_Tensors):
    """``florence2``: one image and a task token (plus its text and generation knobs) in, the result as JSON out."""

    IMAGE = TensorSpec("IMAGE", "TYPE_STRING")
    TASK = TensorSpec("TASK", "TYPE_STRING")
    TEXT = TensorSpec("TEXT", "TYPE_STRING", optional=True)
    MAX_NEW_TOKENS = TensorSpec("MAX_NEW_TOKENS", "TYPE_INT32", optional=True)
    NUM_BEAMS = TensorSpec("NUM_BEAMS", "TYPE_INT32", optional=True)
    RESULT = TensorSpec("RESULT", "TYPE_STRING")
    inputs = (IMAGE, TASK, TEXT, MAX_NEW_TOKENS, NUM_BEAMS)
    outputs = (RESULT,)


class ChatTensors(_Tensors):
    """The decoupled chat models: ``MESSAGES`` (a conversation, JSON) or ``PROMPT`` (raw text) plus ``PARAMETERS``
    (JSON: the generation parameters, or ``{"cancel": id}``) in; a stream of ``TEXT`` deltas out, each with the
    choice it belongs to (``INDEX``), and ``FINISH_REASON``/``USAGE`` (JSON) on a choice's last response;
    ``LOGPROBS`` (JSON) when asked for."""

    MESSAGES = TensorSpec("MESSAGES", "TYPE_STRING", optional=True)
    PROMPT = TensorSpec("PROMPT", "TYPE_STRING", optional=True)
    PARAMETERS = TensorSpec("PARAMETERS", "TYPE_STRING", optional=True)
    TEXT = TensorSpec("TEXT", "TYPE_STRING")
    FINISH_REASON = TensorSpec("FINISH_REASON", "TYPE_STRING")
    USAGE = TensorSpec("USAGE", "TYPE_STRING")
    INDEX = TensorSpec("INDEX", "TYPE_INT32")
    LOGPROBS = TensorSpec("LOGPROBS", "TYPE_STRING")
    inputs = (MESSAGES, PROMPT, PARAMETERS)
    outputs = (TEXT, FINISH_REASON, USAGE, INDEX, LOGPROBS)
