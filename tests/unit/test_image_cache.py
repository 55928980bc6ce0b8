"""The chat models' image-embedding cache: the byte-bounded LRU (vlmserve.model_repository.common.FeatureCache) and the
family pipelines that use it (an image seen again is not re-encoded, and its features are bit-identical)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmserve.api.openai import GenerationParameters
from vlmserve.model_repository import common
from vlmserve.model_repository.chat_engine import ChatJob, DecodeLoop


class Recorder:
    def __init__(self) -> None:
        self.hits = self.misses = 0
        self.bytes: list[int] = []

    def hit(self) -> None:
        self.hits += 1

    def miss(self) -> None:
        self.misses += 1

    def held(self, n: int) -> None:
        self.bytes.append(n)


def test_lru_is_bounded_in_bytes_and_evicts_the_least_recently_used() -> None:
    metrics = Recorder()
    cache = common.FeatureCache(1000, metrics)
    a, b, c = (np.full(100, i, np.float16) for i in range(3))  # 200 bytes each
    big = np.zeros(300, np.float32)  # 1200 bytes: more than the whole budget
    keys = [common.content_key(x) for x in (a, b, c, big)]
    for key, value in zip(keys[:3], (a, b, c), strict=True):
        assert cache.get(key) is None
        cache.put(key, value)
    assert cache.bytes == 600 and metrics.bytes[-1] == 600
    assert cache.get(keys[0]) is a  # a is now the most recently used: b is next out
    cache.put(common.content_key(np.ones(200, np.float16)), np.ones(200, np.float16))  # 400 more -> 1000
    assert cache.bytes == 1000
    cache.put(common.content_key(np.ones(50, np.float32)), np.ones(50, np.float32))  # 200 more: evicts b
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is a and cache.get(keys[2]) is c
    assert cache.bytes <= 1000 and cache.bytes == sum(size for _, size in cache.entries.values())
    cache.put(keys[3], big)  # larger than the budget: not kept, nothing evicted for it
    assert cache.get(keys[3]) is None and cache.get(keys[0]) is a
    assert (cache.hits, cache.misses) == (metrics.hits, metrics.misses) == (4, 5)
    off = common.FeatureCache(0)
    off.put(keys[0], a)
    assert off.get(keys[0]) is None and off.bytes == 0


def test_content_key_sees_dtype_shape_and_every_byte() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    mask = np.ones((3, 2), bool)
    key = common.content_key(x, mask)
    assert key == common.content_key(x.copy(), mask.copy())
    assert key != common.content_key(x.reshape(4, 3), mask)  # same bytes, another shape
    assert key != common.content_key(x.astype(np.float64), mask)
    y = x.copy()
    y[2, 3] = np.nextafter(y[2, 3], np.float32(100))  # one ulp
    assert key != common.content_key(y, mask)
    mask[0, 0] = False
    assert key != common.content_key(x, mask)


# ---------------------------------------------------------------------------------------------- the pipelines


class CountingEncoder:
    """The real ONNX runner of the tiny SmolVLM2's vision encoder, counting its calls and the tiles it got."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.calls: list[int] = []

    def __call__(self, feeds: dict) -> dict:
        self.calls.append(len(feeds["pixel_values"]))
        return self.encoder(feeds)


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory):
    """The tiny SmolVLM2 with its vision encoder exported to ONNX (as export does) and run by common.OnnxEncoder."""
    import torch
    from transformers import SmolVLMForConditionalGeneration

    from vlmserve.export import onnx_utils
    from vlmserve.export.tiny import build_tiny_smolvlm2
    from vlmserve.model_repository.smolvlm import SmolVLMPipeline, vision_module

    root = tmp_path_factory.mktemp("smol-cache")
    checkpoint = build_tiny_smolvlm2(root / "checkpoint")
    model = SmolVLMForConditionalGeneration.from_pretrained(str(checkpoint)).eval()
    size, patch = model.config.vision_config.image_size, model.config.vision_config.patch_size
    onnx_path = root / "vision.onnx"
    onnx_utils.export_onnx(
        vision_module(model), [torch.zeros(2, 3, size, size), torch.ones(2, size // patch, size // patch, dtype=bool)],
        onnx_path, ["pixel_values", "patch_attention_mask"], ["image_features"],
        {"pixel_values": {0: "batch"}, "patch_attention_mask": {0: "batch"}, "image_features": {0: "batch"}},
    )
    encoder = CountingEncoder(common.OnnxEncoder(onnx_path))
    return SmolVLMPipeline(checkpoint, encoder=encoder), encoder


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory):
    from vlmserve.export.tiny import build_tiny_qwen2vl
    from vlmserve.model_repository.qwen2vl import QwenPipeline

    pipeline = QwenPipeline(build_tiny_qwen2vl(tmp_path_factory.mktemp("qwen-cache") / "checkpoint"))
    calls: list[int] = []
    visual = pipeline.model.model.visual
    original = visual.forward
    visual.forward = lambda pixels, *a, **kw: calls.append(len(pixels)) or original(pixels, *a, **kw)
    return pipeline, calls


def picture(seed: int, size: tuple[int, int] = (150, 100)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8))


