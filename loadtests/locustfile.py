"""Locust suite for the vlmserve gateway: one HttpUser per API surface, every task tagged.

    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s --host http://127.0.0.1:8080 \\
        --csv loadtests/reports/run --html loadtests/reports/run.html --tags embeddings

User classes (weight overridable with ``VLMSERVE_LT_WEIGHT_<CLASS>``, e.g. ``VLMSERVE_LT_WEIGHT_CHATUSER=0``):

=============== ======= ========================================================================================
class           weight  tasks (request names) and tags
=============== ======= ========================================================================================
EmbeddingsUser  4       ``/embed`` [embeddings, embed], ``/embed_text`` [embeddings, embed_text],
                        ``/v1/embeddings [float]`` and ``/v1/embeddings [base64]`` [embeddings, v1_embeddings]
FlorenceUser    2       ``/infer [<task>]`` for each of VLMSERVE_LT_FLORENCE_TASKS, in turn [florence2, infer]
ChatUser        2       ``/v1/chat/completions`` [chat, chat_completions], ``/v1/chat/completions [stream]`` and
                        its time to first token ``chat ttft`` (type TTFT) [chat, chat_stream]
OcrUser         1       ``/ocr`` [ocr, ocr_seed], ``/v1/ocr`` [ocr, v1_ocr]
=============== ======= ========================================================================================

A request fails on a non-2xx status, on a body that is not JSON, and on a body that breaks the API's promise
(wrong number of vectors, vectors not unit length, wrong task or image size, an SSE stream without ``[DONE]``
or with an error event, ...). On exit, SLO gates set the exit code to 1 when the failure ratio is above
VLMSERVE_LT_MAX_FAIL_RATIO (default 0.01) or the p95 over all requests above VLMSERVE_LT_MAX_P95_MS (if set).
All settings: loadtests/README.md.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from locust import HttpUser, between, events, tag, task
from locust.runners import WorkerRunner
from payloads import (  # loadtests/ is on sys.path: Locust adds the locustfile's folder
    BadResponse,
    Config,
    EncodedImage,
    StreamResult,
    all_images,
    apply_chunk,
    chat_body,
    check_chat_completion,
    check_infer,
    check_ocr,
    check_openai_embeddings,
    check_stream_end,
    check_vectors,
    embed_body,
    embed_text_body,
    infer_body,
    ocr_body,
    parse_sse,
    pick_image,
    v1_embeddings_body,
    v1_ocr_body,
)

log = logging.getLogger("vlmserve.loadtest")

CONFIG = Config.from_env()
DEFAULT_HOST = "http://127.0.0.1:8080"  # `make demo`; --host (or LOCUST_HOST) overrides it
TTFT_TYPE = "TTFT"
TTFT_NAME = "chat ttft"

_user_ids = itertools.count()
_covered = itertools.count(1)  # users that finished their VLMSERVE_LT_COVER_FIRST pass


class GatewayUser(HttpUser):
    """Shared plumbing: API key, timeouts, a per-user seeded RNG, and JSON requests checked by a validator."""

    abstract = True
    host = DEFAULT_HOST
    wait_time = between(CONFIG.wait_min_s, CONFIG.wait_max_s)

    # How often the VLMSERVE_LT_COVER_FIRST pass runs each task (a task that rotates through variants needs more).
    cover_repeats = 1

    def on_start(self) -> None:
        self.rng = random.Random(CONFIG.seed * 7919 + next(_user_ids))
        if CONFIG.api_key:
            self.client.headers["Authorization"] = f"Bearer {CONFIG.api_key}"
        if CONFIG.cover_first:
            # Every task this user may run (after --tags/--exclude-tags) once, in order, before the weighted
            # random mix: short runs (smoke tests) then report every request name.
            for fn in dict.fromkeys(self.tasks):
                for _ in range(self.cover_repeats):
                    fn(self)  # type: ignore[operator]  # our tasks are plain functions, not TaskSets
            runner = self.environment.runner
            if CONFIG.stop_after_cover and runner is not None and next(_covered) >= runner.target_user_count:
                runner.quit()  # every user has covered its tasks: the stats are complete

    def post_json(self, name: str, path: str, body: dict[str, Any], check: Callable[[Any], None]) -> None:
        """POST ``body``; the request fails on a non-2xx status or when ``check(parsed_body)`` raises."""
        with self.client.post(path, json=body, name=name, timeout=CONFIG.timeout_s, catch_response=True) as resp:
            if not 200 <= resp.status_code < 300:
                resp.failure(_status_message(resp))
                return
            try:
                check(resp.json())
            except (BadResponse, ValueError) as exc:  # requests' JSONDecodeError is a ValueError
                resp.failure(f"malformed body: {exc}")
            else:
                resp.success()


def _status_message(resp: Any) -> str:
    """``HTTP 503: <the gateway's error message>`` (the gateway's errors are OpenAI-shaped)."""
    if not resp.status_code:  # no HTTP answer at all: Locust keeps the exception on the response
        error = getattr(resp, "error", None)
        return f"no response: {type(error).__name__}: {str(error)[:300]}" if error else "no response"
    detail = (resp.text or "")[:300]
    try:
        error = resp.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            detail = str(error["message"])[:300]
    except (ValueError, AttributeError):
        pass
    return f"HTTP {resp.status_code}: {detail}" if detail else f"HTTP {resp.status_code}"


# --- embeddings: /embed, /embed_text, /v1/embeddings --------------------------------------------------------


class EmbeddingsUser(GatewayUser):
    weight = CONFIG.weight("EmbeddingsUser", 4)

    @tag("embeddings", "embed")
    @task(2)
    def embed_images(self) -> None:
        body = embed_body(CONFIG, self.rng)
        self.post_json("/embed", "/embed", body, lambda r: check_vectors(r, len(body["images"])))

    @tag("embeddings", "embed_text")
    @task(2)
    def embed_texts(self) -> None:
        body = embed_text_body(CONFIG, self.rng)
        self.post_json("/embed_text", "/embed_text", body, lambda r: check_vectors(r, len(body["texts"])))

    @tag("embeddings", "v1_embeddings")
    @task(1)
    def v1_embeddings_float(self) -> None:
        self._v1("float")

    @tag("embeddings", "v1_embeddings")
    @task(1)
    def v1_embeddings_base64(self) -> None:
        self._v1("base64")

    def _v1(self, encoding_format: str) -> None:
        body = v1_embeddings_body(CONFIG, self.rng, encoding_format)
        self.post_json(f"/v1/embeddings [{encoding_format}]", "/v1/embeddings", body,
                       lambda r: check_openai_embeddings(r, len(body["input"]), encoding_format))


# --- Florence-2: /infer ------------------------------------------------------------------------------------

# Process-wide round robin over the configured tasks, so every task gets its share however few requests run.
_florence_turn = itertools.count()


class FlorenceUser(GatewayUser):
    weight = CONFIG.weight("FlorenceUser", 2)
    cover_repeats = len(CONFIG.florence_tasks)

    @tag("florence2", "infer")
    @task
    def infer(self) -> None:
        florence_task = CONFIG.florence_tasks[next(_florence_turn) % len(CONFIG.florence_tasks)]
        image = pick_image(CONFIG, self.rng)
        self.post_json(f"/infer [{florence_task}]", "/infer", infer_body(CONFIG, florence_task, image),
                       lambda r: check_infer(r, florence_task, image))


# --- chat: /v1/chat/completions (plain and streaming) -------------------------------------------------------


class ChatUser(GatewayUser):
    weight = CONFIG.weight("ChatUser", 2)

    @tag("chat", "chat_completions")
    @task
    def chat(self) -> None:
        self.post_json("/v1/chat/completions", "/v1/chat/completions", chat_body(CONFIG, self.rng, stream=False),
                       lambda r: check_chat_completion(r, CONFIG.max_new_tokens))

    @tag("chat", "chat_stream")
    @task
    def chat_stream(self) -> None:
        """The whole stream is the ``/v1/chat/completions [stream]`` entry (headers to ``[DONE]``); the time
        to the first answer text is reported as its own entry, ``chat ttft``."""
        body = chat_body(CONFIG, self.rng, stream=True)
        start = time.perf_counter()
        start_time = time.time()
        with self.client.post("/v1/chat/completions", json=body, name="/v1/chat/completions [stream]",
                              timeout=CONFIG.timeout_s, stream=True, catch_response=True) as resp:
            try:
                if not 200 <= resp.status_code < 300:
                    resp.failure(_status_message(resp))
                    return
                if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                    resp.failure(f"malformed body: content-type {resp.headers.get('content-type')!r}, "
                                 "expected text/event-stream")
                    return
                state, received = StreamResult(), 0
                ttft_ms: float | None = None

                def lines():
                    nonlocal received
                    for line in resp.iter_lines():
                        received += len(line) + 1
                        yield line

                try:
                    for payload in parse_sse(lines()):
                        if apply_chunk(state, payload) and ttft_ms is None:
                            ttft_ms = (time.perf_counter() - start) * 1000
                            self._report_ttft(ttft_ms, start_time)
                    check_stream_end(state, CONFIG.max_new_tokens)
                except BadResponse as exc:
                    resp.failure(f"malformed stream: {exc}")
                except Exception as exc:  # noqa: BLE001 - a broken connection mid-stream is this request's failure
                    resp.failure(f"stream broken: {type(exc).__name__}: {exc}")
                else:
                    resp.success()
                # Locust timed the request up to the headers; the entry is about the whole answer.
                resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
                resp.request_meta["response_length"] = received
            finally:
                resp.close()

    def _report_ttft(self, ttft_ms: float, start_time: float) -> None:
        self.environment.events.request.fire(
            request_type=TTFT_TYPE, name=TTFT_NAME, response_time=ttft_ms, response_length=0,
            exception=None, context=self.context(), start_time=start_time, url="/v1/chat/completions",
        )


# --- OCR: /ocr (the Qwen2-VL OCR service) and /v1/ocr (the SmolVLM2 service) ------------------------------------------


class OcrUser(GatewayUser):
    weight = CONFIG.weight("OcrUser", 1)

    @tag("ocr", "ocr_seed")
    @task
    def ocr(self) -> None:
        self.post_json("/ocr", "/ocr", ocr_body(CONFIG, self.rng), lambda r: check_ocr(r, v1=False))

    @tag("ocr", "v1_ocr")
    @task
    def v1_ocr(self) -> None:
        self.post_json("/v1/ocr", "/v1/ocr", v1_ocr_body(CONFIG, self.rng), lambda r: check_ocr(r, v1=True))


# --- setup and SLO gates ------------------------------------------------------------------------------------


def _passes_tags(fn: Any, tags: set[str] | None, exclude: set[str] | None) -> bool:
    """Locust's own rule for --tags/--exclude-tags on one task."""
    task_tags: set[str] = getattr(fn, "locust_tag_set", set())
    return (tags is None or bool(task_tags & tags)) and not (exclude and task_tags & exclude)


