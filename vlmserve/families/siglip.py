"""SigLIP (v1, fixed resolution): image and text embeddings (the SigLIP embedding service's API)."""

from vlmserve.families.contract import EmbedParams
from vlmserve.families.spec import FamilySpec

SPEC = FamilySpec(
    name="siglip",
    title="SigLIP",
    surfaces=("embeddings",),
    default_for=("embeddings",),
    default_source="google/siglip-base-patch16-224",
    recipe="vlmserve.export.siglip",
    params=EmbedParams,
    tiny="vlmserve.export.tiny:build_tiny_siglip",
    perf="vlmserve.export.perf:build_perf_siglip",
    in_default_perf=True,
    tasks=("image embeddings", "text embeddings"),
)
