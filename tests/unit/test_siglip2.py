"""SigLIP 2: the torch-free preprocessing equals transformers', and the ONNX export equals transformers' towers.

The references are transformers 4.57 itself (``Siglip2ImageProcessor``, ``GemmaTokenizerFast``,
``Siglip2VisionEmbeddings.resize_positional_embeddings``, ``get_image_features``/``get_text_features``), run on
tiny random checkpoints of both SigLIP 2 architectures (NaFlex ``Siglip2Model`` and the fixed-resolution
``SiglipModel`` with a Gemma tokenizer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vlmserve.export import photos, siglip2
from vlmserve.export.progress import Progress
from vlmserve.export.repository import ExportOptions
from vlmserve.model_repository import siglip2 as served

# Several sizes and aspect ratios, including extreme ones whose patch grid is smaller than the position grid on
# one side (the resize then downsamples, where antialiasing matters).
SIZES = ((640, 480), (300, 400), (224, 224), (1200, 80), (60, 900), (33, 17), (1600, 1200))


def _images(sizes=SIZES) -> list:
    return [photos.real_photo(w, h, i) if i % 2 == 0 else photos.synthetic_photo(w, h, i)
            for i, (w, h) in enumerate(sizes)]


def test_position_weights_equal_transformers_resize() -> None:
    import torch
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    grid, dim, length = 16, 8, 256
    table = torch.randn(grid, grid, dim, generator=torch.Generator().manual_seed(0))
    shapes = np.array([(16, 16), (8, 32), (1, 256), (3, 5), (25, 10), (40, 6), (2, 2)], dtype=np.int64)
    expected = Siglip2VisionEmbeddings.resize_positional_embeddings(table, torch.from_numpy(shapes), length).numpy()
    got = served.position_weights(shapes, grid, length) @ table.reshape(grid * grid, dim).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)  # float32 rounding only


def test_one_patch_column_follows_the_math_where_torchs_cpu_kernel_does_not() -> None:
    """torch 2.13's CPU antialiased bilinear kernel returns one value for every row when the output is one column
    wide (contiguous tensors; the channels-last path is right), so transformers' reference is wrong for images
    resized to a single patch column (aspect ratio about 1:max_num_patches). The served weights follow the
    filter's definition, which the channels-last path computes."""
    import torch
    import torch.nn.functional as F

    grid = 4
    table = torch.randn(1, 3, grid, grid, generator=torch.Generator().manual_seed(1))
    for height in (8, 3, 2):
        right = F.interpolate(table.contiguous(memory_format=torch.channels_last), size=(height, 1),
                              mode="bilinear", align_corners=False, antialias=True)
        got = served.position_weights(np.array([(height, 1)]), grid, height) @ table[0].reshape(3, -1).T.numpy()
        np.testing.assert_allclose(got[0], right[0].reshape(3, height).T.numpy(), atol=1e-6)


def test_target_size_equals_transformers() -> None:
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    for height, width in [(480, 640), (400, 300), (80, 1200), (900, 60), (1, 1), (17, 33), (4000, 3000)]:
        for patch, max_patches in [(16, 256), (16, 1024), (8, 64), (14, 729)]:
            assert served.size_for_max_patches(height, width, patch, max_patches) == \
                get_image_size_for_max_num_patches(height, width, patch, max_patches)


@pytest.mark.parametrize("max_num_patches", [64, 8])
def test_naflex_transform_equals_the_image_processor(tmp_path: Path, max_num_patches: int) -> None:
    from transformers import Siglip2ImageProcessor

    reference = Siglip2ImageProcessor(patch_size=8, max_num_patches=max_num_patches)
    reference.save_pretrained(tmp_path)
    transform = served.NaflexImageTransform(served.image_processor_config(tmp_path))
    for image in _images():
        expected = reference(images=[image], return_tensors="np")
        patches, mask, shape = transform(image)
        np.testing.assert_array_equal(mask, expected["pixel_attention_mask"][0])
        assert shape == tuple(expected["spatial_shapes"][0])
        np.testing.assert_allclose(patches, expected["pixel_values"][0], atol=1e-6, rtol=0)


TEXTS = ["a photo of a cat", "", "Hello, WORLD!  two  spaces", "ünïcödé ✓ 東京", "<eos> inside <pad>",
         " ".join(["long"] * 40), "a"]


