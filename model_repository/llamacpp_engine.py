"""The chat decode loop on llama.cpp (``llama-cpp-python``'s low-level bindings), for the families that have a GGUF.

:class:`LlamaCppLoop` is a :class:`~vlmserve.model_repository.chat_engine.DecodeLoop` whose forwards run in llama.cpp:
one
``llama_context`` with a unified KV cache of ``max_batch_tokens`` cells and one sequence id per row, each step one
``llama_decode`` of a multi-sequence batch (every row's next token, at its own position, in its own sequence) —
llama.cpp's continuous batching, as ``llama-server`` does it. Everything else is the shared loop's: admission
against the KV budget, the per-row sampler (logprobs, penalties, grammar mask, seed) on llama.cpp's logits, the
streamer (stop strings, cancellation), per-row failure isolation.

- **Prompts.** A text prompt is prefilled from its token ids; a prompt with images as embeddings (the family's
  ``prefill_inputs``: the text embeddings with the vision encoder's features spliced in), since a llama.cpp batch
  is either ids or embeddings. The text prompts admitted in one step share one ``llama_decode``.
- **Rows.** Rows own sequence ids from a pool; ``n`` choices of a request share its prefill
  (``llama_memory_seq_cp``: with the unified cache, the cells are tagged, not copied); a row that leaves has its
  cells removed (``llama_memory_seq_rm``). Packing rows after a leave moves no data.
- **Failures.** On a non-zero return llama.cpp restores the cache as it was before the call, so a failed step has
  nothing to undo, as in the torch loop.
- **Prefix cache.** When a request ends, its sequence's prompt cells stay resident (parked, LRU) with the
  prompt's block keys (:class:`~vlmserve.model_repository.kv_cache.PrefixCache`'s hash chain over 32-token blocks and
  the
  images' pixels). A later prompt that begins with the same whole blocks gets them by ``llama_memory_seq_cp`` of
  that range (tags, no copy) and computes only the rest. Parked prompts hold at most ``prefix_cache_bytes`` of
  KV (and at most ``max_batch_tokens`` cells, which the context adds to the running rows' budget); they are
  dropped first when a batch needs cells or sequence ids.

The GGUF is written at export (``export/llamacpp.py``), which also fences it (teacher-forced logits vs the
transformers reference) and times it against the torch loop before choosing it for the host.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from vlmserve.families.contract import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_PREFIX_CACHE_BYTES, ChatParams
from vlmserve.model_repository.chat_engine import ChatJob, DecodeLoop, DecoderFamily, RowSampler

log = logging.getLogger("vlmserve.chat")

_INIT = threading.Lock()
_LOG_CALLBACK: Any = None  # kept referenced: llama.cpp calls it for as long as the process lives


def bindings() -> Any:
    """The ``llama_cpp`` module, with its backend initialised once and its log routed to ours (warnings up)."""
    global _LOG_CALLBACK
    import llama_cpp

    with _INIT:
        if _LOG_CALLBACK is None:
            def to_log(level: int, text: bytes, _data: Any) -> None:
                if level in (3, 4):  # GGML_LOG_LEVEL_WARN, _ERROR
                    log.warning("llama.cpp: %s", text.decode("utf-8", errors="replace").rstrip())

            _LOG_CALLBACK = llama_cpp.llama_log_callback(to_log)
            llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
    return llama_cpp


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class LlamaCppModel:
    """A GGUF loaded into one llama.cpp context: ``cells`` KV cells shared by up to ``sequences`` sequences."""

    def __init__(self, gguf: Path, cells: int, sequences: int, threads: int | None = None) -> None:
        lib = self.lib = bindings()
        params = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), params)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {gguf}")
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = cells
        ctx_params.n_batch = cells  # one prefill of any admitted prompt is one llama_decode
        ctx_params.n_seq_max = sequences
        ctx_params.kv_unified = True  # every sequence draws from the same cells: rows of any length share them
        ctx_params.n_threads = ctx_params.n_threads_batch = threads or default_threads()
        ctx_params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise ValueError(f"llama.cpp could not create a context of {cells} cells x {sequences} sequences")
        self.cells = int(lib.llama_n_ctx(self.ctx))
        self.memory = lib.llama_get_memory(self.ctx)
        self.vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model)))
        self.embd = int(lib.llama_model_n_embd(self.model))
        self.batch = lib.llama_batch_init(self.cells, 0, 1)

    def decode(self, entries: list[tuple[int, int, int, bool]] | None = None, embeddings: np.ndarray | None = None,
               seq: int = 0, start: int = 0) -> np.ndarray:
        """One ``llama_decode``: ``entries`` (token, position, sequence, wants logits), or ``embeddings``
        ``[n, embd]`` as sequence ``seq`` from position ``start`` (logits of the last one only). Returns the
        logits asked for, in batch order, as float32 ``[outputs, vocab]``."""
        lib = self.lib
        if embeddings is not None:
            n = len(embeddings)
            batch = lib.llama_batch_init(n, self.embd, 1)
            try:
                data = np.ascontiguousarray(embeddings, dtype=np.float32)
                ctypes.memmove(batch.embd, data.ctypes.data, data.nbytes)
                for i in range(n):
                    batch.pos[i] = start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = i == n - 1
                batch.n_tokens = n
                return self._run(batch, 1)
            finally:
                lib.llama_batch_free(batch)
        assert entries
        batch = self.batch
        outputs = 0
        for i, (token, position, sequence, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = sequence
            batch.logits[i] = logits
            outputs += bool(logits)
        batch.n_tokens = len(entries)
        return self._run(batch, outputs)

    def _run(self, batch: Any, outputs: int) -> np.ndarray:
        rc = self.lib.llama_decode(self.ctx, batch)
        if rc != 0:
            # llama.cpp restored its cache to what it was before the call: nothing to undo.
            reason = {1: "no KV cells left for the batch", 2: "aborted"}.get(rc, "error")
            raise RuntimeError(f"llama_decode failed ({rc}: {reason})")
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(outputs, self.vocab))
        return logits.copy()

    def copy(self, src: int, dst: int, start: int = -1, end: int = -1) -> None:
        """Give ``dst`` the cells of ``src`` at positions ``[start, end)`` (all by default)."""
        self.lib.llama_memory_seq_cp(self.memory, src, dst, start, end)

    def drop(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def truncate(self, seq: int, position: int) -> None:
        """Remove sequence ``seq``'s cells from ``position`` on."""
        self.lib.llama_memory_seq_rm(self.memory, seq, position, -1)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None


