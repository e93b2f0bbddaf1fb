"""SamplingParams and the batched sampler: pure functions over [B, V] logits with per-row parameters.

Randomness is counter-based (a hash of (seed, step, token id) turned into Gumbel noise), so a request's
samples depend only on its own seed and step, never on what else shares the batch, and no per-row
torch.Generator is needed in the hot loop.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .fused import sample_rows


@dataclass
class SamplingParams:
    """Per-request generation settings (names follow vLLM / the OpenAI API)."""

    n: int = 1
    max_tokens: int | None = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF style, over prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None = off; k >= 0: sampled token's logprob plus the k most likely
    # None = off; k >= 0: each prompt token's logprob (the first has none) plus the k most likely at its position.
    # Such a request computes its whole prompt (no prefix-cache hit): every position's logits are needed.
    prompt_logprobs: int | None = None
    # the mean of the prompt's last-layer hidden states (after the final norm), as RequestOutput.embedding;
    # needs max_tokens=0. Computes the whole prompt, like prompt_logprobs.
    embed: bool = False
    skip_special_tokens: bool = True
    # callables (output token ids so far, logits [V] fp32) -> logits [V], applied to each row before sampling,
    # in order (constrained decoding, custom bans). One with a `clone()` method is cloned for every sequence of
    # the request (n > 1), so per-sequence state (a grammar matcher) is never shared.
    logits_processors: list | None = field(default=None, repr=False)
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self):
        for name, ok, rule in (("n", self.n >= 1, ">= 1"),
                               # 0: prefill only (prompt logprobs, embedding), finishing with "length"
                               ("max_tokens", self.max_tokens is None or self.max_tokens >= 0, ">= 0"),
                               ("temperature", self.temperature >= 0, ">= 0"),
                               ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                               ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
                               ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
                               ("logprobs", self.logprobs is None or self.logprobs >= 0, ">= 0"),
                               ("prompt_logprobs", self.prompt_logprobs is None or self.prompt_logprobs >= 0, ">= 0"),
                               ("max_tokens", not self.embed or self.max_tokens == 0, "0 with embed")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")
        # any k at or above the vocabulary keeps every token; clamped so a huge k still fits the int64 batch tensor
        self.top_k = 0 if self.top_k is None or self.top_k < 0 else min(int(self.top_k), 2**31 - 1)
        self.stop_list = [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]

    @property
    def is_plain_greedy(self) -> bool:
        """argmax of the raw logits is the whole sampler: no penalties, bias or logprobs."""
        return self.temperature == 0 and not self.needs_penalties and not self.logit_bias and self.logprobs is None

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def new_seed() -> int:
    return random.SystemRandom().getrandbits(31)


_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 finaliser on int64 tensors holding 32-bit values (products wrap; we keep the low 32 bits)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Deterministic Gumbel(0, 1) noise [B, V] from per-row seeds [B] and steps [B] (int64)."""
    key = _fmix32((seeds & _M32) ^ _fmix32((steps * 0x9E3779B1 + 0x7F4A7C15) & _M32))  # [B]
    idx = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    h = _fmix32(key[:, None] ^ ((idx * 0x27D4EB2F + 0x165667B1) & _M32))  # [B, V]
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1)
    return -torch.log(-torch.log(u))


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors (built once per step by the runner)."""

    temperature: torch.Tensor  # [B] fp32, 0 = greedy
    top_k: torch.Tensor | None  # [B] int64 (0 = off) or None when no row uses it
    top_p: torch.Tensor | None  # [B]
    min_p: torch.Tensor | None  # [B]
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64 (tokens generated so far)
    repetition: torch.Tensor | None = None  # [B]
    presence: torch.Tensor | None = None  # [B]
    frequency: torch.Tensor | None = None  # [B]
    seen: torch.Tensor | None = None  # [B, V] bool: token appears in prompt or output
    counts: torch.Tensor | None = None  # [B, V] fp32: occurrences in the output
    bias: torch.Tensor | None = None  # [B, V] fp32 logit_bias
    num_logprobs: int | None = None  # max top_logprobs over rows, None if no row wants logprobs


def build_sampling_batch(seqs: list, vocab: int) -> SamplingBatch:
    """The step's SamplingBatch from its sequences (their params, seeds and tokens so far)."""
    params = [s.params for s in seqs]
    b = len(seqs)
    batch = SamplingBatch(
        temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
        top_k=torch.tensor([p.top_k for p in params]) if any(p.top_k for p in params) else None,
        top_p=torch.tensor([p.top_p for p in params]) if any(p.top_p < 1 for p in params) else None,
        min_p=torch.tensor([p.min_p for p in params]) if any(p.min_p > 0 for p in params) else None,
        seeds=torch.tensor([s.seed for s in seqs], dtype=torch.int64),
        steps=torch.tensor([len(s.output_token_ids) for s in seqs], dtype=torch.int64))
    if any(p.needs_penalties for p in params):
        batch.repetition = torch.tensor([p.repetition_penalty for p in params])
        batch.presence = torch.tensor([p.presence_penalty for p in params])
        batch.frequency = torch.tensor([p.frequency_penalty for p in params])
        batch.seen = torch.zeros(b, vocab, dtype=torch.bool)
        batch.counts = torch.zeros(b, vocab)
        for i, s in enumerate(seqs):  # only rows that asked for penalties
            if s.params.needs_penalties:
                batch.seen[i, torch.tensor(s.token_ids)] = True
                if s.output_token_ids:
                    out = torch.tensor(s.output_token_ids)
                    batch.counts[i].index_add_(0, out, torch.ones(len(out)))
    if any(p.logit_bias for p in params):
        batch.bias = torch.zeros(b, vocab)
        for i, p in enumerate(params):
            for token, value in (p.logit_bias or {}).items():
                if 0 <= int(token) < vocab:
                    batch.bias[i, int(token)] = float(value)
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    batch.num_logprobs = max(wanted) if wanted else None
    return batch


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    if b.bias is not None:
        logits = logits + b.bias
    if b.repetition is not None:
        rep = b.repetition[:, None]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(b.seen, penalised, logits)
    if b.presence is not None:
        logits = logits - b.frequency[:, None] * b.counts - b.presence[:, None] * (b.counts > 0)
    return logits


