"""DeepSeek-OCR: an opt-in OCR chat model (needs real weights and its own remote code; no tiny model)."""

from vlmserve.families.contract import ChatParams
from vlmserve.families.spec import FamilySpec

SPEC = FamilySpec(
    name="deepseek_ocr",
    title="DeepSeek-OCR",
    surfaces=("chat", "ocr"),
    default_source="deepseek-ai/DeepSeek-OCR",
    recipe="vlmserve.export.chat:deepseek_ocr",
    params=ChatParams,
    pipeline="vlmserve.model_repository.deepseek_ocr:DeepSeekOcrPipeline",
    in_default_set=False,
    tasks=("OCR",),
)
