"""Prefill-only requests: prompt logprobs (SamplingParams.prompt_logprobs) and embeddings (embed=True) with
max_tokens=0, checked against a plain forward of the torch model over the whole sequence (fp32)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from minimind.engine import LLM, SamplingParams

MODELS = [("minimind2", False), ("minimind2", True), ("minimind3", True)]
PROMPTS = [[5, 6, 7, 8], list(range(10, 41)), [9, 3], list(range(100, 120)), [3, 1, 4, 1, 5, 9, 2, 6]]


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[L, V] log-softmax of the model's own logits at every position."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


def check_prompt_logprobs(model, ids: list[int], got, k: int) -> None:
    want = direct_logprobs(model, ids)
    assert len(got) == len(ids) and got[0] is None
    for pos in range(1, len(ids)):
        entry, row = got[pos], want[pos - 1]
        assert entry.token_id == ids[pos]
        assert entry.logprob == pytest.approx(row[ids[pos]].item(), abs=1e-4)
        top_lp, top_ids = row.topk(k)
        assert [t.token_id for t in entry.top] == top_ids.tolist()
        assert [t.logprob for t in entry.top] == pytest.approx(top_lp.tolist(), abs=1e-4)


@pytest.mark.parametrize("family,moe", MODELS, ids=["dense", "moe", "minimind3-moe"])
@pytest.mark.parametrize("chunk", [512, 8])  # 8: the long prompts are scored over several chunks
def test_prompt_logprobs_match_the_models_logits(family, moe, chunk):
    model = tiny_model(family, use_moe=moe)
    llm = LLM(model, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=chunk)
    scored_per_step = []
    prepare = llm.runner.prepare

    def watch(batch):
        inputs, seqs = prepare(batch)
        scored_per_step.append(len(inputs.scored))
        return inputs, seqs

    llm.runner.prepare = watch
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=3)
    # a generating request shares the steps: its decode rows and the scored prompt chunks in one forward
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)] + [scoring] * len(PROMPTS)
    outs = llm.generate([[1, 2, 3]] + PROMPTS, params)
    assert max(scored_per_step) >= 2, "scoring requests never shared a step"
    assert len(outs[0].outputs[0].token_ids) == 6 and outs[0].prompt_logprobs is None
    for ids, out in zip(PROMPTS, outs[1:]):
        o = out.outputs[0]
        assert o.token_ids == [] and o.finish_reason == "length" and out.finished
        check_prompt_logprobs(model, ids, out.prompt_logprobs, 3)


def test_prefix_cache_hit_does_not_skip_scored_positions():
    model = tiny_model()
    llm = LLM(model, max_num_seqs=2, max_model_len=64)
    ids = list(range(20, 50))
    first = llm.generate(ids, SamplingParams(temperature=0, max_tokens=2))[0]  # its KV stays in a slot
    again = llm.generate(ids + [7], SamplingParams(temperature=0, max_tokens=2))[0]
    assert again.num_cached_tokens > 0 and first.num_cached_tokens == 0  # the cache does serve this prompt
    out = llm.generate(ids, SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.num_cached_tokens == 0
    check_prompt_logprobs(model, ids, out.prompt_logprobs, 0)


def test_prompt_logprobs_with_generation_and_n():
    model = tiny_model(use_moe=True)
    llm = LLM(model, max_num_seqs=4, max_model_len=64)
    ids = [4, 8, 15, 16, 23, 42]
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=1,
                                           prompt_logprobs=2, n=2))[0]
    check_prompt_logprobs(model, ids, out.prompt_logprobs, 2)
    for o in out.outputs:  # the generated tokens' logprobs continue the same distribution
        want = direct_logprobs(model, ids + o.token_ids)
        for j, lp in enumerate(o.logprobs):
            assert lp.logprob == pytest.approx(want[len(ids) - 1 + j][o.token_ids[j]].item(), abs=1e-4)


def test_max_tokens_zero_fills_the_whole_context():
    llm = LLM(tiny_model(), max_num_seqs=1, max_model_len=16)
    out = llm.generate(list(range(1, 17)), SamplingParams(max_tokens=0))[0]
    assert out.outputs[0].finish_reason == "length" and out.outputs[0].token_ids == []
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(list(range(1, 17)), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(embed=True, max_tokens=3)


@pytest.mark.parametrize("family,moe", MODELS, ids=["dense", "moe", "minimind3-moe"])
def test_embeddings_are_the_mean_of_final_hidden_states(family, moe):
    model = tiny_model(family, use_moe=moe)
    llm = LLM(model, max_num_seqs=3, max_model_len=64, max_num_batched_tokens=8)
    params = SamplingParams(max_tokens=0, embed=True)
    outs = llm.generate(PROMPTS, params)
    for ids, out in zip(PROMPTS, outs):
        with torch.no_grad():
            want = model.model(torch.tensor([ids]))[0].float().mean(dim=0)
        assert out.outputs[0].token_ids == [] and out.prompt_logprobs is None
        assert out.embedding == pytest.approx(want.tolist(), abs=1e-4)
