"""SmolVLM2: chat over images and video, OCR, region descriptions (the SmolVLM2 service); its vision encoder is ONNX."""

from vlmserve.families.contract import ChatParams
from vlmserve.families.spec import FamilySpec

SPEC = FamilySpec(
    name="smolvlm2",
    title="SmolVLM2",
    surfaces=("chat", "ocr"),
    default_source="HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
    recipe="vlmserve.export.chat:smolvlm2",
    params=ChatParams,
    pipeline="vlmserve.model_repository.smolvlm:SmolVLMPipeline",
    tiny="vlmserve.export.tiny:build_tiny_smolvlm2",
    # Real size, random weights: built and exported only when asked for (--family smolvlm2), since it adds a
    # ~1 GB checkpoint and a 512 px SigLIP ONNX export to every perf run.
    perf="vlmserve.export.perf:build_perf_smolvlm2",
    tasks=("chat", "video", "OCR", "region description"),
)
