"""The exceptions every vlmserve client raises, and how a gateway answer becomes one."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx

__all__ = ["VlmserveBadRequest", "VlmserveError", "VlmserveUnavailable"]


class VlmserveError(Exception):
    """An error answer from the gateway (or no answer at all).

    ``status_code`` is the HTTP status (``None`` when the gateway could not be reached); ``message``,
    ``code``, ``error_type`` and ``param`` come from the ``{"error": {...}}`` body; ``retry_after`` is the
    ``Retry-After`` header in seconds, when the gateway sent one.
    """

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None,
                 error_type: str | None = None, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message if status_code is None else f"{status_code}: {message}")
        self.message = message
        self.status_code = status_code
        self.code = code
        self.error_type = error_type
        self.param = param
        self.retry_after = retry_after


class VlmserveUnavailable(VlmserveError):
    """The gateway answered 503 (models still loading, overloaded) or could not be reached."""


class VlmserveBadRequest(VlmserveError):
    """The gateway rejected the request (a 4xx answer: bad input, missing or invalid API key, ...)."""


def _retry_after(value: str | None) -> float | None:
    # Retry-After is either delta-seconds or an HTTP date
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def error_from_response(response: httpx.Response) -> VlmserveError:
    """The exception for a non-2xx answer: 503 → unavailable, other 4xx → bad request, else the base class."""
    message: str | None = None
    code = error_type = param = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            message = _text(err.get("message"))
            code, error_type, param = _text(err.get("code")), _text(err.get("type")), _text(err.get("param"))
        elif isinstance(err, str):
            message = err
        elif body.get("detail") is not None:  # plain FastAPI/Starlette errors
            message = str(body["detail"])
    if not message:
        message = response.text.strip() or response.reason_phrase or "error"
    status = response.status_code
    cls = VlmserveUnavailable if status == 503 else VlmserveBadRequest if 400 <= status < 500 else VlmserveError
    return cls(message, status_code=status, code=code, error_type=error_type, param=param,
               retry_after=_retry_after(response.headers.get("retry-after")))
