"""The one stand-in for the gateway's inference server in unit tests: no Triton, no network, no torch.

:class:`FakeBackend` satisfies :class:`vlmserve.gateway.triton.InferenceBackend` structurally (``make lint`` runs mypy
on
this file), so tests pass it to ``create_app(settings, backend=...)`` as they are. It serves a registry of
:class:`~vlmserve.gateway.triton.ModelInfo`, answers one-shot calls per model (a fixed answer, one computed from the
call,
or an exception), streams scripted responses for decoupled models, and records every call the gateway made.
It knows no model contract: the tests that use it build their models, answers and scripts.

:class:`FakeLauncher` is the orchestrator's stand-in launcher: it satisfies
:class:`vlmserve.orchestrator.launcher.Launcher` and is its own factory, so a test puts it in ``LAUNCHERS`` and drives
the real commands against it; it starts nothing and records what the commands asked.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np

from vlmserve.gateway.triton import ModelInfo, Registry, TritonUnavailable
from vlmserve.orchestrator.launch import Launch
from vlmserve.orchestrator.launcher import LaunchError
from vlmserve.orchestrator.settings import OrchestratorSettings

if TYPE_CHECKING:
    from vlmserve.gateway.triton import InferenceBackend
    from vlmserve.orchestrator.launcher import Launcher, LauncherFactory

__all__ = ["Answer", "Call", "FakeBackend", "FakeLauncher", "StreamItem", "Tensors"]

Tensors: TypeAlias = dict[str, np.ndarray]
# One streamed response, or an exception raised at that point of the stream (after the responses before it).
StreamItem: TypeAlias = "Tensors | BaseException"
# What ``infer`` does for a model: return these tensors, compute them from the call, or raise.
Answer: TypeAlias = "Tensors | BaseException | Callable[[Call], Tensors]"


@dataclass
class Call:
    """One request the gateway sent: ``infer`` (one-shot) or ``stream`` (decoupled)."""

    kind: Literal["infer", "stream"]
    model: str
    inputs: Tensors
    outputs: list[str]
    final_output: str | None = None  # streams only

    def value(self, name: str) -> Any:
        """The first element of input ``name`` (None when it was not sent)."""
        if name not in self.inputs:
            return None
        return np.asarray(self.inputs[name]).reshape(-1)[0]

    def text(self, name: str) -> str | None:
        """Input ``name`` as text (its first element, UTF-8 decoded); None when it was not sent."""
        value = self.value(name)
        return value.decode() if isinstance(value, bytes) else None if value is None else str(value)

    def json(self, name: str) -> Any:
        """Input ``name`` parsed as JSON (its first element); None when it was not sent."""
        value = self.value(name)
        return None if value is None else json.loads(value)


class FakeBackend:
    """An inference server the test scripts.

    ``models``: the registry (ModelInfo objects or a name -> ModelInfo mapping; change ``self.models`` to change
    what the next ``registry()`` returns). ``infer``: per model, the :data:`Answer` to a one-shot call; a model
    without one fails the call with AssertionError (a decoupled model must be streamed). ``script``: the responses
    every stream yields, ``streams``: per-model scripts overriding it; a stream with neither fails. ``reachable``:
    False answers an empty, unreachable registry (the gateway's 503). ``delay``: seconds slept before each streamed
    response and before each infer answer. ``calls`` records every call in order; ``cancelled`` counts streams
    closed before their script ended (the client went away); ``closed`` is set by ``close()``.
    """

    url = "fake-triton:8000"
    retry_after_s = 5

    def __init__(self, models: Mapping[str, ModelInfo] | Iterable[ModelInfo] = (), *,
                 infer: Mapping[str, Answer] | None = None, script: Sequence[StreamItem] | None = None,
                 streams: Mapping[str, Sequence[StreamItem]] | None = None, reachable: bool = True,
                 delay: float = 0.0) -> None:
        self.models: dict[str, ModelInfo] = (dict(models) if isinstance(models, Mapping)
                                             else {m.name: m for m in models})
        self.answers: dict[str, Answer] = dict(infer or {})
        self.script = None if script is None else list(script)
        self.streams = {name: list(s) for name, s in (streams or {}).items()}
        self.reachable = reachable
        self.delay = delay
        self.calls: list[Call] = []
        self.cancelled = 0
        self.closed = False

    async def registry(self, refresh: bool = False) -> Registry:
        if not self.reachable:
            return Registry({}, reachable=False)
        return Registry(dict(self.models))

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        call = Call("infer", model, inputs, list(outputs))
        self.calls.append(call)
        if self.delay:
            await asyncio.sleep(self.delay)
        answer = self.answers.get(model)
        if answer is None:
            raise AssertionError(f"FakeBackend: no infer answer for {model!r} (is it a decoupled model? stream it)")
        if isinstance(answer, BaseException):
            raise answer
        return answer(call) if callable(answer) else answer

    async def stream(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str], *,
                     cancel_inputs: Any = None,
                     final_output: str = "FINISH_REASON") -> AsyncGenerator[dict[str, np.ndarray], None]:
        self.calls.append(Call("stream", model, inputs, list(outputs), final_output))
        script = self.streams.get(model, self.script)
        if script is None:
            raise AssertionError(f"FakeBackend: no stream scripted for {model!r}")
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

    async def statistics(self) -> dict[str, Any]:
        if not self.reachable:
            raise TritonUnavailable("fake Triton is down", self.retry_after_s)
        return {"model_stats": [{"name": name, "version": "1", "inference_count": 0, "execution_count": 0,
                                 "inference_stats": {}} for name in sorted(self.models)]}

    async def close(self) -> None:
        self.closed = True


if TYPE_CHECKING:
    def _is_an_inference_backend(fake: FakeBackend) -> InferenceBackend:
        return fake  # mypy checks FakeBackend against the Protocol here


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
