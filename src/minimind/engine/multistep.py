"""Several decode steps of a lone sequence in one C call (FusedDecoder.steps).

When one sequence is decoding and nothing else is scheduled, the engine's Python step (scheduling, tensors,
sampling, bookkeeping) costs about as much per token as the fused forward of a small model. The C loop takes
up to MAX_STEPS tokens at once for sequences whose sampling is the C sampler's (kernels/sample.c, which the
engine's sampler also runs): greedy, or temperature with top-k / top-p / min-p. The engine then appends the
tokens one by one as usual: a stop string or the end of the text ends the sequence there, and the tokens computed
past it are dropped. A call lasts about BURST_SECONDS at most, so a stream still arrives smoothly from a slower
model.
"""
from __future__ import annotations

MAX_STEPS = 16  # a request that arrives meanwhile waits at most this many tokens
BURST_SECONDS = 0.05  # and a streaming client sees its tokens in pieces of at most ~50 ms


def takes(seq) -> bool:
    """Whether the C loop picks this sequence's tokens as the engine's sampler would."""
    p = seq.params
    return not (seq.lora >= 0 or seq.logits_processors or p.logprobs is not None or p.needs_penalties
                or p.logit_bias)


def decode_steps(runner, batch, max_len: int):
    """[(seq, [(token, None), ...])] for a step whose only work is one sequence's decode the C loop takes, else
    None (the caller runs its one-token step)."""
    if runner.fused is None or batch.prefill or len(batch.decode) != 1 or not takes(seq := batch.decode[0]):
        return None
    left = max_len - len(seq)
    if seq.params.max_tokens is not None:
        left = min(left, seq.params.max_tokens - len(seq.output_token_ids))
    if left < 2:
        return None
    token = seq.output_token_ids[-1] if seq.output_token_ids else seq.prompt_token_ids[-1]
    per_token = runner.fused.seconds_per_token  # None before the first call: a short one measures it
    n = min(MAX_STEPS, left, 2 if per_token is None else max(2, int(BURST_SECONDS / per_token)))
    tokens = runner.fused.steps(n, token, seq.slot, seq.num_computed, seq.params, seq.seed,
                                len(seq.output_token_ids), seq.stop_ids)
    seq.num_computed += len(tokens)  # every token picked was fed but the last, plus the one fed first
    return [(seq, [(t, None) for t in tokens])]
