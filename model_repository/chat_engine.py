"""Continuous batching for chat decoders, streaming tokens per request.

A :class:`DecodeLoop` owns one running batch: a left-padded key/value cache (``DynamicCache``), its attention
mask and, per row, the next position id and the token to feed next. Every :meth:`DecodeLoop.step`

1. admits queued jobs while the batch has room (``max_batch`` rows, ``max_batch_tokens`` of KV): each is
   prefilled alone (images through the vision encoder), its first token sampled and streamed, and its cache
   left-padded into the batch's;
2. runs one decode forward for all rows (explicit per-row position ids; the family maps them to its own form,
   e.g. Qwen2-VL's mrope triple), and picks each row's token from its own logits with its own settings
   (:class:`RowSampler`: log probabilities, repetition / presence / frequency penalties, a JSON-schema grammar
   mask, temperature / top-p / seed), so rows with different settings share one forward;
3. streams each row's text (:class:`RowStreamer`: stop strings, ``max_tokens``, cancellation) and drops the rows
   that finished, with their KV, trimming padding that no remaining row needs.

Rows never see each other (padding is masked and each row's positions are its own), so a greedy request gives
the same tokens alone or joined to a running batch. A request for ``n`` choices is ``n`` rows that share one
prefill: its KV cache is copied into each row and every row samples its own first token.

Failures stay with the request that causes them: prefill and token choice are per request / row, and when the
batched decode forward raises, the cache is put back, each row is run alone, the rows that fail alone get the
error and the others go on (:meth:`DecodeLoop._forward_rows`).

A family plugs in through :class:`DecoderFamily` (``QwenPipeline``, ``SmolVLMPipeline``). Pipelines without it
(``deepseek_ocr``, whose remote code has no forward we can drive step by step) keep the static path: jobs arriving
within ``window_s`` go to ``run_batch`` together, and a batch that fails is run again job by job
(``runtime.retry_singly``).
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

from model_repository import runtime
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: str | None = None  # a compiled llguidance grammar (model_repository.structured.Grammars.compile)

    @property
    def plain_greedy(self) -> bool:
        """Greedy on the raw logits: the batch's one argmax serves this row."""
        return (self.temperature <= 0 and not self.logprobs and self.grammar is None and not self.penalised)

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass
class TokenLogprob:
    """One generated token's log probability and the ``top`` most likely tokens at its step (ids, log probs),
    taken from the model's raw distribution (before penalties, grammar mask and temperature, as vLLM does)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class ChatJob:
    """One request: its prepared model inputs, sampling settings and how to talk back to its client."""

    inputs: Any
    params: SamplingParams
    prompt_tokens: int
    emit: Callable[[str, str, dict | None], None]  # (delta, finish_reason or "", usage or None)
    is_cancelled: Callable[[], bool] = lambda: False
    index: int = 0  # the choice this row is (n > 1); its seed is ``seed + index``
    shared: list[ChatJob] = field(default_factory=list)  # the request's other choices: prefilled with this job
    prompt_ids: list[int] = field(default_factory=list)  # for repetition_penalty (defaults to inputs' input_ids)
    # filled while decoding
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    logprobs_sent: int = 0
    sent: str = ""
    finish: str = ""
    batch_size: int = 0  # the most rows this job shared a decode step with

    def __post_init__(self) -> None:
        if not self.prompt_ids and isinstance(self.inputs, dict) and isinstance(self.inputs.get("input_ids"), list):
            self.prompt_ids = self.inputs["input_ids"]

    def take_logprobs(self) -> list[TokenLogprob]:
        """The log probabilities of the tokens generated since the last call (what a delta carries)."""
        new = self.logprobs[self.logprobs_sent:]
        self.logprobs_sent = len(self.logprobs)
        return new

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
    """One row's next-token choice, all on that row's logits: raw log probabilities (when asked), repetition /
    presence / frequency penalties, the grammar mask, then greedy or temperature / top-p with the row's own
    seeded generator."""

    def __init__(self, params: SamplingParams, index: int = 0, grammars: Any = None) -> None:
        import torch

        self.torch = torch
        self.params = params
        self.generator = torch.Generator()
        # torch takes seeds in [-2**63, 2**64): seed + index (index < MAX_N) of an int64 seed always fits.
        self.generator.manual_seed(params.seed + index if params.seed is not None else time.time_ns() % 2**63)
        self.grammar = None
        if params.grammar is not None:
            from model_repository.structured import RowGrammar

            if grammars is None:
                raise ValueError("structured output needs the model's grammars")
            self.grammar = RowGrammar(grammars, params.grammar)
        self.last: TokenLogprob | None = None

    def __call__(self, logits, job: ChatJob | None = None) -> int:
        torch = self.torch
        params = self.params
        logits = logits.float().cpu()
        if params.logprobs:
            self.last = self._logprobs(logits)
        if params.penalised or self.grammar is not None:
            logits = logits.clone()  # the prefill's logits are shared by the choices of one request
        if params.penalised and job is not None:
            self._penalise(logits, job)
        if self.grammar is not None:
            self.grammar.mask(logits)
        probs = torch.softmax(logits / params.temperature, dim=-1) if params.temperature > 0 else None
        if probs is None or not bool(torch.isfinite(probs).all()):
            # Greedy; also for a temperature so small that logits / temperature overflows (its limit is greedy,
            # and multinomial would refuse the inf/nan probabilities).
            token = int(torch.argmax(logits))
        else:
            if params.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
                keep[0] = True
                filtered = torch.zeros_like(probs)
                filtered[order[keep]] = sorted_probs[keep]
                probs = filtered / filtered.sum()
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.last is not None:
            self.last.token = token
            self.last.logprob = float(self._raw_logprobs[token])
        if self.grammar is not None:
            self.grammar.advance(token)
        return token

    def _logprobs(self, logits) -> TokenLogprob:
        torch = self.torch
        raw = torch.log_softmax(logits, dim=-1)
        self._raw_logprobs = raw
        top: list[tuple[int, float]] = []
        if self.params.top_logprobs:
            values, ids = torch.topk(raw, min(self.params.top_logprobs, raw.shape[-1]))
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        return TokenLogprob(-1, 0.0, top)

    def _penalise(self, logits, job: ChatJob) -> None:
        torch = self.torch
        params = self.params
        vocab = logits.shape[-1]
        if params.repetition_penalty != 1.0:
            # transformers' / vLLM's rule over prompt and answer tokens: shrink positive logits, grow negative ones.
            seen = torch.tensor(sorted({t for t in (*job.prompt_ids, *job.token_ids) if 0 <= t < vocab}),
                                dtype=torch.long)
            if seen.numel():
                picked = logits[seen]
                logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty,
                                           picked * params.repetition_penalty)
        if (params.presence_penalty or params.frequency_penalty) and job.token_ids:
            # OpenAI's rule over the answer so far: minus frequency x count, minus presence once per seen token.
            counts = torch.bincount(torch.tensor(job.token_ids, dtype=torch.long), minlength=vocab)[:vocab].float()
            logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()

    @property
    def complete(self) -> bool:
        """The row's grammar admits nothing but end-of-sequence: the structured answer is whole."""
        return self.grammar is not None and self.grammar.complete


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

    def finish(self, job: ChatJob, reason: str) -> None:
        """End the row now (e.g. its grammar is complete), flushing the text held back."""
        self._finish(job, reason)

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


