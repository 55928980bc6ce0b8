"""Qwen2-VL: chat over images and video, and the OCR / region routes (the Qwen2-VL OCR service)."""

from vlmserve.families.contract import ChatParams
from vlmserve.families.spec import FamilySpec

SPEC = FamilySpec(
    name="qwen2vl",
    title="Qwen2-VL",
    surfaces=("chat", "ocr"),
    default_for=("chat", "ocr"),  # the Qwen2-VL OCR service served Qwen2-VL: it stays the default wherever it is loaded
    default_source="Qwen/Qwen2-VL-2B-Instruct",
    recipe="vlmserve.export.chat:qwen2vl",
    params=ChatParams,
    pipeline="vlmserve.model_repository.qwen2vl:QwenPipeline",
    tiny="vlmserve.export.tiny:build_tiny_qwen2vl",
    tasks=("chat", "OCR", "region description"),
)
