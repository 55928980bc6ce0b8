"""Florence-2 logic behind the old services' routes, free of FastAPI and torch so it is unit-testable on its own.

The task table comes from the served model's config (parameter ``tasks``, written by the export), so the
gateway offers exactly what Triton serves. This module checks a request against that table and the model's
limits, turns the model's answer into the response the old services' users read (``bboxes``, ``labels``,
``objects``, ...), and draws the result onto the image for ``/v1/predict``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from vlmserve.families.contract import FlorenceParams
from vlmserve.gateway.engines import ModelInfo
from vlmserve.gateway.errors import APIError, DomainError
from vlmserve.model_repository.florence2_tasks import REGION_HINT, REGION_TASKS, Task, UnknownTask, region_to_loc_tokens

__all__ = [
    "FlorenceInputError",
    "FlorenceTask",
    "TaskTable",
    "UnknownTask",
    "annotate",
    "check_generation_args",
    "image_format",
    "oriented_size",
    "prepare_text",
    "shape_response",
]


# Distinct colours (Trubetskoy's list of 20, minus white/black/near-greys): one per label.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (255, 225, 25), (128, 0, 0),
    (128, 128, 0), (0, 0, 128), (250, 190, 212), (170, 255, 195), (220, 190, 255), (255, 215, 180),
)

_EXIF_ORIENTATION = 0x0112
_FORMATS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}


class FlorenceInputError(DomainError):
    """A request the model cannot run as sent; ``status`` and ``message`` go to the client as they are."""

    def __init__(self, message: str, status: int = 422, param: str | None = None, code: str | None = None):
        super().__init__(message, status, param, code)


class FlorenceTask(Task):
    """One row of the served task table (the model side's ``Task``, read back from Triton)."""

    @property
    def takes_region(self) -> bool:
        """The text is a box (``x1,y1,x2,y2`` pixels or loc tokens), converted before it reaches the model."""
        return self.name in REGION_TASKS or self.text_hint == REGION_HINT


class TaskTable:
    """The tasks one served Florence-2 model offers, looked up by name or token (case-insensitive)."""

    def __init__(self, tasks: Iterable[FlorenceTask]) -> None:
        self.tasks = tuple(tasks)
        self._by_key = {t.name.lower(): t for t in self.tasks} | {t.token.lower(): t for t in self.tasks}

    @classmethod
    def of(cls, info: ModelInfo) -> TaskTable:
        """The table the model's config serves (``tasks``, validated by the model contract); 502 without one."""
        rows = info.contract(FlorenceParams).tasks
        if not rows:
            raise APIError(502, f"{info.name}: the model config has no 'tasks' parameter; re-export the model "
                                "repository", code="bad_model_config")
        return cls(FlorenceTask(r.name, r.token, r.needs_text, r.description, r.text_hint) for r in rows)

    def __iter__(self) -> Iterator[FlorenceTask]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def find(self, key: str) -> FlorenceTask:
        """A task by name (``object_detection``) or token (``<OD>``); UnknownTask lists the valid ones."""
        task = self._by_key.get(key.strip().lower())
        if task is None:
            # Same wording as vlmserve.model_repository.florence2_tasks.find_task, but over the served table.
            valid = ", ".join(f"{t.name} ({t.token})" for t in self.tasks)
            raise UnknownTask(f"unknown task {key!r}; valid tasks: {valid}")
        return task


def check_generation_args(max_new_tokens: int | None, num_beams: int | None,
                          params: FlorenceParams) -> tuple[int, int]:
    """The knobs to run with: the request's, else the model's defaults (its config, ``default_*``); 422
    (FlorenceInputError) when one is outside ``1..limit`` (``max_new_tokens_limit``, ``num_beams_limit``)."""
    for name, value, limit in (("max_new_tokens", max_new_tokens, params.max_new_tokens_limit),
                               ("num_beams", num_beams, params.num_beams_limit)):
        if value is not None and not 1 <= value <= limit:
            raise FlorenceInputError(f"{name} must be between 1 and {limit}; got {value}", param=name)
    return (max_new_tokens if max_new_tokens is not None else params.default_max_new_tokens,
            num_beams if num_beams is not None else params.default_num_beams)


def prepare_text(task: FlorenceTask, text: str | None, image_size: tuple[int, int], max_chars: int) -> str | None:
    """The TEXT input to send for ``task``, or None to send none.

    Text for a task that takes none is dropped (the old services accepted it silently). A task that needs text
    without it is a 422 naming the hint; text over ``max_chars`` is a 413. Region tasks get their
    ``x1,y1,x2,y2`` pixel box checked against ``image_size`` and converted to Florence's loc tokens.
    """
    if text is not None and not text.strip():
        text = None
    if not task.needs_text:
        return None
    if text is None:
        raise FlorenceInputError(f"task {task.name!r} needs text: send 'text' with {task.text_hint or 'a prompt'}",
                                 param="text", code="text_required")
    if len(text) > max_chars:
        raise FlorenceInputError(f"text has {len(text)} characters; at most {max_chars}", status=413,
                                 param="text", code="text_too_long")
    if task.takes_region:
        width, height = image_size
        try:
            return region_to_loc_tokens(text, width, height)
        except ValueError as exc:
            raise FlorenceInputError(f"task {task.name!r}: {exc}", param="text", code="invalid_region") from None
    return text


def shape_response(payload: Mapping[str, Any], task: FlorenceTask, *, model: str, latency_ms: float,
                   image_size: tuple[int, int]) -> dict[str, Any]:
    """The /infer response: the model's answer plus flat fields per result kind.

    Always ``task``, ``task_token``, ``text`` (raw generated text), ``result`` (parsed), ``image_size``
    (``{"width", "height"}``), ``latency_ms`` and ``processing_time_ms`` (the Florence-2 service's name, same value),
    ``model``. Box results add ``bboxes``, ``labels``, ``objects`` (``[{"label", "bbox"}]``); OCR with
    regions adds ``quad_boxes``, ``labels`` and objects with ``quad_box``; segmentation adds ``polygons``,
    ``labels`` and objects with ``polygons``; open-vocabulary detection adds ``bboxes``, ``bboxes_labels``,
    ``polygons``, ``polygons_labels``, ``labels`` (= ``bboxes_labels``) and objects for both.
    """
    size = payload.get("image_size")
    if isinstance(size, list | tuple) and len(size) == 2:
        width, height = int(size[0]), int(size[1])
    else:
        width, height = image_size
    result = payload.get("result")
    latency = round(float(latency_ms), 3)
    body: dict[str, Any] = {
        "task": task.name,
        "task_token": task.token,
        "text": str(payload.get("text") or ""),
        "result": result,
        "image_size": {"width": width, "height": height},
        "latency_ms": latency,
        "processing_time_ms": latency,
        "model": model,
    }
    if isinstance(result, Mapping):
        body.update(_structured_fields(result))
    if isinstance(payload.get("timing"), Mapping):
        body["timing"] = dict(payload["timing"])  # the model's vision/generate split and the batch it ran in
    return body


def _structured_fields(result: Mapping[str, Any]) -> dict[str, Any]:
    if "quad_boxes" in result:
        quads = _list(result.get("quad_boxes"))
        labels = _labels(result.get("labels"), len(quads))
        objects = [{"label": lab, "bbox": _enclosing([q]), "quad_box": q} for q, lab in zip(quads, labels, strict=True)]
        return {"quad_boxes": quads, "labels": labels, "objects": objects}
    if "bboxes_labels" in result or "polygons_labels" in result:
        boxes = _list(result.get("bboxes"))
        box_labels = _labels(result.get("bboxes_labels"), len(boxes))
        polygons = _list(result.get("polygons"))
        polygon_labels = _labels(result.get("polygons_labels"), len(polygons))
        objects = [{"label": lab, "bbox": b} for b, lab in zip(boxes, box_labels, strict=True)]
        objects += [{"label": lab, "bbox": _enclosing(_polygon_list(p)), "polygons": p}
                    for p, lab in zip(polygons, polygon_labels, strict=True)]
        return {"bboxes": boxes, "bboxes_labels": box_labels, "polygons": polygons,
                "polygons_labels": polygon_labels, "labels": box_labels, "objects": objects}
    if "polygons" in result:
        polygons = _list(result.get("polygons"))
        labels = _labels(result.get("labels"), len(polygons))
        objects = [{"label": lab, "bbox": _enclosing(_polygon_list(p)), "polygons": p}
                   for p, lab in zip(polygons, labels, strict=True)]
        return {"polygons": polygons, "labels": labels, "objects": objects}
    if "bboxes" in result:
        boxes = _list(result.get("bboxes"))
        labels = _labels(result.get("labels"), len(boxes))
        return {"bboxes": boxes, "labels": labels,
                "objects": [{"label": lab, "bbox": b} for b, lab in zip(boxes, labels, strict=True)]}
    return {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _labels(value: Any, n: int) -> list[str]:
    # Labels must line up with the shapes even if the model sends too few (region proposals send "").
    labels = [str(v) for v in _list(value)][:n]
    return labels + [""] * (n - len(labels))


def _polygon_list(entry: Any) -> list[list[float]]:
    # post_process_generation gives each instance a list of polygons; tolerate a single flat polygon too.
    items = _list(entry)
    if items and all(isinstance(v, int | float) for v in items):
        return [items]
    return [list(p) for p in items if isinstance(p, list | tuple)]


def _enclosing(polygons: Sequence[Sequence[Any]]) -> list[float] | None:
    xs: list[float] = []
    ys: list[float] = []
    for poly in polygons:
        numbers = [float(v) for v in poly if isinstance(v, int | float)]
        for x, y in zip(numbers[0::2], numbers[1::2], strict=False):
            xs.append(x)
            ys.append(y)
    if not xs:
        return None
    return [min(xs), min(ys), max(xs), max(ys)]


# --- drawing -----------------------------------------------------------------------------------------------


def image_format(data: bytes) -> str:
    """The file extension for encoded image bytes (``png``, ``jpg``, ...; ``bin`` when unknown)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return _FORMATS.get(img.format or "", "bin")
    except Exception:  # noqa: BLE001 - only a file name depends on it
        return "bin"


def oriented_size(image: bytes, size: tuple[int, int]) -> tuple[int, int]:
    """``size`` (width, height from the file header) as the model sees it: swapped when EXIF rotates 90°.

    The model decodes with ``ImageOps.exif_transpose``, so pixel regions and coordinates refer to the
    upright image.
    """
    try:
        with Image.open(io.BytesIO(image)) as img:
            orientation = img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - a file without readable EXIF is simply not rotated
        return size
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def annotate(image: bytes, result: Any) -> bytes:
    """The input image as PNG with the result drawn on it (boxes, quad boxes, polygons, labels).

    The image is turned upright by its EXIF orientation first, as the model does, so the coordinates match.
    Results without shapes (captions, OCR text) give the image unchanged, re-encoded as PNG. Malformed
    shapes are skipped.
    """
    with Image.open(io.BytesIO(image)) as src:
        src.seek(0)
        img = ImageOps.exif_transpose(src)
    img.load()
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    base = img.convert("RGBA")
    shapes = list(_shapes(result)) if isinstance(result, Mapping) else []
    if shapes:
        base = _draw(base, shapes)
    out = base if has_alpha else base.convert("RGB")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class _Shape:
    kind: str  # "box" | "quad" (outlined only, so the text it marks stays readable) | "polygon" (filled mask)
    points: list[tuple[float, float]]
    label: str
    index: int


def _shapes(result: Mapping[str, Any]) -> Iterator[_Shape]:
    fields = _structured_fields(result)
    index = 0
    for box, label in zip(fields.get("bboxes", []), fields.get("labels", []), strict=False):
        pts = _points(box)
        if len(pts) == 2:
            (x1, y1), (x2, y2) = pts
            yield _Shape("box", [(min(x1, x2), min(y1, y2)), (max(x1, x2), max(y1, y2))], label, index)
        index += 1
    for quad, label in zip(fields.get("quad_boxes", []), fields.get("labels", []), strict=False):
        pts = _points(quad)
        if len(pts) >= 3:
            yield _Shape("quad", pts, label, index)
        index += 1
    polygon_labels = fields.get("polygons_labels", fields.get("labels", []))
    for entry, label in zip(fields.get("polygons", []), polygon_labels, strict=False):
        for poly in _polygon_list(entry):
            pts = _points(poly)
            if len(pts) >= 3:
                yield _Shape("polygon", pts, label, index)
        index += 1


def _points(values: Any) -> list[tuple[float, float]]:
    numbers = []
    for v in _list(values):
        if not isinstance(v, int | float) or not math.isfinite(v):
            return []
        numbers.append(float(v))
    return list(zip(numbers[0::2], numbers[1::2], strict=False))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # noqa: BLE001 - Pillow without FreeType only has the fixed bitmap font
        return ImageFont.load_default()


def _draw(base: Image.Image, shapes: list[_Shape]) -> Image.Image:
    width, height = base.size
    line = max(2, round(min(width, height) / 200))
    font = _font(max(10, round(min(width, height) / 40)))
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    fill = ImageDraw.Draw(overlay)
    colours: dict[str, tuple[int, int, int]] = {}

    def colour(shape: _Shape) -> tuple[int, int, int]:
        # One colour per label, so every "car" matches; unlabeled shapes (region proposals) get one each.
        key = shape.label or f"#{shape.index}"
        if key not in colours:
            colours[key] = PALETTE[len(colours) % len(PALETTE)]
        return colours[key]

    for shape in shapes:  # translucent masks first, outlines and labels drawn over them
        if shape.kind == "polygon":
            fill.polygon(shape.points, fill=(*colour(shape), 90))
    composed = Image.alpha_composite(base, overlay)
    draw = ImageDraw.Draw(composed)
    for shape in shapes:
        rgb = colour(shape)
        if shape.kind == "box":
            draw.rectangle([shape.points[0], shape.points[1]], outline=rgb, width=line)
        else:
            draw.line([*shape.points, shape.points[0]], fill=rgb, width=line, joint="curve")
    for shape in shapes:
        if shape.label:
            _label(draw, shape, colour(shape), font, composed.size)
    return composed


def _label(draw: ImageDraw.ImageDraw, shape: _Shape, rgb: tuple[int, int, int],
           font: ImageFont.FreeTypeFont | ImageFont.ImageFont, size: tuple[int, int]) -> None:
    text = shape.label if len(shape.label) <= 60 else shape.label[:57] + "..."
    x = min(p[0] for p in shape.points)
    y = min(p[1] for p in shape.points)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 6, bottom - top + 4
    # Above the shape when there is room, else just inside its top edge; never off the image.
    x = max(0.0, min(x, size[0] - tw))
    y = y - th if y - th >= 0 else max(0.0, min(y, size[1] - th))
    draw.rectangle([x, y, x + tw, y + th], fill=rgb)
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    draw.text((x + 3 - left, y + 2 - top), text, fill=(0, 0, 0) if luminance > 150 else (255, 255, 255), font=font)
