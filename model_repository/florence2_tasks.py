"""Florence-2's task table: names users send (the Florence-2 service), Florence task tokens (the Florence-2 v1
service), text needs.

Pure data (no torch): the export writes it into the ``florence2`` model config (parameter ``tasks``) and the
gateway reads it back from Triton, so there is one table.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Task:
    name: str
    token: str
    needs_text: bool
    description: str
    text_hint: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


REGION_HINT = "a region: 'x1,y1,x2,y2' in pixels of the input image, or '<loc_x1><loc_y1><loc_x2><loc_y2>'"

TASKS: tuple[Task, ...] = (
    Task("caption", "<CAPTION>", False, "One-sentence caption of the image."),
    Task("detailed_caption", "<DETAILED_CAPTION>", False, "A more detailed caption."),
    Task("more_detailed_caption", "<MORE_DETAILED_CAPTION>", False, "A paragraph describing the image."),
    Task("object_detection", "<OD>", False, "Objects with bounding boxes and labels."),
    Task("dense_region_caption", "<DENSE_REGION_CAPTION>", False, "Regions with a caption each."),
    Task("region_proposal", "<REGION_PROPOSAL>", False, "Candidate object regions (boxes without labels)."),
    Task("ocr", "<OCR>", False, "The text in the image."),
    Task("ocr_with_region", "<OCR_WITH_REGION>", False, "Text lines with their quadrilateral boxes."),
    Task("phrase_grounding", "<CAPTION_TO_PHRASE_GROUNDING>", True,
         "Boxes for the phrases of a caption.", "a caption whose phrases to locate"),
    Task("referring_expression_segmentation", "<REFERRING_EXPRESSION_SEGMENTATION>", True,
         "Polygon mask of the object a phrase refers to.", "a phrase naming the object"),
    Task("region_to_segmentation", "<REGION_TO_SEGMENTATION>", True,
         "Polygon mask of the object inside a region.", REGION_HINT),
    Task("open_vocabulary_detection", "<OPEN_VOCABULARY_DETECTION>", True,
         "Boxes or polygons for an object named in free text.", "the object to find"),
    Task("region_to_category", "<REGION_TO_CATEGORY>", True, "Category of the object inside a region.",
         REGION_HINT),
    Task("region_to_description", "<REGION_TO_DESCRIPTION>", True, "Description of the object inside a region.",
         REGION_HINT),
)

_BY_KEY = {t.name: t for t in TASKS} | {t.token.lower(): t for t in TASKS}
REGION_TASKS = frozenset({"region_to_segmentation", "region_to_category", "region_to_description"})
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_PIXEL_BOX = re.compile(rf"^\[?{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}\]?$")
_LOC_BOX = re.compile(r"^(<loc_\d{1,3}>){4}$")


class UnknownTask(ValueError):
    pass


def find_task(key: str) -> Task:
    """A task by name (``object_detection``) or Florence token (``<OD>``), case-insensitive."""
    task = _BY_KEY.get(key.strip().lower())
    if task is None:
        valid = ", ".join(f"{t.name} ({t.token})" for t in TASKS)
        raise UnknownTask(f"unknown task {key!r}; valid tasks: {valid}")
    return task


def region_to_loc_tokens(text: str, width: int, height: int) -> str:
    """``x1,y1,x2,y2`` pixels -> Florence's ``<loc_..>`` tokens (0..999 bins); loc tokens pass through."""
    stripped = text.strip()
    if _LOC_BOX.match(stripped.replace(" ", "")):
        return stripped.replace(" ", "")
    m = _PIXEL_BOX.match(stripped)
    if not m:
        raise ValueError(f"region must be {REGION_HINT}; got {text!r}")
    x1, y1, x2, y2 = (float(v) for v in m.groups())
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(
            f"region {text!r} must satisfy 0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height} (image size)"
        )

    def q(v: float, size: int) -> int:
        return min(999, max(0, int(v / size * 1000)))

    return f"<loc_{q(x1, width)}><loc_{q(y1, height)}><loc_{q(x2, width)}><loc_{q(y2, height)}>"


# Florence-2's reference post-processing rules (as in the released processors); used when a checkpoint's
# processor config carries none (the tiny models get them written in).
DEFAULT_POST_PROCESSOR_CONFIG: dict = {
    "ocr": {
        "PATTERN": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
        "AREA_THRESHOLD": 0.0,
    },
    "phrase_grounding": {
        "banned_grounding_tokens": [
            "it", "is", "are", "what", "where", "who", "how", "why", "when", "which", "there", "this", "that",
            "these", "those", "he", "she", "they", "we", "you", "i", "me", "him", "her", "them", "us", "my",
            "your", "his", "its", "our", "their", "image", "photo", "picture", "the image", "the photo",
            "the picture", "an image", "a photo", "a picture",
        ]
    },
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}
