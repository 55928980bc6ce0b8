"""Render Triton ``config.pbtxt`` files (protobuf text format) from plain Python data.

Dicts become messages, lists become repeated fields (``field [ ... ]``), :class:`Enum` values are written
unquoted (``TYPE_FP32``, ``KIND_CPU``), strings quoted, bools lower-case. Keys keep insertion order so the
output is stable for golden tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Enum:
    """A protobuf enum value, written without quotes."""

    name: str


def parameters(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Triton's ``parameters`` map: every value is a ``string_value``."""
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"unsupported pbtxt value {value!r}")


def _message(fields: dict[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, dict):
            lines.append(f"{pad}{key} {{")
            lines.extend(_message(value, indent + 1))
            lines.append(f"{pad}}}")
        elif isinstance(value, list):
            if value and all(isinstance(v, dict) for v in value):
                lines.append(f"{pad}{key} [")
                for i, item in enumerate(value):
                    lines.append(f"{pad}  {{")
                    lines.extend(_message(item, indent + 2))
                    lines.append(f"{pad}  }}{',' if i < len(value) - 1 else ''}")
                lines.append(f"{pad}]")
            else:
                lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def render(config: dict[str, Any]) -> str:
    """Render a model config as pbtxt text (ends with a newline)."""
    return "\n".join(_message(config, 0)) + "\n"
