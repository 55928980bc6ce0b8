"""One error schema for every route (OpenAI's shape), mapped in one place."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmserve import telemetry
from vlmserve.api.openai import RequestRejected
from vlmserve.model_repository.florence2_tasks import UnknownTask

log = logging.getLogger("vlmserve.gateway")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error a client sees: ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


class DomainError(ValueError):
    """A request the gateway or a model cannot serve as sent: ``status`` and ``message`` reach the client as they are.

    Raised by the domain code (image intake, Florence-2 rules, ...) without knowing the request's field names;
    :func:`about` names the field on the way out, and :func:`install`'s handler maps it to the error shape, so no
    route translates domain errors by hand.
    """

    code = "invalid_request"

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code or type(self).code

    def at(self, param: str) -> DomainError:
        """The same error, about the request field ``param`` (its message prefixed with the field)."""
        return type(self)(f"{param}: {self.message}", self.status, param, self.code)


@contextmanager
def about(param: str) -> Iterator[None]:
    """Domain errors raised inside are about the request field ``param``."""
    try:
        yield
    except DomainError as exc:
        raise exc.at(param) from None


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error shape; inside a request also ``request_id`` (the ``X-Request-ID`` of the response)."""
    error = {"message": message, "type": _TYPES.get(status, "api_error"), "param": param, "code": code}
    request_id = telemetry.request_id()
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.code, exc.param), exc.status, exc.headers)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    first_param = None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        where = ".".join(loc) or "body"
        first_param = first_param or where
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", first_param


def install(app: FastAPI) -> None:
    """Every error of every route leaves through these handlers, in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(DomainError)
    async def _domain(request: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.code, exc.param), exc.status)

    @app.exception_handler(RequestRejected)
    async def _rejected(request: Request, exc: RequestRejected) -> JSONResponse:
        return JSONResponse(error_body(400, exc.message, exc.code, exc.param), 400)

    @app.exception_handler(UnknownTask)
    async def _unknown_task(request: Request, exc: UnknownTask) -> JSONResponse:
        return JSONResponse(error_body(422, str(exc), "unknown_task", "task"), 422)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return JSONResponse(error_body(422, message, "invalid_request", param), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Log the traceback for operators; the client gets no internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # Answered outside every middleware (Starlette's last resort): the request id header is added here.
        request_id = telemetry.request_id()
        headers = {telemetry.REQUEST_ID_HEADER: request_id} if request_id else None
        return JSONResponse(error_body(500, "internal server error; see the gateway log", "internal_error"), 500,
                            headers)
