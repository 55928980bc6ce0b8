"""Locust users for ``vlmserve bench`` (one scenario per run, chosen by env and the user class name).

Kept apart from ``locustfile.py`` (the general suite): the bench needs exactly one request shape per run so
that vlmserve and the baseline see the same load.
"""

from __future__ import annotations

import base64
import json
import os
import random
import time

from locust import HttpUser, User, constant, task

from vlmserve.export.photos import photo_jpeg as _photo
from vlmserve.families.tensors import EmbedImageTensors

MODEL = os.environ.get("VLMSERVE_BENCH_MODEL") or None
MAX_NEW_TOKENS = int(os.environ.get("VLMSERVE_BENCH_MAX_NEW_TOKENS", "32"))
CHAT_MODEL = os.environ.get("VLMSERVE_BENCH_MODEL") or "smolvlm2"
# Short prompt, one small wide image: SmolVLM2's processor rescales every image to a 2048 px longest edge and
# cuts 512 px tiles, so a 2:1 image costs 4x2 tiles + the global view (9 x 64 tokens), the least it can.
# VLMSERVE_BENCH_CHAT_IMAGE=none sends the prompt alone (decode-bound runs on small CPUs).
CHAT_IMAGE_SPEC = os.environ.get("VLMSERVE_BENCH_CHAT_IMAGE", "96x48")
CHAT_PROMPT = os.environ.get("VLMSERVE_BENCH_CHAT_PROMPT",
                             "Describe this picture in as much detail as you can, then tell a long story about it.")
TIMING_LOG = os.environ.get("VLMSERVE_BENCH_TIMING_LOG")
# Extra fields merged into every chat request body (JSON object), e.g. llama-server's {"ignore_eos": true}.
CHAT_EXTRA = json.loads(os.environ.get("VLMSERVE_BENCH_CHAT_EXTRA") or "{}")
# Staggered arrivals: mean of the exponential think time (s) a chat user waits before each request, the first
# included; 0 (default) is lockstep: every user sends its next request as soon as the last one ends.
THINK_S = float(os.environ.get("VLMSERVE_BENCH_THINK_S", "0"))
# Share of chat requests sent with a JSON-schema response_format (constrained decoding), mixed into the free ones.
STRUCTURED_SHARE = float(os.environ.get("VLMSERVE_BENCH_STRUCTURED_SHARE", "0"))
# No length bounds: like the free requests, structured ones run to max_tokens with random weights (the grammar
# masks every step, which is the cost measured).
STRUCTURED_FORMAT = {"type": "json_schema", "json_schema": {"name": "scene", "strict": True, "schema": {
    "type": "object",
    "properties": {"summary": {"type": "string"}, "objects": {"type": "array", "items": {"type": "string"}}},
    "required": ["summary", "objects"], "additionalProperties": False,
}}}


IMAGES = [_photo(w, h, i) for i, (w, h) in enumerate([(224, 224), (640, 480), (1024, 768), (800, 600)])]
B64 = [base64.b64encode(i).decode() for i in IMAGES]
CHAT_IMAGE = None if CHAT_IMAGE_SPEC == "none" else "data:image/jpeg;base64," + base64.b64encode(
    _photo(*(int(v) for v in CHAT_IMAGE_SPEC.split("x")), seed=7)).decode()


class EmbedUser(HttpUser):
    """One image per ``POST /embed`` (the SigLIP embedding service's call), as fast as answers come back."""

    wait_time = constant(0)

    @task
    def embed(self) -> None:
        body: dict = {"images": ["data:image/jpeg;base64," + random.choice(B64)]}
        if MODEL:
            body["model"] = MODEL
        with self.client.post("/embed", json=body, name="embed image", catch_response=True) as r:
            if r.status_code != 200 or len(r.json()) != 1:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")


class CaptionUser(HttpUser):
    """Florence-2 ``caption`` through the Florence-2 service's ``POST /infer``."""

    wait_time = constant(0)

    @task
    def caption(self) -> None:
        # A data URI: unambiguous for both servers (bare JPEG base64 starts with "/9j/", which looks like a path).
        body = {"image_base64": "data:image/jpeg;base64," + random.choice(B64), "task": "caption",
                "max_new_tokens": MAX_NEW_TOKENS}
        with self.client.post("/infer", json=body, name="caption", catch_response=True) as r:
            if r.status_code != 200 or "text" not in r.json():
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            timing = r.json().get("timing")
            if TIMING_LOG and timing:
                with open(TIMING_LOG, "a") as f:
                    f.write(json.dumps(timing) + "\n")


class DirectEmbedUser(User):
    """The same image embedding straight to Triton (tritonclient HTTP, binary tensors): gateway overhead."""

    wait_time = constant(0)

    def on_start(self) -> None:
        import tritonclient.http as th

        self.th = th
        self.triton = th.InferenceServerClient(self.host.removeprefix("http://"))
        self.model = os.environ.get("VLMSERVE_BENCH_TRITON_MODEL", "siglip_embed_image")

    @task
    def embed(self) -> None:
        item = self.th.InferInput(EmbedImageTensors.IMAGE.name, [1, 1], "BYTES")
        item.set_data_from_numpy(EmbedImageTensors.IMAGE.pack([random.choice(IMAGES)]))
        start = time.perf_counter()
        exception = None
        try:
            out = self.triton.infer(self.model, [item]).as_numpy(EmbedImageTensors.EMBEDDING.name)
            if out.shape[0] != 1:
                raise ValueError(f"unexpected shape {out.shape}")
        except Exception as exc:  # noqa: BLE001 - any failure is a failed request for Locust
            exception = exc
        self.environment.events.request.fire(
            request_type="triton", name="embed image (direct)", response_time=(time.perf_counter() - start) * 1000,
            response_length=0, exception=exception, context={},
        )


