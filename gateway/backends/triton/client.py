"""Talking to Triton: inference calls with error mapping, and the registry learned from Triton itself.

The gateway keeps no model list of its own: it reads Triton's repository index and each model's config
(``parameters`` written by ``export``: family, task, source_model, weights, ...). One-shot calls go over HTTP;
decoupled (streaming) models are called over gRPC streaming, which is the only Triton API that can cancel a
request when the client goes away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_grpc
import tritonclient.http.aio as triton_http
from tritonclient.utils import InferenceServerException

from vlmserve import telemetry
from vlmserve.gateway.engines import EngineUnavailable, ModelInfo, Registry
from vlmserve.gateway.errors import APIError
from vlmserve.gateway.limits import TRITON_PRIORITY, batch_priority

log = logging.getLogger("vlmserve.gateway")


TritonUnavailable = EngineUnavailable  # Triton is the engine here


def _params(config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


def _device(config: dict[str, Any]) -> str:
    kinds = {g.get("kind") for g in config.get("instance_group") or []}
    return "cuda" if "KIND_GPU" in kinds else "cpu"


class TritonClient:
    """Async client for one Triton server: the registry, one-shot calls (HTTP/REST, binary tensors) and streams
    (gRPC); :class:`~vlmserve.gateway.backends.triton.TritonBackend` speaks the surfaces over it."""

    def __init__(self, url: str, timeout_s: float = 120.0, retry_after_s: int = 5, registry_ttl_s: float = 10.0,
                 grpc_url: str | None = None, reconnect_s: float = 0.0):
        self.url = url
        # Connections are pooled and would stay on the Triton replica they first reached: behind a DNS name with
        # several replicas (Swarm dnsrr, a Kubernetes Service balancing per connection) a replica that comes back
        # or is added would get nothing. Every ``reconnect_s`` new clients re-resolve and reconnect; the old ones
        # finish their requests and close. 0 keeps the connections (one Triton).
        self.reconnect_s = reconnect_s
        self.clock = time.monotonic
        self._client_at = 0.0
        self._grpc_at = 0.0
        self._retired: set[asyncio.Task[None]] = set()
        self._open_streams: set[str] = set()  # Triton request ids of the streams in progress
        self.grpc_url = grpc_url or _default_grpc_url(url)
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.registry_ttl_s = registry_ttl_s
        self._client: triton_http.InferenceServerClient | None = None
        self._grpc_client: triton_grpc.InferenceServerClient | None = None
        self._registry: Registry | None = None
        self._registry_at = 0.0
        self._lock = asyncio.Lock()
        # Models whose Python stub died, refused (503) until this clock time: the orchestrator next to their Triton
        # reloads them (orchestrator/heal.py); the gateway never unloads or loads a model itself.
        self._unhealthy: dict[str, float] = {}
        self._served: dict[str, ModelInfo] = {}  # each model as last read READY (kept while it is reloaded)
        self._refresher: asyncio.Task[None] | None = None

    def _stale(self, made_at: float) -> bool:
        return self.reconnect_s > 0 and self.clock() - made_at > self.reconnect_s

    def _retire(self, old: Any) -> None:
        """Close a replaced client once the requests it carries can have finished (``timeout_s``)."""
        async def later() -> None:
            await asyncio.sleep(self.timeout_s)
            await old.close()

        self._background(later())

    @property
    def client(self) -> triton_http.InferenceServerClient:
        if self._client is not None and self._stale(self._client_at):
            self._retire(self._client)
            self._client = None
        if self._client is None:
            self._client = triton_http.InferenceServerClient(self.url, conn_timeout=self.timeout_s)
            self._client_at = self.clock()
        return self._client

    @property
    def grpc_client(self) -> triton_grpc.InferenceServerClient:
        # Created lazily: a grpc.aio channel belongs to the event loop that is running when it is made.
        if self._grpc_client is not None and self._stale(self._grpc_at):
            self._retire(self._grpc_client)
            self._grpc_client = None
        if self._grpc_client is None:
            # tritonclient's own channel options, plus round_robin: a name resolving to several replicas spreads
            # the streams over all of them.
            keepalive = triton_grpc.KeepAliveOptions()
            self._grpc_client = triton_grpc.InferenceServerClient(self.grpc_url, channel_args=[
                ("grpc.max_send_message_length", triton_grpc.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", triton_grpc.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
                ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
                ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
                ("grpc.lb_policy_name", "round_robin"),
            ])
            self._grpc_at = self.clock()
        return self._grpc_client

    def start(self) -> None:
        """Refresh the registry every ``registry_ttl_s`` in the background, so ``/health`` never waits on Triton."""
        async def loop() -> None:
            while True:
                await asyncio.sleep(self.registry_ttl_s)
                await self.registry(refresh=True)

        if self._refresher is None:
            self._refresher = asyncio.create_task(loop(), name="triton-registry-refresh")

    async def cached_registry(self) -> Registry:
        """The last registry read (refreshed by :meth:`start`), read once if there is none yet."""
        return self._registry if self._registry is not None else await self.registry()

    def unhealthy(self, model: str) -> bool:
        until = self._unhealthy.get(model)
        return until is not None and self.clock() < until

    def _dead_stub(self, model: str) -> TritonUnavailable:
        """``model``'s Python stub died: refuse it for ``retry_after_s`` (the watcher beside its Triton reloads it).

        With several Triton replicas only the one this answer came from is hurt; other gateway replicas (and this
        one once the mark expires) keep sending to the others, and the reload happens there, not here.
        """
        self._unhealthy[model] = self.clock() + self.retry_after_s
        self._registry = None
        log.warning("model %s: its Python stub died; refusing it for %ss while its Triton reloads it", model,
                    self.retry_after_s)
        return TritonUnavailable(f"model {model} crashed and is being reloaded", self.retry_after_s)

    def _check_healthy(self, model: str) -> None:
        if self.unhealthy(model):
            raise TritonUnavailable(f"model {model} is being reloaded after a crash", self.retry_after_s)

    async def statistics(self) -> dict[str, Any]:
        try:
            return dict(await self.client.get_inference_statistics())
        except Exception as exc:  # noqa: BLE001 - Triton errors, timeouts and aiohttp errors all mean "not now"
            raise TritonUnavailable(f"{type(exc).__name__} reading statistics from Triton at {self.url}",
                                    self.retry_after_s) from None

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        for task in self._retired:
            task.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._grpc_client is not None:
            await self._grpc_client.close()
            self._grpc_client = None

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
                    models[name] = ModelInfo.of(name, ready, _params(config), int(config.get("max_batch_size", 0)),
                                                _device(config))
                    if models[name].problem:
                        log.error("model %s: %s", name, models[name].problem)
                    if models[name].ready:
                        self._served[name] = models[name]
                    elif not ready and name in self._served:
                        # Unloaded for its reload (orchestrator/heal.py), Triton has no config to give; without its
                        # task the model would drop out of its surface and the default would silently move to
                        # another family (another embedding space): it stays, not ready: 503 + Retry-After.
                        models[name] = dataclasses.replace(self._served[name], ready=False)
                loading = tuple(sorted(n for n, m in models.items()
                                       if not m.ready and m.params is None and not m.problem))
                registry = Registry({name: dataclasses.replace(m, ready=False) if self.unhealthy(name) else m
                                     for name, m in models.items()}, reachable=True, loading=loading,
                                    retry_after_s=self.retry_after_s)
            except Exception:  # noqa: BLE001 - any failure to read the index means "Triton not reachable"
                registry = Registry({}, reachable=False)
            self._registry, self._registry_at = registry, time.monotonic()
            return registry

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """One inference request; bad input -> 400, queue full -> 429, Triton down -> 503."""
        self._check_healthy(model)
        infer_inputs = []
        for name, array in inputs.items():
            dtype = "BYTES" if array.dtype == np.object_ else _np_to_triton(array.dtype)
            item = triton_http.InferInput(name, list(array.shape), dtype)
            item.set_data_from_numpy(array, binary_data=True)
            infer_inputs.append(item)
        requested = [triton_http.InferRequestedOutput(n, binary_data=True) for n in outputs]
        call_id = _call_id()
        try:
            with telemetry.span("gateway", f"triton.infer {model}", **{"vlmserve.model": model,
                                                                        "vlmserve.triton_request_id": call_id}):
                headers, parameters = _trace_headers()
                result = await asyncio.wait_for(
                    self.client.infer(model, infer_inputs, outputs=requested, request_id=call_id, headers=headers,
                                      parameters=parameters, priority=TRITON_PRIORITY[batch_priority.get()]),
                    timeout=self.timeout_s,
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

    async def stream(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str], *,
                     cancel_inputs: Callable[[str], dict[str, np.ndarray]] | None = None,
                     final_output: str | None = None) -> AsyncGenerator[dict[str, np.ndarray], None]:
        """Stream the responses of a decoupled model for one request (gRPC streaming).

        Yields one ``{output: array}`` dict per response and stops after the final one: the response whose
        ``final_output`` tensor is non-empty (or that Triton flags ``triton_final_response``). Errors map like
        :meth:`infer` (bad input -> 400, queue full -> 429, Triton down -> 503), also mid-stream.

        Closing the generator early (the HTTP client went away) ends the request in Triton. With
        ``cancel_inputs`` (the inputs of a request, given this one's request id, that makes the model end it:
        the chat models' ``{"cancel": id}``) that request goes down the same stream, the stream is half-closed and
        what is left of it is read in the background: the gRPC call is never cancelled. Triton 2.51's gRPC
        frontend can abort the whole server (``GRPC_CALL_ERROR_TOO_MANY_OPERATIONS``, an assertion) when a
        stream is cancelled while it writes a response; 200 abandoned chat streams crashed it here. Without
        ``cancel_inputs`` the gRPC call is cancelled, which cancels the request in Triton.
        """
        self._check_healthy(model)
        grpc_inputs = _grpc_inputs(inputs)
        requested = [triton_grpc.InferRequestedOutput(n) for n in outputs]
        # The request side stays open until the final response: Triton ends the call once it is closed and
        # every request on it is done. ``None`` in the outbox closes it.
        # The request's id (X-Request-ID; <id>-<n> for its n-th Triton call), which its cancel request names.
        request_id = _call_id()
        if request_id in self._open_streams:
            # A client sent one X-Request-ID on two requests at once: the cancel request must name this one only.
            request_id = f"{request_id}.{uuid.uuid4().hex[:8]}"
        outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        # The span lasts until the final response (ended in ``finally``; never the current span: a generator's
        # context is not the caller's).
        span = telemetry.start_span("gateway", f"triton.stream {model}", **{
            "vlmserve.model": model, "vlmserve.triton_request_id": request_id})
        headers, parameters = _trace_headers(span)
        first: dict[str, Any] = {"model_name": model, "inputs": grpc_inputs, "outputs": requested,
                                 "request_id": request_id, "priority": TRITON_PRIORITY[batch_priority.get()]}
        if parameters:
            first["parameters"] = parameters
        outbox.put_nowait(first)
        finished = False  # the final response (or an error) came: the request side is closed

        async def requests() -> AsyncIterator[dict[str, Any]]:
            while (item := await outbox.get()) is not None:
                yield item

        try:
            # triton_grpc_error: an error ends the call with its gRPC status code (INVALID_ARGUMENT, INTERNAL, ...)
            # instead of a bare message inside the stream.
            call: Any = self.grpc_client.stream_infer(requests(), headers={"triton_grpc_error": "true",
                                                                         **(headers or {})})
        except InferenceServerException as exc:
            telemetry.end_span(span, "error")
            raise self._map_error(model, exc) from None
        except grpc.RpcError as exc:
            telemetry.end_span(span, "error")
            raise self._unavailable(exc) from None
        self._open_streams.add(request_id)
        try:
            while True:
                try:
                    result, error = await asyncio.wait_for(call.__anext__(), timeout=self.timeout_s)
                except StopAsyncIteration:
                    raise APIError(502, f"{model} ended the stream without a final response",
                                   code="inference_failed") from None
                except TimeoutError:
                    raise TritonUnavailable(f"no response from {model} within {self.timeout_s:g}s",
                                            self.retry_after_s) from None
                except grpc.aio.AioRpcError as exc:
                    raise self._map_rpc_error(model, exc) from None
                if error is not None:
                    finished = True
                    outbox.put_nowait(None)
                    raise self._map_stream_error(model, error)
                values = {n: array for n in outputs if (array := result.as_numpy(n)) is not None}
                final = _is_final(result, values.get(final_output) if final_output else None)
                if final:
                    finished = True
                    outbox.put_nowait(None)
                yield values
                if final:
                    return
        finally:
            self._open_streams.discard(request_id)
            telemetry.end_span(span, None if finished else "abandoned")
            if not finished:
                if cancel_inputs is None:
                    outbox.put_nowait(None)
                    call.cancel()
                else:
                    outbox.put_nowait({"model_name": model, "inputs": _grpc_inputs(cancel_inputs(request_id)),
                                       "outputs": requested})
                    outbox.put_nowait(None)
                    self._background(self._drain(model, call))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _drain(self, model: str, call: Any) -> None:
        """Read an abandoned stream to its end (the model answers the cancelled request with a final response);
        cancel it only if it does not end within ``timeout_s``."""
        try:
            async with asyncio.timeout(self.timeout_s):
                async for _ in call:
                    pass
        except TimeoutError:
            log.warning("%s: an abandoned stream did not end within %gs; cancelling it", model, self.timeout_s)
            call.cancel()
        except Exception as exc:  # noqa: BLE001 - the client is gone; the stream's own errors do not matter
            log.debug("%s: abandoned stream ended with %s", model, type(exc).__name__)

    # Errors are told apart by Triton's status code: HTTP status of the one-shot calls, gRPC status code of the
    # streams (the triton_grpc_error header), the code our models set (model_repository/common.py error_response:
    # INVALID_ARG for the client's input, UNAVAILABLE for a full chat queue). Two cases carry no distinct code and
    # read Triton's message: a dead Python stub (INTERNAL, like any model failure: "Stub process ... is not
    # healthy") and an unknown model inside a stream (refused before the request reaches a model, uncoded).
    # The queue_full / queue_timeout label of a 429 also reads it (both are UNAVAILABLE); the status does not.

    def _map_rpc_error(self, model: str, exc: grpc.aio.AioRpcError) -> APIError:
        code = exc.code()
        details = exc.details() or str(code)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return APIError(400, f"{model}: {details}", code="invalid_input")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # gRPC's own message size limit
            return APIError(413, f"{model}: request too large for the inference server ({details})",
                            code="request_too_large")
        if code == grpc.StatusCode.INTERNAL and _is_dead_stub(details):
            return self._dead_stub(model)
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            return APIError(502, f"{model} failed: {details}", code="inference_failed")
        # NOT_FOUND (not loaded: being reloaded), UNAVAILABLE (Triton unreachable, or a model's full queue: gRPC
        # cannot tell them apart), DEADLINE_EXCEEDED, CANCELLED, ...: retry later.
        self._registry = None
        return TritonUnavailable(f"{code.name} from Triton gRPC at {self.grpc_url}", self.retry_after_s)

    def _map_stream_error(self, model: str, exc: InferenceServerException) -> APIError:
        # With triton_grpc_error a model's error ends the call (_map_rpc_error); what still arrives inside the
        # stream is Triton refusing the request before any model saw it, without a code.
        message = exc.message() or str(exc)
        if exc.status() is not None:
            return self._map_error(model, exc)
        if "unknown model" in message.lower():  # not loaded (being reloaded): NOT_FOUND, sent uncoded
            self._registry = None
            return TritonUnavailable(f"model {model} is not available ({message})", self.retry_after_s)
        return APIError(502, f"{model} failed: {message}", code="inference_failed")

    def _map_error(self, model: str, exc: InferenceServerException) -> APIError:
        """An error of a one-shot call (HTTP status; a gRPC client's ``StatusCode.*`` reads the same)."""
        message = exc.message() or str(exc)
        status = str(exc.status() or "")
        if status in ("400", "StatusCode.INVALID_ARGUMENT"):
            return APIError(400, message, code="invalid_input")
        if status in ("404", "StatusCode.NOT_FOUND"):  # not loaded: being (re)loaded on its Triton
            self._registry = None
            return TritonUnavailable(f"model {model} is not available ({message})", self.retry_after_s)
        if status in ("503", "StatusCode.UNAVAILABLE"):  # the model's queue is full, or the request waited too long
            retry = {"Retry-After": str(self.retry_after_s)}
            if "timeout" in message.lower():
                return APIError(429, f"{model}: server busy, the request waited too long in the queue ({message}); "
                                     "retry later", code="queue_timeout", headers=retry)
            return APIError(429, f"{model}: server busy ({message}); retry later", code="queue_full", headers=retry)
        if status in ("500", "StatusCode.INTERNAL") and _is_dead_stub(message):
            return self._dead_stub(model)
        return APIError(502, f"{model} failed: {message}", code="inference_failed")


def _call_id() -> str:
    """The Triton request id of this call: the gateway request's X-Request-ID, ``<id>-<n>`` for its n-th call
    (calls made concurrently for one request share its context, so each gets its own n); outside a request
    (tests, background work) a fresh one."""
    ctx = telemetry.current.get()
    return uuid.uuid4().hex if ctx is None else ctx.next_triton_id()


def _trace_headers(span: Any = None) -> tuple[dict[str, str] | None, dict[str, str] | None]:
    """With tracing on, ``span`` (default: the current one) as W3C ``traceparent``: a header (Triton's own
    OpenTelemetry trace joins it) and a request parameter (the Python models parent their spans on it)."""
    traceparent = telemetry.traceparent_of(span) if span is not None else telemetry.current_traceparent()
    if traceparent is None:
        return None, None
    return {telemetry.TRACEPARENT: traceparent}, {telemetry.TRACEPARENT: traceparent}


def _grpc_inputs(inputs: dict[str, np.ndarray]) -> list[triton_grpc.InferInput]:
    items = []
    for name, array in inputs.items():
        dtype = "BYTES" if array.dtype == np.object_ else _np_to_triton(array.dtype)
        item = triton_grpc.InferInput(name, list(array.shape), dtype)
        item.set_data_from_numpy(array)
        items.append(item)
    return items


def _is_dead_stub(message: str) -> bool:
    """Triton's words for a model whose Python stub process died (INTERNAL, no code of its own)."""
    lowered = message.lower()
    return "stub process" in lowered and "not healthy" in lowered


def _is_final(result: Any, marker: np.ndarray | None) -> bool:
    if marker is not None and marker.size and marker.reshape(-1)[0] not in (b"", ""):
        return True
    params = result.get_response().parameters
    return "triton_final_response" in params and bool(params["triton_final_response"].bool_param)


def _default_grpc_url(http_url: str) -> str:
    host = http_url.split("://", 1)[-1].rsplit(":", 1)[0] or "127.0.0.1"
    return f"{host}:8001"


def _np_to_triton(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)
