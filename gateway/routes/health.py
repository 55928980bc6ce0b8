"""``GET /health`` (the SigLIP embedding service's fields + per-model readiness), ``GET /livez``, ``GET /readyz``,
``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from vlmserve.gateway.embedding import IMAGE_TASK, TEXT_TASK

router = APIRouter(tags=["health"])


@router.get("/livez")
async def livez() -> dict[str, str]:
    """The gateway process answers (Triton may still be loading)."""
    return {"status": "alive"}


@router.get("/readyz")
async def readyz() -> dict[str, str]:
    """The gateway takes new requests: 200, or 503 + Retry-After once it is draining for a stop (the answer then
    comes from vlmserve.gateway.limits.Drain). A load balancer's readiness probe; Triton's state is /health's job."""
    return {"status": "ready"}


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 when Triton is up and every model is READY, else 503 (with the same body; ``problems``: the models whose
    config parameters break the contract, and why)."""
    backend = request.app.state.backend
    # The cached registry (refreshed on a timer, and dropped when a call finds Triton down): /health is
    # unauthenticated and must not cost a Triton round trip per call.
    registry = await backend.cached_registry()
    models = {name: m.ready for name, m in sorted(registry.models.items())}
    # The SigLIP embedding service's "model": the embedding model a request naming none gets (the surface's default
    # family).
    primary = registry.default(IMAGE_TASK) or registry.default(TEXT_TASK)
    devices = {m.device for m in registry.models.values()}
    weights = sorted({w for m in registry.models.values() if (w := m.declared("weights"))})
    ok = registry.reachable and bool(models) and all(models.values())
    body = {
        "status": "ok" if ok else ("unavailable" if not registry.reachable else "degraded"),
        "model": (primary.declared("source_model") or None) if primary else None,
        "device": "cuda" if "cuda" in devices else "cpu",
        "cuda_available": "cuda" in devices,
        "models": models,
        "weights": weights[0] if len(weights) == 1 else (weights or None),
        "triton": {"url": backend.url, "reachable": registry.reachable},
    }
    if "random" in weights:
        body["warning"] = "serving randomly initialised test models (tiny set): outputs are meaningless"
    broken = {m.name: m.problem for m in registry.models.values() if m.problem}
    if broken:
        body["problems"] = broken  # listed as not ready above; the reason, for the operator
    headers = {} if ok else {"Retry-After": str(request.app.state.settings.retry_after_s)}
    return JSONResponse(body, 200 if ok else 503, headers)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
