"""OpenAI-compatible API: ``POST /v1/embeddings``, ``GET /v1/models`` and ``GET /v1/models/{id}``; and
:class:`OpenAIRoute`, which the chat routes use to answer validation errors the way OpenAI does."""

from __future__ import annotations

import base64
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.responses import Response

from vlmserve.families.contract import EmbedParams, ModelParams
from vlmserve.gateway.auth import require_api_key
from vlmserve.gateway.embedding import EmbeddingService, get_service
from vlmserve.gateway.errors import APIError
from vlmserve.gateway.limits import inflight_group
from vlmserve.host import IsaError, serve_choice, serving_cpu

# Discriminator values pydantic puts into an error's location (messages[0].user.content ...): not fields.
_TAGS = {"system", "developer", "user", "assistant", "text", "image_url", "video_url", "json_object", "json_schema",
         "string", "parts"}


def openai_param(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as OpenAI names a field: ``messages[0].content[1].image_url.url``."""
    out = ""
    previous: Any = None
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif (part in _TAGS and (isinstance(previous, int) or previous in ("response_format", "content"))) \
                or (isinstance(part, str) and ("[" in part or part in ("str", "int", "list", "function-after"))):
            pass  # a union member's tag or type name
        else:
            out += f".{part}" if out else str(part)
        previous = part
    return out or "body"


class OpenAIRoute(APIRoute):
    """Validation errors become OpenAI's ``400 invalid_request_error`` naming the field (``param``), as OpenAI and
    vLLM answer them (the old services' routes keep FastAPI's 422)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                problems, first = [], None
                for err in exc.errors():
                    where = openai_param(tuple(err.get("loc", ())))
                    if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
                        where += "." + str(err.get("ctx", {}).get("discriminator", "")).strip("'")
                    first = first or where
                    message = f"{where}: {err.get('msg')}"
                    if message not in problems:
                        problems.append(message)
                raise APIError(400, "; ".join(problems) or "invalid request", code="invalid_request",
                               param=first) from None

        return route

router = APIRouter(prefix="/v1", tags=["OpenAI"], dependencies=[Depends(require_api_key)])


class EmbeddingsRequest(BaseModel):
    input: str | list[Any]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    modality: Literal["text", "image"] = Field("text", description="vlmserve extension: 'image' embeds images")


def _encode(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":
        # What the openai SDK decodes: little-endian float32 bytes, base64.
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@router.post("/embeddings", openapi_extra=inflight_group("embeddings"))
async def embeddings(body: EmbeddingsRequest, request: Request, service: EmbeddingService = Depends(get_service)):
    items = [body.input] if isinstance(body.input, str) else body.input
    if any(isinstance(x, (int, list)) for x in items):
        raise APIError(400, "token-id inputs are not supported: send strings (text) or image data URIs/URLs",
                       param="input")
    if body.modality == "image":
        result = await service.embed_images(request, items, body.model)
    else:
        result = await service.embed_texts(request, items, body.model)
    dim = result.vectors.shape[1]
    if body.dimensions is not None and body.dimensions != dim:
        raise APIError(400, f"model {result.model.source} returns {dim} dimensions; "
                            f"'dimensions' must be omitted or {dim}", param="dimensions")
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(result.vectors)
        ],
        "model": result.model.source,
        "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
    }


@router.get("/models")
async def models(request: Request):
    return {"object": "list", "data": await _model_entries(request)}


@router.get("/models/{model_id:path}")
async def model(model_id: str, request: Request):
    """One model (the SDK's ``models.retrieve``): by its id (the source checkpoint), its family (``smolvlm2``)
    or any of its Triton model names; the answer's ``id`` is always the source id."""
    entries = await _model_entries(request)
    for entry in entries:
        if model_id == entry["id"] or model_id == entry["family"] or model_id in entry["triton_models"]:
            return entry
    known = ", ".join(e["id"] for e in entries) or "none"
    raise APIError(404, f"model {model_id!r} is not served here (served: {known})", code="model_not_found",
                   param="model")


async def _model_entries(request: Request) -> list[dict[str, Any]]:
    registry = await request.app.state.backend.registry()
    by_source: dict[str, dict[str, Any]] = {}
    for m in registry.models.values():
        p = m.params
        if p is None or not p.source_model or p.role != "client":
            continue
        entry = by_source.setdefault(p.source_model, {
            "id": p.source_model, "object": "model", "created": int(request.app.state.started_at),
            "owned_by": "vlmserve", "family": m.family, "weights": m.declared("weights"), "tasks": [],
            "triton_models": [], "ready": True,
        })
        entry["tasks"].append(m.task)
        entry["triton_models"].append(m.name)
        entry["ready"] = entry["ready"] and m.ready
        if isinstance(p, EmbedParams):
            entry["embedding_dim"] = p.embedding_dim
        decoder, engine = m.declared("decoder_precision"), m.declared("chat_engine")
        if m.declared("runtime") is not None or decoder is not None:
            # Chosen at export by timing the candidates on this host (export/runtime_choice.py).
            entry.setdefault("runtimes", {})[m.name] = {
                "runtime": m.declared("runtime"), "precision": m.declared("precision"),
                "why": m.declared("runtime_choice"),
                **({"decoder_precision": decoder, "decoder_why": m.declared("decoder_choice")}
                   if decoder is not None else {}),
                **({"chat_engine": engine, "engine_why": m.declared("engine_choice")} if engine is not None else {}),
                **_isa_check(p),
            }
    return list(by_source.values())


def _isa_check(params: ModelParams) -> dict[str, Any]:
    """Export's CPU choice re-checked on the gateway's CPU, as the model does at load (``vlmserve.host``):
    ``served_as`` (runtime/precision, decoder) and ``isa_warnings`` where it falls back, ``isa_error`` where the
    model refuses to load. Exact where the gateway shares Triton's host (the process and Docker launchers); across
    nodes it is the gateway's node, and Triton's log is the word of each replica (docs/operating-limits.md)."""
    if params.device != "cpu":
        return {}
    recorded = params.to_triton()  # what export wrote: the choice, its faithful candidates, the decoder's
    try:
        choice = serve_choice(recorded, serving_cpu())
    except IsaError as exc:
        return {"isa_error": str(exc)}
    if not choice.warnings:
        return {}
    served = {"served_as": f"{choice.runtime}/{choice.precision}"} if "runtime" in recorded else {}
    if "decoder_precision" in recorded:
        served["decoder_served_as"] = choice.decoder_precision
    return {**served, "isa_warnings": list(choice.warnings)}
