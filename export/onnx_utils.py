"""Export a torch module to ONNX and prove it matches PyTorch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

PARITY_ATOL = 1e-4
OPSET = 17


class ParityError(RuntimeError):
    """The ONNX model's outputs differ from PyTorch's by more than the tolerance."""

    def __init__(self, name: str, max_diff: float, atol: float) -> None:
        super().__init__(
            f"{name}: ONNX Runtime vs PyTorch max abs difference {max_diff:.3e} exceeds tolerance {atol:.0e}"
        )
        self.max_diff = max_diff


def export_onnx(
    module,  # torch.nn.Module
    example_inputs: Sequence,
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> Path:
    """Trace ``module`` with ``example_inputs`` into ``path`` (single file, fixed opset)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    with torch.no_grad():
        # The TorchScript exporter keeps the batch axis symbolic through SigLIP's attention (the dynamo
        # exporter specialises it when traced at batch 1); parity below is checked at another batch size.
        torch.onnx.export(
            module,
            tuple(example_inputs),
            str(tmp),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    tmp.replace(path)
    return path


def validate(
    name: str,
    module,  # torch.nn.Module
    onnx_path: Path,
    inputs: dict[str, np.ndarray],
    atol: float = PARITY_ATOL,
) -> float:
    """Run ``inputs`` through PyTorch and ONNX Runtime; return the max abs difference or raise ParityError."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = module(*[torch.from_numpy(v) for v in inputs.values()])
    expected_list = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    got = session.run(None, inputs)
    max_diff = 0.0
    for e, g in zip(expected_list, got, strict=True):
        e_np = e.detach().cpu().numpy()
        if e_np.shape != g.shape:
            raise ParityError(f"{name} (shape {g.shape} != {e_np.shape})", float("inf"), atol)
        max_diff = max(max_diff, float(np.max(np.abs(e_np - g))))
    if not max_diff <= atol:
        raise ParityError(name, max_diff, atol)
    return max_diff


INT8_MIN_COSINE = 0.99


class FidelityError(RuntimeError):
    """The int8 model's outputs point elsewhere than the fp32 model's (cosine below the floor)."""


def quantize_int8(src: Path, dst: Path, inputs: dict[str, np.ndarray], min_cosine: float = INT8_MIN_COSINE) -> float:
    """Dynamic int8 quantization (weights int8 in a 7-bit range, activations uint8 quantized at run time).

    Returns the smallest cosine similarity between fp32 and int8 outputs on ``inputs``; raises FidelityError
    below ``min_cosine``. Random weights allow this check: it measures numerics, not model quality.
    """
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Symbolic shape inference cannot follow the exported attention reshapes; ONNX shape inference can.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        # 7-bit weights (reduce_range): the artifact runs on whatever x86 CPU serves it, and ONNX Runtime's
        # u8 x s8 kernels on CPUs without VNNI (AVX2, plain AVX-512) add pairs of products with vpmaddubsw,
        # which saturates at int16 for full-range 8-bit weights: MatMulInteger/ConvInteger return wrong integers
        # (tiny SigLIP: min cosine 0.93 on an AVX2-only CPU vs 0.9996 with exact integer math). With |w| <= 64,
        # 2 * 255 * 64 < 2**15: no CPU saturates, so the fidelity measured here holds on every machine.
        quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8, reduce_range=True)
    fp32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    int8 = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    fp32, int8 = fp32.reshape(len(fp32), -1), int8.reshape(len(int8), -1)
    cosine = float(np.min((fp32 * int8).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))))
    if not cosine >= min_cosine:
        raise FidelityError(f"{dst.parent.parent.name}: int8 vs fp32 min cosine {cosine:.4f} < {min_cosine}")
    return cosine
