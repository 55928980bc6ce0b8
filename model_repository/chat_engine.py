"""Continuous batching for chat decoders, streaming tokens per request.

A :class:`DecodeLoop` owns one running batch: a preallocated key/value cache with one slot per row
(:class:`~vlmserve.model_repository.kv_cache.SlotCache`: nothing is copied when rows join or leave, nothing is padded)
and,
per row, its length, the next position id and the token to feed next. Every :meth:`DecodeLoop.step`

1. admits queued jobs while the batch has room (``max_batch`` rows, ``max_batch_tokens`` of KV) and prefills them
   in one forward (text prompts stacked into one batch; a prompt with images, whose vision encoder runs first,
   alone), each into a fresh slot; each job's first token is sampled and streamed;
2. runs one decode forward for all rows (explicit per-row position ids; the family maps them to its own form,
   e.g. Qwen2-VL's mrope triple), and picks each row's token from its own logits with its own settings
   (:class:`RowSampler`: log probabilities, repetition / presence / frequency penalties, a JSON-schema grammar
   mask, temperature / top-p / seed), so rows with different settings share one forward;
3. streams each row's text (:class:`RowStreamer`: stop strings, ``max_tokens``, cancellation) and drops the rows
   that finished, packing the rows that go on into the first slots.

Rows never see each other (padding is masked and each row's positions are its own), so a greedy request gives
the same tokens alone or joined to a running batch. A request for ``n`` choices is ``n`` rows that share one
prefill: its KV slot is copied into each row's slot and every row samples its own first token.

Failures stay with the request that causes them: prefill and token choice are per request / row, and when the
batched decode forward raises, each row is run alone, the rows that fail alone get the
error and the others go on (:meth:`DecodeLoop._forward_rows`). A forward writes only columns past each
row's length, so a failed step has nothing to undo.

A family plugs in through :class:`DecoderFamily` (``QwenPipeline``, ``SmolVLMPipeline``). Pipelines without it
(``deepseek_ocr``, whose remote code has no forward we can drive step by step) keep the static path: jobs arriving
within ``window_s`` go to ``run_batch`` together, and a batch that fails is run again job by job
(``common.retry_singly``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from vlmserve.api.openai import GenerationParameters
from vlmserve.families.contract import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_PREFIX_CACHE_BYTES, ChatParams
from vlmserve.families.spec import load
from vlmserve.model_repository import common

log = logging.getLogger("vlmserve.chat")


@dataclass
class TokenLogprob:
    """One generated token's log probability and the ``top`` most likely tokens at its step (ids, log probs),
    taken from the model's raw distribution (before penalties, grammar mask and temperature, as vLLM does)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class ChatJob:
    """One request: its prepared model inputs, its ``PARAMETERS`` (resolved for the model: ``max_tokens`` set) and
    how to talk back to its client."""

    inputs: Any
    params: GenerationParameters
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
    submitted: float = field(default_factory=time.monotonic)  # when the request was queued (its wait is counted)
    background: bool = False  # a batch request (PARAMETERS priority "batch"): admitted after interactive ones
    request_id: str = ""  # Triton's request id (the gateway's X-Request-ID): its log lines carry it
    started_at: float = 0.0  # wall clock (time.time()) when the engine took it from its queue: its prefill began
    # params.response_format compiled for the model's tokenizer (vlmserve.model_repository.structured.Grammars)
    grammar: str | None = None

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
        return self.prompt_tokens + self.params.token_limit

    @property
    def plain_greedy(self) -> bool:
        """Greedy on the raw logits, unconstrained: the batch's one argmax serves this row."""
        return self.grammar is None and self.params.plain_greedy


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

    def __init__(self, params: GenerationParameters, index: int = 0, grammar: str | None = None,
                 grammars: Any = None) -> None:
        import torch

        self.torch = torch
        self.params = params
        self.generator = torch.Generator()
        # torch takes seeds in [-2**63, 2**64): seed + index (index < MAX_N) of an int64 seed always fits.
        self.generator.manual_seed(params.seed + index if params.seed is not None else time.time_ns() % 2**63)
        self.grammar = None
        if grammar is not None:
            from vlmserve.model_repository.structured import RowGrammar

            if grammars is None:
                raise ValueError("structured output needs the model's grammars")
            self.grammar = RowGrammar(grammars, grammar)
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
        if not job.finish and len(job.token_ids) >= job.params.token_limit:
            self._finish(job, "length")
        elif not job.finish and job.is_cancelled():
            self._finish(job, "cancelled")
            log.warning("vlmserve chat: request cancelled by the client after %d tokens", len(job.token_ids))
        return bool(job.finish)

    def _stream(self, job: ChatJob) -> None:
        text = self.tokenizer.decode(job.token_ids, skip_special_tokens=True)
        for stop in job.params.stop_sequences:
            at = text.find(stop)
            if at >= 0:
                self._send(job, text[:at])
                job.finish = "stop"  # not _finish(): its flush would send the stop string itself
                return
        # Hold back an incomplete UTF-8 sequence and anything that could still become a stop string.
        if text.endswith("\ufffd"):
            return
        hold = max((len(s) - 1 for s in job.params.stop_sequences), default=0)
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


