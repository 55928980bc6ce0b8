"""Shared pieces of the Triton Python models: config access, encoders (opened in a runtime: ONNX Runtime or
OpenVINO), image decoding, batching."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from vlmserve import telemetry
from vlmserve.families.contract import DEFAULT_MAX_PIXELS, ModelParams
from vlmserve.host import CpuInfo, IsaError, serve_choice, serving_cpu

try:  # Only importable inside Triton's Python backend stub.
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - unit tests use the pure logic below
    pb_utils = None

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("vlmserve.models")
# This stub's model (one Triton model instance per stub process): set by model_config() at initialize; names the
# model's log lines (VLMSERVE_LOG_FORMAT=json) and its spans' service (VLMSERVE_OTLP_ENDPOINT).
MODEL_NAME: str | None = None


class InputError(ValueError):
    """The client's input is wrong: reported as INVALID_ARG (HTTP 400 from Triton), the batch carries on."""


def model_config(args: dict[str, Any]) -> dict[str, Any]:
    """The model's config as Triton hands it, with export's CPU runtime choice re-checked on this CPU.

    A CPU instance whose CPU lacks the ISA of the exported ``runtime``/``precision``/``decoder_precision`` (a
    repository exported on an AMX host, served from a shared volume on an AVX2 node) gets the next faithful
    candidate export recorded in those parameters, with a WARNING in the log; none that runs here: the load fails
    naming the missing ISA (:func:`vlmserve.host.serve_choice`). GPU instances do not use the CPU choice.
    """
    global MODEL_NAME
    config = json.loads(args["model_config"])
    MODEL_NAME = args.get("model_name") or config.get("name")
    telemetry.configure_logging("model", model=MODEL_NAME)  # JSON lines when VLMSERVE_LOG_FORMAT=json
    if not uses_gpu(args):
        apply_serve_choice(config)
    return config


def request_traceparent(request: Any) -> str | None:
    """The W3C traceparent a request's spans hang from (None when tracing is off or the request has none):
    Triton's own span for it when Triton traces (its OpenTelemetry mode), else the ``traceparent`` request
    parameter the gateway sends."""
    if telemetry.otlp_endpoint() is None:
        return None
    try:
        trace = request.trace()
        found = _traceparent_in(trace.get_context() if hasattr(trace, "get_context") else None)
    except Exception:  # noqa: BLE001 - an older stub, or a request Triton does not trace
        found = None
    if found:
        return found
    try:
        params = json.loads(request.parameters() or "{}")
    except (AttributeError, TypeError, ValueError):
        return None
    return telemetry.valid_traceparent(params.get(telemetry.TRACEPARENT)) if isinstance(params, dict) else None


def _traceparent_in(context: Any) -> str | None:
    """Triton's trace context of a request (a JSON text map such as ``{"traceparent": "00-..."}``)."""
    if not context:
        return None
    if isinstance(context, str):
        try:
            context = json.loads(context)
        except ValueError:
            return telemetry.valid_traceparent(context)
    return telemetry.valid_traceparent(context.get(telemetry.TRACEPARENT)) if isinstance(context, dict) else None


def request_id(request: Any) -> str:
    try:
        return str(request.request_id() or "")
    except Exception:  # noqa: BLE001 - stand-in requests in unit tests
        return ""


def warn(message: str) -> None:
    """A WARNING in Triton's own log (``W...`` lines) inside Triton, else this module's Python logger."""
    if pb_utils is not None and hasattr(pb_utils, "Logger"):
        pb_utils.Logger.log_warn(message)
    else:
        log.warning("%s", message)


