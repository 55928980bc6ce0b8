"""Request bodies and response checks for the Locust suite (``locustfile.py``).

Nothing here imports Locust (or gevent), so the module can be imported anywhere, e.g. by tests.

* ``Config``: every ``VLMSERVE_LT_*`` setting, read from the environment once per process.
* Images: deterministic synthetic pictures (gradient background, shapes, text and text-like strokes) at several
  sizes, encoded as JPEG and PNG, generated once per process and cached.
* Bodies for each route, and checks that raise ``BadResponse`` when a 2xx body is malformed.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import random
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "VLMSERVE_LT_"

# Florence-2 tasks run by default: one of each result kind (text, boxes, OCR, grounding, a region task).
DEFAULT_FLORENCE_TASKS = ("caption", "object_detection", "ocr", "phrase_grounding", "region_to_category")
DEFAULT_IMAGE_SIZES = ((224, 224), (640, 480), (1024, 768))
DEFAULT_IMAGE_FORMATS = ("jpeg", "png")

WORDS = [
    "invoice", "total", "amount", "date", "order", "shipping", "address", "customer", "number", "payment",
    "receipt", "station", "platform", "exit", "north", "south", "coffee", "bakery", "menu", "price", "open",
    "closed", "street", "avenue", "warning", "caution", "entrance", "parking",
]

SENTENCES = (
    "a photo of a cat sleeping on a windowsill",
    "a red circle next to a blue square",
    "a scanned invoice with a table of prices",
    "a street sign pointing to the train station",
    "two dogs playing in the snow",
    "a bowl of ramen with an egg and green onions",
    "an aerial view of a city at night",
    "a handwritten note on yellow paper",
    "a diagram of a neural network with three layers",
    "a bicycle leaning against a brick wall",
    "the menu board of a small coffee shop",
    "a close-up of a circuit board",
    "a mountain lake at sunrise with mist over the water",
    "a child drawing a house with crayons",
    "a screenshot of a spreadsheet with charts",
    "a yellow taxi waiting at a crosswalk",
)

CHAT_PROMPTS = (
    "Describe this image in one sentence.",
    "What objects do you see in this picture?",
    "Read any text visible in the image.",
    "What colours dominate this picture?",
    "Is there anything unusual in this image?",
)


class BadResponse(ValueError):
    """A 2xx response whose body is not what the API promises."""


# --- configuration ---------------------------------------------------------------------------------------


def _env(name: str) -> str | None:
    value = os.environ.get(ENV_PREFIX + name, "").strip()
    return value or None


def env_int(name: str, default: int | None, minimum: int | None = None) -> int | None:
    raw = _env(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{ENV_PREFIX}{name} must be >= {minimum}, got {value}")
    return value


def env_float(name: str, default: float | None, minimum: float | None = None) -> float | None:
    raw = _env(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name} must be a number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{ENV_PREFIX}{name} must be >= {minimum}, got {value}")
    return value


def env_bool(name: str, default: bool) -> bool:
    raw = _env(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV_PREFIX}{name} must be 1/0 (true/false), got {raw!r}")


def env_list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = _env(name)
    if raw is None:
        return default
    items = tuple(x.strip() for x in raw.split(",") if x.strip())
    if not items:
        raise ValueError(f"{ENV_PREFIX}{name} must be a comma-separated list, got {raw!r}")
    return items


def parse_sizes(items: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    sizes = []
    for item in items:
        try:
            w, h = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"{ENV_PREFIX}IMAGE_SIZES: {item!r} is not WIDTHxHEIGHT") from None
        if not (16 <= w <= 8192 and 16 <= h <= 8192):
            raise ValueError(f"{ENV_PREFIX}IMAGE_SIZES: {item!r} must be 16..8192 on each side")
        sizes.append((w, h))
    return tuple(sizes)


@dataclass(frozen=True)
class Config:
    """Every knob of the suite; see loadtests/README.md for the table."""

    max_new_tokens: int = 16
    num_beams: int | None = None
    chat_model: str = "smolvlm2"
    ocr_model: str | None = None
    embed_model: str | None = None
    florence_tasks: tuple[str, ...] = DEFAULT_FLORENCE_TASKS
    image_sizes: tuple[tuple[int, int], ...] = DEFAULT_IMAGE_SIZES
    image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS
    embed_batch: int = 4
    text_batch: int = 8
    seed: int = 1234
    wait_min_s: float = 0.05
    wait_max_s: float = 0.5
    timeout_s: float = 120.0
    api_key: str | None = None
    cover_first: bool = False
    # With cover_first: stop the run once every user has run each of its tasks (a smoke test then ends as soon
    # as every request name has shown up; -t is only its cap, however slow the host).
    stop_after_cover: bool = False
    max_fail_ratio: float = 0.01
    max_p95_ms: float | None = None
    weights: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Config:
        formats = tuple(f.lower() for f in env_list("IMAGE_FORMATS", DEFAULT_IMAGE_FORMATS))
        for f in formats:
            if f not in ("jpeg", "jpg", "png"):
                raise ValueError(f"{ENV_PREFIX}IMAGE_FORMATS: {f!r} is not jpeg or png")
        wait_min = env_float("WAIT_MIN_S", cls.wait_min_s, minimum=0.0)
        wait_max = env_float("WAIT_MAX_S", cls.wait_max_s, minimum=0.0)
        assert wait_min is not None and wait_max is not None
        if wait_max < wait_min:
            raise ValueError(f"{ENV_PREFIX}WAIT_MAX_S ({wait_max}) is below {ENV_PREFIX}WAIT_MIN_S ({wait_min})")
        return cls(
            max_new_tokens=env_int("MAX_NEW_TOKENS", cls.max_new_tokens, minimum=1) or cls.max_new_tokens,
            num_beams=env_int("NUM_BEAMS", None, minimum=1),
            chat_model=_env("CHAT_MODEL") or cls.chat_model,
            ocr_model=_env("OCR_MODEL"),
            embed_model=_env("EMBED_MODEL"),
            florence_tasks=env_list("FLORENCE_TASKS", DEFAULT_FLORENCE_TASKS),
            image_sizes=parse_sizes(env_list("IMAGE_SIZES", tuple(f"{w}x{h}" for w, h in DEFAULT_IMAGE_SIZES))),
            image_formats=tuple("jpeg" if f == "jpg" else f for f in formats),
            embed_batch=env_int("EMBED_BATCH", cls.embed_batch, minimum=1) or cls.embed_batch,
            text_batch=env_int("TEXT_BATCH", cls.text_batch, minimum=1) or cls.text_batch,
            seed=env_int("SEED", cls.seed) or 0,
            wait_min_s=wait_min,
            wait_max_s=wait_max,
            timeout_s=env_float("TIMEOUT_S", cls.timeout_s, minimum=0.1) or cls.timeout_s,
            api_key=_env("API_KEY"),
            cover_first=env_bool("COVER_FIRST", False),
            stop_after_cover=env_bool("STOP_AFTER_COVER", False),
            max_fail_ratio=env_float("MAX_FAIL_RATIO", cls.max_fail_ratio, minimum=0.0) or 0.0,
            max_p95_ms=env_float("MAX_P95_MS", None, minimum=0.0),
        )

    def weight(self, class_name: str, default: int) -> int:
        """``VLMSERVE_LT_WEIGHT_<CLASS>`` (class name upper-cased, e.g. ``..._WEIGHT_CHATUSER``); 0 drops it."""
        value = env_int(f"WEIGHT_{class_name.upper()}", default, minimum=0)
        return default if value is None else value


# --- images ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedImage:
    width: int
    height: int
    format: str  # "jpeg" | "png"
    data: bytes

    @functools.cached_property
    def b64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")

    @functools.cached_property
    def data_uri(self) -> str:
        return f"data:image/{self.format};base64,{self.b64}"


def render_image(width: int, height: int, seed: int):
    """A synthetic but photo/document-like RGB picture: two-colour gradient with a radial light, translucent
    shapes, a paper-like panel with real words and lines of word-like strokes. Same seed, same pixels."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    rng = random.Random(seed)

    def colour(lo: int = 0, hi: int = 255) -> tuple[int, int, int]:
        return (rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))

    # Background: a linear gradient between two colours at a random orientation, lit by a radial gradient.
    ramp = Image.linear_gradient("L")
    ramp = ramp.rotate(rng.choice((0, 90, 180, 270))).resize((width, height), Image.Resampling.BILINEAR)
    c0, c1 = colour(), colour()
    channels = [ramp.point(lambda v, a=a, b=b: a + (b - a) * v // 255) for a, b in zip(c0, c1, strict=True)]
    image = Image.merge("RGB", channels)
    light = Image.radial_gradient("L").resize((width, height), Image.Resampling.BILINEAR)
    glow = Image.new("RGB", (width, height), colour(200, 255))
    image = Image.composite(image, glow, light.point(lambda v: 155 + v * 100 // 255))

    draw = ImageDraw.Draw(image, "RGBA")
    scale = min(width, height)
    # Shapes: circles, boxes, triangles, some outlined.
    for _ in range(rng.randint(4, 9)):
        x, y = rng.randint(0, width - 1), rng.randint(0, height - 1)
        r = rng.randint(scale // 20 + 1, scale // 4 + 2)
        fill = (*colour(), rng.randint(120, 230))
        outline = (*colour(0, 90), 255) if rng.random() < 0.5 else None
        kind = rng.choice(("ellipse", "rectangle", "polygon"))
        if kind == "ellipse":
            draw.ellipse((x - r, y - r, x + r, y + int(r * rng.uniform(0.6, 1.4))), fill=fill, outline=outline, width=2)
        elif kind == "rectangle":
            draw.rectangle((x - r, y - r // 2, x + r, y + r), fill=fill, outline=outline, width=2)
        else:
            points = [(x + int(r * math.cos(a)), y + int(r * math.sin(a)))
                      for a in sorted(rng.uniform(0, 2 * math.pi) for _ in range(rng.randint(3, 6)))]
            draw.polygon(points, fill=fill, outline=outline)

    # A document panel: real words (OCR has something to read) and lines of word-like strokes.
    px0, py0 = rng.randint(0, width // 3), rng.randint(0, height // 3)
    px1, py1 = px0 + int(width * rng.uniform(0.45, 0.65)), py0 + int(height * rng.uniform(0.4, 0.6))
    draw.rectangle((px0, py0, px1, py1), fill=(245, 242, 232, 235), outline=(90, 90, 90, 255))
    line_h = max(10, scale // 18)
    try:
        font = ImageFont.load_default(size=max(9, int(line_h * 0.8)))
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed-size bitmap font
        font = ImageFont.load_default()
    ink = (*colour(0, 70), 255)

    def words(n: int, upper: bool = False) -> str:  # as many of n random words as fit on the panel
        line = ""
        for _ in range(n):
            word = rng.choice(WORDS)
            candidate = f"{line} {word.upper() if upper else word}".strip()
            if draw.textlength(candidate, font=font) > px1 - px0 - line_h:
                break
            line = candidate
        return line

    y = py0 + line_h // 2
    draw.text((px0 + line_h // 2, y), words(3, upper=True), fill=ink, font=font)
    y += int(line_h * 1.4)
    while y + line_h < py1:
        x = px0 + line_h // 2
        if rng.random() < 0.4:
            draw.text((x, y), words(rng.randint(2, 6)), fill=ink, font=font)
        else:  # handwriting-ish: words as runs of short strokes
            while x < px1 - line_h:
                word = rng.randint(2, 8)
                for _ in range(word):
                    top = y + rng.randint(0, line_h // 3)
                    draw.line((x, top, x + rng.randint(1, 3), y + line_h * 2 // 3), fill=ink, width=max(1, line_h // 8))
                    x += max(3, line_h // 3)
                x += line_h // 2
        y += int(line_h * 1.3)
    return image.filter(ImageFilter.GaussianBlur(0.6))


@functools.lru_cache(maxsize=64)
def encoded_image(width: int, height: int, fmt: str, seed: int) -> EncodedImage:
    """The picture for (size, format, seed), encoded once per process."""
    image = render_image(width, height, seed * 1_000_003 + width * 8191 + height)
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, "PNG")
    else:
        image.save(buf, "JPEG", quality=85)
    return EncodedImage(width, height, fmt, buf.getvalue())


def all_images(config: Config) -> list[EncodedImage]:
    return [encoded_image(w, h, f, config.seed) for w, h in config.image_sizes for f in config.image_formats]


def pick_image(config: Config, rng: random.Random) -> EncodedImage:
    (w, h), fmt = rng.choice(config.image_sizes), rng.choice(config.image_formats)
    return encoded_image(w, h, fmt, config.seed)


# --- bodies ----------------------------------------------------------------------------------------------


def _with_model(body: dict[str, Any], model: str | None) -> dict[str, Any]:
    if model:
        body["model"] = model
    return body


def embed_body(config: Config, rng: random.Random) -> dict[str, Any]:
    images = [pick_image(config, rng).data_uri for _ in range(rng.randint(1, config.embed_batch))]
    return _with_model({"images": images}, config.embed_model)


def embed_text_body(config: Config, rng: random.Random) -> dict[str, Any]:
    texts = [rng.choice(SENTENCES) for _ in range(rng.randint(1, config.text_batch))]
    return _with_model({"texts": texts}, config.embed_model)


def v1_embeddings_body(config: Config, rng: random.Random, encoding_format: str) -> dict[str, Any]:
    texts = [rng.choice(SENTENCES) for _ in range(rng.randint(1, config.text_batch))]
    return {"model": config.embed_model or "siglip", "input": texts, "encoding_format": encoding_format}


def florence_text(task: str, image: EncodedImage) -> str | None:
    """The prompt a task needs (None for tasks that take none)."""
    w, h = image.width, image.height
    if task in ("region_to_segmentation", "region_to_category", "region_to_description"):
        return f"{w // 4},{h // 4},{w * 3 // 4},{h * 3 // 4}"
    return {
        "phrase_grounding": "a red circle and a sheet of paper with text",
        "referring_expression_segmentation": "the sheet of paper",
        "open_vocabulary_detection": "circle",
    }.get(task)


def infer_body(config: Config, task: str, image: EncodedImage) -> dict[str, Any]:
    body: dict[str, Any] = {"image_base64": image.b64, "task": task, "max_new_tokens": config.max_new_tokens}
    text = florence_text(task, image)
    if text is not None:
        body["text"] = text
    if config.num_beams is not None:
        body["num_beams"] = config.num_beams
    return body


def chat_body(config: Config, rng: random.Random, stream: bool) -> dict[str, Any]:
    image = pick_image(config, rng)
    body: dict[str, Any] = {
        "model": config.chat_model,
        "max_tokens": config.max_new_tokens,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image.data_uri}},
            {"type": "text", "text": rng.choice(CHAT_PROMPTS)},
        ]}],
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def ocr_body(config: Config, rng: random.Random) -> dict[str, Any]:
    """The Qwen2-VL OCR service's ``POST /ocr``: bare base64 and a language hint."""
    body = {"image": pick_image(config, rng).b64, "language": "en", "max_tokens": config.max_new_tokens}
    return _with_model(body, config.ocr_model)


def v1_ocr_body(config: Config, rng: random.Random) -> dict[str, Any]:
    """The SmolVLM2 service's ``POST /v1/ocr`` (JSON): a data URI."""
    body = {"image": pick_image(config, rng).data_uri, "max_tokens": config.max_new_tokens}
    return _with_model(body, config.ocr_model)


# --- checks ----------------------------------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise BadResponse(message)


def check_vector(vector: Any, where: str) -> int:
    """A finite, unit-length float vector (the gateway L2-normalises embeddings); returns its length."""
    _require(isinstance(vector, list) and len(vector) > 0, f"{where}: not a non-empty list of numbers")
    _require(all(isinstance(x, int | float) and math.isfinite(x) for x in vector), f"{where}: non-finite values")
    norm = math.sqrt(math.fsum(x * x for x in vector))
    _require(abs(norm - 1.0) < 1e-3, f"{where}: norm {norm:.4f}, expected a unit vector")
    return len(vector)


def check_vectors(vectors: Any, count: int, where: str = "body") -> None:
    """``count`` unit vectors of one length (the /embed and /embed_text answer)."""
    _require(isinstance(vectors, list), f"{where}: expected a list of vectors, got {type(vectors).__name__}")
    _require(len(vectors) == count, f"{where}: {len(vectors)} vectors for {count} inputs")
    dims = {check_vector(v, f"{where}[{i}]") for i, v in enumerate(vectors)}
    _require(len(dims) == 1, f"{where}: vectors of different lengths {sorted(dims)}")


def decode_base64_vector(value: Any, where: str) -> list[float]:
    _require(isinstance(value, str), f"{where}: expected a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise BadResponse(f"{where}: invalid base64") from None
    _require(len(raw) > 0 and len(raw) % 4 == 0, f"{where}: {len(raw)} bytes is not a float32 vector")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def check_openai_embeddings(body: Any, count: int, encoding_format: str) -> None:
    _require(isinstance(body, dict) and body.get("object") == "list", "expected an OpenAI list object")
    data = body.get("data")
    _require(isinstance(data, list) and len(data) == count, f"data: expected {count} embeddings")
    vectors = []
    for i, item in enumerate(data):
        _require(isinstance(item, dict) and item.get("index") == i, f"data[{i}]: missing or wrong index")
        emb = item.get("embedding")
        vectors.append(decode_base64_vector(emb, f"data[{i}]") if encoding_format == "base64" else emb)
    check_vectors(vectors, count, "data")
    usage = body.get("usage")
    _require(isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int), "usage: missing total_tokens")


def check_infer(body: Any, task: str, image: EncodedImage) -> None:
    _require(isinstance(body, dict), "expected a JSON object")
    _require(body.get("task") == task, f"task: expected {task!r}, got {body.get('task')!r}")
    _require(isinstance(body.get("text"), str) and "result" in body, "missing text/result")
    size = body.get("image_size")
    _require(size == {"width": image.width, "height": image.height},
             f"image_size: expected {image.width}x{image.height}, got {size!r}")


def check_chat_completion(body: Any, max_tokens: int) -> None:
    _require(isinstance(body, dict) and body.get("object") == "chat.completion", "expected a chat.completion")
    choices = body.get("choices")
    _require(isinstance(choices, list) and len(choices) == 1, "choices: expected exactly one")
    message = choices[0].get("message") or {}
    _require(isinstance(message.get("content"), str), "choices[0].message.content: not a string")
    _require(choices[0].get("finish_reason") in ("stop", "length"), "choices[0].finish_reason: missing")
    usage = body.get("usage") or {}
    tokens = usage.get("completion_tokens")
    _require(isinstance(tokens, int) and 0 <= tokens <= max_tokens,
             f"usage.completion_tokens: {tokens!r}, expected 0..{max_tokens}")


def check_ocr(body: Any, *, v1: bool) -> None:
    _require(isinstance(body, dict) and isinstance(body.get("text"), str), "text: missing or not a string")
    _require(isinstance(body.get("model"), str), "model: missing")
    if v1:
        _require(str(body.get("filename", "")).endswith(".txt"), "filename: missing")


@dataclass
class StreamResult:
    """What an SSE chat stream carried, from ``read_chat_stream``."""

    chunks: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False


def parse_sse(lines: Iterator[bytes | str]) -> Iterator[dict[str, Any] | None]:
    """The JSON payloads of ``data:`` events (None for ``[DONE]``); BadResponse on anything unreadable."""
    for raw in lines:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if not line or line.startswith(":"):
            continue
        _require(line.startswith("data:"), f"unexpected SSE line {line[:80]!r}")
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            continue
        try:
            payload = json.loads(data)
        except ValueError:
            raise BadResponse(f"SSE event is not JSON: {data[:80]!r}") from None
        _require(isinstance(payload, dict), "SSE event is not a JSON object")
        yield payload


def apply_chunk(state: StreamResult, payload: dict[str, Any] | None) -> bool:
    """Fold one event into ``state``; True when the event carried answer text (or ended the answer)."""
    if payload is None:
        _require(state.finish_reason is not None, "[DONE] before a finish_reason")
        state.done = True
        return False
    _require(not state.done, "event after [DONE]")
    if "error" in payload:
        error = payload["error"] if isinstance(payload["error"], dict) else {}
        raise BadResponse(f"error event mid-stream: {error.get('message', payload['error'])}")
    _require(payload.get("object") == "chat.completion.chunk", "event is not a chat.completion.chunk")
    state.chunks += 1
    if payload.get("usage"):
        state.usage = payload["usage"]
    choices = payload.get("choices")
    _require(isinstance(choices, list), "chunk without choices")
    if not choices:  # the usage-only chunk at the end
        return False
    delta = choices[0].get("delta") or {}
    content = delta.get("content") or ""
    state.text += content
    finish = choices[0].get("finish_reason")
    if finish:
        state.finish_reason = finish
    return bool(content) or bool(finish)


def check_stream_end(state: StreamResult, max_tokens: int) -> None:
    _require(state.done, "stream ended without [DONE]")
    _require(state.finish_reason in ("stop", "length"), f"finish_reason {state.finish_reason!r}")
    tokens = (state.usage or {}).get("completion_tokens")
    _require(isinstance(tokens, int) and 0 <= tokens <= max_tokens,
             f"usage.completion_tokens: {tokens!r}, expected 0..{max_tokens}")