def decoder_layers(family: DecoderFamily) -> int:
    """The number of layers of the family's language model (one KV cache entry each)."""
    backbone = family.model.model
    text = getattr(backbone, "language_model", None) or backbone.text_model
    return len(text.layers)


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


# Keyword arguments of a prefill that can be stacked into one batched forward (text prompts); anything else
# (pixel values, image grids) makes a job prefill alone.
_STACKABLE = {"inputs_embeds", "input_ids", "position_ids", "attention_mask"}


def _stack_prefills(kwargs_list: list[dict[str, Any]]) -> tuple[dict[str, Any], list[int]]:
    """One prefill's backbone kwargs from several batch-of-1 ones: right-padded to the longest prompt and stacked
    (the padded queries write columns past their row's length, which no later query reads), and each prompt's
    length. The kwargs come without ``attention_mask`` (:func:`_drop_prefix`)."""
    import torch

    def seq_len(kwargs: dict[str, Any]) -> int:
        return int((kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else kwargs["input_ids"]).shape[1])

    lengths = [seq_len(k) for k in kwargs_list]
    if len(kwargs_list) == 1:
        return kwargs_list[0], lengths  # alone: as it is (it may carry inputs that are not stackable)
    longest = max(lengths)
    out: dict[str, Any] = {}
    for key in ("inputs_embeds", "input_ids", "position_ids"):
        if key not in kwargs_list[0]:
            continue
        parts = []
        for kwargs, n in zip(kwargs_list, lengths, strict=True):
            value = kwargs[key]
            if key == "inputs_embeds":  # [1, n, hidden]
                value = torch.nn.functional.pad(value, (0, 0, 0, longest - n))
            else:  # [1, n] ids, [1, n] or [3, 1, n] positions: the sequence is the last axis
                value = torch.nn.functional.pad(value, (0, longest - n))
            parts.append(value)
        out[key] = torch.cat(parts, dim=0 if key != "position_ids" else -2)
    return out, lengths


def _drop_prefix(kwargs: dict[str, Any], start: int) -> dict[str, Any]:
    """A prefill's kwargs without its first ``start`` tokens (their KV comes from the prefix cache) and without
    ``attention_mask`` (the engine passes its own)."""
    out = {}
    for key, value in kwargs.items():
        if key == "attention_mask":
            continue
        if start and key in _STACKABLE:  # [1, n, hidden] embeddings; [1, n] ids; [1, n] or [3, 1, n] positions
            value = value[:, start:] if key == "inputs_embeds" else value[..., start:]
        out[key] = value
    return out


