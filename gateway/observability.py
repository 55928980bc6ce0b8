"""Request ids and the request's span at the gateway's edge (vlmserve/telemetry.py has the settings).

:class:`RequestIdMiddleware` is the outermost middleware: every request gets an id (the client's
``X-Request-ID`` when it is a plain token, else a new one) that every response carries back in the same header,
every error body in ``error.request_id`` (gateway/errors.py), every log line written while the request is served,
and every Triton call as its request id (gateway/backends/triton/client.py). With tracing on, it also opens the
request's server span, child of the client's W3C ``traceparent`` when it sends one.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmserve import telemetry


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        ctx = telemetry.RequestContext(telemetry.accept_request_id(headers.get("x-request-id")))
        # Not reset afterwards: each request runs in its own task, and the error handler of last resort
        # (Starlette's, outside every middleware) still reads it for the 500 body.
        telemetry.current.set(ctx)
        scope.setdefault("state", {})["request_id"] = ctx.request_id
        raw_id = ctx.request_id.encode("latin-1")
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*[(k, v) for k, v in message.get("headers", [])
                                        if k.lower() != b"x-request-id"], (b"x-request-id", raw_id)]
            await send(message)

        with telemetry.span("gateway", f"{scope['method']} {scope.get('path', '')}",
                            parent=headers.get(telemetry.TRACEPARENT), **{
                                "http.request.method": scope["method"], "url.path": scope.get("path", ""),
                                "vlmserve.request_id": ctx.request_id}) as span:
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                if span is not None:
                    route = getattr(scope.get("route"), "path", None)
                    if route:
                        span.update_name(f"{scope['method']} {route}")
                        span.set_attribute("http.route", route)
                    span.set_attribute("http.response.status_code", status)
                    if ctx.model:
                        span.set_attribute("vlmserve.model", ctx.model)
