"""The end-to-end fence of SmolVLM2's vision tower: the language model's teacher-forced logits with a candidate's
image features vs the fp32 reference tower's (export/image_fence.py), and the choice gated on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlmserve.export import image_fence, runtime_choice
from vlmserve.export.onnx_utils import FidelityError
from vlmserve.host import parse_cpuinfo

AVX2_EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse avx2 fma\n"
ONNX_PATH = Path("/nowhere/smolvlm2_vision/1/model.onnx")


@pytest.fixture(scope="module")
def tiny_fence(tmp_path_factory):
    """The tiny SmolVLM2 checkpoint, its fp32 tower as the reference encoder and the fence built on them."""
    import torch
    from transformers import SmolVLMForConditionalGeneration

    from vlmserve.export.tiny import build_tiny_smolvlm2
    from vlmserve.model_repository.smolvlm import vision_module

    checkpoint = build_tiny_smolvlm2(tmp_path_factory.mktemp("tiny-smolvlm2"))
    model = SmolVLMForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    reference = image_fence.torch_encoder(vision_module(model))
    return image_fence.SmolVLMImageFence(checkpoint, reference), reference


def _noisy(reference, scale: float, seed: int = 1):
    """An encoder whose features are the reference's plus Gaussian noise of ``scale`` x their std."""
    def encode(feeds):
        out = reference(feeds)["image_features"]
        noise = np.random.default_rng(seed).standard_normal(out.shape)
        return {"image_features": (out + scale * out.std() * noise).astype(np.float32)}

    return encode


def test_identical_features_give_cosine_1_and_full_agreement(tiny_fence) -> None:
    fence, reference = tiny_fence
    figures = fence(reference)
    assert figures["lm_min_cosine"] >= 1 - 1e-9 and figures["lm_mean_cosine"] >= 1 - 1e-9
    assert figures["lm_argmax_agreement"] == 1.0
    # 3 photos, each prompt followed by a fixed answer: every answer token's position is compared.
    assert figures["lm_positions"] == sum(len(x) for x in fence.reference) >= 3 * 5
    assert runtime_choice.lm_faithful(figures)
    assert "3 photo prompts" in fence.description


def test_noisy_features_are_rejected(tiny_fence) -> None:
    fence, reference = tiny_fence
    figures = fence(_noisy(reference, 1.0))
    assert figures["lm_min_cosine"] < runtime_choice.FIDELITY_FLOOR
    assert not runtime_choice.lm_faithful(figures)
    # A small perturbation (the tower's cosine below 1) still gives the same greedy tokens.
    small = fence(_noisy(reference, 0.01))
    assert runtime_choice.lm_faithful(small) and small["lm_argmax_agreement"] == 1.0


