"""Embedding logic shared by the old services' routes (/embed, /embed_text) and the OpenAI route (/v1/embeddings)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
import numpy as np
from fastapi import Request

from vlmserve.gateway.engines import Embedder, ModelInfo, ModelRegistry, live_registry, use_model
from vlmserve.gateway.errors import APIError, about
from vlmserve.gateway.images import resolve_image
from vlmserve.gateway.settings import GatewaySettings

IMAGE_TASK = "embed_image"
TEXT_TASK = "embed_text"


@dataclass
class Embeddings:
    model: ModelInfo
    vectors: np.ndarray  # [n, dim] float32, unit length
    tokens: int = 0


class EmbeddingService:
    def __init__(self, settings: GatewaySettings, registry: ModelRegistry, embedder: Embedder,
                 http: httpx.AsyncClient) -> None:
        self.settings = settings
        self.engine = registry
        self.embedder = embedder
        self.http = http

    async def _model(self, request: Request, task: str, model: str | None) -> ModelInfo:
        registry = await live_registry(self.engine)
        return use_model(request, registry.find(task, model), self.settings.retry_after_s)

    def _check_count(self, n: int, what: str) -> None:
        if n == 0:
            raise APIError(400, f"{what} is empty: send at least one item", param=what)
        if n > self.settings.max_items:
            raise APIError(413, f"{what} has {n} items; at most {self.settings.max_items} per request",
                           code="too_many_items", param=what)

    async def embed_images(self, request: Request, refs: list[str], model: str | None = None) -> Embeddings:
        self._check_count(len(refs), "images")
        info = await self._model(request, IMAGE_TASK, model)
        policy = self.settings.image_policy()

        async def one(i: int, ref: object) -> bytes:
            if not isinstance(ref, str):
                raise APIError(422, f"images[{i}] must be a string (data URI, base64, URL or path)",
                               param=f"images[{i}]")
            with about(f"images[{i}]"):
                return await resolve_image(ref, policy, self.http)

        data = list(await asyncio.gather(*(one(i, r) for i, r in enumerate(refs))))
        out = await self.embedder.embed_images(info, data)
        self.count(request, info, len(data))
        return Embeddings(info, out.vectors)

    async def embed_texts(self, request: Request, texts: list[str], model: str | None = None) -> Embeddings:
        self._check_count(len(texts), "texts")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise APIError(422, f"texts[{i}] must be a string", param=f"texts[{i}]")
            if len(t) > self.settings.max_text_chars:
                raise APIError(413, f"texts[{i}] has {len(t)} characters; at most {self.settings.max_text_chars}",
                               code="text_too_long", param=f"texts[{i}]")
        info = await self._model(request, TEXT_TASK, model)
        out = await self.embedder.embed_texts(info, texts)
        self.count(request, info, len(texts))
        return Embeddings(info, out.vectors, out.tokens)

    def count(self, request: Request, info: ModelInfo, n: int) -> None:
        request.app.state.metrics.items.labels(info.name).inc(n)


def get_service(request: Request) -> EmbeddingService:
    return request.app.state.embeddings