def apply_serve_choice(config: dict[str, Any], cpu: CpuInfo | None = None) -> None:
    """Rewrite ``config``'s runtime parameters to what :func:`vlmserve.host.serve_choice` allows on ``cpu``."""
    parameters = config.get("parameters") or {}
    raw = {k: (v or {}).get("string_value", "") for k, v in parameters.items()}
    if not {"runtime", "precision", "decoder_precision"} & raw.keys():
        return
    name = config.get("name")
    try:
        choice = serve_choice(raw, cpu or serving_cpu())
    except IsaError as exc:
        raise IsaError(f"model {name!r}: {exc}") from None
    for warning in choice.warnings:
        warn(f"model {name!r}: {warning}")
    chosen = {"decoder_precision": choice.decoder_precision} if "decoder_precision" in raw else {}
    if {"runtime", "precision"} & raw.keys():
        chosen |= {"runtime": choice.runtime, "precision": choice.precision}
    for key, value in chosen.items():
        parameters[key] = {"string_value": value}



def model_dir(args: dict[str, Any]) -> Path:
    """``<repository>/<model>`` of the model being loaded."""
    return Path(args["model_repository"])


def version_dir(args: dict[str, Any]) -> Path:
    return model_dir(args) / str(args["model_version"])


# Set by the ROCm image (and the orchestrator on AMD hosts): Triton has no AMD GPU support, so the instances are
# KIND_CPU at the Triton level and the Python models place their work on the AMD GPU themselves.
ACCELERATOR_ENV = "VLMSERVE_ACCELERATOR"


def accelerator() -> str:
    """``VLMSERVE_ACCELERATOR`` (lower case; empty when unset): ``rocm`` switches on the ROCm placement below."""
    return os.environ.get(ACCELERATOR_ENV, "").strip().lower()


@functools.cache
def _rocm_gpu_available() -> bool:
    """Whether torch-ROCm sees an AMD GPU (HIP answers through torch's ``cuda`` API). Asked once per process.

    torch is imported lazily: only on ROCm, and only by the first model that asks.
    """
    try:
        import torch
    except ImportError:
        return False
    return bool(getattr(torch.version, "hip", None)) and bool(torch.cuda.is_available())


def uses_gpu(args: dict[str, Any]) -> bool:
    """Whether this instance computes on a GPU.

    NVIDIA: Triton's instance kind (KIND_GPU). ROCm (``VLMSERVE_ACCELERATOR=rocm``): Triton schedules KIND_CPU
    instances, so the instance is a GPU instance whenever torch-ROCm sees a GPU.
    """
    if args.get("model_instance_kind") == "GPU":
        return True
    return accelerator() == "rocm" and _rocm_gpu_available()


def device_id(args: dict[str, Any]) -> int:
    """The GPU this instance was placed on.

    Triton sets it for KIND_GPU instances; on ROCm the KIND_CPU instances get 0, i.e. the first GPU in
    ``HIP_VISIBLE_DEVICES`` (HIP numbers the visible devices from 0, as torch and onnxruntime see them).
    """
    return int(args.get("model_instance_device_id") or 0)


def torch_device(args: dict[str, Any]) -> str:
    """``"cuda"`` or ``"cpu"`` for torch; on a GPU instance also makes the instance's GPU torch's current device.

    ``"cuda"`` on ROCm too: torch-ROCm exposes HIP devices through the ``cuda`` API.

    Triton may place an instance on any GPU (``instance_group { gpus: [...] }``); a bare ``"cuda"`` means the
    current device, which would otherwise always be device 0.
    """
    if not uses_gpu(args):
        return "cpu"
    import torch

    torch.cuda.set_device(device_id(args))
    return "cuda"


def apply_gpu_budget(args: dict[str, Any], config: dict[str, Any]) -> None:
    """Cap torch's caching allocator at the config's ``gpu_memory_fraction`` (written by the memory plan).

    Each Python-backend instance is its own process, so the cap is per instance. A no-op on CPU instances and
    when the parameter is absent. torch raises OutOfMemoryError beyond the cap; the CUDA context and memory not
    allocated through torch (e.g. an onnxruntime session, capped by its own ``gpu_mem_limit``) are not counted.
    """
    fraction = ModelParams.from_config(config).gpu_memory_fraction
    if fraction is None or not uses_gpu(args):
        return
    import torch  # lazily: the ONNX-only models never import torch

    torch.cuda.set_per_process_memory_fraction(fraction, device_id(args))


