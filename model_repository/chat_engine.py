"""Continuous batching for chat decoders, streaming tokens per request.

A :class:`DecodeLoop` owns one running batch: a left-padded key/value cache (``DynamicCache``), its attention
mask and, per row, the next position id and the token to feed next. Every :meth:`DecodeLoop.step`

1. admits queued jobs while the batch has room (``max_batch`` rows, ``max_batch_tokens`` of KV): each is
   prefilled alone (images through the vision encoder), its first token sampled and streamed, and its cache
   left-padded into the batch's;
2. runs one decode forward for all rows (explicit per-row position ids; the family maps them to its own form,
   e.g. Qwen2-VL's mrope triple), samples each row with its own temperature / top-p / seed;
3. streams each row's text (:class:`RowStreamer`: stop strings, ``max_tokens``, cancellation) and drops the rows
   that finished, with their KV, trimming padding that no remaining row needs.

Rows never see each other (padding is masked and each row's positions are its own), so a greedy request gives
the same tokens alone or joined to a running batch. A family plugs in through :class:`DecoderFamily`
(``QwenPipeline``, ``SmolVLMPipeline``). Pipelines without it (``deepseek_ocr``, whose remote code has no forward
we can drive step by step) keep the static path: jobs arriving within ``window_s`` go to ``run_batch`` together.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from vlmserve.families.contract import DEFAULT_MAX_BATCH_TOKENS

log = logging.getLogger("vlmserve.chat")

# Padded KV positions one batch may hold (rows x longest row, reserved up to each row's max_tokens).


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class ChatJob:
    """One request: its prepared model inputs, sampling settings and how to talk back to its client."""

    inputs: Any
    params: SamplingParams
    prompt_tokens: int
    emit: Callable[[str, str, dict | None], None]  # (delta, finish_reason or "", usage or None)
    is_cancelled: Callable[[], bool] = lambda: False
    # filled while decoding
    token_ids: list[int] = field(default_factory=list)
    sent: str = ""
    finish: str = ""
    batch_size: int = 0  # the most rows this job shared a decode step with

    @property
    def kv_reservation(self) -> int:
        """The longest this row's cache can grow: the prompt plus every token it may generate."""
        return self.prompt_tokens + self.params.max_tokens


def render_prompt(tokenizer, messages: list[dict[str, Any]]) -> tuple[str, list[Any]]:
    """The checkpoint's chat template applied to parsed messages (images as placeholders), and the images."""
    images = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
    template_messages = [
        {"role": m["role"], "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
        for m in messages
    ]
    return tokenizer.apply_chat_template(template_messages, tokenize=False, add_generation_prompt=True), images


@runtime_checkable
class DecoderFamily(Protocol):
    """What :class:`DecodeLoop` needs from a model family.

    ``model`` is a transformers ``*ForConditionalGeneration`` with ``.model`` (the backbone, which takes
    ``past_key_values``/``position_ids``/``attention_mask``) and ``.lm_head``.
    """

    model: Any
    tokenizer: Any
    eos_ids: set[int]
    device: str

    def prefill_inputs(self, job: ChatJob) -> tuple[dict[str, Any], int]:
        """Backbone kwargs for one job's prompt (batch of 1, ``position_ids`` included) and the position id of
        the first generated token. Runs the vision encoder; raises for this job only."""
        ...

    def decode_positions(self, positions: Any) -> Any:
        """Per-row next positions ``[B]`` -> the backbone's ``position_ids`` for a one-token step."""
        ...


class RowSampler:
    """One row's sampling: greedy, or temperature / top-p with the row's own seeded generator."""

    def __init__(self, params: SamplingParams) -> None:
        import torch

        self.torch = torch
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % 2**63))

    def __call__(self, logits) -> int:
        torch = self.torch
        logits = logits.float().cpu()
        if self.params.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < self.params.top_p
            keep[0] = True
            filtered = torch.zeros_like(probs)
            filtered[order[keep]] = sorted_probs[keep]
            probs = filtered / filtered.sum()
        return int(torch.multinomial(probs, 1, generator=self.generator))