@pytest.mark.parametrize("variant", [
    {},  # as released: no BOS, EOS appended, right padding, input_ids only
    {"add_bos_token": True, "add_eos_token": False, "padding_side": "left",
     "model_input_names": ["input_ids", "attention_mask"]},
])
def test_fast_tokenizer_equals_transformers(tmp_path: Path, variant: dict) -> None:
    from transformers import AutoTokenizer

    siglip2.gemma_tokenizer(320, 16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **variant}))
    reference = AutoTokenizer.from_pretrained(tmp_path)
    ids, mask, counts = served.FastTokenizer(tmp_path, 16)(TEXTS)
    expected = reference(TEXTS, padding="max_length", truncation=True, max_length=16)
    assert ids.tolist() == expected["input_ids"]
    assert counts.tolist() == [len(x) for x in reference(TEXTS)["input_ids"]]
    if "attention_mask" in expected:
        assert mask.tolist() == expected["attention_mask"]
    else:
        assert (mask == 1).all()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """Both tiny architectures built and exported (ONNX Runtime fp32 only: the timing of candidates is not
    what these tests are about)."""
    root = tmp_path_factory.mktemp("siglip2")
    out = {}
    for name, build in (("naflex", siglip2.build_tiny_siglip2), ("fixed", siglip2.build_tiny_siglip2_fixed)):
        source, repo = build(root / name), root / f"repo-{name}"
        report = siglip2.export(source, repo, ExportOptions(runtime="onnxruntime", precision="fp32"), "random",
                                f"tiny-{name}", Progress(quiet=True))
        out[name] = (source, repo, report)
    return out


def test_export_writes_the_four_models_and_reports_parity(exported) -> None:
    for name, (_, repo, report) in exported.items():
        assert all((repo / m / "config.pbtxt").exists() for m in siglip2.MODELS)
        assert report["vision_mode"] == name
        for tower in ("siglip2_vision", "siglip2_text"):
            assert report["parity"][tower]["min_cosine"] >= 0.999
    config = (exported["naflex"][1] / "siglip2_embed_image" / "config.pbtxt").read_text()
    assert "naflex" in config and "position_grid" in config


@pytest.mark.parametrize("name", ["naflex", "fixed"])
def test_onnx_and_openvino_equal_transformers_on_photos(exported, name: str) -> None:
    """Photos of several sizes/aspect ratios (and, for NaFlex, patch budgets other than the exported one, which
    change the graph's patch axis and make the position grid downsample) through the checkpoint's processor."""
    from vlmserve.export.runtime_choice import candidates, cosine_min
    from vlmserve.host import cpu_info
    from vlmserve.model_repository.common import open_encoder

    source, repo, _ = exported[name]
    model, naflex = siglip2.load(source, name)
    budgets = [None, 8, 100] if naflex else [None]
    # Not 60x900 at 8 patches: one patch column, where the torch reference is wrong (test above).
    sizes = {None: SIZES, 8: [s for s in SIZES if s != (60, 900)], 100: SIZES}
    texts = list(photos.SENTENCES) + ["", " ".join(["word"] * 30)]
    runtimes = candidates(cpu_info())  # onnxruntime fp32, openvino fp32 (+ openvino bf16 on bf16 CPUs)
    for budget in budgets:
        pixels, tokens = siglip2.reference_inputs(source, _images(sizes[budget]), texts, 16, budget)
        for tower, kwargs in (("siglip2_vision", {"pixels": pixels}), ("siglip2_text", {"tokens": tokens})):
            expected = siglip2.reference_features(model, naflex, **kwargs)
            inputs = siglip2.graph_inputs(naflex, 8, **kwargs)
            report = siglip2.check_parity(tower, repo / tower / "1" / "model.onnx", inputs, expected)
            assert report["min_cosine"] >= 0.999, (tower, budget, report)
            for runtime, precision in runtimes:
                encoder = open_encoder(repo / tower / "1" / "model.onnx", runtime, precision)
                got = next(iter(encoder(inputs).values()))
                assert cosine_min(expected, got) >= 0.999, (tower, budget, runtime, precision)


