"""Steps with prompt chunks on the fused kernel: decode rows and chunk rows run as one C call, whose logits equal
the torch path's on the same weights and KV cache, step by step. Chunks that need the torch path (prompt logprobs)
leave the step split: decode rows on the kernel, chunks on torch."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from minimind.engine import LLM, SamplingParams
from test_engine_fused import _reference_model

# long prompts take several chunks at max_num_batched_tokens=8; the later ones share prefixes with earlier
# ones (prefix-cache hits: chunks starting past 0)
PROMPTS = [[5, 6, 7], list(range(10, 47)), [9], list(range(100, 120)), list(range(60, 90)),
           list(range(60, 80)) + [7, 7], [3, 1, 4, 1, 5, 9, 2, 6], list(range(60, 85)) + [1, 2]]


def _staggered(llm: LLM, prompts, params) -> list:
    """Add one prompt every other step, so new prompt chunks keep meeting running decode rows."""
    ids, final, pending, step = [], {}, list(prompts), 0
    while pending or llm.has_unfinished():
        if pending and step % 2 == 0:
            ids.append(llm.add_request(pending.pop(0), params))
        for out in llm.step():
            if out.finished:
                final[out.request_id] = out.outputs[0]
        step += 1
    return [final[i] for i in ids]


def _record(llm: LLM) -> list:
    """[(StepInputs, logits)] of every forward of llm's runner from now on."""
    steps, forward = [], llm.runner.forward

    def recorded(inp):
        logits = forward(inp)
        steps.append((inp, logits.clone()))
        return logits

    llm.runner.forward = recorded
    return steps


def assert_kernel_steps_match_torch(kernel: LLM, torch_path: LLM, rtol: float = 1e-4, atol: float = 1e-4) -> list:
    """Staggered requests on two LLMs holding the same weight values: `kernel` steps through the fused kernel,
    `torch_path`'s runner (fused turned off after building: the same packed products) takes the torch path. Every
    step's logits agree and so do the greedy tokens. -> the kernel LLM's outputs."""
    if kernel.runner.fused is None:
        pytest.skip("fused kernel unavailable here")
    torch_path.runner.fused = None
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)  # logprobs: one-token steps
    got_steps, want_steps = _record(kernel), _record(torch_path)
    got, want = _staggered(kernel, PROMPTS, params), _staggered(torch_path, PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert len(got_steps) == len(want_steps)
    # every prompt in one chunk: a chunk starting past 0 is a prefix-cache hit
    whole = kernel.scheduler.max_num_batched_tokens > max(map(len, PROMPTS))
    kinds = set()
    for (inp, a), (_, b) in zip(got_steps, want_steps):
        assert inp.kernel
        if inp.sample_rows is not None:  # a step with prompt chunks
            kinds.add("mixed" if inp.num_decode else "chunks")
            if whole and inp.positions[inp.num_decode] > 0:
                kinds.add("prefix hit")
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    assert {"mixed", "chunks", *(["prefix hit"] if whole else [])} <= kinds, kinds
    return got


@pytest.mark.parametrize("chunk", [512, 8])  # 8: long prompts are split into several chunks
@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
def test_prompt_chunks_run_on_the_kernel(chunk, weights):
    model = tiny_model(vocab_size=256)
    sizes = {"max_num_seqs": 3, "max_model_len": 96, "max_num_batched_tokens": chunk}
    # activations in fp32 on both sides (the kernel's); bf16: the reference holds the bf16-rounded values in fp32
    kwargs = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "int8": {"quantization": "int8", "dtype": "float32"}}
    kernel = LLM(model, **sizes, **kwargs[weights])
    reference = _reference_model(model, kernel, "bf16") if weights == "bf16" else model
    # int8: a last-bit difference in a product's input may round one int8 activation the other way
    got = assert_kernel_steps_match_torch(kernel, LLM(reference, **sizes, **kwargs["int8" if weights == "int8" else
                                                                                    "fp32"]),
                                          atol=1e-2 if weights == "int8" else 1e-4)
    if weights == "fp32":  # greedy tokens of the fully torch engine (torch's own GEMMs) too
        plain = LLM(model, **sizes, fused=False)
        want = _staggered(plain, PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_prompt_logprobs_keep_chunks_on_torch_path():
    """Chunks whose prompt is scored run on torch beside the decode rows on the kernel; results equal the torch
    path alone."""
    model = tiny_model(vocab_size=256)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    fused = LLM(model, max_num_seqs=3, max_model_len=96, max_num_batched_tokens=8)
    if fused.runner.fused is None:
        pytest.skip("fused kernel unavailable here (no C compiler)")
    plain = LLM(model, max_num_seqs=3, max_model_len=96, max_num_batched_tokens=8, fused=False)
    steps = _record(fused)
    got, want = _staggered(fused, PROMPTS, params), _staggered(plain, PROMPTS, params)
    assert any(inp.fused_decode is not None for inp, _ in steps), "no step split between kernel and torch path"
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
