"""Image and text embeddings through the SigLIP embedding service's API: ``POST /embed`` and ``POST /embed_text``.

Usage::

    from vlmserve_client import EmbeddingsClient

    with EmbeddingsClient("http://127.0.0.1:8080") as client:
        image_vectors = client.embed_images(["photo.jpg", "https://example.com/cat.png"])
        text_vector = client.embed_text("a photo of a cat")

Vectors are unit length (cosine similarity is a dot product), one per input, in input order. Images can be
local (a path, bytes or a PIL image: sent as a ``data:`` URI) or references the gateway resolves itself
(``http(s)://`` and ``data:`` strings, or :class:`ImageRef`). ``model`` picks one of several embedding models
(its source checkpoint, family or Triton name); ``None`` is the gateway's default. The OpenAI route
``/v1/embeddings`` is served too: use the ``openai`` SDK for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx

from vlmserve_client._core import (
    ImageInput,
    ImageRef,
    _AsyncClient,
    _Call,
    _ClientBase,
    _SyncClient,
    image_reference,
    json_body,
)
from vlmserve_client.errors import VlmserveError

__all__ = ["AsyncEmbeddingsClient", "EmbeddingsClient", "Vector"]

IMAGE_TASK = "embed_image"  # the tasks /info reports for the embedding models
TEXT_TASK = "embed_text"

Vector = list[float]


def _vectors(response: httpx.Response) -> list[Vector]:
    body: Any = json_body(response)
    try:
        if not isinstance(body, list) or not all(isinstance(v, list) for v in body):
            raise TypeError("not a list of vectors")
        return [[float(x) for x in v] for v in body]
    except (TypeError, ValueError) as exc:
        raise VlmserveError(f"malformed answer from the gateway ({exc}): {body!r:.200}",
                            status_code=response.status_code) from exc


def _one(vectors: list[Vector]) -> Vector:
    if len(vectors) != 1:
        raise VlmserveError(f"expected one vector, the gateway sent {len(vectors)}")
    return vectors[0]


class _EmbeddingCalls(_ClientBase):
    def _images_call(self, images: Iterable[ImageInput | ImageRef], model: str | None) -> _Call[list[Vector]]:
        if isinstance(images, (str, bytes, ImageRef)):
            raise TypeError("images must be a list; use embed_image() for one image")
        body: dict[str, Any] = {"images": [image_reference(image) for image in images]}
        if model is not None:
            body["model"] = model
        return _Call("POST", "/embed", _vectors, json=body)

    def _texts_call(self, texts: Iterable[str], model: str | None) -> _Call[list[Vector]]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings; use embed_text() for one text")
        body: dict[str, Any] = {"texts": list(texts)}
        if model is not None:
            body["model"] = model
        return _Call("POST", "/embed_text", _vectors, json=body)


class EmbeddingsClient(_SyncClient, _EmbeddingCalls):
    """Synchronous client for the SigLIP embedding service's API. Errors raise :class:`VlmserveError`
    (:class:`VlmserveBadRequest` for 4xx such as an undecodable image, :class:`VlmserveUnavailable` for 503)."""

    def is_ready(self) -> bool:
        """True when ``/info`` lists a ready image and a ready text embedding model; never raises."""
        try:
            info = self.info()
        except VlmserveError:
            return False
        return info.ready(IMAGE_TASK) and info.ready(TEXT_TASK)

    def embed_images(self, images: Iterable[ImageInput | ImageRef], *,
                     model: str | None = None) -> list[Vector]:
        """One vector per image (``POST /embed``)."""
        return self._execute(self._images_call(images, model))

    def embed_texts(self, texts: Iterable[str], *, model: str | None = None) -> list[Vector]:
        """One vector per text (``POST /embed_text``)."""
        return self._execute(self._texts_call(texts, model))

    def embed_image(self, image: ImageInput | ImageRef, *, model: str | None = None) -> Vector:
        """The vector of one image."""
        return _one(self.embed_images([image], model=model))

    def embed_text(self, text: str, *, model: str | None = None) -> Vector:
        """The vector of one text."""
        return _one(self.embed_texts([text], model=model))


class AsyncEmbeddingsClient(_AsyncClient, _EmbeddingCalls):
    """Asynchronous client with the same API as :class:`EmbeddingsClient`; await its methods."""

    async def is_ready(self) -> bool:
        """True when ``/info`` lists a ready image and a ready text embedding model; never raises."""
        try:
            info = await self.info()
        except VlmserveError:
            return False
        return info.ready(IMAGE_TASK) and info.ready(TEXT_TASK)

    async def embed_images(self, images: Iterable[ImageInput | ImageRef], *,
                           model: str | None = None) -> list[Vector]:
        """One vector per image (``POST /embed``)."""
        return await self._execute(self._images_call(images, model))

    async def embed_texts(self, texts: Iterable[str], *, model: str | None = None) -> list[Vector]:
        """One vector per text (``POST /embed_text``)."""
        return await self._execute(self._texts_call(texts, model))

    async def embed_image(self, image: ImageInput | ImageRef, *, model: str | None = None) -> Vector:
        """The vector of one image."""
        return _one(await self.embed_images([image], model=model))

    async def embed_text(self, text: str, *, model: str | None = None) -> Vector:
        """The vector of one text."""
        return _one(await self.embed_texts([text], model=model))
