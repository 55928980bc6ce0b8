"""Optional API keys: ``Authorization: Bearer <key>`` when keys are configured."""

from __future__ import annotations

import hmac

from fastapi import Request

from vlmserve.gateway.errors import APIError


def require_api_key(request: Request) -> None:
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not any(hmac.compare_digest(token.strip().encode(), k.encode()) for k in keys):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
