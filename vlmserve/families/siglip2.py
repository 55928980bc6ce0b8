"""SigLIP 2: image and text embeddings, fixed-resolution and NaFlex checkpoints (the SigLIP embedding service served
the so400m NaFlex).

Not the default of the embeddings surface (SigLIP v1 is): ask for it with ``"model": "siglip2"``.
"""

from typing import Literal

from pydantic import Field

from vlmserve.families.contract import EmbedParams
from vlmserve.families.spec import FamilySpec


class Siglip2Params(EmbedParams):
    """SigLIP 2's client models add how the vision tower takes images."""

    vision_mode: Literal["naflex", "fixed"] = "fixed"
    position_grid: int | None = Field(None, ge=1)  # NaFlex: the learned G x G position table
    max_num_patches: int | None = Field(None, ge=1)  # NaFlex: the patch budget per image


SPEC = FamilySpec(
    name="siglip2",
    title="SigLIP 2",
    surfaces=("embeddings",),
    default_source="google/siglip2-so400m-patch16-naflex",
    recipe="vlmserve.export.siglip2",
    params=Siglip2Params,
    tiny="vlmserve.export.siglip2:build_tiny_siglip2",
    perf="vlmserve.export.siglip2:build_perf_siglip2",
    tasks=("image embeddings", "text embeddings", "NaFlex: native aspect ratio"),
)
