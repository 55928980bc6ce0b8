"""Structured outputs for the chat engine: JSON-schema / JSON-object grammars as per-row token masks.

The grammar library is **llguidance** (Microsoft's guidance engine, also a vLLM and SGLang backend): a Rust
extension with no Python dependencies (so it cannot move the torch/transformers pins), which builds its token
trie straight from a fast Hugging Face tokenizer (the tiny models' too), compiles JSON Schema lazily (no
per-schema precompilation pause) and fills one row of a token bitmask per call, which is what a batch whose
rows have different schemas, or none, needs. See docs/openai.md.
"""

from __future__ import annotations

import json
import threading
from typing import Any

# Compact separators, the way json.dumps writes them: every token spent is content, and a model with random
# weights cannot wander off into endless whitespace.
_JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The response_format cannot be compiled (an unsupported or malformed schema)."""


class Grammars:
    """One model's grammar machinery: its llguidance tokenizer (built once, ~1 s on a real vocabulary),
    compiling response formats, and a matcher per row."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = sorted(eos_ids)
        self.vocab_size = vocab_size
        self._lltok: Any = None
        self._lock = threading.Lock()

    @property
    def lltokenizer(self) -> Any:
        with self._lock:
            if self._lltok is None:
                import llguidance.hf

                self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=self.eos_ids)
            return self._lltok

    def compile(self, spec: dict[str, Any]) -> str:
        """``{"type": "json_object"}`` or ``{"type": "json_schema", "schema": {...}}`` -> an llguidance grammar,
        checked against this tokenizer. Raises :class:`GrammarError` with llguidance's reason."""
        import llguidance

        schema = {"type": "object"} if spec.get("type") == "json_object" else spec.get("schema")
        if not isinstance(schema, dict):
            raise GrammarError("response_format needs a JSON schema object")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"response_format schema is not usable: {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error:
            raise GrammarError(f"response_format schema is not supported: {error}")
        return grammar

    def matcher(self, grammar: str) -> Any:
        import llguidance

        return llguidance.LLMatcher(self.lltokenizer, grammar)

    def token_bytes(self, token: int) -> bytes:
        """The exact bytes of one token (a byte-level token may be part of a UTF-8 character)."""
        return bytes(self.lltokenizer.decode_bytes([token]))


class RowGrammar:
    """One row's constraint: masks its logits, follows its tokens, knows when the document is complete.

    The bitmask is filled through ``llguidance.numpy`` and applied with plain torch ops: ``llguidance.torch`` wraps
    its kernel in ``torch.compile`` at import, which would pull in the inductor (and its compiler toolchain) into
    the Triton model for a one-line mask.
    """

    def __init__(self, grammars: Grammars, grammar: str) -> None:
        import llguidance.numpy
        import torch

        self.torch = torch
        self.fill = llguidance.numpy.fill_next_token_bitmask
        self.matcher = grammars.matcher(grammar)
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, grammars.vocab_size)
        self.shifts = torch.arange(32, dtype=torch.int32)

    def mask(self, logits: Any) -> None:
        """Set the logits of every token the grammar forbids next to -inf (in place, a CPU row [vocab])."""
        self.fill(self.matcher, self.bitmask, 0)
        words = self.torch.from_numpy(self.bitmask[0])
        allowed = ((words[:, None] >> self.shifts) & 1).bool().flatten()[: logits.shape[-1]]
        logits.masked_fill_(~allowed, float("-inf"))
    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar rejected token {token}: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Nothing but end-of-sequence can follow: the document is whole."""
        return bool(self.matcher.is_stopped())
