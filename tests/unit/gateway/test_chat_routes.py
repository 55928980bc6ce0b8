"""The OpenAI chat routes (/v1/chat/completions, /v1/completions, /v1/models) against the typed fake engine: what
the gateway asks the engine for (conversation, GenerationParameters) and how answers come back (whole, SSE)."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest

from tests.unit.gateway.chat_support import (
    MP4,
    USAGE,
    chat_backend,
    data_uri,
    error,
    image_part,
    png_bytes,
    resp,
    sse_events,
    text,
    user,
    video_part,
)
from vlmserve.gateway.errors import APIError

# --- /v1/chat/completions: request translation ---------------------------------------------------------------


def test_image_data_uri_becomes_a_base64_image_part(make_client) -> None:
    client, backend = make_client()
    png = png_bytes()
    r = client.post("/v1/chat/completions", json={
        "model": "vlmserve/tiny-smolvlm2",
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [text("what is this?"), image_part(data_uri(png))]}],
    })
    assert r.status_code == 200, r.text
    call = backend.calls[0]
    assert call.model == "smolvlm2" and call.sent == {}  # nothing set: the model's defaults
    assert call.messages[0] == {"role": "system", "content": "be brief"}
    assert call.messages[1]["content"][0] == {"type": "text", "text": "what is this?"}
    part = call.messages[1]["content"][1]
    assert part["type"] == "image" and base64.b64decode(part["data"], validate=True) == png


def test_model_is_matched_by_source_family_or_triton_name(make_client) -> None:
    client, backend = make_client()
    for name, served in [("vlmserve/tiny-qwen2vl", "qwen2vl"), ("smolvlm2", "smolvlm2"), (None, "qwen2vl")]:
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
        if name:
            body["model"] = name
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and backend.calls[-1].model == served
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    assert error(r)["code"] == "model_not_found" and error(r)["type"] == "not_found_error"
    assert "vlmserve/tiny-smolvlm2" in error(r)["message"] and "vlmserve/tiny-qwen2vl" in error(r)["message"]


def test_loopback_image_url_is_refused_unless_allowlisted(make_client, png_server: str) -> None:
    body = {"model": "smolvlm2", "messages": user(text("hi"), image_part(f"{png_server}/a.png"))}
    client, backend = make_client()
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "loopback" in error(r)["message"]
    assert error(r)["param"] == "messages[0].content[1].image_url.url" and not backend.calls
    client, backend = make_client(url_allowlist=["127.0.0.1"])
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert base64.b64decode(backend.calls[0].messages[0]["content"][1]["data"]) == png_bytes()


def test_video_part_data_uri_and_url(make_client, png_server: str) -> None:
    client, backend = make_client(url_allowlist=["127.0.0.1"])
    r = client.post("/v1/chat/completions", json={
        "model": "smolvlm2", "messages": user(video_part(data_uri(MP4, "video/mp4")), text("describe")),
        "video_fps": 2, "video_max_frames": 4})
    assert r.status_code == 200, r.text
    part = backend.calls[0].messages[0]["content"][0]
    assert part["type"] == "video" and base64.b64decode(part["data"]) == MP4
    assert backend.calls[0].sent == {"video_fps": 2.0, "video_max_frames": 4}
    r = client.post("/v1/chat/completions",
                    json={"model": "smolvlm2", "messages": user(video_part(f"{png_server}/v.mp4"))})
    assert r.status_code == 200 and base64.b64decode(backend.calls[1].messages[0]["content"][0]["data"]) == MP4


def test_video_is_refused_by_models_without_video(make_client) -> None:
    client, backend = make_client()
    r = client.post("/v1/chat/completions", json={"model": "qwen2vl",  # supports_video: false
                                                  "messages": user(video_part(data_uri(MP4, "video/mp4")))})
    assert r.status_code == 400 and "does not accept video" in error(r)["message"]
    assert error(r)["code"] == "video_not_supported" and not backend.calls


def test_bad_videos_are_refused(make_client) -> None:
    client, backend = make_client(max_video_bytes=50)
    cases = [
        (data_uri(MP4, "video/mp4"), 413, "max_video_bytes"),
        (data_uri(MP4, "image/png"), 415, "not a video"),
        (data_uri(b"plain bytes here", "video/mp4"), 415, "not a supported video"),
        ("http://127.0.0.1:9/v.mp4", 400, "video URL host '127.0.0.1' resolves to a loopback address"),
        ("ftp://example.com/v.mp4", 400, "unsupported video reference"),
    ]
    for url, status, needle in cases:
        r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": user(video_part(url))})
        assert r.status_code == status, (url, r.text)
        assert needle in error(r)["message"] and error(r)["param"] == "messages[0].content[0].video_url.url"
    assert not backend.calls


def test_sampling_settings_become_the_parameters_json(make_client) -> None:
    client, backend = make_client()
    r = client.post("/v1/chat/completions", json={
        "model": "smolvlm2", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": "\n\n", "seed": 42, "n": 1, "user": "u1"})
    assert r.status_code == 200, r.text
    assert backend.calls[0].sent == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": ["\n\n"],
                                           "seed": 42}
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": [{"role": "user", "content": "x"}],
                                                   "max_completion_tokens": 9, "stop": ["a", "b"]})
    assert r.status_code == 200 and backend.calls[1].sent == {"max_tokens": 9, "stop": ["a", "b"]}


@pytest.mark.parametrize(("extra", "param", "needle"), [
    ({"max_tokens": 65}, "max_tokens", "max_tokens must be 1..64"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be 1..64"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "disagree"),
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": [""]}, "stop", "at least 1 character"),
    ({"n": 9}, "n", "less than or equal to 8"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"top_logprobs": 3}, "top_logprobs", "needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tool calling"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "'xml'"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "Field required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
     "response_format.json_schema.schema", "valid dictionary"),
    ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"video_max_frames": 5}, "video_max_frames", "1..4"),
    ({"video_fps": 0}, "video_fps", "greater than 0"),
])
def test_bad_settings_are_400_naming_the_field(make_client, extra, param, needle) -> None:
    client, backend = make_client()
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2",
                                                  "messages": [{"role": "user", "content": "hi"}], **extra})
    assert r.status_code == 400, r.text
    assert error(r)["param"] == param and needle in error(r)["message"]
    assert error(r)["type"] == "invalid_request_error" and not backend.calls


BAD_PNG = data_uri(b"\x89PNG\r\n\x1a\nnot really a png")


@pytest.mark.parametrize(("messages", "status", "param", "needle"), [
    ([], 400, "messages", "at least 1 item"),
    (["hi"], 400, "messages[0]", "valid dictionary or object"),
    ([{"role": "tool", "content": "x"}], 400, "messages[0].role", "'tool' found using 'role' does not match"),
    ([{"role": "user"}], 400, "messages[0].content", "Field required"),
    ([{"role": "user", "content": []}], 400, "messages[0].content", "at least 1 item"),
    ([{"role": "user", "content": 5}], 400, "messages[0].content", "string or a non-empty list of parts"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], 400,
     "messages[0].content[0].type", "'input_audio' found using 'type' does not match"),
    ([{"role": "user", "content": [{"text": "no type"}]}], 400, "messages[0].content[0].type",
     "Unable to extract tag"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], 400, "messages[0].content[0].text", "string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], 400,
     "messages[0].content[0].image_url.url", "Field required"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": " "}}]}], 400,
     "messages[0].content[0].image_url.url", "data URI or an http(s) URL"),
    ([{"role": "user", "content": [image_part(BAD_PNG)]}], 415, "messages[0].content[0].image_url.url",
     "not a decodable image"),
    ([{"role": "user", "content": [image_part("data:image/png;base64,@@@")]}], 400,
     "messages[0].content[0].image_url.url", "invalid base64"),
    ([{"role": "system", "content": [image_part(data_uri(png_bytes()))]}, {"role": "user", "content": "hi"}], 400,
     "messages[0].content[0]", "only accepted in user messages"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], 400, "messages[1].role",
     "last message"),
    ([{"role": "user", "content": [image_part("http://10.0.0.1/a.png")]}], 400,
     "messages[0].content[0].image_url.url", "private address"),
])
def test_bad_messages_are_4xx_naming_the_part(make_client, messages, status, param, needle) -> None:
    client, backend = make_client()
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": messages})
    assert r.status_code == status, r.text
    assert error(r)["param"] == param and needle in error(r)["message"], error(r)
    assert not backend.calls


def test_too_many_images_is_413(make_client) -> None:
    client, backend = make_client(max_images_per_request=2)
    parts = [image_part(data_uri(png_bytes())) for _ in range(3)]
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": user(*parts)})
    assert r.status_code == 413 and error(r)["code"] == "too_many_images" and "at most 2" in error(r)["message"]
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": user(*parts[:2])})
    assert r.status_code == 200


def test_triton_down_is_503_with_retry_after(make_client) -> None:
    client, _ = make_client(chat_backend(reachable=False))
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert error(r)["code"] == "triton_unavailable"


def test_api_key_is_required_when_configured(make_client) -> None:
    client, _ = make_client(api_keys=["k1"])
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 401
    assert client.get("/info").status_code == 401
    r = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k1"})
    assert r.status_code == 200


# --- /v1/chat/completions: answers ---------------------------------------------------------------------------


def test_non_streaming_answer_is_aggregated(make_client) -> None:
    client, _ = make_client()
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    body = r.json()
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"]) and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "vlmserve/tiny-smolvlm2"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello,  world  "},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


def test_streaming_answer_is_openai_sse(make_client) -> None:
    client, _ = make_client()
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "stream": True,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert all(c["model"] == "vlmserve/tiny-smolvlm2" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello,  world  "
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}


def test_streaming_usage_chunk_when_asked(make_client) -> None:
    client, _ = make_client()
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "stream": True,
                                                  "stream_options": {"include_usage": True},
                                                  "messages": [{"role": "user", "content": "hi"}]})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    assert all(e["usage"] is None for e in events[:-2])
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


def test_error_mid_stream_is_an_error_event_then_done(make_client) -> None:
    failure = APIError(502, "smolvlm2 failed: generation failed: boom", code="inference_failed")
    client, _ = make_client(chat_backend([resp("partial"), failure]))
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "stream": True,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2] == {"error": {"message": "smolvlm2 failed: generation failed: boom", "type": "api_error",
                                    "param": None, "code": "inference_failed",
                                    "request_id": r.headers["x-request-id"]}}
    assert events[1]["choices"][0]["delta"] == {"content": "partial"}
    # No chunk claims the answer finished.
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-2])


def test_stream_that_ends_without_finish_reason_is_an_error_event(make_client) -> None:
    client, _ = make_client(chat_backend([resp("a"), resp("b")]))
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "stream": True,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "without a finish reason" in events[-2]["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 502 and "without a finish reason" in error(r)["message"]


def test_error_before_the_first_token_is_a_plain_http_error(make_client) -> None:
    rejected = APIError(400, "messages[0].content[0]: not a decodable video", code="invalid_input")
    client, _ = make_client(chat_backend([rejected]))
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "stream": True,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert error(r)["message"] == "messages[0].content[0]: not a decodable video"


# --- the openai SDK and real disconnects (uvicorn) ---------------------------------------------------------


# --- issue 15: n, logprobs, penalties, response_format, /v1/completions, /v1/models/{id} ---------------------

LP_A = [{"token": "A", "logprob": -0.5, "bytes": [65],
         "top_logprobs": [{"token": "A", "logprob": -0.5, "bytes": [65]}]}]
LP_B = [{"token": "B", "logprob": -1.5, "bytes": [66],
         "top_logprobs": [{"token": "A", "logprob": -0.3, "bytes": [65]}]}]
TWO_CHOICES: list[Any] = [
    resp("A", index=0, logprobs=LP_A), resp("B", index=1, logprobs=LP_B), resp("", "length", index=1),
    resp("", "stop", {"prompt_tokens": 4, "completion_tokens": 2, "batch_size": 2}, index=0),
]


def test_new_settings_become_the_parameters_json(make_client) -> None:
    client, backend = make_client(chat_backend(TWO_CHOICES))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = client.post("/v1/chat/completions", json={
        "model": "smolvlm2", "messages": [{"role": "user", "content": "hi"}], "n": 2, "logprobs": True,
        "top_logprobs": 1, "presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}})
    assert r.status_code == 200, r.text
    assert backend.calls[0].sent == {
        "n": 2, "logprobs": True, "top_logprobs": 1, "presence_penalty": 0.5,
        "frequency_penalty": -0.25, "repetition_penalty": 1.2,
        "response_format": {"type": "json_schema", "schema": schema}}
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": [{"role": "user", "content": "x"}],
                                                   "response_format": {"type": "json_object"}, "n": 1})
    assert backend.calls[1].sent == {"response_format": {"type": "json_object"}}
    client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": [{"role": "user", "content": "x"}],
                                               "response_format": {"type": "text"}, "presence_penalty": 0})
    assert backend.calls[2].sent == {}  # text and zero penalties are the defaults


def test_n_choices_and_logprobs_are_aggregated(make_client) -> None:
    client, _ = make_client(chat_backend(TWO_CHOICES))
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": [{"role": "user", "content": "hi"}],
                                                   "n": 2, "logprobs": True, "top_logprobs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "A", "stop"), (1, "B", "length")]
    assert body["choices"][0]["logprobs"] == {"content": LP_A, "refusal": None}
    assert body["choices"][1]["logprobs"]["content"] == LP_B
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_n_choices_stream_per_index(make_client) -> None:
    client, _ = make_client(chat_backend(TWO_CHOICES))
    r = client.post("/v1/chat/completions", json={"model": "smolvlm2", "messages": [{"role": "user", "content": "hi"}],
                                                   "n": 2, "stream": True, "logprobs": True,
                                                   "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]
    by_index: dict[int, str] = {0: "", 1: ""}
    for c in chunks:
        by_index[c["choices"][0]["index"]] += c["choices"][0]["delta"].get("content", "")
    assert by_index == {0: "A", 1: "B"}
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"][0]["finish_reason"]}
    assert finishes == {0: "stop", 1: "length"}
    assert [c["choices"][0]["logprobs"]["content"] for c in chunks if c["choices"][0]["delta"].get("content")] == [
        LP_A, LP_B]
    assert events[-2]["usage"]["completion_tokens"] == 2 and events[-2]["choices"] == []


def test_completions_send_the_raw_prompt(make_client) -> None:
    client, backend = make_client(chat_backend([resp("Hel", logprobs=LP_A), resp("lo", "length", USAGE,
                                                                                  logprobs=LP_B)]))
    r = client.post("/v1/completions", json={"model": "qwen2vl", "prompt": "Once upon a time", "max_tokens": 5,
                                              "logprobs": 1, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "Hello" and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["logprobs"] == {"tokens": ["A", "B"], "token_logprobs": [-0.5, -1.5],
                                              "top_logprobs": [{"A": -0.5}, {"A": -0.3}], "text_offset": [0, 1]}
    assert backend.calls[0].prompt == "Once upon a time" and backend.calls[0].messages is None
    assert backend.calls[0].sent == {"max_tokens": 5, "seed": 3, "logprobs": True, "top_logprobs": 1}
    r = client.post("/v1/completions", json={"model": "qwen2vl", "prompt": "x"})
    assert backend.calls[1].sent == {"max_tokens": 16}  # OpenAI's default


def test_completions_list_of_prompts_and_streaming(make_client) -> None:
    client, backend = make_client(chat_backend([resp("ok", "stop", USAGE)]))
    r = client.post("/v1/completions", json={"model": "qwen2vl", "prompt": ["a", "b"]})
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1] and r.json()["usage"]["prompt_tokens"] == 22
    assert sorted(c.prompt for c in backend.calls) == ["a", "b"]
    r = client.post("/v1/completions", json={"model": "qwen2vl", "prompt": "a", "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[0]["object"] == "text_completion"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "ok"


@pytest.mark.parametrize(("extra", "param"), [
    ({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"), ({"logprobs": 6}, "logprobs"),
    ({"prompt": [1, 2]}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": ["a", "b"], "stream": True}, "stream"),
])
def test_completions_refusals(make_client, extra, param) -> None:
    client, backend = make_client()
    r = client.post("/v1/completions", json={"model": "qwen2vl", "prompt": "hi", **extra})
    assert r.status_code == 400 and error(r)["param"].startswith(param), r.text
    assert not backend.calls


def test_models_retrieve_by_id_alias_and_triton_name(make_client) -> None:
    client, _ = make_client()
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    for name, source in (("vlmserve/tiny-smolvlm2", "vlmserve/tiny-smolvlm2"), ("smolvlm2", "vlmserve/tiny-smolvlm2"),
                         ("siglip", "vlmserve/tiny-siglip"), ("siglip_embed_text", "vlmserve/tiny-siglip")):
        r = client.get(f"/v1/models/{name}")
        assert r.status_code == 200 and r.json() == listed[source], name
    r = client.get("/v1/models/gpt-9")
    assert r.status_code == 404 and error(r)["code"] == "model_not_found"
    assert "vlmserve/tiny-qwen2vl" in error(r)["message"]


def test_ocr_with_a_schema_answers_json(make_client) -> None:
    schema = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}
    client, backend = make_client(chat_backend([resp('{"total": 12.5}', "stop", USAGE)]))
    image = base64.b64encode(png_bytes()).decode()
    r = client.post("/ocr", json={"image": image, "schema": schema})
    assert r.status_code == 200, r.text
    assert r.json()["json"] == {"total": 12.5} and r.json()["finish_reason"] == "stop"
    assert backend.calls[0].sent["response_format"] == {"type": "json_schema", "schema": schema}
    assert json.dumps(schema) in backend.calls[0].messages[0]["content"][1]["text"]
    r = client.post("/v1/ocr", json={"image": image, "schema": schema})
    assert r.status_code == 200 and r.json()["json"] == {"total": 12.5}
    cut, _ = make_client(chat_backend([resp('{"total": 1', "length", USAGE)]))
    r = cut.post("/ocr", json={"image": image, "schema": schema})
    assert r.status_code == 200 and r.json()["json"] is None and r.json()["finish_reason"] == "length"
    plain = client.post("/ocr", json={"image": image})
    assert "json" not in plain.json()


def test_openapi_states_the_typed_openai_contract(make_client) -> None:
    client, _ = make_client()
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["items"]["discriminator"]["propertyName"] == "role"
    assert set(chat["messages"]["items"]["discriminator"]["mapping"]) == {"system", "developer", "user", "assistant"}
    assert {"n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
            "response_format"} <= set(chat)
    assert "CompletionRequest" in schemas and "/v1/models/{model_id}" in spec["paths"]
