"""The baseline: SigLIP, Florence-2 and SmolVLM2 chat served the way a straightforward service would.

One FastAPI app, ``transformers`` PyTorch models loaded with ``from_pretrained`` from the same checkpoint
directories vlmserve exports from, and every request handled alone: all model work (decode, preprocess,
forward, ``generate``) runs on one worker thread, so requests queue up and are never batched together,
like the old services' single-model services. It speaks vlmserve's routes of the old services (and OpenAI's
``/v1/chat/completions`` for SmolVLM2, streamed with ``TextIteratorStreamer`` when ``stream`` is true) so one load
test can hit both. ``--bf16`` runs all model work under ``torch.autocast(dtype=bfloat16)``: the second naive
baseline, what a user with a bf16-capable CPU would switch on. For comparison only; never deploy it.

    python -m vlmserve.loadtests.baseline.server --siglip DIR --florence2 DIR --smolvlm2 DIR [--bf16] --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from vlmserve.model_repository.florence2_tasks import (
    DEFAULT_POST_PROCESSOR_CONFIG,
    REGION_TASKS,
    TASKS,
    UnknownTask,
    find_task,
    region_to_loc_tokens,
)

log = logging.getLogger("vlmserve.baseline")

T = TypeVar("T")
MAX_NEW_TOKENS_LIMIT = 1024
NUM_BEAMS_LIMIT = 8
DEFAULT_MAX_NEW_TOKENS = 1024  # the reference generation settings (the Florence-2 service, Florence-2 model card)
DEFAULT_NUM_BEAMS = 3
DTYPES = ("float32", "float16", "bfloat16")


class BadInput(Exception):
    """A client error: answered with ``status`` and vlmserve's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


class EmbedRequest(BaseModel):
    images: list[str] = Field(..., description="data URIs or bare base64 of image files")


class EmbedTextRequest(BaseModel):
    texts: list[str] | None = None
    text: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[dict[str, Any]]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image_base64: str
    task: str = "caption"
    text: str | None = None
    text_input: str | None = None
    max_new_tokens: int | None = None
    num_beams: int | None = None


def decode_image(data: str, param: str) -> Any:
    """A data URI or bare base64 -> RGB PIL image (URLs and paths are not accepted here)."""
    from PIL import Image, UnidentifiedImageError

    text = data.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise BadInput(400, f"{param}: a data URI must look like data:image/png;base64,<data>", param)
    elif text.startswith(("http://", "https://", "/", "./")):
        raise BadInput(400, f"{param}: the baseline takes only base64 or data URIs", param)
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(400, f"{param}: not valid base64", param) from None
    if not raw:
        raise BadInput(400, f"{param}: empty image", param)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise BadInput(415, f"{param}: the bytes are not an image file", param) from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _weights(model_dir: Path) -> str:
    return "random" if (model_dir / "VLMSERVE_TINY.json").exists() else "pretrained"


class SiglipRunner:
    """``SiglipModel`` + ``SiglipProcessor`` in eager PyTorch, one forward per request."""

    def __init__(self, model_dir: Path, device: str, dtype: Any) -> None:
        import torch
        from transformers import AutoProcessor, SiglipModel

        self.torch = torch
        self.dir = model_dir
        self.device = device
        self.dtype = dtype
        self.processor = AutoProcessor.from_pretrained(str(model_dir))
        self.model = SiglipModel.from_pretrained(str(model_dir), dtype=dtype).eval().to(device)

    def _normalise(self, features: Any) -> list[list[float]]:
        features = self.torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().tolist()

    def embed_images(self, images: list[str]) -> list[list[float]]:
        decoded = [decode_image(item, f"images[{i}]") for i, item in enumerate(images)]
        pixels = self.processor(images=decoded, return_tensors="pt")["pixel_values"]
        with self.torch.inference_mode():
            features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return self._normalise(features)

    def embed_texts(self, texts: list[str]) -> list[list[float]]:
        # SigLIP was trained on max_length padding; its text tower pools the last position.
        inputs = self.processor(text=texts, padding="max_length", truncation=True, return_tensors="pt")
        with self.torch.inference_mode():
            features = self.model.get_text_features(input_ids=inputs["input_ids"].to(self.device))
        return self._normalise(features)


