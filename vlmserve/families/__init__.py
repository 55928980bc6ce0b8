"""Model families: one spec file per family in this package, found by :func:`families` (no registry to edit).

A family is a :class:`~vlmserve.families.spec.FamilySpec` named ``SPEC`` in a module of this package; the model
contract (config parameters, defaults and limits) is :mod:`vlmserve.families.contract`. Torch-free, imports nothing
of vlmserve outside this package.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from vlmserve.families.spec import SURFACES, TASK_SURFACE, FamilySpec

__all__ = ["SURFACES", "TASK_SURFACE", "FamilySpec", "default_family", "families", "family"]


@cache
def families() -> dict[str, FamilySpec]:
    """Every family, by name, in a stable order (module name)."""
    found: dict[str, FamilySpec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in ("contract", "spec"):
            continue
        spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPEC", None)
        if isinstance(spec, FamilySpec):
            if spec.name in found:
                raise ValueError(f"two families named {spec.name!r}")
            found[spec.name] = spec
    for surface in SURFACES:
        owners = [s.name for s in found.values() if surface in s.default_for]
        if len(owners) > 1:
            raise ValueError(f"surface {surface!r} has more than one default family: {owners}")
    return found


def family(name: str) -> FamilySpec:
    """The spec of ``name``; ValueError listing the known families otherwise."""
    try:
        return families()[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; choose from {', '.join(families())}") from None


def default_family(surface: str) -> str | None:
    """The family answering ``surface`` when a request names no model (None: the first one loaded)."""
    return next((s.name for s in families().values() if surface in s.default_for), None)