class DecodeLoop:
    """The running batch of one :class:`DecoderFamily` (single-threaded; :class:`ChatEngine` drives it).

    Row ``i`` of the batch is slot ``i`` of :attr:`kv` (a :class:`~vlmserve.model_repository.kv_cache.SlotCache`):
    rows are
    kept packed in slots ``0 .. rows - 1``, each with its own length, position and next token.
    """

    def __init__(self, family: DecoderFamily, max_batch: int = 8,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, prefix_metrics: Any = None,
                 max_prefill_tokens: int = 1024) -> None:
        from vlmserve.model_repository.kv_cache import PrefixCache, SlotCache, use_gqa_sdpa

        attn = getattr(family.model.config, "_attn_implementation", "sdpa")
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"the chat engine's KV slots need SDPA or eager attention (custom 4D masks), not {attn}")
        self._init_scheduler(family, max_batch, max_batch_tokens, max_prefill_tokens)
        use_gqa_sdpa(family.model)
        self.kv = SlotCache(decoder_layers(family))
        self.prefix = PrefixCache(prefix_cache_bytes, metrics=prefix_metrics)

    @classmethod
    def for_model(cls, family: DecoderFamily, params: ChatParams, version_dir: Path,
                  prefix_metrics: Any = None) -> DecodeLoop:
        """The loop a served chat model runs, from its config parameters (and its version directory, where export
        put the engine's files). Every engine of :data:`ENGINES` has this constructor; ImportError: the engine
        cannot run here (the model then serves with the torch loop)."""
        return cls(family, params.max_batch, params.max_batch_tokens, params.prefix_cache_bytes, prefix_metrics)

    def _init_scheduler(self, family: DecoderFamily, max_batch: int, max_batch_tokens: int,
                        max_prefill_tokens: int) -> None:
        """What every engine's loop shares: the queue, the rows with their samplers, the streamer, the limits."""
        import torch

        if max_batch < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch and max_batch_tokens must be positive")
        self.torch = torch
        self.family = family
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.streamer = RowStreamer(family.tokenizer, family.eos_ids)
        self._grammars: Any = getattr(family, "grammars", None)
        self.waiting: deque[ChatJob] = deque()
        self.waited_s = 0.0  # seconds requests spent queued before their prefill, summed (a load signal)
        self.rows: list[ChatJob] = []
        self.samplers: list[RowSampler] = []
        self.lengths: Any = None  # [rows]: KV columns each row holds (the column its next token writes)
        self.positions: Any = None  # [rows]: position id of the token fed at the next step
        self.next_tokens: Any = None  # [rows]

    def add(self, job: ChatJob) -> None:
        """Queue a request: ``job`` and the choices in ``job.shared`` (admitted together, one prefill). An
        interactive job goes ahead of every waiting batch job (``background``), after the interactive ones."""
        if not job.background:
            for i, queued in enumerate(self.waiting):
                if queued.background:
                    self.waiting.insert(i, job)
                    return
        self.waiting.append(job)

    @property
    def grammars(self) -> Any:
        """The family's :class:`~vlmserve.model_repository.structured.Grammars` (made on first use)."""
        if self._grammars is None:
            from vlmserve.model_repository.structured import Grammars

            self._grammars = Grammars(self.family.tokenizer, self.family.eos_ids, vocab_size(self.family))
        return self._grammars

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one token holds: layers x 2 x kv heads x head dim x the weights' dtype size."""
        text = self.family.model.config.get_text_config()
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return self.kv.num_layers * 2 * heads * head_dim * self.family.model.dtype.itemsize

    def kv_bound(self, jobs: list[ChatJob]) -> int:
        """KV positions the batch ``jobs`` can reach: rows x the longest row it can grow to."""
        return len(jobs) * max((j.kv_reservation for j in jobs), default=0)

    def _fits(self, job: ChatJob, admitted: list[ChatJob]) -> bool:
        running = [*self.rows, *admitted]
        if not running:
            return True  # alone it must run, even when its own reservation exceeds the cap
        group = [job, *job.shared]
        return (len(running) + len(group) <= self.max_batch
                and self.kv_bound([*running, *group]) <= self.max_batch_tokens)

    def step(self) -> None:
        """Admit what fits (one batched prefill), then decode one token for every row."""
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
        requests: list[ChatJob] = []
        admitted: list[ChatJob] = []  # their rows: each request's choices
        prompt_tokens = 0
        # One step prefills at most max_prefill_tokens of prompts (at least one request): a burst of long prompts
        # is spread over several steps, so the first ones answer sooner and the running rows keep decoding.
        while self.waiting and self._fits(self.waiting[0], admitted):
            if requests and prompt_tokens + self.waiting[0].prompt_tokens > self.max_prefill_tokens:
                break
            job = self.waiting.popleft()
            self.waited_s += time.monotonic() - job.submitted
            job.started_at = time.time()
            requests.append(job)
            admitted += [job, *job.shared]
            prompt_tokens += job.prompt_tokens
        prepared: list[tuple[ChatJob, dict[str, Any], int]] = []
        for job in requests:
            try:
                kwargs, position = self.family.prefill_inputs(job)  # the vision encoder runs here
            except Exception as exc:  # noqa: BLE001 - only this request fails
                log.exception("chat prefill failed", extra={"request_id": job.request_id})
                self._fail_group(job, exc)
                continue
            prepared.append((job, kwargs, position))
        # Prompts with the same kinds of inputs (ids, or embeddings with the images spliced in) share one forward.
        runs: dict[Any, list[tuple[ChatJob, dict[str, Any], int]]] = {}
        for item in prepared:
            keys = frozenset(item[1])
            runs.setdefault(keys if keys <= _STACKABLE else id(item), []).append(item)
        for run in runs.values():
            for group, outcome in common.retry_singly(run, self._prefill):
                if isinstance(outcome, Exception):
                    log.error("chat prefill failed (requests %s)", ", ".join(j.request_id for j, _, _ in group),
                              exc_info=outcome)
                    for job, _, _ in group:
                        self._fail_group(job, outcome)

    @staticmethod
    def _fail_group(job: ChatJob, exc: Exception) -> None:
        for choice in (job, *job.shared):
            if not choice.finish:
                _fail(choice, exc)

    def _prefill(self, run: list[tuple[ChatJob, dict[str, Any], int]]) -> None:
        """One forward over the prompts of ``run`` (each written into a fresh slot after the running rows; the
        blocks of a prefix found in :attr:`prefix` are copied in, not computed), then each choice's first token;
        the choices that go on become rows."""
        from vlmserve.model_repository.kv_cache import attention_mask

        torch = self.torch
        device = self.family.device
        base = len(self.rows)
        groups = [[job, *job.shared] for job, _, _ in run]
        hits = [self._prefix_hits(job, kwargs) for job, kwargs, _ in run]
        starts = [len(cached) * self.prefix.block for _, cached in hits]
        kwargs, lengths = _stack_prefills([_drop_prefix(kwargs, start)
                                           for (_, kwargs, _), start in zip(run, starts, strict=True)])
        longest = max(lengths)
        read_len = max(starts) + longest
        self._reserve(base + sum(len(g) for g in groups), [c for g in groups for c in g], read_len)
        for slot, (_, cached) in enumerate(hits):
            for i, block in enumerate(cached):
                self.kv.write_block(base + slot, i * self.prefix.block, block)
        cols = torch.tensor(starts, device=device)[:, None] + torch.arange(longest, device=device)[None, :]
        self.kv.plan(base, cols, read_len)
        hidden = self.family.model.model(
            **kwargs, attention_mask=attention_mask(cols, read_len, self.family.model.dtype),
            past_key_values=self.kv, use_cache=True,
        ).last_hidden_state
        last = hidden[torch.arange(len(run), device=device), torch.tensor(lengths, device=device) - 1]
        logits = self.family.model.lm_head(last)
        for slot, ((keys, cached), start, n) in enumerate(zip(hits, starts, lengths, strict=True)):
            block = self.prefix.block
            for i in range(len(cached), len(keys)):  # this prompt's new whole blocks, for the next one
                self.prefix.put(keys[i], self.kv.read_block(base + slot, i * block, (i + 1) * block))
            if self.prefix.enabled:  # every prompt token counts: taken from the cache, or computed
                self.prefix.record(start + n, start)
        # Each choice that goes on takes a row: (source slot, job, sampler, token, prompt length, position).
        joining: list[tuple[int, ChatJob, RowSampler, int, int, int]] = []
        for slot, ((_, _, position), group, start, n) in enumerate(zip(run, groups, starts, lengths, strict=True)):
            for choice in group:
                sampler = RowSampler(choice.params, choice.index, choice.grammar,
                                     self.grammars if choice.grammar else None)
                choice.batch_size = max(choice.batch_size, base + sum(len(g) for g in groups))
                token = sampler(logits[slot], choice)
                if not self._answer(choice, token, sampler):
                    joining.append((base + slot, choice, sampler, token, start + n, position))
        if not joining:
            return
        # Place the joining rows right after the running ones (a choice of n > 1 copies its request's slot).
        sources = torch.tensor([j[0] for j in joining], device=device)
        targets = torch.arange(base, base + len(joining), device=device)
        if not torch.equal(sources, targets):
            data = self.kv.data
            assert data is not None
            data[:, :, targets, :, :read_len] = data[:, :, sources, :, :read_len]
        self._join(joining, device)

    def _join(self, joining: list[tuple[Any, ChatJob, RowSampler, int, int, int]], device: Any) -> None:
        """Append rows after the running ones: (slot or sequence, job, sampler, next token, KV length, position)."""
        torch = self.torch
        new = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        first = not self.rows
        self.rows += [j[1] for j in joining]
        self.samplers += [j[2] for j in joining]
        added = (new([j[3] for j in joining]), new([j[4] for j in joining]), new([j[5] for j in joining]))
        if first:
            self.next_tokens, self.lengths, self.positions = added
        else:
            self.next_tokens = torch.cat([self.next_tokens, added[0]])
            self.lengths = torch.cat([self.lengths, added[1]])
            self.positions = torch.cat([self.positions, added[2]])

    def _prefix_hits(self, job: ChatJob, kwargs: dict[str, Any]) -> tuple[list[bytes], list[Any]]:
        """The prefix-cache keys of the job's whole prompt blocks, and the cached blocks that begin it (at least
        the prompt's last token is always computed: its logits give the first token)."""
        from vlmserve.model_repository.kv_cache import inputs_digest

        ids = job.inputs.get("input_ids") if isinstance(job.inputs, dict) else None
        if not self.prefix.enabled or not isinstance(ids, list) or not set(kwargs) <= _STACKABLE:
            return [], []
        keys = self.prefix.keys(ids, inputs_digest(job.inputs))
        return keys, self.prefix.lookup(keys[: (len(ids) - 1) // self.prefix.block])

    def _reserve(self, rows: int, jobs: list[ChatJob], length: int) -> None:
        """KV slots for ``rows`` rows as long as the longest reservation of the running rows and ``jobs`` (and at
        least ``length``); as many more rows (up to ``max_batch``) as the KV budget allows at that length, so
        later joins copy nothing."""
        length = max(length, *(j.kv_reservation for j in [*self.rows, *jobs]))
        spare = min(self.max_batch, max(rows, self.max_batch_tokens // max(length, 1)))
        if rows > self.kv.rows or length > self.kv.length:
            self.kv.reserve(max(rows, spare), length)

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
                token = greedy[row] if job.plain_greedy else sampler(logits[row], job)
            except Exception as exc:  # noqa: BLE001 - e.g. a grammar error: this row fails, the others go on
                log.exception("chat: choosing the next token failed")
                _fail(job, exc)
                continue
            if not self._answer(job, token, sampler):
                keep.append(row)
                tokens.append(token)
        if not keep:
            self._reset()
            return
        if len(keep) < rows:
            self._select(keep)
        self.next_tokens = torch.tensor(tokens, dtype=torch.long, device=self.lengths.device)

    def _forward(self, first: int, tokens: Any, lengths: Any, positions: Any) -> Any:
        """One decode forward of the rows in slots ``first .. first + len(tokens) - 1``: their float logits
        ``[rows, vocab]``. Each row's key/value is written at its own next column."""
        from vlmserve.model_repository.kv_cache import attention_mask

        cols = lengths[:, None]
        read_len = int(lengths.max()) + 1
        self.kv.plan(first, cols, read_len)
        hidden = self.family.model.model(
            input_ids=tokens[:, None], attention_mask=attention_mask(cols, read_len, self.family.model.dtype),
            position_ids=self.family.decode_positions(positions), past_key_values=self.kv, use_cache=True,
        ).last_hidden_state
        return self.family.model.lm_head(hidden[:, -1]).float()

    def _forward_rows(self) -> Any:
        """The decode forward of every row: their logits, with the step's lengths and positions taken; None when
        no row is left.

        A failure is isolated (:meth:`_isolate`): the rows that fail alone are failed and dropped, and the others
        get one more batched forward. When that fails too, or no row fails alone (a fault of the batch as a whole,
        e.g. out of memory), every row is failed: a step never loops. A forward that raised part-way wrote only
        columns past each row's length, which nothing reads: there is nothing to undo.
        """
        try:
            logits = self._forward(0, self.next_tokens, self.lengths, self.positions)
        except Exception as exc:  # noqa: BLE001 - find the row(s) that cause it
            if not self._isolate(exc):
                return None
            try:
                logits = self._forward(0, self.next_tokens, self.lengths, self.positions)
            except Exception as again:  # noqa: BLE001 - not a row's fault: fail the rest, once
                log.error("chat: the decode step failed again without the failing row(s) (%s: %s); failing its "
                          "other %d row(s)", type(again).__name__, again, len(self.rows))
                self._fail_all(again)
                return None
        self.lengths = self.lengths + 1
        self.positions = self.positions + 1
        return logits

    def _isolate(self, exc: Exception) -> bool:
        """After the batch's decode forward raised ``exc``: run each row's forward alone, and fail and drop the rows
        whose own forward raises. True when rows remain for another batched forward; otherwise all rows are
        failed."""
        rows = len(self.rows)
        log.error("chat: the decode step of %d row(s) failed", rows, exc_info=exc)
        if rows == 1:
            self._fail_all(exc)  # alone already: it is this row's failure
            return False
        keep: list[int] = []
        for row, job in enumerate(self.rows):
            try:
                self._probe(row)
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
        return True

    def _probe(self, row: int) -> None:
        """Run row ``row``'s decode forward alone (raises when the row fails alone). Its write lands past the
        row's length, where the next batched forward writes again."""
        one = slice(row, row + 1)
        self._forward(row, self.next_tokens[one], self.lengths[one], self.positions[one])

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
        """Keep only rows ``keep`` (ascending), packed into slots ``0 .. len(keep) - 1``: each kept row moves down
        to its new slot (only its own columns are copied; a slot is overwritten only after its row has moved)."""
        lengths = self.lengths.tolist()
        for new, old in enumerate(keep):
            self.kv.copy_row(old, new, lengths[old])
        index = self.torch.tensor(keep, device=self.lengths.device)
        self.lengths = self.lengths[index]
        self.positions = self.positions[index]
        self.next_tokens = self.next_tokens[index]
        self.rows = [self.rows[i] for i in keep]
        self.samplers = [self.samplers[i] for i in keep]

    def _reset(self) -> None:
        self.rows, self.samplers = [], []
        self.lengths = self.positions = self.next_tokens = None
        self.kv.release()  # an idle model holds no KV memory

    def drain(self) -> None:
        """Step until every admitted and queued job has finished (tests and shutdown)."""
        while self.busy:
            self.step()


# The decode engines a chat model may run (``chat_engine`` of its config, which export chooses per host:
# export/chat_engine_choice.py): name -> its DecodeLoop, or "module:Class" for one imported only when chosen.
# A new engine is one module with a DecodeLoop subclass (its ``for_model``) and one line here.
ENGINES: dict[str, type[DecodeLoop] | str] = {
    "torch": DecodeLoop,
    "llamacpp": "vlmserve.model_repository.llamacpp_engine:LlamaCppLoop",
}
DEFAULT_ENGINE = "torch"


def check_engine(name: str) -> None:
    """ValueError naming the known engines when ``name`` is not one of :data:`ENGINES`."""
    if name not in ENGINES:
        raise ValueError(f"chat_engine {name!r} is not a decode engine; the known engines are "
                         f"{', '.join(sorted(ENGINES))} (model_repository/chat_engine.py ENGINES)")


def engine_class(name: str) -> type[DecodeLoop]:
    """The loop class of engine ``name``, imported on first use (ValueError for an unknown name; ImportError when
    its module cannot be imported here)."""
    check_engine(name)
    engine = ENGINES[name]
    return load(engine) if isinstance(engine, str) else engine


def decode_loop(family: Any, params: ChatParams, version_dir: Path,
                prefix_metrics: Any = None) -> tuple[DecodeLoop | None, str]:
    """The loop of the engine ``params.chat_engine`` names, and the name of the engine it really is: the torch loop
    where the chosen engine cannot run here (logged), None ("static") for a pipeline that is not a
    :class:`DecoderFamily`. ValueError for an unknown engine name, whatever the pipeline."""
    name = params.chat_engine
    check_engine(name)
    if not isinstance(family, DecoderFamily):
        return None, "static"
    if name != DEFAULT_ENGINE:
        try:
            return engine_class(name).for_model(family, params, version_dir, prefix_metrics), name
        except ImportError as exc:
            log.warning("%s: export chose the %s engine (%s) but it cannot run here (%s); serving with the torch "
                        "loop", params.family, name, params.engine_choice, exc)
    return DecodeLoop.for_model(family, params, version_dir, prefix_metrics), DEFAULT_ENGINE


class ChatEngine:
    """Background thread feeding submitted jobs to a :class:`DecodeLoop` (or, for pipelines that are not a
    :class:`DecoderFamily`, to their static ``run_batch``)."""

    def __init__(self, pipeline: Any, max_batch: int = 8, window_s: float = 0.02,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, prefix_metrics: Any = None,
                 loop: DecodeLoop | None = None, load: Callable[[int, int, float], None] | None = None) -> None:
        self.pipeline = pipeline
        # ``load(running rows, waiting rows, seconds waited in all)`` after every step that changed them.
        self.load = load
        self.max_batch = max_batch
        self.window_s = window_s
        # ``loop``: the model's engine's loop (:func:`decode_loop`); else the torch one.
        if loop is None and isinstance(pipeline, DecoderFamily):
            loop = DecodeLoop(pipeline, max_batch, max_batch_tokens, prefix_cache_bytes, prefix_metrics)
        self.loop = loop
        self.queue: queue.Queue[ChatJob | None] = queue.Queue()
        self._last_load: tuple[int, int, float] = (0, 0, 0.0)
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
            self._report_load(loop)

    def _report_load(self, loop: DecodeLoop) -> None:
        waiting = sum(1 + len(j.shared) for j in loop.waiting) + self.queue.qsize()
        state = (len(loop.rows), waiting, loop.waited_s)
        if self.load is not None and state != self._last_load:
            self._last_load = state
            try:
                self.load(*state)
            except Exception as exc:  # noqa: BLE001 - a metric is not worth a decode step
                log.warning("chat load metrics: %s: %s", type(exc).__name__, exc)

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
            for job in batch:
                job.started_at = time.time()
            # The jobs of a batch are independent requests: when the batch fails, each is run alone, so that only
            # the request(s) that cause the failure fail.
            for group, outcome in common.retry_singly(batch, self._run_static):
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
