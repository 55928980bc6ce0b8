"""Triton model ``florence2``: every Florence-2 task; no request waits behind another request's work.

Per ``execute`` (one dynamic batch): decode images and validate each request (a bad one fails alone), then hand
the jobs to a :class:`~vlmserve.model_repository.florence2_engine.Florence2Engine` and return at once; each request is
answered through its response sender when its own batch is done. The engine batches jobs by generation settings
and interleaves the batches decode step by decode step, lightest first (see its module docstring). A batch runs
:meth:`Florence2Pipeline.run`: the vision encoder once for its images (ONNX: in-process on the embedded server,
the native model via BLS on NGC), the image features spliced into the prompt embeddings, one beam-search
``generate`` (tasks may be mixed), and each answer post-processed with the checkpoint's own
``Florence2Processor.post_process_generation`` (location tokens -> pixel coordinates).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmserve.families.contract import DEFAULT_MAX_PIXELS, FlorenceParams
from vlmserve.families.tensors import FlorenceTensors
from vlmserve.model_repository import common
from vlmserve.model_repository.florence2_engine import Cancelled, Florence2Engine
from vlmserve.model_repository.florence2_tasks import (
    DEFAULT_POST_PROCESSOR_CONFIG,
    REGION_TASKS,
    Task,
    UnknownTask,
    find_task,
    region_to_loc_tokens,
)


@dataclass
class Job:
    index: int
    task: Task
    prompt: str
    image: Any  # PIL image
    max_new_tokens: int
    num_beams: int


def _optional_int(request, name: str) -> int | None:
    tensor = common.pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else int(tensor.as_numpy().reshape(-1)[0])


def _optional_text(request, name: str) -> str | None:
    tensor = common.pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = common.as_bytes_list(tensor.as_numpy())[0]
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise common.InputError(f"{name} is not valid UTF-8") from None


class Florence2Pipeline:
    """Everything but Triton I/O, so it can be used (and tested) without a server."""

    def __init__(self, checkpoint_dir, encoder, *, default_max_new_tokens: int = 1024, default_num_beams: int = 3,
                 max_new_tokens_limit: int = 1024, num_beams_limit: int = 8,
                 max_pixels: int = DEFAULT_MAX_PIXELS, device: str = "cpu",
                 decoder_precision: str = "fp32") -> None:
        import torch
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(str(checkpoint_dir))
        if not self.processor.post_processor.parse_task_config:
            self.processor.post_processor.parse_task_config = DEFAULT_POST_PROCESSOR_CONFIG
        self.model = Florence2ForConditionalGeneration.from_pretrained(str(checkpoint_dir)).eval().to(device)
        # The vision tower runs as the exported ONNX model; drop the torch copy to save memory.
        self.model.model.vision_tower = torch.nn.Identity()
        self.device = device
        self.encoder = encoder
        self.image_token_id = self.processor.image_token_id
        self.defaults = (default_max_new_tokens, default_num_beams)
        self.limits = (max_new_tokens_limit, num_beams_limit)
        self.max_pixels = max_pixels
        if decoder_precision not in ("fp32", "bf16"):
            raise ValueError(f"decoder_precision must be fp32 or bf16, got {decoder_precision!r}")
        # bf16 autocast on CPUs with native bf16, when export measured it faithful and faster (decoder_choice.json).
        self.bf16 = decoder_precision == "bf16" and device == "cpu"

    def job(self, index: int, image: bytes, task_key: str, text: str | None,
            max_new_tokens: int | None, num_beams: int | None) -> Job:
        """Validate one request; raises InputError with a message for the client."""
        try:
            task = find_task(task_key)
        except UnknownTask as exc:
            raise common.InputError(str(exc)) from None
        decoded = common.decode_image(image, self.max_pixels)
        prompt = task.token
        if task.needs_text:
            if not text or not text.strip():
                raise common.InputError(f"task {task.name} needs TEXT: {task.text_hint}")
            if task.name in REGION_TASKS:
                try:
                    text = region_to_loc_tokens(text, *decoded.size)
                except ValueError as exc:
                    raise common.InputError(str(exc)) from None
            prompt = task.token + text.strip()
        new_tokens = self.defaults[0] if max_new_tokens is None else max_new_tokens
        beams = self.defaults[1] if num_beams is None else num_beams
        if not 1 <= new_tokens <= self.limits[0]:
            raise common.InputError(f"MAX_NEW_TOKENS must be 1..{self.limits[0]}, got {new_tokens}")
        if not 1 <= beams <= self.limits[1]:
            raise common.InputError(f"NUM_BEAMS must be 1..{self.limits[1]}, got {beams}")
        return Job(index, task, prompt, decoded, new_tokens, beams)

    def run(self, jobs: list[Job], step: Callable[[], None] | None = None) -> dict[int, dict[str, Any]]:
        """Generate for all jobs: one encoder call, one generate per (max_new_tokens, num_beams) group.

        ``step``, when given, is called after the encoders and after every decode step (it may block, to let
        other batches compute, or raise, to stop); it does not change what is generated.
        """
        torch = self.torch
        criteria = None
        if step is not None:
            from transformers import StoppingCriteria, StoppingCriteriaList

            class StepHook(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):  # never stops: only yields the turn
                    step()
                    return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

            criteria = StoppingCriteriaList([StepHook()])
        started = time.perf_counter()
        # channels_last: RGB PIL images; transformers would guess an image 1 or 3 pixels high is channels-first.
        inputs = self.processor(text=[j.prompt for j in jobs], images=[j.image for j in jobs],
                                return_tensors="pt", padding=True, input_data_format="channels_last")
        features = self.encoder({"pixel_values": inputs["pixel_values"].numpy().astype(np.float32)})
        vision_ms = (time.perf_counter() - started) * 1000
        image_features = torch.from_numpy(features["image_features"]).to(self.device)
        input_ids = inputs["input_ids"].to(self.device)
        attention_mask = inputs["attention_mask"].to(self.device)
        with torch.no_grad():
            embeds = self.model.get_input_embeddings()(input_ids)
            mask = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, image_features.to(embeds.dtype))

        groups: dict[tuple[int, int], list[int]] = {}
        for row, job in enumerate(jobs):
            groups.setdefault((job.max_new_tokens, job.num_beams), []).append(row)
        results: dict[int, dict[str, Any]] = {}
        generate_started = time.perf_counter()
        for (max_new_tokens, num_beams), rows in groups.items():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                # Run the language encoder on our spliced embeddings and hand generate() its outputs: the
                # model's own generate path would recompute image features with the (dropped) torch tower.
                encoder_outputs = self.model.get_encoder()(
                    inputs_embeds=embeds[rows], attention_mask=attention_mask[rows], return_dict=True
                )
                if step is not None:
                    step()
                generated = self.model.generate(
                    encoder_outputs=encoder_outputs, attention_mask=attention_mask[rows],
                    max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, early_stopping=False,
                    stopping_criteria=criteria,
                )
            texts = self.processor.batch_decode(generated, skip_special_tokens=False)
            for row, text in zip(rows, texts, strict=True):
                results[jobs[row].index] = self.parse(jobs[row], text)
        # Per batch, shared by its requests: what the benchmark reports as the vision/decoder split.
        timing = {"preprocess_and_vision_ms": round(vision_ms, 2),
                  "generate_ms": round((time.perf_counter() - generate_started) * 1000, 2), "batch_size": len(jobs)}
        for result in results.values():
            result["timing"] = timing
        return results

    def parse(self, job: Job, generated: str) -> dict[str, Any]:
        width, height = job.image.size
        parsed = self.processor.post_process_generation(generated, task=job.task.token, image_size=(width, height))
        clean = generated
        for special in ("<s>", "</s>", "<pad>"):
            clean = clean.replace(special, "")
        return {
            "task": job.task.name,
            "task_token": job.task.token,
            "text": clean.strip(),
            "result": _jsonable(parsed.get(job.task.token, parsed)),
            "image_size": [width, height],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


class Florence2Model:
    """Triton model ``florence2`` (see the module docstring)."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = common.model_config(args)
        required = {t.name for t in FlorenceTensors.inputs if not t.optional}
        if not required <= {i["name"] for i in config["input"]} \
                or {o["name"] for o in config["output"]} != set(FlorenceTensors.output_names()):
            raise ValueError(f"florence2: config must declare inputs {', '.join(sorted(required))} (+ optional) and "
                             f"output {', '.join(FlorenceTensors.output_names())}")
        device = common.torch_device(args)
        common.apply_gpu_budget(args, config)  # before loading: an over-budget checkpoint fails loudly here
        params = FlorenceParams.from_config(config)
        self.pipeline = Florence2Pipeline(
            common.version_dir(args) / "checkpoint",
            common.make_encoder(args, config, ["image_features"]),
            default_max_new_tokens=params.default_max_new_tokens,
            default_num_beams=params.default_num_beams,
            max_new_tokens_limit=params.max_new_tokens_limit,
            num_beams_limit=params.num_beams_limit,
            max_pixels=params.max_pixels,
            device=device,
            decoder_precision=params.decoder_precision,
        )
        # Triton's max_batch_size bounds one generate's batch (as it did when a dynamic batch was one generate).
        self.engine = Florence2Engine(self.pipeline, max_batch=int(config.get("max_batch_size") or 8))

    def execute(self, requests) -> None:
        """Validate each request and hand it to the engine; every request is answered through its response
        sender (exactly one final response: non-decoupled), so ``execute`` returns None at once."""
        pb = common.pb_utils
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        t = FlorenceTensors
        for i, request in enumerate(requests):
            sender = request.get_response_sender()
            try:
                images = common.as_bytes_list(pb.get_input_tensor_by_name(request, t.IMAGE.name).as_numpy())
                if len(images) != 1:
                    raise common.InputError(f"send one image per request ({t.IMAGE.name} shape [1, 1])")
                task = common.as_bytes_list(pb.get_input_tensor_by_name(request, t.TASK.name).as_numpy())[0]
                job = self.pipeline.job(
                    i, images[0], task.decode("utf-8", "replace"), _optional_text(request, t.TEXT.name),
                    _optional_int(request, t.MAX_NEW_TOKENS.name), _optional_int(request, t.NUM_BEAMS.name),
                )
            except common.InputError as exc:
                sender.send(common.error_response(str(exc), invalid_arg=True), flags=final)
                continue
            except Exception as exc:  # noqa: BLE001 - one bad request must not take the batch down
                sender.send(common.error_response(f"preprocessing failed: {type(exc).__name__}: {exc}"),
                            flags=final)
                continue
            cancelled = getattr(request, "is_cancelled", None) or (lambda: False)
            self.engine.submit(job, _answer(sender), cancelled)

    def finalize(self) -> None:
        with contextlib.suppress(TimeoutError):  # unloading anyway; Triton fails what is left
            self.engine.join(timeout=30)


def _answer(sender) -> Callable[[Any], None]:
    """Sends one job's result (or failure) as its request's only, final response."""

    def send(result: Any) -> None:
        pb = common.pb_utils
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if isinstance(result, Cancelled):
            code = getattr(pb.TritonError, "CANCELLED", None)
            error = pb.TritonError("request cancelled", code) if code is not None else pb.TritonError(
                "request cancelled")
            sender.send(pb.InferenceResponse(error=error), flags=final)
        elif isinstance(result, Exception):
            sender.send(common.error_response(f"generation failed: {type(result).__name__}: {result}"),
                        flags=final)
        else:
            payload = np.array([[json.dumps(result).encode("utf-8")]], dtype=np.object_)
            result_tensor = pb.Tensor(FlorenceTensors.RESULT.name, payload)
            sender.send(pb.InferenceResponse(output_tensors=[result_tensor]), flags=final)

    return send
