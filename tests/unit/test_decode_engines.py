"""The decode engines a chat model may run: one table (``chat_engine.ENGINES``), read from the config's
``chat_engine`` when the model loads; an unknown name fails the load, naming the known engines."""

from __future__ import annotations

import pytest

from tests.unit.test_chat_model import chat_model, fake_pb  # noqa: F401 (fixtures)
from vlmserve.families.contract import ChatParams
from vlmserve.model_repository.chat_engine import ENGINES, DecodeLoop, decode_loop, engine_class


def test_the_table_names_each_engine_s_loop_and_imports_the_heavy_one_on_use() -> None:
    from vlmserve.model_repository.llamacpp_engine import LlamaCppLoop

    assert set(ENGINES) == {"torch", "llamacpp"}
    assert isinstance(ENGINES["llamacpp"], str)  # a "module:Class" string: imported only when chosen
    assert engine_class("torch") is DecodeLoop
    assert engine_class("llamacpp") is LlamaCppLoop
    assert all(issubclass(engine_class(name), DecodeLoop) for name in ENGINES)


def test_an_unknown_engine_fails_loading_and_names_the_known_ones(fake_pb, tmp_path) -> None:  # noqa: F811
    # Refused before the checkpoint is read (there is none here): the config's chat_engine is checked first.
    with pytest.raises(ValueError, match=r"qwen2vl: chat_engine 'vllm' is not a decode engine; the known engines "
                                         r"are llamacpp, torch"):
        chat_model(tmp_path, tmp_path / "no-checkpoint", chat_engine="vllm")


def test_an_unknown_engine_is_refused_for_a_static_pipeline_too(tmp_path) -> None:
    with pytest.raises(ValueError, match="known engines are llamacpp, torch"):
        decode_loop(object(), ChatParams(family="deepseek_ocr", chat_engine="vllm"), tmp_path)
    assert decode_loop(object(), ChatParams(family="deepseek_ocr"), tmp_path) == (None, "static")
