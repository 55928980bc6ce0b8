"""A preallocated key/value cache for the chat engine's running batch: one slot (row) per sequence.

Per layer, keys and values live in buffers ``[rows, kv_heads, capacity, head_dim]``. Row ``r`` holds its tokens at
columns ``[0, length_r)``; nothing is padded on the left and nothing is copied when a row joins or leaves the batch
(Hugging Face's ``DynamicCache`` concatenates every layer's whole cache on every step and on every join). A forward
writes each row's new keys at that row's own columns and reads the slots it runs as a view; the attention mask
(:func:`attention_mask`) lets each query see only the columns its row filled, so columns past a row's length hold
stale values that no query reads, and a forward that fails part-way leaves nothing to undo.

The buffers grow (one copy) when a batch needs more rows or longer rows than they hold; the chat engine reserves
each row's prompt + ``max_tokens`` when it admits it, so a decode step never grows them.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache

# Length capacity grows in steps of this many columns (fewer re-allocations for slightly longer rows).
LENGTH_QUANTUM = 64


class SlotCache(Cache):
    """Transformers ``Cache`` over per-row slots (see the module docstring).

    All layers' keys and values are one tensor :attr:`data` ``[2, layers, rows, kv_heads, capacity, head_dim]``
    (made on the first forward, when the model's kv heads, head dim and dtype are known), so moving a row or a
    block of columns is one copy. Before each forward the engine calls :meth:`plan` with the slots the forward runs
    and the column each of its query tokens writes; the model's attention layers then call :meth:`update`.
    """

    def __init__(self, layers: int) -> None:
        super().__init__(layers=[])
        self.num_layers = layers
        self.data: torch.Tensor | None = None
        self.rows = 0  # row capacity
        self.length = 0  # column capacity
        self._read: slice = slice(0, 0)
        self._write_rows: torch.Tensor | None = None  # [B, 1] slot of each row of the forward
        self._write_cols: torch.Tensor | None = None  # [B, T] column each query token writes
        self._read_len = 0

    @property
    def keys(self) -> list[torch.Tensor]:
        """Per layer, ``[rows, kv_heads, capacity, head_dim]`` (views of :attr:`data`)."""
        return [] if self.data is None else list(self.data[0])

    @property
    def values(self) -> list[torch.Tensor]:
        return [] if self.data is None else list(self.data[1])

    # -- capacity -------------------------------------------------------------------------------------------------

    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` slots of ``length`` columns each (grows by copying; never shrinks)."""
        length = -(-length // LENGTH_QUANTUM) * LENGTH_QUANTUM
        if rows <= self.rows and length <= self.length:
            return
        new_rows, new_length = max(rows, self.rows), max(length, self.length)
        if self.data is not None:
            old = self.data
            shape = (*old.shape[:2], new_rows, old.shape[3], new_length, old.shape[5])
            self.data = old.new_zeros(shape)
            self.data[:, :, : old.shape[2], :, : old.shape[4]] = old
        self.rows, self.length = new_rows, new_length

    def release(self) -> None:
        """Free the buffers (the batch is empty)."""
        self.data = None
        self.rows = self.length = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    # -- moving rows and blocks -----------------------------------------------------------------------------------

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Slot ``dst`` takes slot ``src``'s first ``length`` columns (a row moving down, or a choice's copy)."""
        if src != dst and self.data is not None:
            self.data[:, :, dst, :, :length] = self.data[:, :, src, :, :length]

    def read_block(self, slot: int, start: int, stop: int) -> torch.Tensor:
        """A copy of slot ``slot``'s columns ``[start, stop)``: ``[2, layers, kv_heads, stop - start, head_dim]``."""
        assert self.data is not None
        return self.data[:, :, slot, :, start:stop].clone()

    def write_block(self, slot: int, start: int, block: torch.Tensor) -> None:
        """Slot ``slot``'s columns from ``start`` take ``block`` (from :meth:`read_block`)."""
        if self.data is None:
            self.data = block.new_zeros((2, self.num_layers, self.rows, block.shape[2], self.length, block.shape[4]))
        self.data[:, :, slot, :, start:start + block.shape[3]] = block

    # -- one forward ----------------------------------------------------------------------------------------------

    def plan(self, first: int, cols: torch.Tensor, read_len: int) -> None:
        """The next forward runs slots ``first .. first + B - 1``; query token ``t`` of row ``b`` writes column
        ``cols[b, t]``; attention reads columns ``[0, read_len)`` of those slots."""
        rows = cols.shape[0]
        if first + rows > self.rows or read_len > self.length:
            raise RuntimeError(f"KV slots {first}..{first + rows - 1} x {read_len} columns exceed the reservation "
                               f"({self.rows} x {self.length})")
        self._read = slice(first, first + rows)
        self._write_rows = torch.arange(first, first + rows, device=cols.device)[:, None]
        self._write_cols = cols
        self._read_len = read_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.data is None:  # first forward: the buffers take the model's kv heads, head dim and dtype
            _, heads, _, dim = key_states.shape
            self.data = key_states.new_zeros((2, self.num_layers, self.rows, heads, self.length, dim))
        keys, values = self.data[0, layer_idx], self.data[1, layer_idx]
        # [B, H, T, D] -> [B, T, H, D]: advanced indices (slot, column) come first in the indexed view.
        keys[self._write_rows, :, self._write_cols] = key_states.transpose(1, 2)
        values[self._write_rows, :, self._write_cols] = value_states.transpose(1, 2)
        return keys[self._read, :, : self._read_len], values[self._read, :, : self._read_len]

    # -- what transformers asks of a Cache ------------------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # unused: the engine passes position ids and a 4D mask, so no cache_position is derived from it

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int) -> tuple[int, int]:
        return self._read_len, 0

    @property
    def is_compileable(self) -> bool:
        return False


