"""The batched sampler: draws follow softmax(logits / T) restricted by top-k / top-p (chi-square against the
distribution computed independently), and the one-pass C Gumbel-max equals the torch formulation."""
from __future__ import annotations

import pytest
import torch

from minimind.engine import fused
from minimind.engine.sampling import SamplingBatch, gumbel_noise, sample

# chi-square critical values at p = 1e-4 by degrees of freedom (the draws are deterministic: counter-based noise)
CHI2_CRIT = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51}


def _batch(rows: int, temperature: float, top_k: int = 0, top_p: float = 1.0) -> SamplingBatch:
    return SamplingBatch(temperature=torch.full((rows,), temperature),
                         top_k=torch.full((rows,), top_k) if top_k else None,
                         top_p=torch.full((rows,), top_p) if top_p < 1 else None, min_p=None,
                         seeds=torch.full((rows,), 1234, dtype=torch.int64), steps=torch.arange(rows))


def _chi2(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token outside the allowed set was drawn"
    expected = probs[keep].double() * tokens.numel()
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("fast", [True, False], ids=["C", "torch"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8)])
def test_draws_follow_the_filtered_softmax(fast, temperature, top_k, top_p):
    """One request's successive steps (one row per step) drawn from fixed logits: 5 live tokens among 21, some in
    the C kernel's 8-lane part and some in its scalar tail, the rest -inf (as filtered tokens are)."""
    logits = torch.full((21,), float("-inf"))
    logits[[0, 6, 9, 17, 20]] = torch.tensor([1.5, 2.0, -0.4, 0.3, -1.0])
    draws = 20000
    probs = torch.softmax(logits / temperature, -1)
    if top_k:
        probs[torch.argsort(probs, descending=True)[top_k:]] = 0
    if top_p < 1:  # smallest prefix of the sorted tokens whose mass reaches top_p
        order = torch.argsort(probs, descending=True)
        before = torch.cumsum(probs[order], 0) - probs[order]
        probs[order[before >= top_p]] = 0
    probs = probs / probs.sum()
    tokens, *_ = sample(logits.expand(draws, -1).clone(), _batch(draws, temperature, top_k, top_p), fast=fast)
    stat, dof = _chi2(tokens, probs)
    assert stat < CHI2_CRIT[dof], f"chi-square {stat:.1f} with {dof} degrees of freedom"


def test_c_gumbel_argmax_equals_torch():
    """Same hash and noise as sampling.gumbel_noise; the C logs are a polynomial, so a row may differ only where
    its two best candidates are within 1e-4 of each other."""
    if fused._linear_library() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(0)
    for rows, vocab in [(1, 7), (3, 100), (32, 6400), (2, 49152), (17, 13)]:
        logits = torch.randn(rows, vocab, generator=gen) * 3
        logits[:, : vocab // 3] = float("-inf")  # filtered-out tokens
        seeds, steps = torch.randint(0, 2**31, (rows,), generator=gen), torch.randint(0, 10**6, (rows,), generator=gen)
        total = logits + gumbel_noise(seeds, steps, vocab)
        off = torch.zeros(rows, dtype=torch.int64)
        got = fused.sample_rows(logits, torch.ones(rows), off, torch.ones(rows), torch.zeros(rows), seeds, steps)
        want = total.argmax(-1)
        top2 = total.topk(2, dim=-1).values if vocab > 1 else None
        for r in range(rows):
            if got[r] != want[r]:
                assert top2[r, 0] - top2[r, 1] < 1e-4, f"row {r} of {rows}x{vocab}: {got[r]} != {want[r]}"
        assert got.dtype == torch.int64 and (got >= vocab // 3).all()


@pytest.mark.parametrize("vocab", [50, 6400, 49152])
@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.7, 0, 0.9, 0.0), (1.0, 40, 1.0, 0.0),
                                                           (0.2, 0, 0.9, 0.0), (1.3, 20, 0.8, 0.05),
                                                           (0.85, 0, 0.85, 0.1), (1.0, 1, 1.0, 0.0), (0.0, 5, 0.5, 0.0)])
