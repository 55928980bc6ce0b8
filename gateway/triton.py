"""Talking to Triton: inference calls with error mapping, and the registry learned from Triton itself.

The gateway keeps no model list of its own: it reads Triton's repository index and each model's config
(``parameters`` written by ``export``: family, task, source_model, weights, ...).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.http.aio as triton_http
from tritonclient.utils import InferenceServerException

from gateway.errors import APIError


class TritonUnavailable(APIError):
    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(503, f"inference server unavailable: {detail}; retry later", code="triton_unavailable",
                         headers={"Retry-After": str(retry_after)})


@dataclass(frozen=True)
class ModelInfo:
    name: str
    ready: bool
    params: dict[str, str] = field(default_factory=dict)
    max_batch_size: int = 0
    device: str = "cpu"

    @property
    def family(self) -> str | None:
        return self.params.get("family")

    @property
    def task(self) -> str | None:
        return self.params.get("task")


@dataclass(frozen=True)
class Registry:
    models: dict[str, ModelInfo]
    reachable: bool = True

    def by_task(self, task: str) -> list[ModelInfo]:
        return [m for m in self.models.values() if m.task == task]

    def find(self, task: str, model: str | None) -> ModelInfo:
        """The model serving ``task`` that matches ``model`` (source id, family or Triton name; None = first)."""
        candidates = self.by_task(task)
        if not candidates:
            raise APIError(404, f"no model serving {task!r} is loaded in Triton", code="model_not_found")
        if model is None:
            return candidates[0]
        for m in candidates:
            if model in (m.name, m.family, m.params.get("source_model")):
                return m
        known = {m.params.get("source_model", m.name) for m in candidates}
        known |= {m.family or "" for m in candidates}
        available = ", ".join(sorted(k for k in known if k))
        raise APIError(404, f"model {model!r} not found for {task}; available: {available}",
                       code="model_not_found", param="model")


def _params(config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


def _device(config: dict[str, Any]) -> str:
    kinds = {g.get("kind") for g in config.get("instance_group") or []}
    return "cuda" if "KIND_GPU" in kinds else "cpu"


class TritonBackend:
    """Async client for one Triton server (HTTP/REST, binary tensors)."""

    def __init__(self, url: str, timeout_s: float = 120.0, retry_after_s: int = 5, registry_ttl_s: float = 10.0):
        self.url = url
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.registry_ttl_s = registry_ttl_s
        self._client: triton_http.InferenceServerClient | None = None
        self._registry: Registry | None = None
        self._registry_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def client(self) -> triton_http.InferenceServerClient:
        if self._client is None:
            self._client = triton_http.InferenceServerClient(self.url, conn_timeout=self.timeout_s)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _unavailable(self, exc: BaseException) -> TritonUnavailable:
        return TritonUnavailable(f"{type(exc).__name__} talking to Triton at {self.url}", self.retry_after_s)

    async def registry(self, refresh: bool = False) -> Registry:
        """Models known to Triton (cached ``registry_ttl_s``); an unreachable Triton gives an empty registry."""
        now = time.monotonic()
        if not refresh and self._registry is not None and now - self._registry_at < self.registry_ttl_s:
            return self._registry
        async with self._lock:
            fresh = self._registry is not None and time.monotonic() - self._registry_at < self.registry_ttl_s
            if not refresh and fresh and self._registry is not None:
                return self._registry
            try:
                index = await self.client.get_model_repository_index()
                models: dict[str, ModelInfo] = {}
                for entry in index:
                    name = entry["name"]
                    ready = entry.get("state") == "READY"
                    config: dict[str, Any] = {}
                    if ready:
                        config = await self.client.get_model_config(name)
                    models[name] = ModelInfo(name, ready, _params(config), int(config.get("max_batch_size", 0)),
                                             _device(config))
                registry = Registry(models, reachable=True)
            except Exception:  # noqa: BLE001 - any failure to read the index means "Triton not reachable"
                registry = Registry({}, reachable=False)
            self._registry, self._registry_at = registry, time.monotonic()
            return registry

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """One inference request; bad input -> 400, queue full -> 429, Triton down -> 503."""
        infer_inputs = []
        for name, array in inputs.items():
            dtype = "BYTES" if array.dtype == np.object_ else _np_to_triton(array.dtype)
            item = triton_http.InferInput(name, list(array.shape), dtype)
            item.set_data_from_numpy(array, binary_data=True)
            infer_inputs.append(item)
        requested = [triton_http.InferRequestedOutput(n, binary_data=True) for n in outputs]
        try:
            result = await asyncio.wait_for(
                self.client.infer(model, infer_inputs, outputs=requested), timeout=self.timeout_s
            )
        except InferenceServerException as exc:
            raise self._map_error(model, exc) from None
        except (TimeoutError, OSError) as exc:
            raise self._unavailable(exc) from None
        except Exception as exc:  # noqa: BLE001 - aiohttp client errors are not OSError subclasses
            if type(exc).__module__.startswith("aiohttp"):
                raise self._unavailable(exc) from None
            raise
        return {n: result.as_numpy(n) for n in outputs}

    def _map_error(self, model: str, exc: InferenceServerException) -> APIError:
        message = exc.message() or str(exc)
        status = str(exc.status() or "")
        lowered = message.lower()
        if "queue" in lowered and ("full" in lowered or "maximum" in lowered):
            return APIError(429, f"{model}: server busy ({message}); retry later", code="queue_full",
                            headers={"Retry-After": str(self.retry_after_s)})
        if status == "400":
            return APIError(400, message, code="invalid_input")
        if status in ("404", "503") or "unavailable" in lowered or "not ready" in lowered or "unknown model" in lowered:
            self._registry = None
            return TritonUnavailable(f"model {model} is not available ({message})", self.retry_after_s)
        return APIError(502, f"{model} failed: {message}", code="inference_failed")


def _np_to_triton(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)
