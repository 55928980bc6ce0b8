"""The stand-ins for the gateway's inference engine and the orchestrator's launchers in unit tests: no Triton, no
tensors, no network, no torch, no processes.

:class:`FakeEngine` implements the protocols of :mod:`vlmserve.gateway.engines` (``Embedder``, ``Generator``,
``FlorenceRunner``, ``ModelRegistry``) structurally (``make lint`` runs mypy on this file), so tests pass it to
``create_app(settings, backend=...)`` as they are. It serves a registry of
:class:`~vlmserve.gateway.engines.ModelInfo` (:func:`model` builds one from config parameters, parsed the way the
registry parses them), answers embeddings and Florence-2 calls per model (a fixed answer, one computed from the
call, or an exception), streams scripted :class:`~vlmserve.gateway.engines.Delta` s for generations, and records
every call the gateway made, typed (the ``GenerationParameters`` it asked for, the ``FlorenceRequest`` it ran).

:class:`FakeLauncher` is the orchestrator's stand-in launcher: it satisfies
:class:`vlmserve.orchestrator.launcher.Launcher` and is its own factory, so a test puts it in ``LAUNCHERS`` and drives
the real commands against it; it starts nothing and records what the commands asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np

from vlmserve.api.openai import GenerationParameters
from vlmserve.gateway.engines import (
    Delta,
    Embedded,
    EngineUnavailable,
    FlorenceRequest,
    ModelInfo,
    Registry,
    Usage,
)
from vlmserve.orchestrator.launch import Launch
from vlmserve.orchestrator.launcher import LaunchError
from vlmserve.orchestrator.settings import OrchestratorSettings

if TYPE_CHECKING:
    from vlmserve.gateway.engines import Embedder, Engine, FlorenceRunner, Generator, ModelRegistry
    from vlmserve.orchestrator.launcher import Launcher, LauncherFactory

__all__ = ["Call", "EmbedAnswer", "FakeEngine", "FakeLauncher", "FlorenceAnswer", "StreamItem", "delta", "model",
           "vectors"]

# One streamed delta, or an exception raised at that point of the stream (after the deltas before it).
StreamItem: TypeAlias = "Delta | BaseException"
# What an embedding call answers for a model: these vectors, vectors computed from the call, or an exception.
EmbedAnswer: TypeAlias = "Embedded | BaseException | Callable[[Call], Embedded]"
# What a Florence-2 call answers: the model's payload ({"result": ..., ...}), one computed from the call, or raise.
FlorenceAnswer: TypeAlias = "dict[str, Any] | BaseException | Callable[[Call], dict[str, Any]]"


def model(name: str, ready: bool = True, max_batch_size: int = 0, device: str = "cpu", **params: Any) -> ModelInfo:
    """A served model from its config parameters (values as export writes them: strings, or anything ``str``-able),
    validated as the registry validates them."""
    raw = {k: v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
           for k, v in params.items()}
    return ModelInfo.of(name, ready, raw, max_batch_size, device)


def delta(text: str, finish: str | None = None, usage: dict[str, int] | None = None, index: int = 0,
          logprobs: list[dict[str, Any]] | None = None) -> Delta:
    """One streamed piece of an answer."""
    counts = None if usage is None else Usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                                             usage.get("batch_size"))
    return Delta(text, finish or None, counts, index, logprobs)


@dataclass
class Call:
    """One request the gateway made of the engine."""

    kind: Literal["embed_images", "embed_texts", "generate", "florence"]
    model: str
    items: Sequence[Any] = ()  # embeddings: the images (bytes) or texts
    params: GenerationParameters | None = None  # generate
    messages: list[dict[str, Any]] | None = None  # generate: the conversation, media inline
    prompt: str | None = None  # generate: a raw prompt
    florence: FlorenceRequest | None = None  # florence

    @property
    def sent(self) -> dict[str, Any]:
        """The generation parameters the gateway set (what differs from the model's defaults)."""
        assert self.params is not None
        return self.params.model_dump(mode="json", exclude_defaults=True)


class FakeEngine:
    """An inference engine the test scripts.

    ``models``: the registry (ModelInfo objects or a name -> ModelInfo mapping; change ``self.models`` to change
    what the next ``registry()`` returns). ``embed``/``florence``: per model, the answer to those calls; a model
    without one fails the call with AssertionError. ``script``: the deltas every generation yields, ``streams``:
    per-model scripts overriding it; a generation with neither fails. ``reachable``: False answers an empty,
    unreachable registry (the gateway's 503). ``delay``: seconds slept before each delta and each answer. ``calls``
    records every call in order; ``cancelled`` counts generations closed before their script ended (the client
    went away); ``started``/``closed`` are set by ``start()``/``close()``.
    """

    url = "fake-triton:8000"
    retry_after_s = 5

    def __init__(self, models: Mapping[str, ModelInfo] | Iterable[ModelInfo] = (), *,
                 embed: Mapping[str, EmbedAnswer] | None = None, florence: Mapping[str, FlorenceAnswer] | None = None,
                 script: Sequence[StreamItem] | None = None, streams: Mapping[str, Sequence[StreamItem]] | None = None,
                 reachable: bool = True, delay: float = 0.0) -> None:
        self.models: dict[str, ModelInfo] = (dict(models) if isinstance(models, Mapping)
                                             else {m.name: m for m in models})
        self.embed_answers: dict[str, EmbedAnswer] = dict(embed or {})
        self.florence_answers: dict[str, FlorenceAnswer] = dict(florence or {})
        self.script = None if script is None else list(script)
        self.streams = {name: list(s) for name, s in (streams or {}).items()}
        self.reachable = reachable
        self.delay = delay
        self.calls: list[Call] = []
        self.cancelled = 0
        self.started = False
        self.closed = False

    # --- ModelRegistry ---

    async def registry(self, refresh: bool = False) -> Registry:
        if not self.reachable:
            return Registry({}, reachable=False)
        return Registry(dict(self.models))

    async def cached_registry(self) -> Registry:
        return await self.registry()

    def start(self) -> None:
        self.started = True

    async def statistics(self) -> dict[str, Any]:
        if not self.reachable:
            raise EngineUnavailable("fake engine is down", self.retry_after_s)
        return {"model_stats": [{"name": name, "version": "1", "inference_count": 0, "execution_count": 0,
                                 "inference_stats": {}} for name in sorted(self.models)]}

    async def close(self) -> None:
        self.closed = True

    # --- Embedder ---

    async def embed_images(self, model: ModelInfo, images: Sequence[bytes]) -> Embedded:
        return await self._embed(Call("embed_images", model.name, list(images)))

    async def embed_texts(self, model: ModelInfo, texts: Sequence[str]) -> Embedded:
        return await self._embed(Call("embed_texts", model.name, list(texts)))

    async def _embed(self, call: Call) -> Embedded:
        return await self._answer(call, self.embed_answers, "embedding")

    async def _answer(self, call: Call, answers: Mapping[str, Any], what: str) -> Any:
        """Record ``call``, wait ``delay``, then the model's answer: raised, computed from the call, or as is."""
        self.calls.append(call)
        if self.delay:
            await asyncio.sleep(self.delay)
        answer = answers.get(call.model)
        if answer is None:
            raise AssertionError(f"FakeEngine: no {what} answer for {call.model!r}")
        if isinstance(answer, BaseException):
            raise answer
        return answer(call) if callable(answer) else answer

    # --- Generator ---

    async def generate(self, model: ModelInfo, params: GenerationParameters, *,
                       messages: list[dict[str, Any]] | None = None,
                       prompt: str | None = None) -> AsyncGenerator[Delta, None]:
        self.calls.append(Call("generate", model.name, params=params, messages=messages, prompt=prompt))
        script = self.streams.get(model.name, self.script)
        if script is None:
            raise AssertionError(f"FakeEngine: no generation scripted for {model.name!r}")
        done = False
        try:
            for item in script:
                if self.delay:
                    await asyncio.sleep(self.delay)
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
            done = True
        finally:
            if not done:
                self.cancelled += 1

    # --- FlorenceRunner ---

    async def run_florence(self, model: ModelInfo, request: FlorenceRequest) -> dict[str, Any]:
        result: dict[str, Any] = await self._answer(Call("florence", model.name, florence=request),
                                                    self.florence_answers, "Florence-2")
        return result


def vectors(n: int, dim: int = 4) -> np.ndarray:
    """``n`` unit vectors of ``dim`` floats (float32), distinct per row."""
    return np.eye(max(n, dim), dim, dtype=np.float32)[:n]


if TYPE_CHECKING:
    def _is_an_engine(fake: FakeEngine) -> Engine:
        return fake  # mypy checks FakeEngine against every protocol here

    def _surfaces(fake: FakeEngine) -> tuple[ModelRegistry, Embedder, Generator, FlorenceRunner]:
        return fake, fake, fake, fake


class FakeLauncher:
    """A launcher the test scripts; the commands build it through ``LAUNCHERS[name]`` (it returns itself, with the
    settings and the planned launch they passed).

    ``rows``: what ``status`` answers (each row gets ``launcher: <name>``). ``error``: raised by every start
    (``up``, ``ensure``, ``run_foreground``). ``exit_code``: what ``run_foreground`` returns.
    ``available_``/``active_``: its answers to ``available()``/``active()``. ``calls`` records each verb with its
    arguments, in order.
    """

    def __init__(self, name: str = "fake", *, in_image: bool = False, rows: Sequence[Mapping[str, Any]] = (),
                 error: LaunchError | None = None, exit_code: int = 0, available_: bool = True,
                 active_: bool = True) -> None:
        self.name = name
        self.in_image = in_image
        self.rows = [dict(r) for r in rows]
        self.error = error
        self.exit_code = exit_code
        self.available_ = available_
        self.active_ = active_
        self.launch: Launch | None = None
        self.settings: OrchestratorSettings | None = None
        self.calls: list[tuple[str, Any]] = []

    def __call__(self, settings: OrchestratorSettings, *, log: Callable[[str], None] = print,
                 launch: Launch | None = None) -> FakeLauncher:
        self.settings, self.launch = settings, launch
        return self

    def _start(self, verb: str, detail: Any) -> None:
        self.calls.append((verb, detail))
        if self.error is not None:
            raise self.error

    def available(self) -> bool:
        return self.available_

    def active(self) -> bool:
        return self.active_

    def up(self, run_args: Sequence[str]) -> list[str]:
        self._start("up", list(run_args))
        return ["triton", "gateway"]

    def ensure(self, run_args: Sequence[str]) -> list[str]:
        self._start("ensure", list(run_args))
        return ["gateway"]

    def run_foreground(self) -> int:
        self._start("run_foreground", None)
        return self.exit_code

    def down(self) -> list[str]:
        self.calls.append(("down", None))
        return ["gateway", "triton"]

    def status(self) -> list[dict[str, Any]]:
        self.calls.append(("status", None))
        return [{**r, "launcher": self.name} for r in self.rows]

    def logs(self, service: str | None, follow: bool, tail: int | None) -> Iterator[str]:
        self.calls.append(("logs", (service, follow, tail)))
        yield f"{service or 'triton'} | a line from {self.name}"

    def clean(self, volumes: bool) -> list[str]:
        self.calls.append(("clean", volumes))
        return [f"{self.name} things"]


if TYPE_CHECKING:
    def _is_a_launcher_and_its_factory(fake: FakeLauncher) -> tuple[Launcher, LauncherFactory]:
        return fake, fake  # mypy checks FakeLauncher against both Protocols here