def vocab_size(family: DecoderFamily) -> int:
    """The width of the family's logits (may exceed the tokenizer's length: padded embedding tables)."""
    head = family.model.lm_head
    return int(getattr(head, "out_features", None) or head.weight.shape[0])


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
        self._grammars: Any = getattr(family, "grammars", None)
        self.waiting: deque[ChatJob] = deque()
        self.rows: list[ChatJob] = []
        self.samplers: list[RowSampler] = []
        self.cache: Any = None  # DynamicCache, [rows, heads, width, dim] per layer, left-padded
        self.mask: Any = None  # [rows, width]: 1 where the cache holds a real token of the row
        self.positions: Any = None  # [rows]: position id of the token fed at the next step
        self.next_tokens: Any = None  # [rows]

    def add(self, job: ChatJob) -> None:
        """Queue a request: ``job`` and the choices in ``job.shared`` (admitted together, one prefill)."""
        self.waiting.append(job)

    @property
    def grammars(self) -> Any:
        """The family's :class:`~model_repository.structured.Grammars` (made on first use)."""
        if self._grammars is None:
            from model_repository.structured import Grammars

            self._grammars = Grammars(self.family.tokenizer, self.family.eos_ids, vocab_size(self.family))
        return self._grammars

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def kv_bound(self, jobs: list[ChatJob]) -> int:
        """Padded KV positions the batch ``jobs`` can reach: rows x the longest row it can grow to."""
        return len(jobs) * max((j.kv_reservation for j in jobs), default=0)

    def _fits(self, job: ChatJob) -> bool:
        if not self.rows:
            return True  # alone it must run, even when its own reservation exceeds the cap
        group = [job, *job.shared]
        return (len(self.rows) + len(group) <= self.max_batch
                and self.kv_bound([*self.rows, *group]) <= self.max_batch_tokens)

    def step(self) -> None:
        """Admit what fits, then decode one token for every row."""
        with self.torch.inference_mode():
            self._admit()
            if self.rows:
                try:
                    self._decode()
                except Exception as exc:  # noqa: BLE001 - last guard: fail this batch's clients, keep serving
                    log.exception("chat decode step failed")
                    self._fail_all(exc)

    def _admit(self) -> None:
        for job in [j for j in self.waiting if j.is_cancelled()]:
            self.waiting.remove(job)
            for choice in (job, *job.shared):
                _cancelled_in_queue(choice)
        # First come, first served: a job that does not fit holds back those behind it (no starvation).
        while self.waiting and self._fits(self.waiting[0]):
            job = self.waiting.popleft()
            try:
                self._prefill(job)
            except Exception as exc:  # noqa: BLE001 - only this request fails
                log.exception("chat prefill failed")
                for choice in (job, *job.shared):
                    if not choice.finish:
                        _fail(choice, exc)

    def _prefill(self, job: ChatJob) -> None:
        from transformers import DynamicCache

        kwargs, position = self.family.prefill_inputs(job)
        cache = DynamicCache()
        hidden = self.family.model.model(**kwargs, past_key_values=cache, use_cache=True).last_hidden_state
        logits = self.family.model.lm_head(hidden[:, -1])[0]
        # The prompt's KV, kept aside: every choice of the request gets its own copy as a row of the batch.
        prompt_kv = [(layer.keys, layer.values) for layer in cache.layers]
        width = cache.get_seq_length()
        group = [job, *job.shared]
        for choice in group:
            sampler = RowSampler(choice.params, choice.index, self.grammars if choice.params.grammar else None)
            choice.batch_size = max(choice.batch_size, len(self.rows) + len(group))
            token = sampler(logits, choice)
            if self._answer(choice, token, sampler):
                continue
            self._append_row(cache, prompt_kv, width, position, token)
            self.rows.append(choice)
            self.samplers.append(sampler)

    def _append_row(self, cache: Any, prompt_kv: list[tuple[Any, Any]], width: int, position: int,
                    token: int) -> None:
        torch = self.torch
        device = self.family.device
        if not self.rows:
            for layer, (keys, values) in zip(cache.layers, prompt_kv, strict=True):
                layer.keys, layer.values = keys, values
            self.cache = cache
            self.mask = torch.ones((1, width), dtype=torch.long, device=device)
            self.positions = torch.tensor([position], dtype=torch.long, device=device)
            self.next_tokens = torch.tensor([token], dtype=torch.long, device=device)
            return
        old = self.mask.shape[1]
        full = max(old, width)
        pad = torch.nn.functional.pad
        for mine, (keys, values) in zip(self.cache.layers, prompt_kv, strict=True):
            # [rows, heads, width, dim]: pad the sequence axis on the left, then append the row.
            mine.keys = torch.cat([pad(mine.keys, (0, 0, full - old, 0)), pad(keys, (0, 0, full - width, 0))])
            mine.values = torch.cat([pad(mine.values, (0, 0, full - old, 0)), pad(values, (0, 0, full - width, 0))])
        row_mask = torch.zeros((1, full), dtype=torch.long, device=device)
        row_mask[0, full - width:] = 1
        self.mask = torch.cat([pad(self.mask, (full - old, 0)), row_mask])
        self.positions = torch.cat([self.positions, torch.tensor([position], device=device)])
        self.next_tokens = torch.cat([self.next_tokens, torch.tensor([token], device=device)])

    def _decode(self) -> None:
        torch = self.torch
        logits = self._forward_rows()
        if logits is None:
            return  # every row failed
        rows = len(self.rows)
        greedy = torch.argmax(logits, dim=-1).tolist()  # one call for all plain greedy rows
        keep: list[int] = []
        tokens: list[int] = []
        for row, (job, sampler) in enumerate(zip(self.rows, self.samplers, strict=True)):
            job.batch_size = max(job.batch_size, rows)
            try:
                token = greedy[row] if job.params.plain_greedy else sampler(logits[row], job)
            except Exception as exc:  # noqa: BLE001 - e.g. a grammar error: this row fails, the others go on
                log.exception("chat: choosing the next token failed")
                _fail(job, exc)
                continue
            if not self._answer(job, token, sampler):
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

    def _forward(self, cache: Any, mask: Any, positions: Any, tokens: Any) -> tuple[Any, Any]:
        """One decode forward of the rows ``cache`` holds (extending it by one column): their float logits
        ``[rows, vocab]`` and ``mask`` with the new column."""
        torch = self.torch
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=mask.device)], dim=1)
        hidden = self.family.model.model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=self.family.decode_positions(positions),
            past_key_values=cache, use_cache=True,
        ).last_hidden_state
        return self.family.model.lm_head(hidden[:, -1]).float(), mask

    def _forward_rows(self) -> Any:
        """The decode forward of every row: their logits, with the step's mask and positions taken; None when no
        row is left.

        A failure is isolated (:meth:`_isolate`): the rows that fail alone are failed and dropped, and the others
        get one more batched forward. When that fails too, or no row fails alone (a fault of the batch as a whole,
        e.g. out of memory), every row is failed: a step never loops.
        """
        try:
            logits, mask = self._forward(self.cache, self.mask, self.positions, self.next_tokens)
        except Exception as exc:  # noqa: BLE001 - find the row(s) that cause it
            if not self._isolate(exc):
                return None
            try:
                logits, mask = self._forward(self.cache, self.mask, self.positions, self.next_tokens)
            except Exception as again:  # noqa: BLE001 - not a row's fault: fail the rest, once
                log.error("chat: the decode step failed again without the failing row(s) (%s: %s); failing its "
                          "other %d row(s)", type(again).__name__, again, len(self.rows))
                self._fail_all(again)
                return None
        self.mask = mask
        self.positions = self.positions + 1
        return logits

    def _isolate(self, exc: Exception) -> bool:
        """After the batch's decode forward raised ``exc``: put the cache back as it was before the step, run each
        row's forward alone (on a copy of its cache: the batch is not touched), and fail and drop the rows whose
        own forward raises. True when rows remain for another batched forward; otherwise all rows are failed."""
        rows = len(self.rows)
        log.error("chat: the decode step of %d row(s) failed", rows, exc_info=exc)
        if rows == 1:
            self._fail_all(exc)  # alone already: it is this row's failure
            return False
        self._restore()
        keep: list[int] = []
        for row, job in enumerate(self.rows):
            try:
                self._forward_row(row)
            except Exception as row_exc:  # noqa: BLE001 - this row causes it: only its client gets the error
                log.warning("chat: row %d of %d fails alone (%s: %s); failing its request, the others go on",
                            row, rows, type(row_exc).__name__, row_exc)
                _fail(job, row_exc)
            else:
                keep.append(row)
        if len(keep) == rows:
            log.error("chat: every row of the failed decode step runs alone: a fault of the batch, not of a row; "
                      "failing its %d rows", rows)
            self._fail_all(exc)
            return False
        if not keep:
            self._reset()
            return False
        self._select(keep)
        self.next_tokens = self.next_tokens[self.torch.tensor(keep, device=self.next_tokens.device)]
        return True

    def _restore(self) -> None:
        """Undo a decode forward that raised part-way: each layer it reached had its keys/values replaced with a
        concatenation one column wider (``DynamicLayer.update``; the tensors of the step before are never written),
        so cutting every layer back to the mask's width restores the cache exactly. (Holding on to the previous
        tensors instead would keep two copies of the whole KV cache alive during every step.)"""
        width = self.mask.shape[1]
        self.cache.crop(width)
        if any(layer.keys.shape[-2] != width or layer.values.shape[-2] != width for layer in self.cache.layers):
            raise RuntimeError("the decode cache could not be restored after a failed step")

    def _forward_row(self, row: int) -> None:
        """Row ``row``'s decode forward alone, on a one-row copy of its cache; raises as that row does."""
        from transformers import DynamicCache

        one = slice(row, row + 1)
        cache = DynamicCache()
        for index, layer in enumerate(self.cache.layers):
            cache.update(layer.keys[one], layer.values[one], index)  # copies: the batch's cache is not touched
        self._forward(cache, self.mask[one], self.positions[one], self.next_tokens[one])

    def _fail_all(self, exc: Exception) -> None:
        for job in self.rows:
            if not job.finish:
                _fail(job, exc)
        self._reset()

    def _answer(self, job: ChatJob, token: int, sampler: RowSampler) -> bool:
        """Stream ``token`` to the job's client; True when its row is done (finished, or its client unreachable)."""
        try:
            if sampler.last is not None and token not in self.family.eos_ids:
                job.logprobs.append(sampler.last)
            finished = self.streamer.push(job, token)
            if not finished and sampler.complete:
                self.streamer.finish(job, "stop")  # the JSON document is whole: no need to wait for the EOS step
                finished = True
            if finished:
                self.streamer.close(job)
            return finished
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
            # The jobs of a batch are independent requests: when the batch fails, each is run alone, so that only
            # the request(s) that cause the failure fail.
            for group, outcome in runtime.retry_singly(batch, self._run_static):
                if isinstance(outcome, Exception):
                    log.error("chat request failed", exc_info=outcome)
                    for job in group:
                        if not job.finish:
                            _fail(job, outcome)

    def _run_static(self, jobs: list[ChatJob]) -> None:
        # A job answered before its batch failed (run_batch marks a job finished before it answers) is not run
        # again when the batch is retried job by job.
        pending = [job for job in jobs if not job.finish]
        if pending:
            self.pipeline.run_batch(pending)
