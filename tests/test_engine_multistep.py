"""Several decode steps of a lone sequence in one C call (engine/multistep.py): the tokens equal the engine's
one-token steps (the same C sampler: argmax, or filters and seeded Gumbel draws), stops land where they would, and the KV cache
it leaves behind serves a later prefix-cache hit."""
from __future__ import annotations

import pytest

from conftest import tiny_model
from minimind.engine import LLM, SamplingParams

PROMPT = [5, 9, 11, 40, 3]


def _llm(**kw) -> LLM:
    llm = LLM(tiny_model(vocab_size=256), max_num_seqs=2, max_model_len=128, **kw)
    if llm.runner.fused is None:
        pytest.skip("fused kernel unavailable here (no C compiler)")
    return llm


def _spy(llm: LLM) -> list:
    """Record the C loop's calls (to know the test exercised it)."""
    calls, steps = [], llm.runner.fused.steps
    llm.runner.fused.steps = lambda *a: calls.append(a[0]) or steps(*a)
    return calls


@pytest.mark.parametrize("temperature,seed,filters", [(0.0, None, {}), (0.7, 11, {}), (1.6, 5, {}),
                                                      (0.85, 3, {"top_p": 0.85}), (1.0, 4, {"top_k": 20}),
                                                      (1.2, 8, {"min_p": 0.05, "top_p": 0.95})])
def test_steps_equal_one_token_steps(temperature, seed, filters):
    llm = _llm()
    calls = _spy(llm)
    params = dict(temperature=temperature, seed=seed, max_tokens=45, ignore_eos=True, **filters)
    [fast] = llm.generate([PROMPT], SamplingParams(**params))
    assert calls[0] == 2 and max(calls) == 16  # the first call measures the model's speed, then full calls
    # logprobs are outside what the C loop does: the same request then takes one-token steps
    [slow] = llm.generate([PROMPT], SamplingParams(**params, logprobs=0))
    assert fast.outputs[0].token_ids == slow.outputs[0].token_ids
    assert len(fast.outputs[0].token_ids) == 45 and fast.outputs[0].finish_reason == "length"
    if temperature == 0:  # and the torch path agrees
        plain = LLM(tiny_model(vocab_size=256), max_num_seqs=2, max_model_len=128, fused=False)
        [plain] = plain.generate([PROMPT], SamplingParams(**params))
        assert fast.outputs[0].token_ids == plain.outputs[0].token_ids


def test_stop_token_mid_call_and_prefix_cache_after_it():
    llm = _llm()
    [free] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    tokens = free.outputs[0].token_ids
    stop = next(t for i, t in enumerate(tokens) if i >= 6 and t not in tokens[:i])  # first seen mid-way
    [stopped] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop]))
    assert stopped.outputs[0].token_ids == tokens[:tokens.index(stop) + 1]
    assert stopped.outputs[0].finish_reason == "stop"
    # the next prompt extends the finished one: its cached KV (written by the C loop) must be the right one
    longer = PROMPT + stopped.outputs[0].token_ids + [7, 8]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    [hit] = llm.generate([longer], params)
    [fresh] = _llm().generate([longer], params)
    assert hit.outputs[0].token_ids == fresh.outputs[0].token_ids


def test_sequences_the_loop_leaves_alone():
    llm = _llm()
    calls = _spy(llm)
    for params in (SamplingParams(temperature=0.8, presence_penalty=0.5, max_tokens=20, seed=1),
                   SamplingParams(temperature=0, repetition_penalty=1.2, max_tokens=20),
                   SamplingParams(temperature=0, max_tokens=20, logprobs=1)):
        llm.generate([PROMPT], params)
    # two sequences share every step (both end after 20 tokens): no step has a lone sequence
    llm.generate([PROMPT, [7, 7, 7]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert calls == []


def test_calls_stay_short_for_slow_models(monkeypatch):
    """A call lasts about BURST_SECONDS: a model slower than that per token gets two tokens per call, so a stream
    still arrives in small pieces."""
    from minimind.engine import multistep

    monkeypatch.setattr(multistep, "BURST_SECONDS", 1e-9)
    llm = _llm()
    calls = _spy(llm)
    [out] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=21, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 21 and set(calls) == {2}
