"""Sequence (one completion being generated) and the outputs handed back to callers.

The scheduler and runner see only token ids; text (incremental detokenization, stop strings) is kept
here per sequence, so a stop string that spans several tokens is found as soon as its last byte arrives.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..text.detok import IncrementalDetokenizer
from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass
class TopLogprob:
    token_id: int
    logprob: float


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprob] | None = None
    delta_text: str = ""  # new text since the previous output of this request (streaming)
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict = field(default_factory=dict)  # arrival / first_token / finished times (perf_counter)
    # SamplingParams.prompt_logprobs: one entry per prompt token (the first None), once the prompt is computed
    prompt_logprobs: list[TokenLogprob | None] | None = None
    embedding: list[float] | None = None  # SamplingParams.embed: set in the final output


def eos_token_ids(cfg, tokenizer) -> set[int]:
    eos = cfg.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer is not None:
        ids.add(tokenizer.eos_token_id)
    ids.discard(None)
    return ids


class Sequence:
    lora = -1  # index of the LoRA adapter this sequence runs with (ModelRunner.lora), -1 = the base model

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, eos_token_ids: set[int], tokenizer=None):
        self.request_id = request_id
        self.index = index  # position among the request's n completions
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.params = params
        self.seed = seed
        self.status = Status.WAITING
        self.slot: int | None = None
        self.num_computed = 0  # tokens whose KV is in the slot
        self.num_cached = 0  # prompt tokens taken from the prefix cache
        self.wait_for: Sequence | None = None  # n > 1: let the first sibling fill the shared prompt KV first
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        # prompt logprobs and the embedding are the request's, computed by its first sequence only
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        if params.prompt_logprobs is not None and index == 0:
            self.prompt_logprobs = [None]  # the first token has no logprob: nothing comes before it
        self.embed = params.embed and index == 0
        self.hidden_sum: torch.Tensor | None = None  # embed: [H] fp32 sum of the positions computed so far
        self.logits_processors = [p.clone() if hasattr(p, "clone") else p for p in params.logits_processors or ()]
        self.stop_ids = set(params.stop_token_ids or ()) | (set() if params.ignore_eos else eos_token_ids)
        self.text = ""
        self._emitted_text = 0  # chars of self.text already handed out as deltas
        self._emitted_tokens = 0
        self._holdback = max((len(s) for s in params.stop_list), default=1) - 1
        self._detok = None if tokenizer is None else IncrementalDetokenizer(
            tokenizer, skip_special_tokens=params.skip_special_tokens)

    # ---------------------------------------------------------------- counters
    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def whole_prompt(self) -> bool:
        """Every prompt position must be computed here (no prefix-cache hit): its logits or hidden states are used."""
        return self.prompt_logprobs is not None or self.embed

    @property
    def embedding(self) -> list[float] | None:
        if self.hidden_sum is None or self.in_prefill:
            return None
        return (self.hidden_sum / len(self.prompt_token_ids)).tolist()

    # ---------------------------------------------------------------- prompt results (whole_prompt)
    def add_prompt_logprobs(self, logits: torch.Tensor, pos0: int) -> None:
        """logits [n, V] fp32 of positions pos0 - 1 ..., which predict the prompt tokens at pos0 ... pos0 + n - 1."""
        ids = torch.tensor(self.prompt_token_ids[pos0:pos0 + logits.shape[0]])
        logp = logits.log_softmax(dim=-1)
        chosen = logp.gather(1, ids[:, None])[:, 0].tolist()
        k = min(self.params.prompt_logprobs, logp.shape[-1])
        top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0])
        for token, lp, t_ids, t_lps in zip(ids.tolist(), chosen, top_ids.tolist(), top_lp.tolist()):
            self.prompt_logprobs.append(TokenLogprob(token, lp, [TopLogprob(t, v) for t, v in zip(t_ids, t_lps)]))

    def add_hidden(self, hidden: torch.Tensor) -> None:
        """hidden [n, H] fp32: the final-norm hidden states of the next n prompt positions."""
        total = hidden.sum(dim=0)
        self.hidden_sum = total if self.hidden_sum is None else self.hidden_sum + total

    # ---------------------------------------------------------------- postprocess
    def append_token(self, token_id: int, max_len: int) -> None:
        """Record a sampled token, update the text and decide whether the sequence is done."""
        self.output_token_ids.append(token_id)
        if token_id in self.stop_ids:
            self._finish("stop", token_id)
            return
        if self._detok is not None:
            self._add_text(self._detok.push(token_id))
            if self.is_finished:
                return
        max_tokens = self.params.max_tokens
        if max_tokens is not None and len(self.output_token_ids) >= max_tokens or len(self) >= max_len:
            self._finish("length")

    def _add_text(self, piece: str) -> None:
        if not piece:
            return
        start = max(0, len(self.text) - self._holdback)  # a stop string may begin in older text
        self.text += piece
        for stop in self.params.stop_list:
            at = self.text.find(stop, start)
            if at >= 0:
                end = at + len(stop) if self.params.include_stop_str_in_output else at
                self.text = self.text[:end]
                self._finish("stop", stop)
                return

    def _finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        if self._detok is not None and not isinstance(stop_reason, str):  # a stop string truncated the text
            self.text += self._detok.flush()
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def abort(self) -> None:
        self._finish("abort")

    def finish_prompt_only(self) -> None:
        """max_tokens=0: the prompt is computed and nothing is sampled."""
        self._finish("length")

    def output(self, delta: bool = True) -> CompletionOutput:
        """Snapshot; delta fields cover what is new since the previous call (text held back while it could
        still turn into a stop string)."""
        upto = len(self.text) if self.is_finished else max(self._emitted_text, len(self.text) - self._holdback)
        out = CompletionOutput(self.index, self.text[:upto] if not self.is_finished else self.text,
                               list(self.output_token_ids), self.finish_reason, self.stop_reason,
                               list(self.logprobs) if self.logprobs is not None else None)
        if delta:
            out.delta_text = self.text[self._emitted_text:upto]
            out.delta_token_ids = self.output_token_ids[self._emitted_tokens:]
            self._emitted_text, self._emitted_tokens = upto, len(self.output_token_ids)
        return out