# ---------------------------------------------------------------------------------------------- encoders


Provider = str | tuple[str, dict[str, Any]]


def providers(use_gpu: bool, device_id: int, gpu_mem_limit: int | None, available: Sequence[str]) -> list[Provider]:
    """onnxruntime execution providers: the GPU ones on ``device_id`` (when asked for and available), then the CPU.

    NVIDIA: CUDA. ROCm (``VLMSERVE_ACCELERATOR=rocm``): MIGraphX, then
    ROCm (onnxruntime-migraphx / onnxruntime-rocm builds); nodes one provider cannot run fall to the next.
    ``gpu_mem_limit`` caps the CUDA/ROCm provider's arena (MIGraphX has no such option and is not capped);
    ``kSameAsRequested`` makes the arena grow by what is asked instead of doubling, so it does not hit the cap
    early with one oversized extension.
    """
    result: list[Provider] = []
    if use_gpu:
        arena: dict[str, Any] = {}
        if gpu_mem_limit is not None:
            arena = {"gpu_mem_limit": gpu_mem_limit, "arena_extend_strategy": "kSameAsRequested"}
        if accelerator() == "rocm":
            if "MIGraphXExecutionProvider" in available:
                result.append(("MIGraphXExecutionProvider", {"device_id": device_id}))
            if "ROCMExecutionProvider" in available:
                result.append(("ROCMExecutionProvider", {"device_id": device_id, **arena}))
        elif "CUDAExecutionProvider" in available:
            result.append(("CUDAExecutionProvider", {"device_id": device_id, **arena}))
    result.append("CPUExecutionProvider")
    return result


class OnnxEncoder:
    """Runs an ``.onnx`` file with ONNX Runtime in this process (the embedded flavour's encoder)."""

    def __init__(
        self,
        path: Path,
        use_gpu: bool = False,
        intra_op_threads: int = 0,
        device_id: int = 0,
        gpu_mem_limit: int | None = None,
    ) -> None:
        import onnxruntime as ort

        if not path.exists():
            raise FileNotFoundError(f"ONNX model {path} not found; run `vlmserve export` first")
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.providers = providers(use_gpu, device_id, gpu_mem_limit, ort.get_available_providers())
        self.session = ort.InferenceSession(str(path), options, providers=self.providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outputs, strict=True))


class OpenVinoEncoder:
    """Runs an ``.onnx`` file with OpenVINO's CPU plugin in this process, at ``precision`` fp32 or bf16.

    bf16 is OpenVINO's inference precision (weights and activations in bf16, accumulation in fp32): on CPUs
    with AVX512-BF16 or AMX it is the fast path, and export only picks it when its cosine to the fp32 PyTorch
    reference holds. The LATENCY hint keeps one stream: on a few cores, the THROUGHPUT hint's streams split
    them and each batch runs slower (Triton already forms the batches).
    """

    def __init__(self, path: Path, precision: str = "fp32", threads: int = 0) -> None:
        import openvino as ov

        if not path.exists():
            raise FileNotFoundError(f"ONNX model {path} not found; run `vlmserve export` first")
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {sorted(OPENVINO_PRECISIONS)}, got {precision!r}")
        properties: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY",
                                      "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision]}
        if threads:
            properties["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", properties)
        self.request = self.compiled.create_infer_request()
        self.providers = [f"OpenVINO CPU ({precision})"]
        # A port can carry several tensor names (OpenVINO merges an input with the internal tensor it feeds, e.g.
        # {'input_ids', '/text_model/Reshape_output_0'}): keep the graph's own name, never an internal '/...' one.
        self.input_names = [_graph_name(p.get_names()) for p in self.compiled.inputs]
        self.output_names = [_graph_name(p.get_names()) for p in self.compiled.outputs]

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer({self.input_names.index(name): array for name, array in inputs.items()})
        # The request reuses its output buffers on the next call: copy out.
        return {name: np.array(results[self.compiled.outputs[i]]) for i, name in enumerate(self.output_names)}


