"""Request body size cap (413), enforced on Content-Length and on the bytes actually received; in-flight caps per
route group (429 + Retry-After); the request's priority (interactive, or batch below it)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmserve.gateway.errors import error_body


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _reject(self) -> JSONResponse:
        return JSONResponse(
            error_body(413, f"request body larger than {self.max_bytes} bytes; send fewer or smaller items",
                       "body_too_large"),
            413,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    too_large = int(value) > self.max_bytes
                except ValueError:
                    too_large = False
                if too_large:
                    await self._reject()(scope, receive, send)
                    return
        received = 0
        started = False
        rejected = False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not started:
                    # Answer now and tell the app the client left: frameworks turn exceptions raised while
                    # reading the body into their own 400, so raising here would lose the 413.
                    rejected = True
                    await self._reject()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return  # the 413 was already sent; drop whatever the app answers
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


# Inference routes belong to a group; each group has its own in-flight cap (settings max_inflight_<group>). A route
# names its group where it is declared (``openapi_extra=inflight_group("chat")``, shown in the OpenAPI schema), and
# the app hands the middleware the map of every declared route, read from its OpenAPI schema (:func:`route_groups`).
INFLIGHT_GROUP_KEY = "x-vlmserve-inflight-group"


def inflight_group(group: str) -> dict[str, str]:
    """The ``openapi_extra`` that puts a POST route into an in-flight group."""
    return {INFLIGHT_GROUP_KEY: group}


def route_groups(openapi: Mapping[str, Any]) -> dict[str, str]:
    """Path -> in-flight group of every POST route whose schema declares one (``app.openapi()``)."""
    return {path: ops["post"][INFLIGHT_GROUP_KEY] for path, ops in openapi.get("paths", {}).items()
            if INFLIGHT_GROUP_KEY in ops.get("post", {})}


# ``X-Vlmserve-Priority: batch`` (the Batch API's runner sends it; any client may) puts a request below interactive
# traffic: Triton's dynamic batchers queue it at priority level 2 of 2 (``TRITON_PRIORITY``), the chat models admit
# its rows after every waiting interactive row. Nothing can raise a request above the default.
PRIORITY_HEADER = b"x-vlmserve-priority"
batch_priority: ContextVar[bool] = ContextVar("vlmserve_batch_priority", default=False)
TRITON_PRIORITY = {False: 1, True: 2}  # the exported dynamic batchers: priority_levels 2, default level 1


class Interactive:
    """Interactive (not batch) requests per route group: how many are in progress and when the last one came or
    went. A running batch yields to them (``vlmserve.gateway.batches``): one line at a time while the group is busy."""

    def __init__(self) -> None:
        self.active: dict[str, int] = {}
        self.last: dict[str, float] = {}

    def busy(self, group: str, quiet_s: float) -> bool:
        """Whether ``group`` has interactive requests in progress, or had one within ``quiet_s`` seconds."""
        return self.active.get(group, 0) > 0 or time.monotonic() - self.last.get(group, -math.inf) < quiet_s

    def enter(self, group: str) -> None:
        self.active[group] = self.active.get(group, 0) + 1
        self.last[group] = time.monotonic()

    def leave(self, group: str) -> None:
        self.active[group] -= 1
        self.last[group] = time.monotonic()


class InFlightLimit:
    """At most ``caps[group]`` requests of a route group in progress (a streamed answer counts until its end);
    the next one gets 429 + Retry-After at once instead of queueing in the gateway (fetching URLs, decoding).
    It also reads the request's priority header into ``batch_priority`` for the handlers below it."""

    def __init__(self, app: ASGIApp, caps: dict[str, int], groups: Mapping[str, str], retry_after_s: int,
                 interactive: Interactive | None = None) -> None:
        self.app = app
        self.caps = caps
        self.groups = dict(groups)  # path -> group (route_groups(app.routes))
        self.retry_after_s = retry_after_s
        self.active = dict.fromkeys(caps, 0)
        self.interactive = interactive or Interactive()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        group = self.groups.get(scope.get("path", "")) if scope["type"] == "http" else None
        if group is None or group not in self.caps or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        batch = any(k == PRIORITY_HEADER and v.strip().lower() == b"batch" for k, v in scope.get("headers", []))
        batch_priority.set(batch)
        cap = self.caps[group]
        if self.active[group] >= cap:
            # Metrics label by route template; these paths are templates already (no path parameters).
            scope["route"] = SimpleNamespace(path=scope["path"])
            body = error_body(429, f"too many {group} requests in progress (max_inflight_{group}={cap}); "
                                   "retry later", "too_many_requests")
            await JSONResponse(body, 429, {"Retry-After": str(self.retry_after_s)})(scope, receive, send)
            return
        # Single-threaded event loop: the check above and this increment cannot interleave.
        self.active[group] += 1
        if not batch:
            self.interactive.enter(group)
        try:
            await self.app(scope, receive, send)
        finally:
            self.active[group] -= 1
            if not batch:
                self.interactive.leave(group)


class Drain:
    """Graceful stop (SIGTERM), readiness first. While ``unready`` (the first ``drain_delay_s`` after the signal)
    only ``/readyz`` answers 503, every other request is served as before: load balancers and Kubernetes
    endpoints stop routing here while the requests they still send are answered. Then ``draining``: requests
    already in progress finish; new ones get 503 + Retry-After and ``Connection: close`` (a load balancer or client
    retries elsewhere) instead of a refused connection. The server (``vlmserve.gateway.__main__``) exits once ``active``
    reaches 0 or the drain times out. ``/livez`` keeps answering: the process is alive until it exits."""

    def __init__(self, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        self.unready = False
        self.draining = False
        self.active = 0  # HTTP requests in progress (a streamed answer counts until its end)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def drain(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            path = scope.get("path")
            if (self.draining and path != "/livez") or (self.unready and path == "/readyz"):
                scope["route"] = SimpleNamespace(path=scope.get("path", ""))  # the metrics' route label
                body = error_body(503, "the gateway is shutting down; retry the request", "shutting_down")
                headers = {"Retry-After": str(self.retry_after_s), "Connection": "close"}
                await JSONResponse(body, 503, headers)(scope, receive, send)
                return
            self.active += 1
            try:
                await app(scope, receive, send)
            finally:
                self.active -= 1

        return drain
