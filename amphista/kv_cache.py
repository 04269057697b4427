"""A pre-allocated KV cache that tree verification can compact in place.

Each layer owns (1, H, max_len, D) buffers written by position index (as in gpt-fast), so accepting a
path costs a copy of a few rows and rejecting costs nothing. The model sees only the filled prefix, so
attention never runs over empty slots. It plugs into any `transformers` model as its
`cache` (`past_key_values` before transformers 5.24).

`RowsCache` is the same for many sequences at once (batched decoding): one buffer, a slot per row, each row
at its own committed length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .errors import BatchingError


class TreeKVLayer(DynamicLayer):
    """One layer's buffers. `length` entries are committed; `update` appends after them."""

    def __init__(self, max_len: int, storage: _JointStorage | None = None):
        super().__init__()
        self.max_len = max_len
        self.length = 0
        self.storage = storage
        self.joint = False  # True when key_buf/value_buf are views into the cache's one joint buffer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, dk = key_states.shape
        dv = value_states.shape[-1]
        self.dtype, self.device = key_states.dtype, key_states.device
        views = self.storage.claim(key_states, value_states) if self.storage is not None else None
        if views is not None:
            self.key_buf, self.value_buf = views
            self.joint = True
        else:
            self.key_buf = torch.zeros(b, h, self.max_len, dk, dtype=key_states.dtype, device=key_states.device)
            self.value_buf = torch.zeros(
                b, h, self.max_len, dv, dtype=value_states.dtype, device=value_states.device
            )
        self.keys, self.values = self.key_buf[:, :, :0], self.value_buf[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions for a cache of {self.max_len}")
        self.key_buf[:, :, start:end] = key_states
        self.value_buf[:, :, start:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buf[:, :, :end], self.value_buf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    def set_length(self, length: int) -> None:
        self.length = length
        if self.is_initialized:
            self.keys, self.values = self.key_buf[:, :, :length], self.value_buf[:, :, :length]

    def compact(self, start: int, keep: torch.Tensor | None, n_keep: int) -> None:
        """Keep the entries at start + keep (sorted, relative) as start .. start + n_keep - 1."""
        if self.is_initialized and keep is not None:
            src = keep + start
            self.key_buf[:, :, start : start + n_keep] = self.key_buf.index_select(2, src)
            self.value_buf[:, :, start : start + n_keep] = self.value_buf.index_select(2, src)
        self.set_length(start + n_keep)

    def reset(self) -> None:
        self.set_length(0)


class _JointStorage:
    """One (layers, 2, B, H, max_len, D) buffer behind every layer whose keys and values share a shape,
    so that compacting the accepted path is one gather and one copy for the whole model instead of two
    per layer: at small model sizes the per-op cost, not the bytes, is what a step pays for."""

    def __init__(self, num_layers: int, max_len: int):
        self.num_layers, self.max_len = num_layers, max_len
        self.buf: torch.Tensor | None = None
        self.slots = 0

    @property
    def covers_all(self) -> bool:
        """Every layer lives in the joint buffer, so one gather compacts them all."""
        return self.slots == self.num_layers

    def claim(self, key_states: torch.Tensor, value_states: torch.Tensor):
        b, h, _, dk = key_states.shape
        if value_states.shape != key_states.shape or value_states.dtype != key_states.dtype:
            return None
        if self.buf is None:
            self.buf = torch.zeros(
                self.num_layers, 2, b, h, self.max_len, dk, dtype=key_states.dtype, device=key_states.device
            )
        elif self.buf.shape[2:4] + self.buf.shape[5:] != (b, h, dk) or self.buf.dtype != key_states.dtype:
            return None  # layers of different shapes (rare) keep their own buffers
        if self.slots == self.num_layers:
            return None
        slot = self.buf[self.slots]
        self.slots += 1
        return slot[0], slot[1]


class TreeCache(Cache):
    """The target's KV cache for one sequence of at most `max_len` positions (prompt + new + tree)."""

    def __init__(self, num_layers: int, max_len: int):
        self.storage = _JointStorage(num_layers, max_len)
        super().__init__(layers=[TreeKVLayer(max_len, self.storage) for _ in range(num_layers)])
        self.max_len = max_len

    @property
    def length(self) -> int:
        return self.layers[0].length

    def commit(self, start: int, keep: torch.Tensor, nodes: list[int]) -> None:
        """After a tree forward that wrote nodes at start.., keep only the accepted `nodes` (ascending;
        `keep` is the same indices as a tensor on the cache's device).

        When the accepted nodes already sit at start .. start + n - 1 (a top-1 chain), no copy is made.
        """
        n_keep = len(nodes)
        contiguous = n_keep == 0 or nodes[-1] == n_keep - 1
        if not contiguous and self.storage.covers_all:
            joint = self.storage.buf
            joint[..., start : start + n_keep, :] = joint.index_select(4, keep + start)
            contiguous = True  # moved already: the layers only need their new length
        for layer in self.layers:
            layer.compact(start, None if contiguous else keep, n_keep)

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.set_length(length)


class _RowsLayer(DynamicLayer):
    """One layer's view of the shared buffer; the cache says which rows and positions a forward writes."""

    def __init__(self, owner: RowsCache, index: int):
        super().__init__()
        self.owner, self.index = owner, index
        self.is_initialized = True  # the owner allocates; transformers must not

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.owner.write(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.owner.past

    def get_max_length(self) -> int:
        return self.owner.max_len


class RowsCache(Cache):
    """The target's KV cache for up to `capacity` sequences, each with its own committed length.

    One (layers, 2, capacity, H, max_len, D) buffer: rows live in slots 0..B-1, a position's keys and values
    sit at its index, so a row's prefix never moves and committing an accepted path is one gather and one
    scatter for the whole model. `prepare` names the rows and positions the next forward writes."""

    def __init__(self, num_layers: int, capacity: int, max_len: int):
        super().__init__(layers=[_RowsLayer(self, i) for i in range(num_layers)])
        self.num_layers, self.capacity, self.max_len = num_layers, capacity, max_len
        self.buf: torch.Tensor | None = None
        self.rows = slice(0, 0)
        self.index: torch.Tensor | None = None  # (r, 1, q, 1) write positions, expanded per layer
        self.kv_end = 0
        self.past = 0

    def prepare(self, rows: slice, slots: torch.Tensor, kv_end: int) -> None:
        """The next forward writes rows `rows`, token j of row b into cache slot slots[b, j], and attends to
        slots < kv_end. (A tree's slots are not its positions: siblings share a position, not a slot.)"""
        self.rows, self.kv_end = rows, kv_end
        self.index = slots[:, None, :, None]
        self.past = kv_end - slots.shape[1]

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        if self.buf is None:
            _, h, _, d = key.shape
            if value.shape[-1] != d:
                raise BatchingError(
                    "batched decoding needs keys and values of one head size in every layer; this target's "
                    "differ: decode its sequences one at a time with generate()"
                )
            self.buf = key.new_zeros(self.num_layers, 2, self.capacity, h, self.max_len, d)
        index = self.index.expand(-1, key.shape[1], -1, key.shape[3])
        k, v = self.buf[layer, 0, self.rows], self.buf[layer, 1, self.rows]
        k.scatter_(2, index, key)
        v.scatter_(2, index, value)
        return k[:, :, : self.kv_end], v[:, :, : self.kv_end]

    def grow(self, max_len: int) -> None:
        """Make every slot hold `max_len` positions, keeping what the live rows hold."""
        if max_len <= self.max_len:
            return
        if self.buf is not None:
            old = self.buf
            self.buf = old.new_zeros(*old.shape[:4], max_len, old.shape[5])
            self.buf[..., : self.max_len, :] = old
        self.max_len = max_len

    def commit(self, rows: int, starts: list[int], nodes: list[list[int]]) -> None:
        """Row b wrote a tree at starts[b]..; keep its accepted `nodes[b]` (ascending, root first) at
        starts[b].. . Rows whose accepted nodes already sit in place (a chain of top-1s) need no copy."""
        if self.buf is None or all(n[-1] == len(n) - 1 for n in nodes):
            return
        width = max(len(n) for n in nodes)
        src = torch.tensor(
            [[s + (n[i] if i < len(n) else n[-1]) for i in range(width)] for s, n in zip(starts, nodes)]
        )
        dst = torch.tensor([[s + i for i in range(width)] for s in starts])
        buf = self.buf[:, :, :rows]
        shape = (*buf.shape[:3], buf.shape[3], width, buf.shape[5])
        src = src.to(buf.device)[None, None, :, None, :, None].expand(shape)
        dst = dst.to(buf.device)[None, None, :, None, :, None].expand(shape)
        buf.scatter_(4, dst, buf.gather(4, src))

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot `src`'s first `length` positions now live in slot `dst`."""
        if self.buf is not None and src != dst:
            self.buf[:, :, dst, :, :length] = self.buf[:, :, src, :, :length]