def run(pipeline, images: list[Image.Image], text: str = "what is this?") -> tuple[list[int], ChatJob]:
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
    inputs, prompt_tokens = pipeline.prepare([{"role": "user", "content": content}])
    tokens: list[int] = []
    job = ChatJob(inputs, GenerationParameters(max_tokens=8), prompt_tokens, lambda t, f, u: None)
    loop = DecodeLoop(pipeline)
    loop.add(job)
    loop.drain()
    tokens = list(job.token_ids)
    return tokens, job


def prefill_embeddings(pipeline, job: ChatJob):
    kwargs, _ = pipeline.prefill_inputs(job)
    return kwargs["inputs_embeds"]


def test_smolvlm2_image_seen_again_is_not_re_encoded_and_is_bit_identical(smol) -> None:
    pipeline, encoder = smol
    pipeline.image_cache = common.FeatureCache(64 * 2**20)
    encoder.calls.clear()
    first, job = run(pipeline, [picture(1)])
    tiles = len(job.inputs["pixel_values"])
    assert tiles > 1 and encoder.calls == [tiles]  # every tile of the image in one encoder batch
    assert (pipeline.image_cache.hits, pipeline.image_cache.misses) == (0, 1)
    again, job_again = run(pipeline, [picture(1)])
    assert encoder.calls == [tiles]  # no second encoder call
    assert again == first and pipeline.image_cache.hits == 1
    cached = prefill_embeddings(pipeline, job_again)
    pipeline.image_cache = common.FeatureCache(0)  # off: the encoder runs again
    fresh = prefill_embeddings(pipeline, job_again)
    assert len(encoder.calls) == 2
    assert cached.dtype == fresh.dtype and bool((cached == fresh).all())  # bit-identical to a fresh encode


def test_smolvlm2_only_new_images_are_encoded_in_one_batch(smol) -> None:
    pipeline, encoder = smol
    pipeline.image_cache = common.FeatureCache(64 * 2**20)
    encoder.calls.clear()
    _, job_a = run(pipeline, [picture(2)])
    tiles_a = len(job_a.inputs["pixel_values"])
    _, job_ab = run(pipeline, [picture(3, (90, 60)), picture(2)])  # a new image, then the known one
    tiles_ab = len(job_ab.inputs["pixel_values"])
    assert encoder.calls == [tiles_a, tiles_ab - tiles_a]  # only the new image's tiles went to the encoder
    cached = prefill_embeddings(pipeline, job_ab)
    pipeline.image_cache = common.FeatureCache(0)
    fresh = prefill_embeddings(pipeline, job_ab)  # both images in one batch, no cache
    assert bool((cached == fresh).all())


def test_qwen2vl_image_seen_again_is_not_re_encoded_and_is_bit_identical(qwen) -> None:
    pipeline, calls = qwen
    pipeline.image_cache = common.FeatureCache(64 * 2**20)
    calls.clear()
    first, job = run(pipeline, [picture(4)])
    assert len(calls) == 1
    again, job_again = run(pipeline, [picture(4)])
    assert len(calls) == 1 and again == first
    assert (pipeline.image_cache.hits, pipeline.image_cache.misses) == (1, 1)
    cached = prefill_embeddings(pipeline, job_again)
    pipeline.image_cache = common.FeatureCache(0)
    fresh = prefill_embeddings(pipeline, job_again)
    assert len(calls) == 2 and bool((cached == fresh).all())
    # And the same as the model's own path (pixel_values through Qwen2VLModel.forward).
    import torch

    with torch.inference_mode():
        ids = torch.tensor([job_again.inputs["input_ids"]])
        embeds = pipeline.model.model.get_input_embeddings()(ids)
        features = torch.cat(pipeline.model.model.get_image_features(job_again.inputs["pixel_values"],
                                                                     job_again.inputs["image_grid_thw"]))
        mask = (ids == pipeline.model.config.image_token_id)[..., None].expand_as(embeds)
        reference = embeds.masked_scatter(mask, features.to(embeds.dtype))
    assert bool((cached == reference).all())