def test_logit_fidelity_figures() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 10))
    b = a.copy()
    b[0] = -b[0]  # one position of four points elsewhere: argmax differs there, cosine -1
    figures = runtime_choice.logit_fidelity([a[:2], a[2:]], [b[:2], b[2:]])
    assert figures["lm_positions"] == 4 and figures["lm_argmax_agreement"] == 0.75
    assert figures["lm_min_cosine"] == pytest.approx(-1.0) and figures["lm_mean_cosine"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ in shape"):
        runtime_choice.logit_fidelity([a], [b[:3]])


# ------------------------------------------------------------------------------------- the choice, gated on it


def _fakes(tower: dict[str, np.ndarray], lm: dict[str, dict]):
    """An opener whose candidates output ``tower[runtime/precision]`` and a fence that reports ``lm[...]``."""
    def opener(path, rt, prec):
        def encode(feeds):
            return {"image_features": tower[f"{rt}/{prec}"]}

        encode.name = f"{rt}/{prec}"  # type: ignore[attr-defined]
        return encode

    def fence(encoder):
        return {"lm_positions": 40, "lm_mean_cosine": lm[encoder.name]["lm_min_cosine"], **lm[encoder.name]}

    return opener, fence


REFERENCE = np.random.default_rng(0).standard_normal((3, 8, 16)).astype(np.float32)
FAR = REFERENCE + 0.5 * np.random.default_rng(1).standard_normal(REFERENCE.shape).astype(np.float32)  # cosine ~0.9
PASS = {"lm_min_cosine": 0.99995, "lm_argmax_agreement": 1.0}
FAIL_COSINE = {"lm_min_cosine": 0.995, "lm_argmax_agreement": 1.0}
FAIL_ARGMAX = {"lm_min_cosine": 0.9995, "lm_argmax_agreement": 0.95}


def _choose(tower, lm, fenced: bool = True, runtime: str = "openvino"):
    opener, fence = _fakes(tower, lm)
    return runtime_choice.choose(ONNX_PATH, {"pixel_values": np.zeros((3, 1), np.float32)}, REFERENCE,
                                 runtime=runtime, cpu=parse_cpuinfo(AVX2_EPYC), rounds=1,
                                 fence=fence if fenced else None, opener=opener)


@pytest.mark.parametrize("lm", [FAIL_COSINE, FAIL_ARGMAX])
def test_tower_cosine_passes_but_lm_fence_fails_is_refused(lm) -> None:
    tower = {"openvino/fp32": REFERENCE}
    assert runtime_choice.cosine_min(REFERENCE, tower["openvino/fp32"]) >= runtime_choice.FIDELITY_FLOOR
    with pytest.raises(FidelityError, match="language model's teacher-forced logits"):
        _choose(tower, {"openvino/fp32": lm})
    # The same candidate under the tower gate (SigLIP & co., whose output the user sees) is accepted.
    assert _choose(tower, {"openvino/fp32": lm}, fenced=False)["runtime"] == "openvino"


def test_lm_fence_passes_although_the_tower_cosine_does_not() -> None:
    tower = {"openvino/fp32": FAR}
    report = _choose(tower, {"openvino/fp32": PASS})
    assert (report["runtime"], report["precision"], report["gate"]) == ("openvino", "fp32", "lm")
    # Both figures are recorded: the gate's and the tower's own cosine (reported, below the old floor).
    assert report["lm_min_cosine"] == PASS["lm_min_cosine"] and report["lm_argmax_agreement"] == 1.0
    assert report["min_cosine"] < runtime_choice.FIDELITY_FLOOR
    assert report["argmax_floor"] == runtime_choice.ARGMAX_FLOOR and report["lm_positions"] == 40
    line = runtime_choice.summary(report)
    assert line.startswith("openvino/fp32 (LM logits cosine min 0.99995") and "tower cosine" in line
    with pytest.raises(FidelityError, match="no candidate holds cosine >= 0.999 to the fp32"):
        _choose(tower, {"openvino/fp32": PASS}, fenced=False)


def test_only_lm_faithful_candidates_compete() -> None:
    """On an AVX2 host (no native bf16): onnxruntime/fp32 and openvino/fp32 are tried; the default fails the
    LM fence here (faked), so the other one wins whatever the timing."""
    tower = {"onnxruntime/fp32": REFERENCE, "openvino/fp32": FAR}
    report = _choose(tower, {"onnxruntime/fp32": FAIL_ARGMAX, "openvino/fp32": PASS}, runtime="auto")
    assert [(c["runtime"], c["precision"]) for c in report["candidates"]] == [("onnxruntime", "fp32"),
                                                                              ("openvino", "fp32")]
    assert (report["runtime"], report["precision"]) == ("openvino", "fp32")
    assert all(c["gate"] == "lm" and c["lm_argmax_agreement"] is not None for c in report["candidates"])


def test_choice_with_the_real_fence(tiny_fence) -> None:
    """The real fence on the tiny checkpoint: the reference tower passes, heavily perturbed features do not."""
    fence, reference = tiny_fence
    encoders = {"onnxruntime/fp32": _noisy(reference, 1.0), "openvino/fp32": reference}
    feeds = {"pixel_values": np.zeros((2, 3, 64, 64), np.float32),
             "patch_attention_mask": np.ones((2, 4, 4), bool)}
    report = runtime_choice.choose(ONNX_PATH, feeds, reference(feeds)["image_features"],
                                   cpu=parse_cpuinfo(AVX2_EPYC), rounds=1, fence=fence,
                                   opener=lambda path, rt, prec: encoders[f"{rt}/{prec}"])
    trials = {f"{c['runtime']}/{c['precision']}": c for c in report["candidates"]}
    assert not runtime_choice.lm_faithful(trials["onnxruntime/fp32"])
    assert (report["runtime"], report["lm_argmax_agreement"]) == ("openvino", 1.0)