def filter_logits(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Temperature, then top-k / top-p / min-p masking (-inf) on the rows that ask for it."""
    if bool((b.temperature != 1.0).any()):  # the common T = 1 skips a [B, V] divide
        logits = logits / torch.where(b.temperature > 0, b.temperature, 1.0)[:, None]
    if b.top_k is None and b.top_p is None and b.min_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if b.top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        remove |= (b.top_k[:, None] > 0) & (ranks >= b.top_k[:, None])
    if b.top_p is not None or b.min_p is not None:
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        if b.top_p is not None:
            # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
            before = probs.cumsum(dim=-1) - probs
            remove |= before >= b.top_p[:, None]
        if b.min_p is not None:
            remove |= probs < b.min_p[:, None] * probs[:, :1]
    remove[:, 0] = False
    mask = torch.zeros_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


def sample(logits: torch.Tensor, b: SamplingBatch, fast: bool = True):
    """logits [B, V] fp32 -> (tokens [B] int64, logprob [B] | None, top_ids [B, k] | None, top_lp [B, k] | None).

    Logprobs are of the raw model distribution (before penalties and temperature), as vLLM's default. fast: every
    row in one C pass (engine/kernels/sample.c: the filters without sorting the vocabulary, the same Gumbel-max
    noise) when the kernels build here; False: torch only.
    """
    raw = logits
    logits = apply_penalties(logits, b)
    rows = logits.shape[0]
    tokens = sample_rows(logits, b.temperature,
                         b.top_k if b.top_k is not None else torch.zeros(rows, dtype=torch.int64),
                         b.top_p if b.top_p is not None else torch.ones(rows),
                         b.min_p if b.min_p is not None else torch.zeros(rows), b.seeds, b.steps) if fast else None
    if tokens is None:
        tokens, hot = logits.argmax(dim=-1), b.temperature > 0
        if bool(hot.any()):
            noise = gumbel_noise(b.seeds, b.steps, logits.shape[-1])
            sampled = (filter_logits(logits, b) + noise).argmax(dim=-1)  # Gumbel-max: a draw from softmax(filtered)
            tokens = torch.where(hot, sampled, tokens)
    if b.num_logprobs is None:
        return tokens, None, None, None
    logp = raw.float().log_softmax(dim=-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    if b.num_logprobs > 0:
        top_lp, top_ids = logp.topk(b.num_logprobs, dim=-1)
        return tokens, chosen, top_ids, top_lp
    return tokens, chosen, None, None