def test_served_preprocessing_feeds_the_graph_what_transformers_feeds_the_model(exported) -> None:
    """The Triton model's numpy path (decode, NaFlex transform, position weights, tokenizer) end to end against
    ``get_image_features``/``get_text_features`` on the processor's outputs, per image."""
    from vlmserve.model_repository.common import open_encoder

    source, repo, _ = exported["naflex"]
    model, _ = siglip2.load(source, "naflex")
    processor_dir = repo / "siglip2_embed_image" / "1" / "processor"
    preprocess = served.NaflexImagePreprocessor(processor_dir, grid=8)
    vision = open_encoder(repo / "siglip2_vision" / "1" / "model.onnx")
    images = _images()
    got = vision(preprocess([photos.encode(i, "PNG") for i in images]))["image_embeds"]
    pixels, _ = siglip2.reference_inputs(source, images, ["x"], 16)
    assert siglip2.runtime_choice.cosine_min(siglip2.reference_features(model, True, pixels=pixels), got) >= 0.999

    ids, mask, _ = served.FastTokenizer(repo / "siglip2_embed_text" / "1" / "processor", 16)(list(photos.SENTENCES))
    text = open_encoder(repo / "siglip2_text" / "1" / "model.onnx")({"input_ids": ids, "attention_mask": mask})
    _, tokens = siglip2.reference_inputs(source, images[:1], list(photos.SENTENCES), 16)
    expected = siglip2.reference_features(model, True, tokens=tokens)
    np.testing.assert_allclose(text["text_embeds"], expected, atol=1e-5)


def test_recipe_refuses_a_siglip_v1_checkpoint(tmp_path: Path) -> None:
    from vlmserve.export.tiny import build_tiny_siglip

    build_tiny_siglip(tmp_path / "v1")
    with pytest.raises(ValueError, match="'siglip' family"):
        siglip2.load(tmp_path / "v1", "tiny-v1")
    shutil.rmtree(tmp_path / "v1")


def test_perf_config_has_the_so400m_dimensions() -> None:
    config = siglip2.perf_siglip2_config()
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers) == (1152, 4304, 27)
    assert (vision.patch_size, vision.num_patches) == (16, 256)
    assert (text.vocab_size, text.max_position_embeddings, text.projection_size) == (256000, 64, 1152)


def test_siglip2_is_a_family_that_does_not_take_the_embeddings_surface_over() -> None:
    """Triton lists siglip2_* before siglip_* ('2' < '_'): the gateway still defaults to SigLIP v1 (its spec)."""
    from vlmserve.families import family
    from vlmserve.gateway.engines import ModelInfo, Registry

    assert family("siglip2").default_source == "google/siglip2-so400m-patch16-naflex"  # the old service's
    v2 = ModelInfo.of("siglip2_embed_image", True, {"task": "embed_image", "family": "siglip2"})
    v1 = ModelInfo.of("siglip_embed_image", True, {"task": "embed_image", "family": "siglip"})
    registry = Registry({m.name: m for m in (v2, v1)})
    assert registry.find("embed_image", None) is v1
    assert registry.find("embed_image", "siglip2") is v2
    assert Registry({"siglip2_embed_image": v2}).find("embed_image", None) is v2  # alone, it serves the default


def test_fixed_resolution_served_path_equals_transformers(exported) -> None:
    """Fixed-resolution SigLIP 2: v1's image transform + the Gemma FastTokenizer feed the graph what transformers'
    SiglipProcessor feeds SiglipModel."""
    from vlmserve.model_repository.common import open_encoder
    from vlmserve.model_repository.siglip import SiglipImagePreprocessor

    source, repo, _ = exported["fixed"]
    model, naflex = siglip2.load(source, "fixed")
    images = _images()
    preprocess = SiglipImagePreprocessor(repo / "siglip2_embed_image" / "1" / "processor")
    got = open_encoder(repo / "siglip2_vision" / "1" / "model.onnx")(
        {"pixel_values": preprocess([photos.encode(i, "PNG") for i in images])})["image_embeds"]
    pixels, tokens = siglip2.reference_inputs(source, images, list(photos.SENTENCES), 16)
    assert siglip2.runtime_choice.cosine_min(siglip2.reference_features(model, naflex, pixels=pixels), got) >= 0.999
    ids, mask, _ = served.FastTokenizer(repo / "siglip2_embed_text" / "1" / "processor", 16)(list(photos.SENTENCES))
    text = open_encoder(repo / "siglip2_text" / "1" / "model.onnx")({"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(text["text_embeds"], siglip2.reference_features(model, naflex, tokens=tokens),
                               atol=1e-5)
