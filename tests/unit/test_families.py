"""The family specs and the model contract: discovery, defaults per surface, typed config parameters."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import vlmserve.families as fam
from vlmserve.families import SURFACES, default_family, families, family
from vlmserve.families.contract import (
    MAX_NEW_TOKENS_LIMIT,
    ChatParams,
    EmbedParams,
    FlorenceParams,
    ModelParams,
)
from vlmserve.families.spec import FamilySpec, load
from vlmserve.gateway.engines import ModelInfo, Registry


def test_every_family_is_discovered_with_loadable_targets() -> None:
    specs = families()
    assert set(specs) == {"siglip", "siglip2", "florence2", "qwen2vl", "smolvlm2", "deepseek_ocr"}
    for spec in specs.values():
        recipe = spec.load_recipe()
        assert recipe.MODELS and isinstance(recipe.RECIPE_VERSION, str) and callable(recipe.export)
        assert (spec.pipeline is not None) == ("chat" in spec.surfaces)  # chat families name their pipeline
        for target in (spec.tiny, spec.perf, spec.pipeline):
            assert target is None or callable(load(target)), target
        assert issubclass(spec.params, ModelParams)
        assert spec.env_var == f"VLMSERVE_{spec.name.upper()}_MODEL"


def test_each_surface_has_at_most_one_explicit_default() -> None:
    assert default_family("embeddings") == "siglip"
    assert default_family("florence2") == "florence2"
    assert default_family("chat") == default_family("ocr") == "qwen2vl"
    for surface in SURFACES:
        assert sum(surface in s.default_for for s in families().values()) <= 1


def test_unknown_family_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model family 'clip'; choose from .*siglip"):
        family("clip")


def test_a_spec_file_is_a_family_and_does_not_take_a_surface_over(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Adding a family = one more module in vlmserve/families: no registry to edit.
    (tmp_path / "zz_newembed.py").write_text(
        "from vlmserve.families.contract import EmbedParams\n"
        "from vlmserve.families.spec import FamilySpec\n"
        "SPEC = FamilySpec(name='newembed', title='New', surfaces=('embeddings',), default_source='org/new',\n"
        "                  recipe='vlmserve.export.siglip', params=EmbedParams)\n")
    monkeypatch.setattr(fam, "__path__", [*fam.__path__, str(tmp_path)])
    families.cache_clear()
    try:
        assert "newembed" in families() and family("newembed").default_source == "org/new"
        # Both loaded: a request naming no model still gets the surface's default family, whatever the order.
        registry = Registry({
            name: ModelInfo.of(name, True, {"family": fam_name, "task": "embed_image", "role": "client"})
            for name, fam_name in (("aaa_newembed_embed_image", "newembed"), ("siglip_embed_image", "siglip"))
        })
        assert registry.find("embed_image", None).name == "siglip_embed_image"
        assert registry.find("embed_image", "newembed").name == "aaa_newembed_embed_image"
        del registry.models["siglip_embed_image"]
        assert registry.find("embed_image", None).name == "aaa_newembed_embed_image"  # the only one loaded
    finally:
        monkeypatch.undo()
        families.cache_clear()
        sys.modules.pop("vlmserve.families.zz_newembed", None)
    assert "newembed" not in families()


def test_spec_rejects_unknown_surfaces_and_foreign_defaults() -> None:
    with pytest.raises(ValueError, match="unknown surfaces"):
        FamilySpec("x", "X", ("speech",), "o/x", "vlmserve.export.siglip", EmbedParams)
    with pytest.raises(ValueError, match="default_for"):
        FamilySpec("x", "X", ("embeddings",), "o/x", "vlmserve.export.siglip", EmbedParams, default_for=("chat",))


def test_contract_round_trips_through_triton_strings() -> None:
    tasks = json.dumps([{"name": "caption", "token": "<CAPTION>"}])
    written = FlorenceParams(family="florence2", source_model="m", weights="random", task="florence2",
                             num_beams_limit=4, tasks=tasks).to_triton()
    assert all(isinstance(v, str) for v in written.values())
    assert written["num_beams_limit"] == "4" and written["default_num_beams"] == "3"  # knobs always written
    assert "runtime" not in written  # common keys only when set: their defaults live in the contract
    read = FlorenceParams.from_triton(written)
    assert read.num_beams_limit == 4 and read.tasks is not None and read.tasks[0].token == "<CAPTION>"
    chat = ChatParams.from_triton({"family": "smolvlm2", "supports_video": "false", "video_fps": "2.5"})
    assert (chat.supports_video, chat.video_fps, chat.task) == (False, 2.5, "chat")
    assert chat.max_new_tokens_limit == MAX_NEW_TOKENS_LIMIT
    assert ChatParams.from_triton(ChatParams(family="q", supports_video=False).to_triton()).supports_video is False


@pytest.mark.parametrize(("params", "key"), [
    ({"max_batch": "0"}, "max_batch"),
    ({"video_fps": "fast"}, "video_fps"),
    ({"weights": "maybe"}, "weights"),
    ({"gpu_memory_fraction": "1.5"}, "gpu_memory_fraction"),
])
def test_a_config_that_breaks_the_contract_fails_loading_naming_the_key(params: dict[str, str], key: str) -> None:
    config = {"name": "m", "parameters": {k: {"string_value": v} for k, v in {"family": "x", **params}.items()}}
    with pytest.raises(ValueError, match=rf"model 'm': invalid parameters: {key}"):
        ChatParams.from_config(config)