class RowStreamer:
    """Turns each row's new tokens into text deltas and decides per row when it is done."""

    def __init__(self, tokenizer, eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids

    def push(self, job: ChatJob, token: int) -> bool:
        """Take one generated token; True when the row is finished (EOS, stop string, length, cancelled)."""
        if job.finish:
            return True
        if token in self.eos_ids:
            self._finish(job, "stop")
            return True
        job.token_ids.append(token)
        self._stream(job)
        if not job.finish and len(job.token_ids) >= job.params.max_tokens:
            self._finish(job, "length")
        elif not job.finish and job.is_cancelled():
            self._finish(job, "cancelled")
            log.warning("vlmserve chat: request cancelled by the client after %d tokens", len(job.token_ids))
        return bool(job.finish)

    def _stream(self, job: ChatJob) -> None:
        text = self.tokenizer.decode(job.token_ids, skip_special_tokens=True)
        for stop in job.params.stop:
            at = text.find(stop)
            if at >= 0:
                self._send(job, text[:at])
                job.finish = "stop"  # not _finish(): its flush would send the stop string itself
                return
        # Hold back an incomplete UTF-8 sequence and anything that could still become a stop string.
        if text.endswith("\ufffd"):
            return
        hold = max((len(s) - 1 for s in job.params.stop), default=0)
        self._send(job, text[: len(text) - hold] if hold else text)

    def _send(self, job: ChatJob, text: str) -> None:
        if len(text) > len(job.sent) and text.startswith(job.sent):
            job.emit(text[len(job.sent):], "", None)
            job.sent = text

    def _finish(self, job: ChatJob, reason: str) -> None:
        if reason != "cancelled":
            # Flush what was held back: no stop string matched it (``_stream`` checked all the text).
            self._send(job, self.tokenizer.decode(job.token_ids, skip_special_tokens=True))
        job.finish = reason

    def close(self, job: ChatJob) -> None:
        """Send the job's final response (a row still open hit the length limit)."""
        if not job.finish:
            self._finish(job, "length")
        usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": len(job.token_ids),
                 "batch_size": job.batch_size}
        job.emit("", job.finish, usage)


def _fail(job: ChatJob, exc: Exception) -> None:
    job.finish = "error"
    try:
        # The exception's type and message only: the traceback goes to the log, never to the client.
        job.emit(f"generation failed: {type(exc).__name__}: {exc}", "error", None)
    except Exception:  # noqa: BLE001 - the client may be gone; nothing more to tell it
        log.exception("chat: could not send the error response")


def _cancelled_in_queue(job: ChatJob) -> None:
    job.finish = "cancelled"  # the client left while queued: answer nothing more
    job.emit("", "cancelled", {"prompt_tokens": job.prompt_tokens, "completion_tokens": 0, "batch_size": 0})


