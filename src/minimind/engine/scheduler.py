"""Scheduler: which sequences run in the next step, over token ids only.

Every step decodes one token for each running sequence that finished its prompt, then spends the rest of
the token budget on prompt chunks (running prefills first, then newly admitted requests), so long prompts
never stall the streams already flowing. A request waits in FIFO order while no KV slot is free.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import KVCache, SlotManager
from .sequence import Sequence, Status


@dataclass
class Chunk:
    seq: Sequence
    start: int  # first prompt position computed in this step
    length: int
    tokens: list[int] | None = None  # None: the prompt's tokens; speculative decoding passes its own
    logits: str = "auto"  # "auto": last row when the chunk completes the prompt; "last"; "all"

    @property
    def token_ids(self) -> list[int]:
        if self.tokens is not None:
            return self.tokens
        return self.seq.prompt_token_ids[self.start:self.start + self.length]

    @property
    def ends_prompt(self) -> bool:
        return self.start + self.length == len(self.seq.prompt_token_ids)

    @property
    def sample_rows(self) -> range:
        if self.logits == "all":
            return range(self.length)
        if self.logits == "last" or (self.ends_prompt and self.seq.params.max_tokens != 0):
            return range(self.length - 1, self.length)
        return range(0)  # mid-prompt, or max_tokens=0 (nothing is sampled)


@dataclass
class Batch:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(self, slots: SlotManager, kv: KVCache, max_num_batched_tokens: int):
        self.slots, self.kv = slots, kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        batch = Batch(decode=[s for s in self.running if not s.in_prefill])
        budget = self.max_num_batched_tokens - len(batch.decode)
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                budget -= self._add_chunk(batch, seq, budget)
        while self.waiting and budget > 0 and self.slots.num_free > 0:
            seq = self.waiting[0]
            if seq.wait_for is not None and seq.wait_for.status == Status.RUNNING and seq.wait_for.in_prefill:
                break  # n > 1: the sibling's prompt KV is being computed; copy it next step instead
            self.waiting.popleft()
            self._admit(seq)
            budget -= self._add_chunk(batch, seq, budget)
        return batch

    def _admit(self, seq: Sequence) -> None:
        slot, cached, source = self.slots.allocate(seq)
        if seq.whole_prompt:  # its logits or hidden states at every position are needed: no prefix-cache hit
            cached, source = 0, None
        if source is not None:
            self.kv.copy_prefix(source, slot, cached)
        seq.slot, seq.num_computed, seq.num_cached = slot, cached, cached
        seq.status = Status.RUNNING
        self.running.append(seq)

    @staticmethod
    def _add_chunk(batch: Batch, seq: Sequence, budget: int) -> int:
        n = min(len(seq.prompt_token_ids) - seq.num_computed, budget)
        batch.prefill.append(Chunk(seq, seq.num_computed, n))
        return n

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) sequence; its slot keeps the KV as prefix cache."""
        if seq in self.running:
            self.running.remove(seq)
            self.slots.release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
