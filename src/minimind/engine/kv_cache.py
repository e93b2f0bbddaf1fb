"""Preallocated KV storage in slots, and the slot manager that doubles as the prefix cache.

One slot holds one sequence's keys/values for up to max_model_len positions. A finished sequence leaves
its KV in its slot; the next request whose prompt starts with those tokens (the next chat turn, the same
system prompt) takes that slot and skips recomputing them. Free slots are reused least-recently-used first.
"""
from __future__ import annotations

import mmap
import os

import torch


class KVCache:
    """k, v: [layers, slots, H_kv, max_len, D], allocated once and written in place."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype):
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k, self.v = _zeros(shape, dtype), _zeros(shape, dtype)
        self.num_kv_heads, self.max_len = num_kv_heads, max_len
        # Row views for index_copy_: [layers, slots * H_kv * max_len, D]
        self.k_rows = self.k.view(num_layers, -1, head_dim)
        self.v_rows = self.v.view(num_layers, -1, head_dim)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write_index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Row index [N * H_kv] (token-major, head-minor) of tokens at (slots [N], positions [N])."""
        heads = torch.arange(self.num_kv_heads)
        return ((slots[:, None] * self.num_kv_heads + heads[None, :]) * self.max_len + positions[:, None]).flatten()

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self.k[:, dst, :, :n].copy_(self.k[:, src, :, :n])
        self.v[:, dst, :, :n].copy_(self.v[:, src, :, :n])


def _zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros in an anonymous mapping: the OS supplies zero pages on first write, so the cache costs memory only for
    the positions in use (torch.zeros would write all of it, max_model_len positions, up front)."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)  # the tensor keeps the mapping alive


def common_prefix_len(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))


class SlotManager:
    """Owns the slot <-> sequence map and what each free slot still caches (token ids of its valid KV)."""

    # Copy KV out of a busy slot only when that saves at least this many tokens over the best free slot.
    MIN_COPY_GAIN = 16

    def __init__(self, num_slots: int, enable_prefix_caching: bool = True):
        self.num_slots = num_slots
        self.enable_prefix_caching = enable_prefix_caching
        self.owner: list = [None] * num_slots  # running Sequence per slot
        self.cached: list[list[int]] = [[] for _ in range(num_slots)]  # free slots: token ids with valid KV
        self.cached_lora = [-1] * num_slots  # the adapter that computed a free slot's KV (LoRA changes K and V)
        self.last_used = [-1] * num_slots
        self.clock = 0

    @property
    def num_free(self) -> int:
        return self.owner.count(None)

    def _content(self, slot: int, lora: int = -1) -> list[int]:
        """Token ids whose KV the slot holds, as computed with adapter `lora` (else nothing reusable)."""
        seq = self.owner[slot]
        if seq is None:
            return self.cached[slot] if self.cached_lora[slot] == lora else []
        return seq.token_ids[:seq.num_computed] if seq.lora == lora else []

    def allocate(self, seq) -> tuple[int, int, int | None]:
        """-> (slot, number of prompt tokens already valid, slot to copy them from or None)."""
        prompt = seq.prompt_token_ids
        limit = len(prompt) - 1  # the last prompt token is always recomputed: its logits are needed
        free = [s for s in range(self.num_slots) if self.owner[s] is None]
        assert free, "allocate() called without a free slot"
        best_free, best_free_len = min(free, key=lambda s: self.last_used[s]), 0  # LRU when nothing matches
        best_busy, best_busy_len = None, 0
        if self.enable_prefix_caching and limit > 0:
            for s in range(self.num_slots):
                n = min(common_prefix_len(self._content(s, seq.lora), prompt), limit)
                if self.owner[s] is None and n > best_free_len:
                    best_free, best_free_len = s, n
                elif self.owner[s] is not None and n > best_busy_len:
                    best_busy, best_busy_len = s, n
        if best_busy is not None and best_busy_len >= best_free_len + self.MIN_COPY_GAIN:
            # Copy from the busy slot into the LRU free slot, sparing a free slot that matched a little.
            others = [s for s in free if s != best_free] if best_free_len > 0 else free
            dst = min(others or free, key=lambda s: self.last_used[s])
            self._take(dst, seq)
            return dst, best_busy_len, best_busy
        self._take(best_free, seq)
        return best_free, best_free_len, None

    def _take(self, slot: int, seq) -> None:
        self.clock += 1
        self.owner[slot], self.cached[slot], self.last_used[slot] = seq, [], self.clock

    def release(self, seq) -> None:
        slot = seq.slot
        self.owner[slot] = None
        self.cached[slot] = seq.token_ids[:seq.num_computed] if self.enable_prefix_caching else []
        self.cached_lora[slot] = seq.lora
        self.clock += 1
        self.last_used[slot] = self.clock
