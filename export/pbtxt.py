"""Triton ``config.pbtxt`` files from plain Python data, through Triton's own ``ModelConfig`` protobuf.

Dicts are messages (``parameters`` and other map fields are dicts too), lists are repeated fields, :class:`Enum`
values are enum names; a plain string names an enum value too (protobuf's JSON mapping), as the ``data_type`` of
:meth:`vlmserve.families.tensors.TensorSpec.config` does. Rendering goes through ``json_format.ParseDict`` into
``model_config_pb2.ModelConfig``, so a misspelt field or a wrong type fails at export, not when Triton loads the
model; ``text_format`` writes the text (map entries sorted by key: stable output for golden tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2


@dataclass(frozen=True)
class Enum:
    """A protobuf enum value (``TYPE_FP32``, ``KIND_CPU``)."""

    name: str


def parameters(values: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Triton's ``parameters`` map: every value is a ``string_value``."""
    return {k: {"string_value": str(v)} for k, v in values.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def message(config: dict[str, Any]) -> model_config_pb2.ModelConfig:
    """``config`` as Triton's ``ModelConfig`` (ParseError on unknown fields or wrong types)."""
    return json_format.ParseDict(_plain(config), model_config_pb2.ModelConfig())


def render(config: dict[str, Any]) -> str:
    """Render a model config as pbtxt text (ends with a newline)."""
    return text_format.MessageToString(message(config))