class Florence2Runner:
    """``Florence2ForConditionalGeneration`` + ``Florence2Processor``: one ``generate`` per request."""

    def __init__(self, model_dir: Path, device: str, dtype: Any) -> None:
        import torch
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        self.torch = torch
        self.dir = model_dir
        self.device = device
        self.dtype = dtype
        self.processor = AutoProcessor.from_pretrained(str(model_dir))
        if not self.processor.post_processor.parse_task_config:
            self.processor.post_processor.parse_task_config = DEFAULT_POST_PROCESSOR_CONFIG
        self.model = Florence2ForConditionalGeneration.from_pretrained(
            str(model_dir), dtype=dtype
        ).eval().to(device)

    def infer(self, body: InferRequest) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            task = find_task(body.task)
        except UnknownTask as exc:
            raise BadInput(400, str(exc), "task") from None
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if body.max_new_tokens is None else body.max_new_tokens
        num_beams = DEFAULT_NUM_BEAMS if body.num_beams is None else body.num_beams
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise BadInput(400, f"max_new_tokens must be 1..{MAX_NEW_TOKENS_LIMIT}", "max_new_tokens")
        if not 1 <= num_beams <= NUM_BEAMS_LIMIT:
            raise BadInput(400, f"num_beams must be 1..{NUM_BEAMS_LIMIT}", "num_beams")
        image = decode_image(body.image_base64, "image_base64")
        width, height = image.size
        prompt = task.token
        text = body.text if body.text is not None else body.text_input
        if task.needs_text:
            if not text or not text.strip():
                raise BadInput(400, f"task {task.name} needs text: {task.text_hint}", "text")
            text = text.strip()
            if task.name in REGION_TASKS:
                try:
                    text = region_to_loc_tokens(text, width, height)
                except ValueError as exc:
                    raise BadInput(400, str(exc), "text") from None
            prompt = task.token + text
        inputs = self.processor(text=prompt, images=image, return_tensors="pt")
        with self.torch.inference_mode():
            generated = self.model.generate(
                input_ids=inputs["input_ids"].to(self.device),
                pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                early_stopping=False,
            )
        raw = self.processor.batch_decode(generated, skip_special_tokens=False)[0]
        parsed = self.processor.post_process_generation(raw, task=task.token, image_size=(width, height))
        clean = raw
        for special in ("<s>", "</s>", "<pad>"):
            clean = clean.replace(special, "")
        latency = round((time.perf_counter() - start) * 1000, 3)
        return {
            "task": task.name,
            "task_token": task.token,
            "text": clean.strip(),
            "result": _jsonable(parsed.get(task.token, parsed)),
            "image_size": {"width": width, "height": height},
            "latency_ms": latency,
            "processing_time_ms": latency,
        }


CHAT_DEFAULT_MAX_TOKENS = 256


