"""What a model family is, in one place: :class:`FamilySpec`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from vlmserve.families.contract import ModelParams

# The gateway's surfaces: which routes a family's client models answer.
SURFACES = {
    "embeddings": "/embed, /v1/embeddings (SigLIP-style image and text embeddings)",
    "florence2": "/v1/florence2, /predict, /v1/predict (Florence-2 tasks)",
    "chat": "/v1/chat/completions, /chat/completions (chat over images and video)",
    "ocr": "/v1/ocr, /ocr, /v1/describe-region (OCR and region descriptions through a chat model)",
}
# The surface of each client-model task (the Triton ``task`` parameter the gateway's registry routes on); "ocr"
# shares the chat models and is asked for by name.
TASK_SURFACE = {"embed_image": "embeddings", "embed_text": "embeddings", "florence2": "florence2", "chat": "chat"}


def load(target: str) -> Any:
    """``"package.module"`` -> the module, ``"package.module:name"`` -> that attribute (imported on use)."""
    module, _, attr = target.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attr) if attr else loaded


@dataclass(frozen=True)
class FamilySpec:
    """One model family: everything export, the Triton models, the gateway and the CLI need to know.

    Import targets (``recipe``, ``tiny``, ``perf``, ``pipeline``) are strings, imported only when used, so the
    spec stays importable without torch (gateway, Triton stubs, CLI listing).
    """

    name: str  # Triton family key, CLI name (``--family NAME``), tiny/perf checkpoint folder name
    title: str
    surfaces: tuple[str, ...]  # keys of SURFACES
    default_source: str  # Hub id exported by ``--set hub`` (``VLMSERVE_<NAME>_MODEL`` / ``--model NAME=...``)
    recipe: str  # export module: RECIPE_VERSION, MODELS, export(source_dir, repo, options, weights, name, progress)
    params: type[ModelParams]  # the contract of its client model(s)
    default_for: tuple[str, ...] = ()  # surfaces it answers when a request names no model
    tiny: str | None = None  # builder of the offline tiny random checkpoint (``make demo``); None: needs real weights
    perf: str | None = None  # builder of the real-size random checkpoint (``--set perf``)
    in_default_set: bool = True  # exported by ``vlmserve export`` without ``--family``
    in_default_perf: bool = False  # part of the default perf set (benchmarks)
    pipeline: str | None = None  # chat families: the model_repository pipeline the chat model runs
    tasks: tuple[str, ...] = ()  # what it does, for listings (Florence-2's task names, "image embeddings", ...)
    notes: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.surfaces) - set(SURFACES)
        if unknown:
            raise ValueError(f"family {self.name}: unknown surfaces {sorted(unknown)}; known: {sorted(SURFACES)}")
        if not set(self.default_for) <= set(self.surfaces):
            raise ValueError(f"family {self.name}: default_for {self.default_for} must be among its surfaces")

    @property
    def env_var(self) -> str:
        return f"VLMSERVE_{self.name.upper()}_MODEL"

    def load_recipe(self) -> Any:
        return load(self.recipe)
