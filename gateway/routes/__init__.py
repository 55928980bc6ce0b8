"""One router module per API surface, and the table of the routers the app serves.

Adding a route: a handler in the module of its surface (an inference route names its in-flight group where it is
declared: ``openapi_extra=inflight_group("chat")``); a new surface: its module here plus one line in :data:`ROUTERS`.
"""

from __future__ import annotations

from fastapi import APIRouter

from vlmserve.gateway.routes import batches, chat, embeddings, florence, health, openai
from vlmserve.gateway.ui import router as ui_router

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    embeddings.router,
    openai.router,
    florence.router,
    florence.files_router,
    chat.router,
    batches.router,
    ui_router,
)