class SmolVLMChatRunner:
    """SmolVLM2 with ``AutoModelForImageTextToText``: one ``generate`` per request, streamed by
    ``TextIteratorStreamer``.

    transformers' ``SmolVLMProcessor`` imports its video processor, which needs torchvision (not shipped next to
    torch here), so the prompt is built as the processor builds it: the chat template, then each ``<image>``
    expanded to the tiles the image processor cut.
    """

    def __init__(self, model_dir: Path, device: str, dtype: Any) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer, SmolVLMImageProcessor

        self.torch = torch
        self.dir = model_dir
        self.device = device
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.image_processor = SmolVLMImageProcessor.from_pretrained(str(model_dir))
        self.model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=dtype).eval().to(device)
        config = self.model.config
        self.seq_len = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 // (
            config.scale_factor**2)
        self.name = "baseline/smolvlm2"

    def prepare(self, body: ChatRequest) -> tuple[dict[str, Any], dict[str, Any]]:
        """Validated request -> (model inputs, generate settings); ``BadInput`` for client errors."""
        from vlmserve.model_repository.smolvlm import image_prompt

        if not body.messages:
            raise BadInput(400, "messages must be a non-empty list", "messages")
        template_messages, images = [], []
        for i, message in enumerate(body.messages):
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "user", "assistant"):
                raise BadInput(400, f"messages[{i}].role must be system, user or assistant", "messages")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list):
                raise BadInput(400, f"messages[{i}].content must be a string or a list of parts", "messages")
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                    images.append(decode_image(str(part["image_url"].get("url", "")),
                                               f"messages[{i}].content[{j}].image_url"))
                    parts.append({"type": "image"})
                else:
                    raise BadInput(400, f"messages[{i}].content[{j}]: parts are text or image_url", "messages")
            template_messages.append({"role": role, "content": parts})
        max_tokens = next((t for t in (body.max_completion_tokens, body.max_tokens) if t is not None),
                          CHAT_DEFAULT_MAX_TOKENS)
        if not 1 <= max_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise BadInput(400, f"max_tokens must be 1..{MAX_NEW_TOKENS_LIMIT}", "max_tokens")
        temperature = 0.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        if not 0.0 <= temperature <= 2.0 or not 0.0 < top_p <= 1.0:
            raise BadInput(400, "temperature must be 0..2 and top_p in (0, 1]", "temperature")
        prompt = self.tokenizer.apply_chat_template(template_messages, tokenize=False, add_generation_prompt=True)
        inputs: dict[str, Any] = {}
        if images:
            vision = self.image_processor(images=[images], return_row_col_info=True, return_tensors="pt")
            pieces = prompt.split("<image>")
            expanded = [image_prompt(r, c, self.seq_len) for r, c in zip(vision["rows"][0], vision["cols"][0],
                                                                          strict=True)]
            prompt = pieces[0] + "".join(e + rest for e, rest in zip(expanded, pieces[1:], strict=True))
            inputs = {"pixel_values": vision["pixel_values"].to(self.device, self.dtype),
                      "pixel_attention_mask": vision["pixel_attention_mask"].to(self.device)}
        encoded = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        inputs.update(input_ids=encoded["input_ids"].to(self.device),
                      attention_mask=encoded["attention_mask"].to(self.device))
        settings: dict[str, Any] = {"max_new_tokens": max_tokens}
        if temperature > 0:
            settings.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            settings.update(do_sample=False)
        return inputs, settings

    def generate(self, inputs: dict[str, Any], settings: dict[str, Any], seed: int | None,
                 streamer: Any = None) -> dict[str, Any]:
        if seed is not None:
            self.torch.manual_seed(seed)
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, **settings, streamer=streamer)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        new = out[0, prompt_tokens:].tolist()
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        finished = bool(new) and new[-1] in eos_ids
        return {
            "text": self.tokenizer.decode(new, skip_special_tokens=True),
            "finish_reason": "stop" if finished or len(new) < settings["max_new_tokens"] else "length",
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(new),
                      "total_tokens": prompt_tokens + len(new)},
        }

    def streamer(self) -> Any:
        from transformers import TextIteratorStreamer

        return TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _chat_events(streamer: Any, future: asyncio.Future, completion_id: str, created: int, model: str,
                       include_usage: bool) -> AsyncIterator[str]:
    """OpenAI ``chat.completion.chunk`` events (the same sequence vlmserve's gateway sends) from the streamer."""

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    yield _sse(chunk({"role": "assistant", "content": ""}, None))
    pieces: Iterator[str] = iter(streamer)
    while True:
        # The streamer's queue blocks; read it off the event loop (and off the model worker, which is generating).
        piece = await asyncio.to_thread(next, pieces, None)
        if piece is None:
            break
        if piece:
            yield _sse(chunk({"content": piece}, None))
    try:
        result = await future
    except Exception:  # noqa: BLE001 - the headers are sent: end the stream with an error event
        log.exception("baseline chat generation failed")
        yield _sse({"error": {"message": "generation failed; see the server log", "type": "server_error",
                              "param": None, "code": "inference_failed"}})
        yield "data: [DONE]\n\n"
        return
    yield _sse(chunk({}, result["finish_reason"]))
    if include_usage:
        yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": result["usage"]})
    yield "data: [DONE]\n\n"


