"""A small batching engine for chat decoders, streaming tokens per request.

Requests that arrive together (within ``window_s``, up to ``max_batch``) are prefilled and decoded as one
``generate`` call. Two hooks make one batched call behave like independent requests:

- :class:`RowSampler` (a logits processor) samples each row with its own temperature, top-p and seed, then
  masks every other token, so the greedy step of ``generate`` picks exactly that token;
- :class:`RowStreamer` (a stopping criterion, called after every step) turns each row's new tokens into text
  deltas, applies stop strings and per-row ``max_tokens``, notices cancelled clients, and tells ``generate``
  which rows are done.

Requests arriving while a batch runs wait for the next batch (they do not join a running one).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("vlmserve.chat")


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


def render_prompt(tokenizer, messages: list[dict[str, Any]]) -> tuple[str, list[Any]]:
    """The checkpoint's chat template applied to parsed messages (images as placeholders), and the images."""
    images = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
    template_messages = [
        {"role": m["role"], "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
        for m in messages
    ]
    return tokenizer.apply_chat_template(template_messages, tokenize=False, add_generation_prompt=True), images


class RowSampler:
    """Per-row temperature / top-p / seed sampling inside one greedy ``generate``."""

    def __init__(self, jobs: Sequence[ChatJob]) -> None:
        import torch

        self.torch = torch
        self.jobs = jobs
        self.generators = []
        for job in jobs:
            g = torch.Generator()
            g.manual_seed(job.params.seed if job.params.seed is not None else int(time.time_ns() % 2**63))
            self.generators.append(g)

    def __call__(self, input_ids, scores):
        torch = self.torch
        out = torch.full_like(scores, float("-inf"))
        for row, job in enumerate(self.jobs):
            logits = scores[row].float()
            if job.params.temperature <= 0:
                choice = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / job.params.temperature, dim=-1)
                if job.params.top_p < 1.0:
                    sorted_probs, order = torch.sort(probs, descending=True)
                    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < job.params.top_p
                    keep[0] = True
                    filtered = torch.zeros_like(probs)
                    filtered[order[keep]] = sorted_probs[keep]
                    probs = filtered / filtered.sum()
                choice = int(torch.multinomial(probs, 1, generator=self.generators[row]))
            out[row, choice] = 0.0
        return out


class RowStreamer:
    """Stopping criterion that streams each row's text and decides per row when it is done."""

    def __init__(self, jobs: Sequence[ChatJob], tokenizer, eos_ids: set[int]) -> None:
        self.jobs = jobs
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, job in enumerate(self.jobs):
            if job.finish:
                done[row] = True
                continue
            token = int(input_ids[row, -1])
            if token in self.eos_ids:
                self._finish(job, "stop")
            else:
                job.token_ids.append(token)
                self._stream(job)
                if not job.finish and len(job.token_ids) >= job.params.max_tokens:
                    self._finish(job, "length")
                elif not job.finish and job.is_cancelled():
                    self._finish(job, "cancelled")
                    log.warning("vlmserve chat: request cancelled by the client after %d tokens", len(job.token_ids))
            done[row] = bool(job.finish)
        return done

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

    def close(self, batch_size: int) -> None:
        """Send the final response of every job (rows still open hit the length limit)."""
        for job in self.jobs:
            if not job.finish:
                self._finish(job, "length")
            usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": len(job.token_ids),
                     "batch_size": batch_size}
            job.emit("", job.finish, usage)


class ChatEngine:
    """Background thread: collect queued jobs into batches and run them through ``run_batch``."""

    def __init__(self, run_batch: Callable[[list[ChatJob]], None], max_batch: int = 8,
                 window_s: float = 0.02) -> None:
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.window_s = window_s
        self.queue: queue.Queue[ChatJob | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="chat-engine", daemon=True)
        self.thread.start()

    def submit(self, job: ChatJob) -> None:
        self.queue.put(job)

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
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
                job.finish = "cancelled"  # the client left while queued: answer nothing more
                job.emit("", "cancelled", {"prompt_tokens": job.prompt_tokens, "completion_tokens": 0,
                                           "batch_size": 0})
            batch = [j for j in batch if not j.finish]
            if not batch:
                continue
            log.info("chat batch of %d", len(batch))
            try:
                self.run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - report to every client of the batch, keep serving
                log.exception("chat batch failed")
                for job in batch:
                    if not job.finish:
                        job.finish = "error"
                        job.emit(f"generation failed: {type(exc).__name__}: {exc}", "error", None)