def _graph_name(names: set[str]) -> str:
    return sorted(names, key=lambda n: (n.startswith("/"), n))[0]


OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
# (runtime, precision) pairs an exported encoder may be served with; int8 lives in its own *_int8 ONNX file.
RUNTIMES = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16")}


def open_encoder(path: Path, runtime_name: str = "onnxruntime", precision: str = "fp32", use_gpu: bool = False,
                 threads: int = 0, device: int = 0, mem_limit: int | None = None):
    """The in-process encoder for ``runtime_name``/``precision``: what export times and the models serve.

    GPU instances always run ONNX Runtime (CUDA/ROCm providers); the CPU runtime choice is export's.
    """
    if runtime_name not in RUNTIMES or precision not in RUNTIMES[runtime_name]:
        raise ValueError(f"unknown runtime/precision {runtime_name}/{precision}; one of "
                         + ", ".join(f"{r}/{p}" for r, ps in RUNTIMES.items() for p in ps))
    if runtime_name == "openvino" and not use_gpu:
        return OpenVinoEncoder(path, precision, threads)
    return OnnxEncoder(path, use_gpu, threads, device, mem_limit)


class TritonEncoder:
    """Calls another Triton model (e.g. the native onnxruntime/TensorRT one) with a BLS request.

    Only for the NGC image: on the embedded ``nvidia-pytriton`` server BLS calls into Python models fail
    (docs/platform.md), which is why the embedded configs select :class:`OnnxEncoder` instead.
    """

    def __init__(self, model_name: str, output_names: Sequence[str]) -> None:
        if pb_utils is None:
            raise RuntimeError("TritonEncoder only runs inside Triton's Python backend")
        self.model_name = model_name
        self.output_names = list(output_names)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=self.model_name,
            requested_output_names=self.output_names,
            inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.model_name}: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in self.output_names}


def make_encoder(args: dict[str, Any], config: dict[str, Any], output_names: Sequence[str]):
    """The encoder the config asks for: ``runner`` = ``onnxruntime`` (in-process) or ``triton`` (BLS).

    In-process, the ``runtime``/``precision`` parameters (written by export after timing the candidates on
    this host) pick ONNX Runtime or OpenVINO.
    """
    params = ModelParams.from_config(config)
    if not params.encoder_model:
        raise ValueError(f"model {config.get('name')!r}: required parameter 'encoder_model' missing in config")
    if params.runner == "triton":
        return TritonEncoder(params.encoder_model, output_names)
    if params.runner != "onnxruntime":
        raise ValueError(f"model {config['name']!r}: unknown runner {params.runner!r} (onnxruntime|triton)")
    onnx_path = model_dir(args).parent / params.encoder_model / "1" / "model.onnx"
    return open_encoder(onnx_path, params.runtime, params.precision, uses_gpu(args), params.intra_op_threads,
                        device_id(args), params.gpu_mem_limit)


# ---------------------------------------------------------------------------------------------- feature cache


def content_key(*arrays: np.ndarray) -> bytes:
    """blake2b over the exact arrays (dtype, shape and bytes of each, in order): equal keys, equal inputs."""
    digest = hashlib.blake2b(digest_size=32)
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.reshape(-1).view(np.uint8).data)
    return digest.digest()


class FeatureCache:
    """An LRU of vision-encoder outputs (numpy arrays or torch tensors), bounded in bytes (``capacity``; 0: off).

    Keys are :func:`content_key` of the exact arrays the encoder is fed. A value larger than the whole budget is
    not kept; storing evicts the least recently used entries until the new one fits. ``metrics`` (optional):
    an object with ``hit()``, ``miss()`` and ``held(bytes)``, called on every lookup and change. Thread-safe.
    """

    def __init__(self, capacity: int, metrics: Any = None) -> None:
        self.capacity = capacity
        self.metrics = metrics
        self.entries: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: bytes) -> Any | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
                self.entries.move_to_end(key)
        if self.metrics is not None:
            self.metrics.hit() if entry is not None else self.metrics.miss()
        return None if entry is None else entry[0]

    def put(self, key: bytes, value: Any) -> None:
        size = int(value.nbytes)
        with self.lock:
            if size > self.capacity or key in self.entries:
                return
            while self.bytes + size > self.capacity:
                _, (_, freed) = self.entries.popitem(last=False)
                self.bytes -= freed
            self.entries[key] = (value, size)
            self.bytes += size
            held = self.bytes
        if self.metrics is not None:
            self.metrics.held(held)