@events.init.add_listener
def _on_init(environment, **_kwargs) -> None:
    """Drop user classes left without tasks by --tags/--exclude-tags (Locust would spawn them and fail), and
    log what runs."""
    options = environment.parsed_options
    tags = set(options.tags) if options is not None and getattr(options, "tags", None) else None
    exclude = set(options.exclude_tags) if options is not None and getattr(options, "exclude_tags", None) else None
    if tags is not None or exclude is not None:
        keep = [c for c in environment.user_classes if any(_passes_tags(t, tags, exclude) for t in c.tasks)]
        dropped = sorted(c.__name__ for c in environment.user_classes if c not in keep)
        if dropped:
            log.info("no task of %s matches the tags; not spawning them", ", ".join(dropped))
        if not keep:
            log.error("no task matches --tags %s / --exclude-tags %s", sorted(tags or ()), sorted(exclude or ()))
        else:
            environment.user_classes[:] = keep
    if not isinstance(environment.runner, WorkerRunner):
        log.info("vlmserve load test: %s", json.dumps({
            "users": {c.__name__: c.weight for c in environment.user_classes},
            "max_new_tokens": CONFIG.max_new_tokens, "chat_model": CONFIG.chat_model,
            "florence_tasks": list(CONFIG.florence_tasks),
            "images": [f"{w}x{h}" for w, h in CONFIG.image_sizes], "formats": list(CONFIG.image_formats),
            "max_fail_ratio": CONFIG.max_fail_ratio, "max_p95_ms": CONFIG.max_p95_ms,
        }))


