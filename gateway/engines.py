"""The gateway's seams to an inference engine: what the services and routes use, free of any engine's wire format.

One protocol per surface: :class:`Embedder` (vectors), :class:`Generator` (chat and text completions, streamed),
:class:`FlorenceRunner` (Florence-2 tasks), plus :class:`ModelRegistry` (what is served, health, statistics,
close). An engine implements all of them (:class:`Engine`); the Triton one is ``vlmserve.gateway.backends.triton``
and the only code that knows Triton's tensors. The registry's models carry their config parameters parsed once
into the model contract (``vlmserve.families.contract``): services read typed limits and defaults, never strings.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from vlmserve import telemetry
from vlmserve.api.openai import GenerationParameters
from vlmserve.families import TASK_SURFACE, default_family
from vlmserve.families.contract import ChatParams, EmbedParams, FlorenceParams, ModelParams, ValidationError
from vlmserve.gateway.errors import APIError

__all__ = [
    "PARAMS_BY_TASK", "Delta", "Embedded", "Embedder", "Engine", "EngineUnavailable", "FlorenceRequest",
    "FlorenceRunner", "Generator", "ModelInfo", "ModelRegistry", "Registry", "Usage", "live_registry",
    "parse_params", "use_model",
]

P = TypeVar("P", bound=ModelParams)

# The contract model of each task's config parameters; encoders (no task) and unknown tasks get the common keys.
PARAMS_BY_TASK: dict[str, type[ModelParams]] = {
    "embed_image": EmbedParams, "embed_text": EmbedParams, "florence2": FlorenceParams, "chat": ChatParams,
}


def parse_params(raw: Mapping[str, str]) -> ModelParams:
    """A model's config parameters (the string map an engine's registry holds) as its contract model, picked by its
    ``task``; ``ValueError`` (pydantic's ``ValidationError``) when they break the contract."""
    kind = PARAMS_BY_TASK.get(raw.get("task", ""), ModelParams)
    params: ModelParams = kind.from_triton(raw)
    return params


class EngineUnavailable(APIError):
    """The inference server cannot answer now: 503 + Retry-After (the code keeps its historical name)."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(503, f"inference server unavailable: {detail}; retry later", code="triton_unavailable",
                         headers={"Retry-After": str(retry_after)})


@dataclass(frozen=True)
class ModelInfo:
    """One served model. ``params``: its config parameters, parsed once (None while its config is unknown: still
    loading, or ``problem`` says why it broke the contract; such a model is never ready)."""

    name: str
    ready: bool
    params: ModelParams | None = None
    max_batch_size: int = 0
    device: str = "cpu"
    problem: str | None = None

    @classmethod
    def of(cls, name: str, ready: bool, raw: Mapping[str, str], max_batch_size: int = 0,
           device: str = "cpu") -> ModelInfo:
        """From an engine's string map of config parameters (empty: not read yet), validated here once."""
        if not raw:
            return cls(name, ready, None, max_batch_size, device)
        try:
            params = parse_params(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            return cls(name, False, None, max_batch_size, device,
                       problem=f"invalid model config parameters ({problems}); re-export the model repository")
        return cls(name, ready, params, max_batch_size, device)

    @property
    def family(self) -> str | None:
        return self.params.family if self.params is not None else None

    @property
    def task(self) -> str | None:
        return (self.params.task or None) if self.params is not None else None

    @property
    def source(self) -> str:
        """The id clients know it by: its checkpoint (``source_model``), else its engine name."""
        return (self.params.source_model if self.params is not None else "") or self.name

    def declared(self, key: str) -> Any:
        """The parameter ``key`` when its config sets it, else None (not the contract's default): what export
        recorded, e.g. ``runtime`` or ``decoder_precision``."""
        if self.params is None or key not in self.params.model_fields_set:
            return None
        return getattr(self.params, key)

    def contract(self, kind: type[P]) -> P:
        """Its parameters as ``kind`` (502 when its config broke the contract or is another kind of model's)."""
        if isinstance(self.params, kind):
            return self.params
        why = self.problem or f"its task {self.task!r} has no {kind.__name__}"
        raise APIError(502, f"{self.name}: {why}", code="bad_model_config")


@dataclass(frozen=True)
class Registry:
    models: dict[str, ModelInfo]
    reachable: bool = True
    # Models listed but not READY, whose config this gateway never saw (it cannot know what they serve): a task
    # with no model may be served by one of them once it is loaded (at start, or while a replica's watcher reloads
    # it before this gateway first saw it ready), so find() answers 503 + Retry-After instead of 404.
    loading: tuple[str, ...] = ()
    retry_after_s: int = 5

    def by_task(self, task: str) -> list[ModelInfo]:
        return [m for m in self.models.values() if m.task == task]

    def default(self, task: str, surface: str | None = None) -> ModelInfo | None:
        """The model answering ``task`` when a request names none.

        The default family of the surface (its spec's ``default_for``) when loaded, else the first by name:
        adding a family never silently takes a surface over.
        """
        candidates = sorted(self.by_task(task), key=lambda m: m.name)
        preferred = default_family(surface or TASK_SURFACE.get(task, task))
        return next((m for m in candidates if m.family == preferred), candidates[0] if candidates else None)

    def find(self, task: str, model: str | None, surface: str | None = None) -> ModelInfo:
        """The model serving ``task`` that matches ``model`` (source id, family or engine name; None = default)."""
        candidates = self.by_task(task)
        if not candidates and self.loading:
            raise EngineUnavailable(f"no model serving {task!r} is ready; not ready yet: {', '.join(self.loading)}",
                                    self.retry_after_s)
        if not candidates:
            broken = [f"{m.name}: {m.problem}" for m in self.models.values() if m.problem]
            if broken:
                raise APIError(502, f"no model serving {task!r}; models with broken configs: {'; '.join(broken)}",
                               code="bad_model_config")
            raise APIError(404, f"no model serving {task!r} is loaded in Triton", code="model_not_found")
        if model is None:
            return self.default(task, surface) or candidates[0]
        for m in candidates:
            if model in (m.name, m.family, m.source):
                return m
        known = {m.source for m in candidates} | {m.family or "" for m in candidates}
        available = ", ".join(sorted(k for k in known if k))
        raise APIError(404, f"model {model!r} not found for {task}; available: {available}",
                       code="model_not_found", param="model")


# --- what the surfaces exchange ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # [n, dim] float32, unit length
    tokens: int = 0  # text tokens used (0 for images)


@dataclass(frozen=True)
class Usage:
    """Token counts of a generation (its last delta)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_openai(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class Delta:
    """One streamed response of choice ``index``: new text (and its tokens' log probabilities when asked); when
    the choice ends, its finish reason; on the request's last response, the usage."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    index: int = 0
    logprobs: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class FlorenceRequest:
    """One Florence-2 task on one image: the task's token, its text (already checked and converted) and knobs
    (None: the model's defaults)."""

    image: bytes
    task_token: str
    text: str | None = None
    max_new_tokens: int | None = None
    num_beams: int | None = None


# --- the protocols -----------------------------------------------------------------------------------------------


@runtime_checkable
class ModelRegistry(Protocol):
    """What is served and how the engine is: models, readiness, config parameters; statistics; lifetime."""

    url: str  # where the engine is (shown by /health and the UI)
    retry_after_s: int

    async def registry(self, refresh: bool = False) -> Registry:
        """Models, readiness, parameters (cached; ``refresh`` re-reads); an unreachable engine: ``reachable``
        False and no models."""
        ...

    async def cached_registry(self) -> Registry:
        """The last registry read, without a round trip when there is one (``/health``)."""
        ...

    def start(self) -> None:
        """Start background work (e.g. refreshing the registry) once the app's event loop runs."""
        ...

    async def statistics(self) -> dict[str, Any]:
        """Per-model inference statistics (Triton's ``/v2/models/stats`` JSON shape); EngineUnavailable if down."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class Embedder(Protocol):
    async def embed_images(self, model: ModelInfo, images: Sequence[bytes]) -> Embedded:
        """Encoded images (checked bytes) -> one unit vector each."""
        ...

    async def embed_texts(self, model: ModelInfo, texts: Sequence[str]) -> Embedded:
        """Texts -> one unit vector each, and the tokens they used."""
        ...


@runtime_checkable
class Generator(Protocol):
    def generate(self, model: ModelInfo, params: GenerationParameters, *,
                 messages: list[dict[str, Any]] | None = None,
                 prompt: str | None = None) -> AsyncGenerator[Delta, None]:
        """The answer to ``messages`` (a conversation, media inline as base64) or a raw ``prompt`` as deltas, until
        every one of the ``params.n`` choices has finished (the last delta carries the usage).

        Closing the generator (``aclose``) cancels the request in the engine. Errors are :class:`APIError`
        (4xx for the client's input, 429 when full, 503 + Retry-After when the engine is down), also mid-stream.
        """
        ...


@runtime_checkable
class FlorenceRunner(Protocol):
    async def run_florence(self, model: ModelInfo, request: FlorenceRequest) -> dict[str, Any]:
        """The model's answer: ``{"result": ..., "text": ..., "image_size": [w, h], "timing": ...}``; 502
        (``bad_model_output``) when it is unreadable."""
        ...


@runtime_checkable
class Engine(ModelRegistry, Embedder, Generator, FlorenceRunner, Protocol):
    """Every surface of one inference engine (``vlmserve.gateway.backends.BACKENDS``)."""


async def live_registry(engine: ModelRegistry) -> Registry:
    """``engine``'s registry, re-read once if it looked unreachable; 503 (Retry-After) when it still is."""
    registry = await engine.registry()
    if not registry.reachable:
        registry = await engine.registry(refresh=True)
        if not registry.reachable:
            raise EngineUnavailable(f"no answer from Triton at {engine.url}", engine.retry_after_s)
    return registry


def use_model(request: Any, info: ModelInfo, retry_after_s: int) -> ModelInfo:
    """Refuse a model that is still loading (503 + Retry-After); label the request's metrics with it."""
    if not info.ready:
        raise APIError(503, f"model {info.name} is not ready yet; retry later", code="model_not_ready",
                       headers={"Retry-After": str(retry_after_s)})
    request.scope.setdefault("state", {})["model"] = info.name
    telemetry.set_model(info.name)  # the request's log lines and span name it
    return info