def attention_mask(cols: torch.Tensor, read_len: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive 4D mask ``[B, 1, T, read_len]`` of a forward planned with ``cols``: query ``t`` of row ``b``
    sees the columns up to and including its own, ``cols[b, t]`` (its row's earlier tokens and itself)."""
    allowed = torch.arange(read_len, device=cols.device)[None, None, :] <= cols[:, :, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=cols.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


class PrefixCache:
    """The KV of prompt prefixes seen before, by blocks of :attr:`block` tokens, so that a repeated system prompt
    or the earlier turns of a conversation are not computed again.

    Block ``i`` of a prompt is keyed by a hash chain: the hash of block ``i - 1``'s key and block ``i``'s token ids,
    starting from a digest of the request's other model inputs (its images' pixels), so a key names the exact
    inputs of everything up to the block's end, and with them its keys and values. Blocks are held in an LRU
    bounded in bytes (``capacity``; 0: off). ``metrics`` (optional): ``hit(n)`` / ``miss(n)`` with prompt tokens
    taken from the cache / computed, ``held(bytes)``.
    """

    def __init__(self, capacity: int, block: int = 32, metrics: Any = None) -> None:
        from vlmserve.model_repository.common import FeatureCache

        self.block = block
        self.store = FeatureCache(capacity)
        self.metrics = metrics
        self.hit_tokens = 0
        self.missed_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.store.capacity > 0

    def keys(self, ids: list[int], extra: bytes) -> list[bytes]:
        """The key of each whole block of ``ids``."""
        import hashlib

        out: list[bytes] = []
        previous = extra
        for start in range(0, len(ids) - self.block + 1, self.block):
            digest = hashlib.blake2b(previous, digest_size=16)
            digest.update(torch.tensor(ids[start:start + self.block], dtype=torch.int64).numpy().tobytes())
            previous = digest.digest()
            out.append(previous)
        return out

    def lookup(self, keys: list[bytes]) -> list[torch.Tensor]:
        """The cached blocks that begin the prompt (stops at the first block not held)."""
        found: list[torch.Tensor] = []
        for key in keys:
            block = self.store.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def put(self, key: bytes, block: torch.Tensor) -> None:
        self.store.put(key, block)

    def record(self, prompt_tokens: int, hit: int, held: int | None = None) -> None:
        """Count a prompt's tokens taken from the cache (``hit``) and computed; ``held``: the bytes the cache holds
        when they are not in :attr:`store` (an engine that keeps prefixes its own way)."""
        self.hit_tokens += hit
        self.missed_tokens += prompt_tokens - hit
        if self.metrics is not None:
            self.metrics.hit(hit)
            self.metrics.miss(prompt_tokens - hit)
            self.metrics.held(self.store.bytes if held is None else held)


def inputs_digest(inputs: dict[str, Any]) -> bytes:
    """A digest of a prompt's model inputs other than its token ids (images' pixels, grids): prefixes with the
    same ids but other images never share a key."""
    import numpy as np

    from vlmserve.model_repository.common import content_key

    arrays = []
    for name in sorted(k for k in inputs if k != "input_ids"):
        value = inputs[name]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        arrays.append(np.asarray(value))
    return content_key(*arrays)


GQA_SDPA = "vlmserve_gqa_sdpa"


def _gqa_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with grouped-query attention done inside the kernel (``enable_gqa``) also
    when a mask is given: transformers' own ``sdpa`` then copies every layer's keys and values ``heads /
    kv_heads`` times on every step (``repeat_kv``), which costs more than the attention itself on long rows."""
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=bool(is_causal),
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def use_gqa_sdpa(model: Any) -> None:
    """Switch ``model``'s language model from ``sdpa`` to :func:`_gqa_sdpa` (same kernel, same masks, no
    repeated keys and values). Other attention implementations are left as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_SDPA, _gqa_sdpa)
    AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)
    text = model.config.get_text_config()
    if text._attn_implementation == "sdpa":
        text._attn_implementation = GQA_SDPA