# ---------------------------------------------------------------------------------------------- inputs


# How far above the model's input size a reduced-scale JPEG decode must stay (see decode_image).
JPEG_DRAFT_MARGIN = 2


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None):
    """Encoded image bytes -> upright RGB PIL image; refuses non-images and decompression bombs.

    Every PIL mode becomes RGB with ``Image.convert("RGB")``, exactly what the reference pipelines do
    (``Image.open(...).convert("RGB")`` before the transformers processor, as the SigLIP embedding service and
    ``loadtests/baseline`` do; transformers' own ``convert_to_rgb`` is the same call), so that served embeddings
    match them: L/1/P replicate into three channels, RGBA/LA/PA and palette transparency are dropped (not
    composited on a background), CMYK uses PIL's conversion, and 16-bit grayscale (I;16) is clipped to 0..255 like
    PIL does for the reference. The one deliberate difference: the EXIF orientation is applied, so a phone photo
    is seen upright.

    ``min_size``: the model resizes to about this size anyway, so a JPEG may be decoded at 1/2, 1/4 or 1/8
    scale (libjpeg's DCT scaling), which makes large photos several times cheaper to decode. Both sides stay
    >= ``JPEG_DRAFT_MARGIN * min_size``: the model's own resize filter then still does at least half of the
    downscaling. With a margin of 1 (the DCT-scaled image barely above the model size) the end-to-end fidelity
    fence (tests/integration/test_embedding_fidelity.py, cosine >= 0.999 against the full-decode reference) held
    only just (worst 0.99927, a 224 px JPEG decoded at 56 px for a 32 px model); with 2 its worst is 0.99994.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise InputError("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # PIL warns about palette images with byte transparency; the conversion below is still right.
            warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(f"image has {width}x{height} pixels, more than the cap of {max_pixels}")
            if min_size and image.format == "JPEG":
                target = JPEG_DRAFT_MARGIN * min_size
                image.draft("RGB", (target, target))
            image.load()
            # Inside the try: a mode PIL cannot turn into RGB is the client's problem (400), not a crash.
            return ImageOps.exif_transpose(image).convert("RGB")
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise InputError(f"not a decodable image ({type(exc).__name__}: {exc})") from None


def as_bytes_list(array: np.ndarray) -> list[bytes]:
    """A Triton BYTES tensor ([batch, 1] or [batch]) as a flat list of ``bytes``."""
    return [x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1)]


# ---------------------------------------------------------------------------------------------- batching


def run_batched(
    requests: Sequence[Any],
    prepare: Callable[[Any], Any],
    compute: Callable[[Any], dict[str, np.ndarray]],
) -> list[Any]:
    """Prepare each request, run one batched computation, split the outputs back per request.

    ``prepare(request)`` returns the request's rows (an array, or a dict of arrays sharing the first axis:
    its batch size) or raises InputError, which fails only that request. ``compute(rows)`` gets the
    concatenation (same type) and returns named outputs with the same first axis.
    (The shape of pytriton's ``@batch`` decorator: concatenate, run once, split.)
    """
    started = time.time()
    responses: list[Any] = [None] * len(requests)
    ready: list[tuple[int, Any]] = []
    for i, request in enumerate(requests):
        try:
            ready.append((i, prepare(request)))
        except InputError as exc:
            log.info("input refused (INVALID_ARG)", extra={"request_id": request_id(request)})
            responses[i] = error_response(str(exc), invalid_arg=True)
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the batch down
            log.warning("preprocessing failed: %s", type(exc).__name__, extra={"request_id": request_id(request)})
            responses[i] = error_response(f"preprocessing failed: {type(exc).__name__}: {exc}")
    prepared = time.time()
    if ready:
        _run_ready(ready, compute, responses)
    _report_batch(requests, ready, responses, started, prepared, time.time())
    return responses


def _report_batch(requests: Sequence[Any], ready: list[tuple[int, Any]], responses: list[Any], started: float,
                  prepared: float, done: float) -> None:
    """Each request's log line and (tracing on) spans: preprocess, then the batched encode with its size."""
    rows = sum(len(next(iter(r.values())) if isinstance(r, dict) else r) for _, r in ready)
    model = MODEL_NAME or "model"
    for i, request in enumerate(requests):
        rid = request_id(request)
        failed = responses[i] is None or (hasattr(responses[i], "has_error") and responses[i].has_error())
        log.info("request done in a batch of %d requests (%d rows)%s", len(requests), rows,
                 " with an error" if failed else "", extra={"request_id": rid})
        parent = request_traceparent(request)
        if parent is None:
            continue
        attrs = {"vlmserve.request_id": rid, "vlmserve.model": model, "vlmserve.batch.requests": len(requests),
                 "vlmserve.batch.rows": rows, "vlmserve.error": failed or None}
        parent = telemetry.record_span(model, f"{model} execute", parent, started, done, **attrs) or parent
        telemetry.record_span(model, f"{model} preprocess", parent, started, prepared, **attrs)
        telemetry.record_span(model, f"{model} encode", parent, prepared, done, **attrs)


def _run_ready(ready: list[tuple[int, Any]], compute: Callable[[Any], dict[str, np.ndarray]],
               responses: list[Any]) -> None:
    """One batched ``compute`` over the prepared requests (retried singly on failure), responses split back."""
    def run(group: list[tuple[int, Any]]) -> dict[str, np.ndarray]:
        parts = [rows for _, rows in group]
        if isinstance(parts[0], dict):
            return compute({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        return compute(np.concatenate(parts))

    for group, outputs in retry_singly(ready, run):
        if isinstance(outputs, Exception):
            (i, _), = group
            responses[i] = error_response(f"inference failed: {type(outputs).__name__}: {outputs}")
            continue
        start = 0
        for i, rows in group:
            end = start + len(next(iter(rows.values())) if isinstance(rows, dict) else rows)
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(v[start:end])) for name, v in outputs.items()]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start = end


def retry_singly(items: list[T], run: Callable[[list[T]], R]) -> list[tuple[list[T], R | Exception]]:
    """``run(items)`` once; if that raises, ``run([item])`` for each item, so that only the item(s) that cause
    the failure fail (a poisoned row must not fail the requests that happened to share its batch).

    Returns ``(group, result or the exception)`` pairs covering every item once.
    """
    try:
        return [(items, run(items))]
    except Exception as exc:  # noqa: BLE001 - decided per item below
        if len(items) <= 1:
            return [(items, exc)]
        log.warning("batch of %d failed (%s: %s); retrying each request alone", len(items), type(exc).__name__, exc)
    results: list[tuple[list[T], R | Exception]] = []
    for item in items:
        try:
            results.append(([item], run([item])))
        except Exception as exc:  # noqa: BLE001
            results.append(([item], exc))
    return results


def error_response(message: str, invalid_arg: bool = False, unavailable: bool = False):
    """An error response whose Triton code the gateway maps (gateway/backends/triton/client.py): INVALID_ARG (the
    client's input)
    -> 400, UNAVAILABLE (full, retry later) -> 429/503 + Retry-After, otherwise INTERNAL -> 502."""
    code = "INVALID_ARG" if invalid_arg else "UNAVAILABLE" if unavailable else None
    if code is not None and hasattr(pb_utils.TritonError, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
