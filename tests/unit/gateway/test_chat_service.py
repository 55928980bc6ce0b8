"""The chat service's own logic, engine-free: the models' typed limits, the generation parameters a request becomes
(checked once, here), OCR prompts, boxes and crops."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from PIL import Image

from tests.unit.gateway.chat_support import HEIGHT, MP4, QWEN, RED_BOX, SMOL, WIDTH, png_bytes
from vlmserve.api.openai import ChatCompletionRequest, CompletionRequest, RequestRejected
from vlmserve.families.contract import MAX_NEW_TOKENS_LIMIT, ChatParams
from vlmserve.gateway.chat import crop_region, ocr_prompt, parse_box
from vlmserve.gateway.engines import ModelInfo
from vlmserve.gateway.errors import APIError
from vlmserve.gateway.media import video_container


def test_chat_limits_come_from_the_model_params() -> None:
    limits = ModelInfo.of("smolvlm2", True, SMOL).contract(ChatParams)
    assert (limits.max_new_tokens_limit, limits.default_max_new_tokens, limits.supports_video,
            limits.max_video_frames, limits.max_images) == (64, 16, True, 4, 16)
    assert ModelInfo.of("qwen2vl", True, QWEN).contract(ChatParams).supports_video is False
    # The contract's defaults fill what a config leaves out; a config that breaks it is listed not ready with the
    # reason, and a 502 when used, not a guess.
    bare = ModelInfo.of("m", True, {"family": "x", "task": "chat"})
    assert bare.contract(ChatParams).max_new_tokens_limit == MAX_NEW_TOKENS_LIMIT
    broken = ModelInfo.of("m", True, {**SMOL, "max_images": "0"})
    assert not broken.ready and broken.params is None and broken.problem and "max_images" in broken.problem
    with pytest.raises(APIError) as err:
        broken.contract(ChatParams)
    assert err.value.status == 502 and err.value.code == "bad_model_config" and "max_images" in err.value.message
    # Another task's model is not a chat model: its parameters are the common ones.
    encoder = ModelInfo.of("enc", True, {"family": "smolvlm2", "role": "encoder"})
    assert encoder.ready and type(encoder.params).__name__ == "ModelParams"
    with pytest.raises(APIError):
        encoder.contract(ChatParams)


SMOL_LIMITS = ModelInfo.of("smolvlm2", True, SMOL).contract(ChatParams)


def _chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_a_chat_request_becomes_the_models_generation_parameters() -> None:
    params = _chat().to_generation_parameters(SMOL_LIMITS)
    # Nothing set: the model's defaults (max_tokens: its default_max_new_tokens, lowered to the context left).
    assert params.model_dump(exclude_defaults=True) == {}
    params = _chat(max_completion_tokens=9, stop="\n", seed=3, n=2, logprobs=True, top_logprobs=2, video_fps=2,
                   video_max_frames=4, response_format={"type": "json_object"}).to_generation_parameters(SMOL_LIMITS)
    assert params.model_dump(exclude_defaults=True) == {
        "max_tokens": 9, "stop": ["\n"], "seed": 3, "n": 2, "logprobs": True, "top_logprobs": 2, "video_fps": 2.0,
        "video_max_frames": 4, "response_format": {"type": "json_object"}}


@pytest.mark.parametrize(("fields", "param", "needle"), [
    ({"max_tokens": 65}, "max_tokens", "max_tokens must be 1..64 for this model, got 65"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be 1..64"),
    ({"max_completion_tokens": 65}, "max_completion_tokens", "must be 1..64"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "disagree"),
    ({"n": 8}, "n", "n must be 1..4 for this model"),
    ({"video_max_frames": 5}, "video_max_frames", "1..4"),
    ({"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
    ({"tools": [{"type": "function"}]}, "tools", "tool calling"),
])
def test_the_models_limits_are_checked_once_when_the_request_converts(fields, param, needle) -> None:
    limits = ModelInfo.of("smolvlm2", True, {**SMOL, "max_batch": "4"}).contract(ChatParams)
    with pytest.raises(RequestRejected) as err:
        _chat(**fields).to_generation_parameters(limits)
    assert err.value.param == param and needle in err.value.message


def test_a_completion_request_becomes_the_models_generation_parameters() -> None:
    request = CompletionRequest.model_validate({"prompt": "x", "logprobs": 2, "seed": 1})
    assert request.to_generation_parameters(SMOL_LIMITS).model_dump(exclude_defaults=True) == {
        "max_tokens": 16, "seed": 1, "logprobs": True, "top_logprobs": 2}  # 16: OpenAI's default for completions
    with pytest.raises(RequestRejected, match="max_tokens must be 1..64"):
        CompletionRequest.model_validate({"prompt": "x", "max_tokens": 100}).to_generation_parameters(SMOL_LIMITS)


def test_ocr_prompt_adds_a_language_hint_unless_auto() -> None:
    assert ocr_prompt("auto") == ocr_prompt(None) == ocr_prompt("") == \
        "Extract all text from this image. Return only the text, no commentary."
    assert ocr_prompt("russian").endswith("The text is in russian.")


def test_video_container_sniffs_mp4_and_webm() -> None:
    assert video_container(MP4) == "mp4"
    # The EBML header FFmpeg writes for WebM (doctype "webm"); more containers in tests/unit/test_media.py.
    webm = b"\x1aE\xdf\xa3\x9fB\x86\x81\x01B\xf7\x81\x01B\xf2\x81\x04B\xf3\x81\x08B\x82\x84webm"
    assert video_container(webm) == "webm"
    assert video_container(png_bytes()) is None and video_container(b"") is None


@pytest.mark.parametrize(("box", "expected"), [
    ("10,5,30,25", (10.0, 5.0, 30.0, 25.0)),
    (" 0 , 0 , 64 , 48 ", (0.0, 0.0, 64.0, 48.0)),
    ("1.5,2,3.25,4", (1.5, 2.0, 3.25, 4.0)),
    ([1, 2, 3, 4], (1.0, 2.0, 3.0, 4.0)),
])
def test_parse_box_accepts_four_numbers_inside_the_image(box: Any, expected: tuple[float, ...]) -> None:
    assert parse_box(box, (WIDTH, HEIGHT)) == expected


BAD_BOXES = [
    ("1,2,3", "exactly four values, got 3"),
    ("1,2,3,4,5", "exactly four values, got 5"),
    ("", "exactly four values, got 0"),
    ("1 2 3 4", "exactly four values, got 1"),
    ("a,2,3,4", "x1='a' is not a number"),
    ("1,,3,4", "y1='' is not a number"),
    ("1,2,3e1,4", "x2='3e1' is not a number"),
    ("1,2,3,nan", "y2='nan' is not a number"),
    ("30,5,10,25", "x1 must be less than x2"),
    ("10,10,30,10", "y1 must be less than y2"),
    ("-1,5,30,25", "x1=-1 is outside 0..64"),
    ("10,5,65,25", "x2=65 is outside 0..64"),
    ("10,5,30,49", "y2=49 is outside 0..48"),
    ([1, 2, 3], "exactly four values, got 3"),
    ([1, 2, "3", 4], "x2='3' is not a number"),
    (12, "box must be a string"),
]


@pytest.mark.parametrize(("box", "rule"), BAD_BOXES)
def test_parse_box_names_the_rule_that_failed(box: Any, rule: str) -> None:
    with pytest.raises(APIError) as info:
        parse_box(box, (WIDTH, HEIGHT))
    assert info.value.status == 422 and info.value.param == "box"
    assert rule in info.value.message


def test_crop_region_keeps_the_box_and_enlarges_small_crops() -> None:
    crop = Image.open(io.BytesIO(crop_region(png_bytes(red_box=RED_BOX), (10, 5, 30, 25))))
    assert crop.format == "PNG" and crop.size == (64, 64)
    assert crop.convert("RGB").getpixel((32, 32)) == (255, 0, 0)
    thin = Image.open(io.BytesIO(crop_region(png_bytes(), (0.2, 0, 0.4, 48))))
    assert min(thin.size) >= 64  # a sub-pixel-wide box still yields an image a vision processor accepts


# --- TritonBackend.stream (gRPC streaming) with a fake call ----------------------------------------------


@pytest.mark.parametrize("text", ["1,2,30,40", " 1.5 , 2 ,30.,40.25", "+1,2,3,4", "1,2,3", "a,b,c,d", "1e1,2,3,4",
                                  "1,2,3,4,", "", "1;2;3;4"])
def test_the_schema_box_pattern_is_the_rule_parse_box_applies(text: str) -> None:
    """The OpenAPI schema's pattern for a box (vlmserve.gateway.chat.BOX_PATTERN) accepts exactly the strings parse_box
    reads as four numbers (their order and the image bounds are checked after, and the schema says so)."""
    from vlmserve.gateway.chat import BOX_PATTERN

    try:
        parse_box(text, (10_000, 10_000))
        parsed = True
    except APIError as exc:
        parsed = "exactly four values" not in exc.message and "is not a number" not in exc.message
    assert (re.fullmatch(BOX_PATTERN, text) is not None) == parsed
