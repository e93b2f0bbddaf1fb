"""Mixed steps (prompt chunks arriving while other sequences decode): the decode rows run on the fused kernel and
the chunks on the torch path, and the result equals the torch path alone."""
from __future__ import annotations

import pytest

from conftest import tiny_model
from minimind.engine import LLM, SamplingParams


def _staggered(llm: LLM, prompts, params, calls: list | None = None) -> dict:
    """Add one prompt every other step, so new prompt chunks keep meeting running decode rows."""
    if calls is not None:
        fused = llm.runner.fused

        def spy(ids, slots, positions):
            calls.append(len(ids))
            return fused(ids, slots, positions)

        llm.runner.fused = spy
    ids, final, pending, step = [], {}, list(prompts), 0
    while pending or llm.has_unfinished():
        if pending and step % 2 == 0:
            ids.append(llm.add_request(pending.pop(0), params))
        for out in llm.step():
            if out.finished:
                final[out.request_id] = out.outputs[0]
        step += 1
    return [final[i] for i in ids]


@pytest.mark.parametrize("chunk", [512, 8])  # 8: long prompts are split into several chunks
def test_mixed_steps_split_between_kernel_and_torch_path(chunk):
    model = tiny_model(vocab_size=256)
    prompts = [[5, 6, 7], list(range(10, 47)), [9], list(range(100, 120)), [3, 1, 4, 1, 5, 9, 2, 6], list(range(60, 90))]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    fused = LLM(model, max_num_seqs=3, max_model_len=96, max_num_batched_tokens=chunk)
    if fused.runner.fused is None:
        pytest.skip("fused kernel unavailable here (no C compiler)")
    plain = LLM(model, max_num_seqs=3, max_model_len=96, max_num_batched_tokens=chunk, fused=False)
    calls: list[int] = []
    seen_mixed = []
    prepare = fused.runner.prepare

    def watch(batch):
        inputs, seqs = prepare(batch)
        seen_mixed.append(inputs.fused_decode is not None)
        return inputs, seqs

    fused.runner.prepare = watch
    got, want = _staggered(fused, prompts, params, calls), _staggered(plain, prompts, params)
    assert any(seen_mixed), "no step mixed prompt chunks with decode rows: the test does not test the split"
    assert calls  # decode rows went through the kernel
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
