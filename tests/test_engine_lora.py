"""Per-request LoRA adapters in one engine: requests for different adapters and the base model share batches,
and each one's greedy output equals the original LoRALinear forward (W x + B A x) of that adapter alone."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from conftest import tiny_model
from minimind.checkpoint.lora import apply_lora, load_lora, lora_layers
from minimind.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 6, 7], list(range(10, 40)), [9], list(range(100, 117))]


def random_adapter(model, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """An adapter state dict in the original key layout with non-zero B (a fresh adapter would be a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    shadow = apply_lora(copy.deepcopy(model), rank)
    return {f"{name}.lora.{ab}.weight": 0.3 * torch.randn(getattr(layer.lora, ab).weight.shape, generator=gen)
            for name, layer in lora_layers(shadow).items() for ab in ("A", "B")}


@functools.cache
def _greedy(model, prompt: tuple[int, ...], n: int) -> tuple[int, ...]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return tuple(ids[len(prompt):])


@pytest.fixture(scope="module", params=[{}, {"intermediate_size": 64}], ids=["attention-only", "with-mlp"])
def setup(request):
    """Base model, two adapters and their reference models (LoRALinear, unmerged). With intermediate == hidden
    the MLP projections are square too, so gate/up/down carry adapters (offsets inside gate|up)."""
    base = tiny_model(vocab_size=256, **request.param)
    adapters = {"a": random_adapter(base, 4, 1), "b": random_adapter(base, 2, 2)}
    refs = {None: base, **{name: load_lora(copy.deepcopy(base), sd).eval() for name, sd in adapters.items()}}
    return base, adapters, refs


def test_mixed_adapters_share_a_batch(setup):
    base, adapters, refs = setup
    llm = LLM(base, max_num_seqs=4, max_model_len=64, lora_adapters=adapters)
    jobs = [(PROMPTS[0], None), (PROMPTS[1], "a"), (PROMPTS[2], "b"), (PROMPTS[3], "a"), (PROMPTS[1], None),
            (PROMPTS[1], "b")]
    outs = llm.generate([p for p, _ in jobs], GREEDY, lora=[a for _, a in jobs])
    for (prompt, adapter), out in zip(jobs, outs):
        assert tuple(out.outputs[0].token_ids) == _greedy(refs[adapter], tuple(prompt), 8), adapter
    assert len({tuple(o.outputs[0].token_ids) for o in outs[4:]} | {tuple(outs[1].outputs[0].token_ids)}) == 3


def test_prefix_cache_never_crosses_adapters(setup):
    base, adapters, refs = setup
    llm = LLM(base, max_num_seqs=1, max_model_len=64, lora_adapters=adapters)
    first = llm.generate(PROMPTS[1], GREEDY)[0]
    again = llm.generate(PROMPTS[1], GREEDY, lora="a")[0]  # same tokens, other weights: KV must be recomputed
    assert again.num_cached_tokens == 0
    assert tuple(again.outputs[0].token_ids) == _greedy(refs["a"], tuple(PROMPTS[1]), 8)
    same = llm.generate(PROMPTS[1], GREEDY, lora="a")[0]  # same adapter: the cache applies
    assert same.num_cached_tokens > 0 and same.outputs[0].token_ids == again.outputs[0].token_ids
    assert first.outputs[0].token_ids != again.outputs[0].token_ids


def test_unknown_adapter_and_bad_file_are_refused(setup):
    base, adapters, _ = setup
    llm = LLM(base, max_num_seqs=2, max_model_len=64, lora_adapters={"a": adapters["a"]})
    with pytest.raises(ValueError, match="unknown LoRA adapter 'z'.*'a'"):
        llm.add_request(PROMPTS[0], GREEDY, lora="z")
    wrong = {k: v[:, :-1] if k.endswith("A.weight") else v for k, v in adapters["a"].items()}
    with pytest.raises(Exception, match="does not fit|expected A"):
        LLM(base, max_num_seqs=2, max_model_len=64, lora_adapters={"bad": wrong})


def test_unmerged_lora_model_is_served_as_its_forward(setup):
    """A model holding an unmerged adapter runs W + B A (before: the engine silently dropped the adapter)."""
    _, _, refs = setup
    llm = LLM(refs["a"], max_num_seqs=2, max_model_len=64)
    out = llm.generate(PROMPTS[3], GREEDY)[0]
    assert tuple(out.outputs[0].token_ids) == _greedy(refs["a"], tuple(PROMPTS[3]), 8)
