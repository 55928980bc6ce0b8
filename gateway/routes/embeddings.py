"""The SigLIP embedding service's API: ``POST /embed`` and ``POST /embed_text`` -> a JSON list of vectors."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import JsonDict

from vlmserve.gateway.auth import require_api_key
from vlmserve.gateway.embedding import EmbeddingService, get_service
from vlmserve.gateway.images import EXAMPLE_IMAGE, IMAGE_REF_SCHEMA
from vlmserve.gateway.limits import inflight_group

router = APIRouter(tags=["embedding service API"], dependencies=[Depends(require_api_key)])


MODEL = Field(None, description="source id, family or Triton name; default: the embeddings surface's default "
                               "family (`vlmserve families`)")
ITEMS = "at most VLMSERVE_MAX_ITEMS (default 32) per request: 413 beyond"


class EmbedRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"images": [EXAMPLE_IMAGE]}]})

    images: list[Annotated[str, Field(json_schema_extra=IMAGE_REF_SCHEMA)]] = Field(
        ..., description=f"data URIs, bare base64, http(s) URLs or local paths; {ITEMS}",
        json_schema_extra={"minItems": 1})
    model: str | None = MODEL


def _one_of_text_or_texts(schema: JsonDict) -> None:
    properties = schema["properties"]
    assert isinstance(properties, dict)
    for name in ("texts", "text"):
        prop = properties[name]
        assert isinstance(prop, dict)
        branches = prop.pop("anyOf")
        assert isinstance(branches, list)
        value = next(b for b in branches if b != {"type": "null"})
        assert isinstance(value, dict)
        prop.update(value)
    schema["oneOf"] = [{"required": ["texts"]}, {"required": ["text"]}]
    schema["examples"] = [{"text": "a photo of a cat"}]


class EmbedTextRequest(BaseModel):
    # Exactly one of the two, as the validator below enforces (the schema leaves null out: a null is "not sent").
    model_config = ConfigDict(json_schema_extra=_one_of_text_or_texts)

    texts: list[str] | None = Field(None, description=f"{ITEMS}; each at most VLMSERVE_MAX_TEXT_CHARS (default "
                                    "20000) characters", json_schema_extra={"minItems": 1})
    text: str | None = Field(None, description="one text (instead of 'texts')")
    model: str | None = MODEL

    @model_validator(mode="after")
    def _one_of(self) -> EmbedTextRequest:
        if (self.texts is None) == (self.text is None):
            raise ValueError("send either 'texts' (a list of strings) or 'text' (a string), not both")
        return self


@router.post("/embed", response_model=list[list[float]], openapi_extra=inflight_group("embeddings"))
async def embed(body: EmbedRequest, request: Request, service: EmbeddingService = Depends(get_service)):
    result = await service.embed_images(request, body.images, body.model)
    return result.vectors.tolist()


@router.post("/embed_text", response_model=list[list[float]], openapi_extra=inflight_group("embeddings"))
async def embed_text(body: EmbedTextRequest, request: Request, service: EmbeddingService = Depends(get_service)):
    texts = body.texts if body.texts is not None else [body.text or ""]
    result = await service.embed_texts(request, texts, body.model)
    return result.vectors.tolist()