@events.test_start.add_listener
def _warm_images(environment, **_kwargs) -> None:
    """Render and encode every image before the clock matters (once per process; cached)."""
    if getattr(environment.parsed_options, "master", False):
        return  # a master sends no requests
    images: list[EncodedImage] = all_images(CONFIG)
    log.debug("rendered %d images (%d bytes)", len(images), sum(len(i.data) for i in images))


def slo_violations(total: Any, max_fail_ratio: float, max_p95_ms: float | None,
                   require_requests: bool = True) -> list[str]:
    """Why ``total`` (a Locust StatsEntry over all requests) breaks the SLOs; empty when it does not."""
    problems: list[str] = []
    if total.num_requests == 0:
        if not require_requests:
            return problems
        problems.append("no requests were made (check --tags/--exclude-tags, the weights and --host)")
        return problems
    if total.fail_ratio > max_fail_ratio:
        problems.append(f"failure ratio {total.fail_ratio:.4f} ({total.num_failures}/{total.num_requests}) is above "
                        f"VLMSERVE_LT_MAX_FAIL_RATIO={max_fail_ratio}")
    if max_p95_ms is not None:
        p95 = total.get_response_time_percentile(0.95)
        if p95 > max_p95_ms:
            problems.append(f"p95 latency {p95:.0f} ms is above VLMSERVE_LT_MAX_P95_MS={max_p95_ms:g}")
    return problems


@events.quitting.add_listener
def _slo_gates(environment, **_kwargs) -> None:
    """Exit code 1 when an SLO is broken (on the master or a local run; workers hold no totals)."""
    if isinstance(environment.runner, WorkerRunner):
        return
    # A headless run that sent nothing is a broken run; quitting the web UI before starting a test is not.
    headless = bool(getattr(environment.parsed_options, "headless", False))
    problems = slo_violations(environment.stats.total, CONFIG.max_fail_ratio, CONFIG.max_p95_ms,
                              require_requests=headless)
    if problems:
        for problem in problems:
            log.error("SLO gate failed: %s", problem)
        environment.process_exit_code = 1
    else:
        total = environment.stats.total
        log.info("SLO gates passed: %d requests, failure ratio %.4f, p95 %s ms", total.num_requests,
                 total.fail_ratio, total.get_response_time_percentile(0.95))
