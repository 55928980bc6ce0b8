"""The gateway's app factory."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from vlmserve.gateway import errors
from vlmserve.gateway.backends import load_backend
from vlmserve.gateway.batches import BatchStore, batch_root, batch_runner
from vlmserve.gateway.chat import ChatService
from vlmserve.gateway.embedding import EmbeddingService
from vlmserve.gateway.engines import Engine
from vlmserve.gateway.limits import BodySizeLimit, Drain, InFlightLimit, Interactive, route_groups
from vlmserve.gateway.metrics import Metrics, MetricsMiddleware
from vlmserve.gateway.observability import RequestIdMiddleware
from vlmserve.gateway.routes import ROUTERS
from vlmserve.gateway.settings import GatewaySettings
from vlmserve.gateway.storage import LocalStore, build_store, sweep_forever

log = logging.getLogger("vlmserve.gateway")


def create_app(settings: GatewaySettings, backend: Engine | None = None) -> FastAPI:
    """Build the app; ``backend`` defaults to the engine ``settings.backend`` names (Triton at
    ``settings.triton_url``)."""
    backend = backend or load_backend(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Redirects are followed by vlmserve.gateway.images itself, re-checking every hop against the SSRF rules.
        async with httpx.AsyncClient(follow_redirects=False, timeout=settings.fetch_timeout_s) as http:
            app.state.embeddings = EmbeddingService(settings, backend, backend, http)
            app.state.chat = ChatService(settings, backend, backend, http)
            registry = await backend.registry(refresh=True)
            if registry.reachable:
                log.info("triton at %s serves: %s", backend.url, ", ".join(sorted(registry.models)) or "nothing")
                if any(m.declared("weights") == "random" for m in registry.models.values()):
                    log.warning("serving RANDOM weights (tiny test models): outputs are meaningless")
            else:
                log.warning("triton at %s not reachable yet; requests get 503 until it is", backend.url)
            backend.start()
            sweeper = (asyncio.create_task(sweep_forever(app.state.storage, settings.storage_sweep_s))
                       if isinstance(app.state.storage, LocalStore) else None)
            try:
                async with batch_runner(app, settings):
                    yield
            finally:
                if sweeper is not None:
                    sweeper.cancel()
                await backend.close()

    app = FastAPI(title="vlmserve", version="0.1.0", lifespan=lifespan,
                  description="Vision-language models behind NVIDIA Triton: the old services' APIs + OpenAI API")
    app.state.settings = settings
    app.state.backend = backend
    app.state.metrics = Metrics()
    app.state.started_at = time.time()
    app.state.drain = Drain(settings.retry_after_s)  # started by the server on SIGTERM (vlmserve.gateway.__main__)
    app.state.storage = build_store(settings)  # lazy: no folder or S3 client until first use
    app.state.interactive = Interactive()  # counted by InFlightLimit; a running batch yields to it
    app.state.batches = BatchStore(batch_root(settings))  # lazy too: the database opens on first use
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(InFlightLimit, caps=settings.inflight_caps(), groups=route_groups(app.openapi()),
                       retry_after_s=settings.retry_after_s,
                       interactive=app.state.interactive)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(app.state.drain.middleware)  # a draining gateway refuses before any work
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer (a drain's 503 too) carries X-Request-ID
    return app
