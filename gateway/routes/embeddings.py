"""Seed 004's API: ``POST /embed`` and ``POST /embed_text`` -> a JSON list of vectors."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, model_validator

from gateway.auth import require_api_key
from gateway.embedding import EmbeddingService, get_service
from gateway.errors import APIError

router = APIRouter(tags=["embeddings (seed-compatible)"], dependencies=[Depends(require_api_key)])


class EmbedRequest(BaseModel):
    images: list[Any] = Field(..., description="data URIs, bare base64, http(s) URLs or local paths")
    model: str | None = None


class EmbedTextRequest(BaseModel):
    texts: list[Any] | None = None
    text: str | None = None
    model: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> EmbedTextRequest:
        if self.texts is None and self.text is None:
            raise ValueError("send 'texts' (a list of strings) or 'text' (a string)")
        return self


@router.post("/embed", response_model=list[list[float]])
async def embed(body: EmbedRequest, request: Request, service: EmbeddingService = Depends(get_service)):
    result = await service.embed_images(request, body.images, body.model)
    return result.vectors.tolist()


@router.post("/embed_text", response_model=list[list[float]])
async def embed_text(body: EmbedTextRequest, request: Request, service: EmbeddingService = Depends(get_service)):
    if body.texts is not None and body.text is not None:
        raise APIError(422, "send either 'texts' or 'text', not both", param="texts")
    texts: list = body.texts if body.texts is not None else [body.text]
    result = await service.embed_texts(request, texts, body.model)
    return result.vectors.tolist()
