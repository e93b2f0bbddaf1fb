"""A plain, correct token-by-token generation loop (the fast engine replaces `stream_generate` later).

Sampling follows HF's processor order, which the original scripts used through `model.generate`:
repetition penalty -> temperature -> top-k -> top-p -> multinomial; temperature 0 means greedy.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    temperature: float = 0.85
    top_p: float = 0.85
    top_k: int = 50  # HF's default, which the original eval scripts got implicitly
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a fresh random seed per call, like the original eval_llm.py
    stop_ids: set[int] = field(default_factory=set)


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """eos ids of tokenizer and model config, plus ChatML's `<|im_start|>` / `<|im_end|>` when they are tokens:
    a chat model that starts a new turn has finished its answer."""
    ids: set[int] = set()
    config = getattr(model, "config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    unk = getattr(tokenizer, "unk_token_id", None)
    for tok in ("<|im_start|>", "<|im_end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid >= 0 and (tid != unk or unk is None):
            ids.add(tid)
    return ids


def sample_next(logits: torch.Tensor, seen: torch.Tensor, s: GenerationSettings,
                generator: torch.Generator | None) -> int:
    """One token id from 1-D `logits` (float32, CPU). `seen` = prompt + generated ids, for the penalty."""
    logits = logits.clone()  # may be the model's own output tensor (fp32 on CPU): do not edit it in place
    if s.repetition_penalty != 1.0 and seen.numel():
        # HF RepetitionPenaltyLogitsProcessor: divide positive logits, multiply negative ones.
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
    if s.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / s.temperature
    if 0 < s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < s.top_p < 1.0:
        # HF TopPLogitsWarper: drop the low tail whose total mass is <= 1 - top_p, always keeping the top token.
        sorted_logits, order = torch.sort(logits, descending=False)
        tail = sorted_logits.softmax(-1).cumsum(-1) <= 1 - s.top_p
        tail[-1] = False
        logits = logits.masked_fill(tail.scatter(0, order, tail), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.inference_mode()
def stream_generate(model, tokenizer, input_ids: list[int] | torch.Tensor,
                    settings: GenerationSettings) -> Iterator[int]:
    """Yield generated token ids one by one; stop tokens end the stream and are not yielded.

    The first `next()` runs the prefill (whole prompt), later ones one decode step each, so a caller can time
    prefill and decode separately around the iterator.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    limit = getattr(model.config, "max_position_embeddings", None)
    budget = settings.max_new_tokens if limit is None else min(settings.max_new_tokens, limit - ids.shape[1])
    if budget <= 0:
        return
    seed = settings.seed if settings.seed is not None else random.randint(0, 2**31 - 1)
    generator = torch.Generator().manual_seed(seed)  # CPU sampling: same stream on every device
    stops = settings.stop_ids or stop_token_ids(tokenizer, model)
    seen = ids[0].clone()
    cache = DynamicCache(config=model.config)
    step_input = ids.to(device)
    for _ in range(budget):
        out = model(step_input, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = sample_next(out.logits[0, -1].float().cpu(), seen, settings, generator)
        if token in stops:
            return
        yield token
        seen = torch.cat([seen, torch.tensor([token])])
        step_input = torch.tensor([[token]], device=device)