def pick_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def create_app(
    siglip_dir: Path | None = None,
    florence2_dir: Path | None = None,
    device: str = "auto",
    dtype: str = "float32",
    smolvlm2_dir: Path | None = None,
    bf16: bool = False,
) -> FastAPI:
    """The baseline app, with its models loaded (at least one checkpoint directory).

    ``bf16``: every model call runs under ``torch.autocast(dtype=bfloat16)`` on the model's device type.
    """
    import torch

    if siglip_dir is None and florence2_dir is None and smolvlm2_dir is None:
        raise ValueError("give --siglip, --florence2 and/or --smolvlm2")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    device = pick_device(device)
    torch_dtype = getattr(torch, dtype)
    siglip = SiglipRunner(Path(siglip_dir), device, torch_dtype) if siglip_dir else None
    florence = Florence2Runner(Path(florence2_dir), device, torch_dtype) if florence2_dir else None
    # Under autocast transformers' SmolVLM writes bf16 image features into fp32 text embeddings and fails
    # (inputs_merger: "Index put requires the source and destination dtypes match"); the fix a user would
    # reach for is loading the chat model in bf16 as well.
    chat_dtype = torch.bfloat16 if bf16 else torch_dtype
    chat = SmolVLMChatRunner(Path(smolvlm2_dir), device, chat_dtype) if smolvlm2_dir else None
    # The one worker thread is the point of the baseline: requests are served strictly one at a time.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baseline-model")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="vlmserve baseline (one request at a time)", lifespan=lifespan)

    def precision() -> Any:
        if not bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)

    def on_worker(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
        def call() -> T:
            with precision():
                return fn(*args)

        return call

    async def run(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(worker, on_worker(fn, *args))

    def need(runner: T | None, family: str) -> T:
        if runner is None:
            raise BadInput(404, f"{family} is not loaded in this baseline server (start it with --{family} DIR)")
        return runner

    @app.exception_handler(BadInput)
    async def bad_input(_: Request, exc: BadInput) -> JSONResponse:
        error = {"message": exc.message, "type": "invalid_request_error", "param": exc.param, "code": None}
        return JSONResponse({"error": error}, status_code=exc.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        models = {
            name: {"path": str(r.dir), "weights": _weights(r.dir)}
            for name, r in (("siglip", siglip), ("florence2", florence), ("smolvlm2", chat))
            if r is not None
        }
        weights = {m["weights"] for m in models.values()}
        return {
            "status": "ok",
            "model_loaded": True,
            "models": models,
            "weights": "random" if "random" in weights else "pretrained",
            "device": device,
            "dtype": dtype,
            "bf16_autocast": bf16,
            "cuda_available": torch.cuda.is_available(),
            "gpu_memory_gb": round(torch.cuda.memory_allocated() / 2**30, 2) if device.startswith("cuda") else 0.0,
            "serving": "baseline: transformers eager PyTorch, one request at a time",
        }

    @app.get("/tasks")
    async def tasks() -> dict[str, Any]:
        return {"tasks": [t.name for t in TASKS], "descriptions": {t.name: t.description for t in TASKS}}

    @app.post("/embed")
    async def embed(body: EmbedRequest) -> list[list[float]]:
        runner = need(siglip, "siglip")
        if not body.images:
            raise BadInput(400, "images must be a non-empty list", "images")
        return await run(runner.embed_images, body.images)

    @app.post("/embed_text")
    async def embed_text(body: EmbedTextRequest) -> list[list[float]]:
        runner = need(siglip, "siglip")
        if (body.texts is None) == (body.text is None):
            raise BadInput(400, "send exactly one of 'texts' (a list) or 'text' (a string)", "texts")
        texts = body.texts if body.texts is not None else [body.text or ""]
        if not texts:
            raise BadInput(400, "texts must be a non-empty list", "texts")
        return await run(runner.embed_texts, texts)

    @app.post("/infer")
    async def infer(body: InferRequest) -> dict[str, Any]:
        return await run(need(florence, "florence2").infer, body)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        runner = need(chat, "smolvlm2")
        inputs, settings = await run(runner.prepare, body)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if not body.stream:
            result = await run(runner.generate, inputs, settings, body.seed)
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": runner.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "logprobs": None, "finish_reason": result["finish_reason"]}],
                "usage": result["usage"],
            }
        streamer = runner.streamer()

        def generate() -> dict[str, Any]:
            try:
                return runner.generate(inputs, settings, body.seed, streamer)
            except BaseException:
                streamer.end()  # unblock the reader below; the error itself comes from the future
                raise

        # Queued behind earlier requests on the one model worker, like every other route.
        future = asyncio.get_running_loop().run_in_executor(worker, on_worker(generate))
        include_usage = bool(body.stream_options and body.stream_options.get("include_usage"))
        return StreamingResponse(_chat_events(streamer, future, completion_id, created, runner.name, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m vlmserve.loadtests.baseline.server``: load the checkpoints and serve with uvicorn."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--siglip", type=Path, help="SigLIP checkpoint directory (Hugging Face format)")
    parser.add_argument("--florence2", type=Path, help="Florence-2 checkpoint directory (Hugging Face format)")
    parser.add_argument("--smolvlm2", type=Path, help="SmolVLM2 checkpoint directory: serves /v1/chat/completions")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--bf16", action="store_true",
                        help="run all model work under torch.autocast(dtype=bfloat16) (weights stay in --dtype)")
    args = parser.parse_args(argv)
    if args.siglip is None and args.florence2 is None and args.smolvlm2 is None:
        parser.error("give --siglip, --florence2 and/or --smolvlm2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.monotonic()
    app = create_app(args.siglip, args.florence2, args.device, args.dtype, args.smolvlm2, args.bf16)
    log.info("baseline models loaded in %.1fs; serving on http://%s:%d (one request at a time)",
             time.monotonic() - start, args.host, args.port)
    # One process, no reload: the old services' single-model service.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