class LlamaCppLoop(DecodeLoop):
    """A :class:`DecodeLoop` whose forwards run in llama.cpp (see the module docstring)."""

    def __init__(self, family: DecoderFamily, gguf: Path, max_batch: int = 8,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, max_prefill_tokens: int = 1024,
                 threads: int | None = None, prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
                 prefix_metrics: Any = None) -> None:
        from vlmserve.model_repository.kv_cache import PrefixCache

        self._init_scheduler(family, max_batch, max_batch_tokens, max_prefill_tokens)
        self.prefix = PrefixCache(prefix_cache_bytes, metrics=prefix_metrics)
        # Parked prompts: at most prefix_cache_bytes of KV, and at most max_batch_tokens cells beside the rows'.
        self.parked_limit = min(prefix_cache_bytes // self.kv_bytes_per_token, max_batch_tokens)
        parked_seqs = max_batch if self.parked_limit else 0
        self.llama = LlamaCppModel(gguf, max_batch_tokens + self.parked_limit, max_batch + parked_seqs, threads)
        self.seqs: list[int] = []  # row -> its llama.cpp sequence id
        self.sequences = max_batch + parked_seqs
        self.free = list(range(self.sequences))  # sequence ids nothing holds
        # Parked sequence id -> (its prompt's block keys, its prompt length), least recently used first.
        self.parked: OrderedDict[int, tuple[list[bytes], int]] = OrderedDict()
        self.prompt_keys: dict[int, list[bytes]] = {}  # id(job) of a row -> its prompt's block keys

    @classmethod
    def for_model(cls, family: DecoderFamily, params: ChatParams, version_dir: Path,
                  prefix_metrics: Any = None) -> LlamaCppLoop:
        """The served loop on export's GGUF (``decoder_gguf`` in ``version_dir``). ImportError where the bindings
        cannot be imported (an image built without them, a repository exported elsewhere)."""
        try:
            import llama_cpp  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"llama-cpp-python cannot be imported ({exc}); `make llamacpp` installs the "
                              "bindings") from exc
        gguf = version_dir / params.decoder_gguf
        log.info("%s: decoding with llama.cpp (%s; %s)", params.family, gguf.name, params.engine_choice)
        loop = cls(family, gguf, params.max_batch, params.max_batch_tokens,
                   prefix_cache_bytes=params.prefix_cache_bytes, prefix_metrics=prefix_metrics)
        # The torch copy of the decoder layers is not run any more: only its embeddings (image prompts) and head
        # (the vocabulary's width) stay.
        backbone = family.model.model
        text = getattr(backbone, "language_model", None) or backbone.text_model
        text.layers = type(text.layers)()
        return loop

    @property
    def kv_bytes_per_token(self) -> int:
        """llama.cpp keeps keys and values in f16: layers x 2 x kv heads x head dim x 2 bytes."""
        text = self.family.model.config.get_text_config()
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return text.num_hidden_layers * 2 * heads * head_dim * 2

    @property
    def parked_tokens(self) -> int:
        return sum(n for _, n in self.parked.values())

    def _take(self) -> int:
        if not self.free:
            self._evict()
        seq = self.free.pop(0)
        self.llama.drop(seq)  # nothing of an earlier holder's cells may remain
        return seq

    def _give_back(self, seq: int) -> None:
        self.llama.drop(seq)
        self.free.append(seq)

    def _evict(self) -> None:
        """Drop the least recently used parked prompt."""
        seq, _ = self.parked.popitem(last=False)
        self._give_back(seq)
        self._report_held()

    def _park(self, seq: int, job: ChatJob) -> None:
        """Keep ``seq``'s prompt cells for later prompts that begin the same way (or free it)."""
        keys = self.prompt_keys.pop(id(job), None)
        length = len(job.inputs["input_ids"])
        if (not keys or length > self.parked_limit
                or any(k[-1] == keys[-1] for k, _ in self.parked.values())):  # nothing to keep, or kept already
            self._give_back(seq)
            return
        self.llama.truncate(seq, length)  # the answer's cells go; the prompt's stay
        self.parked[seq] = (keys, length)
        while self.parked_tokens > self.parked_limit:
            self._evict()
        self._report_held()

    def _report_held(self) -> None:
        if self.prefix.metrics is not None:
            self.prefix.metrics.held(self.parked_tokens * self.kv_bytes_per_token)

    def _reuse(self, job: ChatJob, seq: int) -> int:
        """Give ``seq`` the cells of the longest parked prefix of ``job``'s prompt (whole blocks, at least the last
        prompt token left to compute); returns how many prompt tokens they cover."""
        from vlmserve.model_repository.kv_cache import inputs_digest

        ids = job.inputs["input_ids"]
        if not self.prefix.enabled:
            return 0
        keys = self.prefix.keys(ids, inputs_digest(job.inputs))
        self.prompt_keys[id(job)] = keys
        usable = keys[: (len(ids) - 1) // self.prefix.block]
        best, blocks = None, 0
        for parked, (held, _) in self.parked.items():
            n = 0
            while n < min(len(usable), len(held)) and usable[n] == held[n]:
                n += 1
            if n > blocks:
                best, blocks = parked, n
        if best is None:
            return 0
        self.parked.move_to_end(best)
        start = blocks * self.prefix.block
        self.llama.copy(best, seq, 0, start)
        return start

    def _prefill(self, run: list[tuple[ChatJob, dict[str, Any], int]]) -> None:
        """The prompts of ``run`` into fresh sequences (text prompts in one ``llama_decode``, a prompt with images
        alone, as embeddings), each from the end of its longest parked prefix, then each choice's first token;
        the choices that go on become rows."""
        try:
            logits = self._prefill_prompts(run)
        except RuntimeError as exc:
            if "no KV cells" not in str(exc) or not self.parked:
                raise
            while self.parked:  # the parked prompts hold the cells this batch needs: drop them, once
                self._evict()
            logits = self._prefill_prompts(run)
        torch = self.torch
        rows = len(self.rows) + sum(1 + len(job.shared) for job, _, _ in run)
        joining: list[tuple[int, ChatJob, RowSampler, int, int, int]] = []  # (seq, job, sampler, token, len, pos)
        for i, (job, _, position) in enumerate(run):
            seq = self._prompt_seqs[i]
            row_logits = torch.from_numpy(logits[i])
            taken = False
            for choice in (job, *job.shared):
                sampler = RowSampler(choice.params, choice.index, choice.grammar,
                                     self.grammars if choice.grammar else None)
                choice.batch_size = max(choice.batch_size, rows)
                token = sampler(row_logits, choice)
                if self._answer(choice, token, sampler):
                    continue
                if taken:  # another choice of this request: its own sequence, sharing the prompt's cells
                    own = self._take()
                    self.llama.copy(seq, own)
                    joining.append((own, choice, sampler, token, len(job.inputs["input_ids"]), position))
                else:
                    taken = True
                    joining.append((seq, choice, sampler, token, len(job.inputs["input_ids"]), position))
            if not taken:
                self._park(seq, job)
        if not joining:
            return
        self.seqs += [j[0] for j in joining]
        self._join(joining, "cpu")

    def _prefill_prompts(self, run: list[tuple[ChatJob, dict[str, Any], int]]) -> dict[int, np.ndarray]:
        """Each prompt's last logits; its sequence in ``self._prompt_seqs`` (all freed again when this raises)."""
        seqs = self._prompt_seqs = [self._take() for _ in run]
        try:
            starts = [self._reuse(job, seq) for (job, _, _), seq in zip(run, seqs, strict=True)]
            texts = [i for i, (job, _, _) in enumerate(run) if "pixel_values" not in job.inputs]
            logits: dict[int, np.ndarray] = {}
            if texts:
                entries = []
                for i in texts:
                    ids = run[i][0].inputs["input_ids"]
                    entries += [(ids[p], p, seqs[i], p == len(ids) - 1) for p in range(starts[i], len(ids))]
                out = self.llama.decode(entries)
                logits.update({i: out[k] for k, i in enumerate(texts)})
            for i, (_, kwargs, _) in enumerate(run):
                if i not in logits:
                    embeds = kwargs["inputs_embeds"][0, starts[i]:].float().cpu().numpy()
                    logits[i] = self.llama.decode(embeddings=embeds, seq=seqs[i], start=starts[i])[0]
        except Exception:
            for (job, _, _), seq in zip(run, seqs, strict=True):
                self.prompt_keys.pop(id(job), None)
                self._give_back(seq)
            raise
        if self.prefix.enabled:
            for (job, _, _), start in zip(run, starts, strict=True):
                self.prefix.record(len(job.inputs["input_ids"]), start,
                                   held=self.parked_tokens * self.kv_bytes_per_token)
        return logits

    def _forward(self, first: int, tokens: Any, lengths: Any, positions: Any) -> Any:
        """One decode step of rows ``first .. first + len(tokens) - 1``: each row's token at its own position in
        its own sequence, all in one ``llama_decode``; their float logits ``[rows, vocab]``."""
        seqs = self.seqs[first:first + len(tokens)]
        entries = [(int(t), int(p), s, True)
                   for t, p, s in zip(tokens.tolist(), positions.tolist(), seqs, strict=True)]
        try:
            return self.torch.from_numpy(self.llama.decode(entries))
        except RuntimeError as exc:
            if "no KV cells" not in str(exc) or not self.parked:
                raise
            while self.parked:  # the running rows come first
                self._evict()
            return self.torch.from_numpy(self.llama.decode(entries))

    def _probe(self, row: int) -> None:
        """Row ``row``'s decode alone, then its token taken out of its sequence again (llama.cpp keeps what a
        decode wrote; the batched retry decodes that position once more)."""
        super()._probe(row)
        self.llama.truncate(self.seqs[row], int(self.positions[row]))

    def _select(self, keep: list[int]) -> None:
        """Keep only rows ``keep``; the others' sequences are freed (no data moves)."""
        kept = set(keep)
        for row, seq in enumerate(self.seqs):
            if row not in kept:
                self._leave(row, seq)
        index = self.torch.tensor(keep)
        self.lengths = self.lengths[index]
        self.positions = self.positions[index]
        self.next_tokens = self.next_tokens[index]
        self.seqs = [self.seqs[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]
        self.samplers = [self.samplers[i] for i in keep]

    def _leave(self, row: int, seq: int) -> None:
        job = self.rows[row]
        if job.finish in ("stop", "length"):  # its prompt cells are sound: keep them for a later prompt
            self._park(seq, job)
        else:
            self.prompt_keys.pop(id(job), None)
            self._give_back(seq)

    def _reset(self) -> None:
        for row, seq in enumerate(self.seqs):
            self._leave(row, seq)
        self.rows, self.samplers, self.seqs = [], [], []
        self.lengths = self.positions = self.next_tokens = None
