"""The client-facing tensors: every exported config declares exactly its spec (``vlmserve/families/tensors.py``), so
a spec and a config cannot drift apart; ``pack`` builds the rows a Triton client sends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from vlmserve.export.repository import EMBEDDED_CONFIG
from vlmserve.families.tensors import ChatTensors, EmbedImageTensors, EmbedTextTensors, FlorenceTensors, TensorSpec

# What the gateway routes on (the config's ``task`` parameter) -> the tensors of that kind of model.
BY_TASK = {"embed_image": EmbedImageTensors, "embed_text": EmbedTextTensors, "florence2": FlorenceTensors,
           "chat": ChatTensors}
# The client-facing models of the tiny export: each must be found and checked.
TINY_CLIENTS = {"siglip_embed_image", "siglip_embed_text", "siglip2_embed_image", "siglip2_embed_text", "florence2",
                "smolvlm2", "qwen2vl"}


def _client_configs(repo: Path) -> list[tuple[Path, model_config_pb2.ModelConfig]]:
    """Every client-facing config of ``repo`` (native ``config.pbtxt`` and the embedded variant), parsed."""
    paths = sorted([*repo.glob("*/config.pbtxt"), *repo.glob(f"*/configs/{EMBEDDED_CONFIG}.pbtxt")])
    configs = [(p, text_format.Parse(p.read_text(), model_config_pb2.ModelConfig())) for p in paths]
    return [(p, c) for p, c in configs if c.parameters["role"].string_value == "client"]


def _declared(entries) -> list[tuple[str, str, list[int], bool]]:
    """A config's ``input``/``output`` entries as (name, data type, dims, optional); outputs have no ``optional``
    field (always False: a spec's output marked optional cannot match)."""
    return [(e.name, model_config_pb2.DataType.Name(e.data_type), list(e.dims), getattr(e, "optional", False))
            for e in entries]


def _expected(specs: tuple[TensorSpec, ...], width: int) -> list[tuple[str, str, list[int], bool]]:
    """The specs as a config must declare them, in order: a ``-1`` dim is the model's embedding width."""
    return [(s.name, s.dtype, [width if d == -1 else d for d in s.dims], s.optional) for s in specs]


def assert_client_tensors(repo: Path) -> dict[str, int]:
    """Every client-facing model of an exported ``repo`` declares exactly the tensors of its kind (by its ``task``
    parameter); returns how many configs of each model were checked."""
    checked: dict[str, int] = {}
    for path, config in _client_configs(repo):
        task = config.parameters["task"].string_value
        assert task in BY_TASK, f"{path}: client-facing model with task {task!r} has no declared tensors"
        tensors = BY_TASK[task]
        width = 0
        if task.startswith("embed_"):
            width = int(config.parameters["embedding_dim"].string_value)  # the encoder's output width
            assert width > 0, path
        assert _declared(config.input) == _expected(tensors.inputs, width), path
        assert _declared(config.output) == _expected(tensors.outputs, width), path
        checked[config.name] = checked.get(config.name, 0) + 1
    return checked


def test_every_client_model_of_the_tiny_export_declares_exactly_its_tensors(tiny_repo: Path) -> None:
    # Both flavours (native and embedded) of every client-facing model were checked.
    assert assert_client_tensors(tiny_repo) == dict.fromkeys(TINY_CLIENTS, 2)


def test_a_drifted_config_is_caught() -> None:
    """The comparison above fails on any difference: name, type, dims or optional."""
    image = EmbedImageTensors.IMAGE.name

    def declared(entry: str) -> list[tuple[str, str, list[int], bool]]:
        return _declared(text_format.Parse(f"input {{ {entry} }}", model_config_pb2.ModelConfig()).input)

    assert declared(f'name: "{image}" data_type: TYPE_STRING dims: 1') == _expected(EmbedImageTensors.inputs, 0)
    for drifted in (f'name: "{image}S" data_type: TYPE_STRING dims: 1',
                    f'name: "{image}" data_type: TYPE_UINT8 dims: 1',
                    f'name: "{image}" data_type: TYPE_STRING dims: 1 dims: 1',
                    f'name: "{image}" data_type: TYPE_STRING dims: 1 optional: true'):
        assert declared(drifted) != _expected(EmbedImageTensors.inputs, 0), drifted


def test_config_entries_parse_into_triton_model_config() -> None:
    """``TensorSpec.config`` is a valid ``ModelConfig`` entry (data type by name), ``-1`` filled by ``dims``."""
    from vlmserve.export import pbtxt

    config = pbtxt.message({"name": "m", "input": [t.config() for t in FlorenceTensors.inputs],
                            "output": [EmbedTextTensors.EMBEDDING.config([768]), EmbedTextTensors.NUM_TOKENS.config()]})
    assert [(i.name, i.optional) for i in config.input] == [(t.name, t.optional) for t in FlorenceTensors.inputs]
    assert [i.optional for i in config.input] == [False, False, True, True, True]
    assert model_config_pb2.DataType.Name(config.input[3].data_type) == "TYPE_INT32"
    assert [list(o.dims) for o in config.output] == [[768], [1]]
    assert EmbedTextTensors.EMBEDDING.dims == (-1,)  # the spec itself is untouched


@pytest.mark.parametrize(("spec", "values", "expected"), [
    (EmbedImageTensors.IMAGE, [b"\x89PNG", b"\xff\xd8"], [[b"\x89PNG"], [b"\xff\xd8"]]),
    (EmbedTextTensors.TEXT, ["a cat", "ünï ✓"], [[b"a cat"], ["ünï ✓".encode()]]),
    (ChatTensors.PARAMETERS, ['{"max_tokens": 2}'], [[b'{"max_tokens": 2}']]),
    (FlorenceTensors.MAX_NEW_TOKENS, [4, 7, 1], [[4], [7], [1]]),
])
def test_pack_builds_rows_of_the_spec_dtype(spec: TensorSpec, values: list, expected: list) -> None:
    packed = spec.pack(values)
    assert packed.shape == (len(values), 1)
    assert packed.dtype == np.dtype(spec.numpy_dtype)
    assert packed.tolist() == expected
    if spec.dtype == "TYPE_STRING":
        assert packed.dtype == np.object_ and all(isinstance(v, bytes) for v in packed.ravel())
    else:
        assert packed.dtype == np.int32


def test_numpy_dtypes_follow_the_triton_types() -> None:
    assert EmbedImageTensors.EMBEDDING.numpy_dtype is np.float32
    assert EmbedTextTensors.NUM_TOKENS.numpy_dtype is np.int32 and ChatTensors.INDEX.numpy_dtype is np.int32
    assert FlorenceTensors.RESULT.numpy_dtype is np.object_


def test_the_wire_names_are_the_published_contract() -> None:
    """Triton direct clients (docs/triton.md, README) spell these names: renaming one breaks them. This is the one
    place besides the specs where they are written out."""
    published = {
        EmbedImageTensors: (["IMAGE"], ["EMBEDDING"]),
        EmbedTextTensors: (["TEXT"], ["EMBEDDING", "NUM_TOKENS"]),
        FlorenceTensors: (["IMAGE", "TASK", "TEXT", "MAX_NEW_TOKENS", "NUM_BEAMS"], ["RESULT"]),
        ChatTensors: (["MESSAGES", "PROMPT", "PARAMETERS"], ["TEXT", "FINISH_REASON", "USAGE", "INDEX", "LOGPROBS"]),
    }
    for tensors, (inputs, outputs) in published.items():
        assert [t.name for t in tensors.inputs] == inputs and tensors.output_names() == outputs
        assert tensors.input_names() == set(inputs)
