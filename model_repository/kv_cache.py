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

    Before each forward the engine calls :meth:`plan` with the slots the forward runs and the column each of its
    query tokens writes; the model's attention layers then call :meth:`update`.
    """

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0  # row capacity of the buffers
        self.length = 0  # column capacity
        self._read: slice = slice(0, 0)
        self._write_rows: torch.Tensor | None = None  # [B, 1] slot of each row of the forward
        self._write_cols: torch.Tensor | None = None  # [B, T] column each query token writes
        self._read_len = 0

    # -- capacity -------------------------------------------------------------------------------------------------

    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` slots of ``length`` columns each (grows by copying; never shrinks)."""
        length = -(-length // LENGTH_QUANTUM) * LENGTH_QUANTUM
        if rows <= self.rows and length <= self.length:
            return
        new_rows, new_length = max(rows, self.rows), max(length, self.length)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_zeros((new_rows, old.shape[1], new_length, old.shape[3]))
                grown[: old.shape[0], :, : old.shape[2]] = old
                store[i] = grown
        self.rows, self.length = new_rows, new_length

    def release(self) -> None:
        """Free the buffers (the batch is empty)."""
        self.keys, self.values = [], []
        self.rows = self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # -- moving rows ----------------------------------------------------------------------------------------------

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Slot ``dst`` takes slot ``src``'s first ``length`` columns (a row moving down, or a choice's copy)."""
        if src == dst:
            return
        for store in (self.keys, self.values):
            for buf in store:
                buf[dst, :, :length] = buf[src, :, :length]

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
        if layer_idx == len(self.keys):  # first forward: buffers take the model's kv heads, head dim and dtype
            _, heads, _, dim = key_states.shape
            shape = (self.rows, heads, self.length, dim)
            self.keys.append(key_states.new_zeros(shape))
            self.values.append(value_states.new_zeros((self.rows, heads, self.length, value_states.shape[3])))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
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