def chat_wait_time(think_s: float):
    """Locust ``wait_time`` for ChatUser: none (lockstep) or exponential with mean ``think_s`` (staggered)."""
    if think_s <= 0:
        return constant(0)
    return lambda _user: random.expovariate(1 / think_s)


class ChatUser(HttpUser):
    """Streaming OpenAI chat completion (one small image + a short prompt, greedy, ``max_tokens`` from
    ``VLMSERVE_BENCH_MAX_NEW_TOKENS``), against the gateway or the baseline's ``/v1/chat/completions``.
    Env: ``VLMSERVE_BENCH_MODEL`` (default smolvlm2), ``VLMSERVE_BENCH_CHAT_IMAGE`` (``WxH``, default 96x48, or
    ``none``), ``VLMSERVE_BENCH_CHAT_PROMPT``, ``VLMSERVE_BENCH_CHAT_EXTRA`` (JSON merged into the body),
    ``VLMSERVE_BENCH_THINK_S`` (staggered: exponential think time of that mean before each request, the first
    included, so each user's requests arrive as a Poisson process while it waits; 0: lockstep).

    Rows it writes to Locust's stats (``--csv``; read them by name, the ``Aggregated`` row mixes them):

    - ``chat completion`` (POST): whole request, first byte sent to ``[DONE]``; failures land here;
    - ``chat TTFT`` (METRIC): send -> first non-empty content delta, ms;
    - ``chat ITL`` (METRIC): per request, (last content delta - first) / (completion_tokens - 1), ms;
    - ``chat tokens`` (METRIC): response_length = completion_tokens, so Request Count x Average Content Size
      is all output tokens (divide by the run time for output tokens/s);
    - ``chat deltas`` (METRIC): response_length = non-empty content deltas of the stream (tokens are counted
      from ``usage.completion_tokens`` for every server; this row shows how each one chunks them);
    - ``chat stopped early`` (METRIC): fired when a request ended before ``max_tokens`` (EOS), which would make
      token counts differ between servers; with random perf weights it should stay empty (a structured answer
      may end early when its JSON document is complete);
    - ``chat structured`` (METRIC): one per request sent with ``response_format`` (``VLMSERVE_BENCH_STRUCTURED_SHARE``
      of them, spread evenly); its answer must open a JSON object and, when it ended by ``stop``, parse, else
      the request counts as failed.

    vlmserve and the torch baseline have no ``ignore_eos``; random weights over a 49280-token vocabulary almost
    never pick EOS, so greedy answers run to ``max_tokens`` (``chat stopped early`` counts the exceptions).
    llama-server gets ``ignore_eos`` through ``VLMSERVE_BENCH_CHAT_EXTRA``.
    """

    wait_time = chat_wait_time(THINK_S)

    def on_start(self) -> None:
        self.structured_credit = 1.0 - STRUCTURED_SHARE if STRUCTURED_SHARE > 0 else 0.0  # first one: structured
        if THINK_S > 0:
            time.sleep(random.expovariate(1 / THINK_S))  # staggered from the first request on

    def _metric(self, name: str, value: float, length: int = 0) -> None:
        self.environment.events.request.fire(request_type="METRIC", name=name, response_time=value,
                                             response_length=length, exception=None, context={})

    @task
    def chat(self) -> None:
        body = {
            "model": CHAT_MODEL, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": MAX_NEW_TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": CHAT_PROMPT}]}],
        }
        if CHAT_IMAGE:
            body["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": CHAT_IMAGE}})
        body.update(CHAT_EXTRA)
        self.structured_credit += STRUCTURED_SHARE
        structured = self.structured_credit >= 1
        if structured:
            self.structured_credit -= 1
            body["response_format"] = STRUCTURED_FORMAT
        start = time.perf_counter()
        first = last = None
        usage = None
        finish = None
        received = 0
        deltas = 0
        text: list[str] = []
        with self.client.post("/v1/chat/completions", json=body, name="chat completion", stream=True,
                              catch_response=True) as r:
            try:
                if r.status_code != 200:
                    r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                    return
                done = False
                for line in r.iter_lines(decode_unicode=True):
                    received += len(line) + 1
                    if not line or not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        r.failure(f"stream error: {event['error'].get('message')}")
                        return
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        if choice.get("delta", {}).get("content"):
                            last = time.perf_counter()
                            first = first or last
                            deltas += 1
                            text.append(choice["delta"]["content"])
                        finish = choice.get("finish_reason") or finish
                if not done or usage is None or first is None:
                    r.failure(f"incomplete stream (done={done}, usage={usage is not None}, text={first is not None})")
                    return
                if structured and not _json_answer_ok("".join(text), finish):
                    r.failure(f"structured answer is not JSON: {''.join(text)[:120]!r}")
                    return
            finally:
                # Locust timed the headers only (stream=True): report the whole answer.
                r.request_meta["response_time"] = (time.perf_counter() - start) * 1000
                r.request_meta["response_length"] = received
        tokens = int(usage["completion_tokens"])
        self._metric("chat TTFT", (first - start) * 1000)
        if tokens > 1:
            self._metric("chat ITL", (last - first) * 1000 / (tokens - 1))
        self._metric("chat tokens", 0, tokens)
        self._metric("chat deltas", 0, deltas)
        if tokens < MAX_NEW_TOKENS or finish != "length":
            self._metric("chat stopped early", 0, tokens)
        if structured:
            self._metric("chat structured", 0, tokens)


def _json_answer_ok(text: str, finish: str | None) -> bool:
    """A constrained answer opens an object; when it ended by itself (not cut by max_tokens) it parses."""
    if not text.startswith("{"):
        return False
    if finish != "stop":
        return True
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