def test_c_filters_pick_the_torch_samplers_tokens(vocab, temperature, top_k, top_p, min_p):
    """The C sampler's top-k / top-p / min-p (candidates near the maximum, no sort of the vocabulary) draw the
    tokens the torch sampler draws (sort, softmax, cumsum) with the same noise, row by row."""
    if fused._linear_library() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(vocab)
    rows = 64
    logits = torch.randn(rows, vocab, generator=gen) * torch.linspace(0.5, 6, rows)[:, None]  # flat to peaked
    batch = SamplingBatch(temperature=torch.full((rows,), temperature),
                          top_k=torch.full((rows,), top_k), top_p=torch.full((rows,), top_p),
                          min_p=torch.full((rows,), min_p), seeds=torch.randint(0, 2**31, (rows,), generator=gen),
                          steps=torch.arange(rows))
    c_tokens, *_ = sample(logits.clone(), batch, fast=True)
    torch_tokens, *_ = sample(logits.clone(), batch, fast=False)
    differ = (c_tokens != torch_tokens).nonzero().flatten().tolist()
    assert len(differ) <= 1, f"rows {differ} differ"  # a near-tie of two noisy logits (see the test above)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (0, 0.999), (50, 1.0)])
def test_c_min_p_keeps_unlikely_tokens_above_it(top_k, top_p):
    """min_p 0.005 keeps a token at e^-4.5 (0.011) of the top one's probability, far from the maximum: drawn about
    1 % of the time, by the C sampler exactly where the torch sampler draws it."""
    if fused._linear_library() is None:
        pytest.skip("no C compiler")
    rows, vocab = 3000, 6400
    logits = torch.full((vocab,), -60.0)
    logits[7], logits[100:140] = 0.0, -4.5  # 40 tokens at e^-4.5: 31 % of the mass together
    batch = SamplingBatch(temperature=torch.ones(rows), top_k=torch.full((rows,), top_k),
                          top_p=torch.full((rows,), top_p), min_p=torch.full((rows,), 0.005),
                          seeds=torch.full((rows,), 99, dtype=torch.int64), steps=torch.arange(rows))
    c_tokens, *_ = sample(logits.expand(rows, -1).clone(), batch, fast=True)
    torch_tokens, *_ = sample(logits.expand(rows, -1).clone(), batch, fast=False)
    assert ((c_tokens >= 100) & (c_tokens < 140)).float().mean() > 0.2
    assert (c_tokens != torch_tokens).sum() <= rows // 500  # near-ties of two noisy logits (see above)


def test_huge_top_k_keeps_every_token():
    """A top_k beyond any vocabulary (an API client may send 10**30) samples exactly like top_k off, instead of
    overflowing the int64 batch tensor (found by the schemathesis run of the server)."""
    from conftest import tiny_model
    from minimind.engine import LLM, SamplingParams

    llm = LLM(tiny_model(vocab_size=256), max_num_seqs=2, max_model_len=64)
    runs = [llm.generate([[5, 6, 7]], SamplingParams(temperature=1.0, top_k=k, seed=3, max_tokens=8, ignore_eos=True))
            for k in (10**30, 0)]
    assert runs[0][0].outputs[0].token_ids == runs[1][0].outputs[0].token_ids


@pytest.mark.parametrize("fast", [True, False], ids=["C", "torch"])
def test_greedy_and_sampled_rows_share_a_batch(fast):
    # the sampler skips the greedy argmax when every row samples; a mixed batch must still give greedy rows their
    # argmax and sampled rows exactly the draw they get in a batch of their own (same seed and step)
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    temps = torch.tensor([0.0, 1.0, 0.0, 0.7, 1.0, 0.0])
    mixed = SamplingBatch(temperature=temps, top_k=None, top_p=None, min_p=None,
                          seeds=torch.arange(6, dtype=torch.int64) + 11, steps=torch.full((6,), 3))
    tokens, *_ = sample(logits.clone(), mixed, fast=fast)
    hot = temps > 0
    assert torch.equal(tokens[~hot], logits[~hot].argmax(-1))
    alone = SamplingBatch(temperature=temps[hot], top_k=None, top_p=None, min_p=None,
                          seeds=mixed.seeds[hot], steps=mixed.steps[hot])
    sampled, *_ = sample(logits[hot].clone(), alone, fast=fast)
    assert torch.equal(tokens[hot], sampled)
    assert not torch.equal(sampled, logits[hot].argmax(-1)), "the seeds chosen draw no non-argmax token: no test"