class DecodeLoop:
    """The running batch of one :class:`DecoderFamily` (single-threaded; :class:`ChatEngine` drives it)."""

    def __init__(self, family: DecoderFamily, max_batch: int = 8,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> None:
        import torch

        if max_batch < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch and max_batch_tokens must be positive")
        self.torch = torch
        self.family = family
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.streamer = RowStreamer(family.tokenizer, family.eos_ids)
        self.waiting: deque[ChatJob] = deque()
        self.rows: list[ChatJob] = []
        self.samplers: list[RowSampler] = []
        self.cache: Any = None  # DynamicCache, [rows, heads, width, dim] per layer, left-padded
        self.mask: Any = None  # [rows, width]: 1 where the cache holds a real token of the row
        self.positions: Any = None  # [rows]: position id of the token fed at the next step
        self.next_tokens: Any = None  # [rows]

    def add(self, job: ChatJob) -> None:
        self.waiting.append(job)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def kv_bound(self, jobs: list[ChatJob]) -> int:
        """Padded KV positions the batch ``jobs`` can reach: rows x the longest row it can grow to."""
        return len(jobs) * max((j.kv_reservation for j in jobs), default=0)

    def _fits(self, job: ChatJob) -> bool:
        if not self.rows:
            return True  # alone it must run, even when its own reservation exceeds the cap
        return len(self.rows) < self.max_batch and self.kv_bound([*self.rows, job]) <= self.max_batch_tokens

    def step(self) -> None:
        """Admit what fits, then decode one token for every row."""
        with self.torch.inference_mode():
            self._admit()
            if self.rows:
                try:
                    self._decode()
                except Exception as exc:  # noqa: BLE001 - fail this batch's clients, keep serving
                    log.exception("chat decode step failed")
                    for job in self.rows:
                        if not job.finish:
                            _fail(job, exc)
                    self._reset()

    def _admit(self) -> None:
        for job in [j for j in self.waiting if j.is_cancelled()]:
            self.waiting.remove(job)
            _cancelled_in_queue(job)
        # First come, first served: a job that does not fit holds back those behind it (no starvation).
        while self.waiting and self._fits(self.waiting[0]):
            job = self.waiting.popleft()
            try:
                self._prefill(job)
            except Exception as exc:  # noqa: BLE001 - only this request fails
                log.exception("chat prefill failed")
                _fail(job, exc)

    def _prefill(self, job: ChatJob) -> None:
        torch = self.torch
        from transformers import DynamicCache

        kwargs, position = self.family.prefill_inputs(job)
        cache = DynamicCache()
        hidden = self.family.model.model(**kwargs, past_key_values=cache, use_cache=True).last_hidden_state
        logits = self.family.model.lm_head(hidden[:, -1])[0]
        sampler = RowSampler(job.params)
        job.batch_size = max(job.batch_size, len(self.rows) + 1)
        token = sampler(logits)
        if self._answer(job, token):
            return
        width = cache.get_seq_length()
        device = self.family.device
        if not self.rows:
            self.cache = cache
            self.mask = torch.ones((1, width), dtype=torch.long, device=device)
            self.positions = torch.tensor([position], dtype=torch.long, device=device)
            self.next_tokens = torch.tensor([token], dtype=torch.long, device=device)
        else:
            old = self.mask.shape[1]
            full = max(old, width)
            pad = torch.nn.functional.pad
            for mine, new in zip(self.cache.layers, cache.layers, strict=True):
                # [rows, heads, width, dim]: pad the sequence axis on the left, then append the row.
                mine.keys = torch.cat([pad(mine.keys, (0, 0, full - old, 0)), pad(new.keys, (0, 0, full - width, 0))])
                mine.values = torch.cat([pad(mine.values, (0, 0, full - old, 0)),
                                         pad(new.values, (0, 0, full - width, 0))])
            row_mask = torch.zeros((1, full), dtype=torch.long, device=device)
            row_mask[0, full - width:] = 1
            self.mask = torch.cat([pad(self.mask, (full - old, 0)), row_mask])
            self.positions = torch.cat([self.positions, torch.tensor([position], device=device)])
            self.next_tokens = torch.cat([self.next_tokens, torch.tensor([token], device=device)])
        self.rows.append(job)
        self.samplers.append(sampler)

    def _decode(self) -> None:
        torch = self.torch
        rows = len(self.rows)
        mask = torch.cat([self.mask, torch.ones((rows, 1), dtype=self.mask.dtype, device=self.mask.device)], dim=1)
        hidden = self.family.model.model(
            input_ids=self.next_tokens[:, None], attention_mask=mask,
            position_ids=self.family.decode_positions(self.positions),
            past_key_values=self.cache, use_cache=True,
        ).last_hidden_state
        logits = self.family.model.lm_head(hidden[:, -1]).float()
        self.mask = mask
        self.positions = self.positions + 1
        greedy = torch.argmax(logits, dim=-1).tolist()  # one call for all greedy rows
        keep: list[int] = []
        tokens: list[int] = []
        for row, (job, sampler) in enumerate(zip(self.rows, self.samplers, strict=True)):
            job.batch_size = max(job.batch_size, rows)
            token = greedy[row] if job.params.temperature <= 0 else sampler(logits[row])
            if not self._answer(job, token):
                keep.append(row)
                tokens.append(token)
        if len(keep) == rows:
            self.next_tokens = torch.tensor(tokens, dtype=torch.long, device=self.next_tokens.device)
            return
        if not keep:
            self._reset()
            return
        self._select(keep)
        self.next_tokens = torch.tensor(tokens, dtype=torch.long, device=self.mask.device)

    def _answer(self, job: ChatJob, token: int) -> bool:
        """Stream ``token`` to the job's client; True when its row is done (finished, or its client unreachable)."""
        try:
            if self.streamer.push(job, token):
                self.streamer.close(job)
                return True
            return False
        except Exception:  # noqa: BLE001 - one client's broken sender must not fail the other rows
            log.exception("chat: sending to a client failed; dropping its row")
            job.finish = job.finish or "error"
            return True

    def _select(self, keep: list[int]) -> None:
        """Keep only rows ``keep``, and drop the leading cache columns that are padding for all of them."""
        index = self.torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[index]
        first = int(self.mask.any(dim=0).int().argmax())
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self.positions = self.positions[index]
        self.rows = [self.rows[i] for i in keep]
        self.samplers = [self.samplers[i] for i in keep]

    def _reset(self) -> None:
        self.rows, self.samplers = [], []
        self.cache = self.mask = self.positions = self.next_tokens = None

    def drain(self) -> None:
        """Step until every admitted and queued job has finished (tests and shutdown)."""
        while self.busy:
            self.step()


class ChatEngine:
    """Background thread feeding submitted jobs to a :class:`DecodeLoop` (or, for pipelines that are not a
    :class:`DecoderFamily`, to their static ``run_batch``)."""

    def __init__(self, pipeline: Any, max_batch: int = 8, window_s: float = 0.02,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> None:
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.window_s = window_s
        self.loop = DecodeLoop(pipeline, max_batch, max_batch_tokens) if isinstance(pipeline, DecoderFamily) else None
        self.queue: queue.Queue[ChatJob | None] = queue.Queue()
        target = self._continuous if self.loop is not None else self._static
        self.thread = threading.Thread(target=target, name="chat-engine", daemon=True)
        self.thread.start()

    def submit(self, job: ChatJob) -> None:
        self.queue.put(job)

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _continuous(self) -> None:
        loop = self.loop
        assert loop is not None
        while True:
            try:
                # Idle: sleep until a job comes. Busy: take whatever arrived since the last step, no waiting.
                job = self.queue.get(block=not loop.busy)
                while True:
                    if job is None:
                        for left in [*loop.rows, *loop.waiting]:
                            _fail(left, RuntimeError("the model is being unloaded"))
                        return
                    loop.add(job)
                    job = self.queue.get_nowait()
            except queue.Empty:
                pass
            try:
                loop.step()
            except Exception:  # noqa: BLE001 - step handles model errors; this is a last guard for the thread
                log.exception("chat engine step failed")

    def _static(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.queue.put(None)
                    break
                batch.append(job)
            for job in [j for j in batch if j.is_cancelled()]:
                _cancelled_in_queue(job)
            batch = [j for j in batch if not j.finish]
            if not batch:
                continue
            log.info("chat batch of %d", len(batch))
            try:
                self.pipeline.run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - report to every client of the batch, keep serving
                log.exception("chat batch failed")
                for job in batch:
                    if not job.finish:
                        _fail(job, exc)
