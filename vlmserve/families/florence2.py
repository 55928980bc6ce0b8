"""Florence-2: captioning, detection, OCR, grounding, segmentation (the Florence-2 services)."""

from vlmserve.families.contract import FlorenceParams
from vlmserve.families.spec import FamilySpec

SPEC = FamilySpec(
    name="florence2",
    title="Florence-2",
    surfaces=("florence2",),
    default_for=("florence2",),
    default_source="florence-community/Florence-2-base",
    recipe="vlmserve.export.florence2",
    params=FlorenceParams,
    tiny="vlmserve.export.tiny:build_tiny_florence2",
    perf="vlmserve.export.perf:build_perf_florence2",
    in_default_perf=True,
    tasks=("caption", "detection", "OCR", "grounding", "segmentation", "region tasks"),
)
