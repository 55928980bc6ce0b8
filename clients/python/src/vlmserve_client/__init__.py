"""vlmserve-client: typed sync and async clients for a vlmserve gateway (Python 3.9+, httpx only).

- :class:`Florence2Client` / :class:`AsyncFlorence2Client`: Florence-2 tasks (the Florence-2 service's API,
``/infer/upload``).
- :class:`EmbeddingsClient` / :class:`AsyncEmbeddingsClient`: image and text embeddings (the SigLIP embedding
service's ``/embed``,
  ``/embed_text``).
- :class:`OcrClient` / :class:`AsyncOcrClient`: OCR (the Qwen2-VL OCR service's ``/ocr``) and region descriptions (the
SmolVLM2 service's
  ``/v1/describe_region``) by the chat models.

Chat (``/v1/chat/completions``) and OpenAI embeddings (``/v1/embeddings``) are OpenAI-compatible: use the
official ``openai`` SDK for them. Every error is a :class:`VlmserveError`: :class:`VlmserveBadRequest` for a 4xx
answer, :class:`VlmserveUnavailable` for 503 or an unreachable gateway.
"""

from vlmserve_client._core import DEFAULT_BASE_URL, DEFAULT_TIMEOUT, ImageInput, ImageRef, ModelInfo, ServiceInfo
from vlmserve_client.embeddings import AsyncEmbeddingsClient, EmbeddingsClient, Vector
from vlmserve_client.errors import VlmserveBadRequest, VlmserveError, VlmserveUnavailable
from vlmserve_client.florence2 import (
    AsyncFlorence2Client,
    BBox,
    CaptionDetail,
    DetectedObject,
    Florence2Client,
    Florence2Result,
    TaskInfo,
)
from vlmserve_client.ocr import AsyncOcrClient, OcrClient, OcrResult, RegionDescription

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "AsyncEmbeddingsClient",
    "AsyncFlorence2Client",
    "AsyncOcrClient",
    "BBox",
    "CaptionDetail",
    "DetectedObject",
    "EmbeddingsClient",
    "Florence2Client",
    "Florence2Result",
    "ImageInput",
    "ImageRef",
    "ModelInfo",
    "OcrClient",
    "OcrResult",
    "RegionDescription",
    "ServiceInfo",
    "TaskInfo",
    "Vector",
    "VlmserveBadRequest",
    "VlmserveError",
    "VlmserveUnavailable",
]
