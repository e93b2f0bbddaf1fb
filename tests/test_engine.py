"""Engine correctness on tiny random models: batched/cached/chunked greedy == naive full-recompute greedy,
slot accounting, seeds, n > 1, logprobs, MoE, int8 and speculative decoding. No timing asserts."""
from __future__ import annotations

import functools
import threading

import pytest
import torch

from conftest import tiny_model
from minimind.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 6, 7], list(range(10, 47)), [9], list(range(100, 120)), [3, 1, 4, 1, 5, 9, 2, 6]]


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    return list(_naive_greedy(model, tuple(prompt), n))


@functools.cache
def _naive_greedy(model, prompt: tuple[int, ...], n: int) -> tuple[int, ...]:
    """Full recompute of the whole sequence for every token: no cache of any kind."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return tuple(ids[len(prompt):])


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=256)


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("chunk", [4, 512])
def test_batched_greedy_equals_naive(model, prefix_cache, chunk):
    llm = LLM(model, max_num_seqs=4, max_model_len=96, max_num_batched_tokens=chunk,
              enable_prefix_caching=prefix_cache)
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == naive_greedy(model, prompt, 10)
    # Second round shares prefixes with the first (a chat's next turn, a common system prompt).
    follow = [PROMPTS[1] + out.outputs[0].token_ids[:5] + [42] for out in outs[1:2]] + [list(range(10, 30)) + [7]]
    outs2 = llm.generate(follow, GREEDY)
    for prompt, out in zip(follow, outs2):
        assert out.outputs[0].token_ids == naive_greedy(model, prompt, 10)
    if prefix_cache:
        assert outs2[0].num_cached_tokens >= len(PROMPTS[1]) and outs2[1].num_cached_tokens == 20
    else:
        assert all(o.num_cached_tokens == 0 for o in outs2)


def test_requests_join_running_batch(model):
    """Continuous batching: a request added mid-stream decodes alongside the running ones."""
    llm = LLM(model, max_num_seqs=4, max_model_len=64)
    first = llm.add_request(PROMPTS[0], GREEDY)
    results = {}
    for i in range(30):
        if i == 1:  # after the first step (its prompt): a lone sequence takes many tokens per step
            second = llm.add_request(PROMPTS[3], GREEDY)
        for out in llm.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        if not llm.has_unfinished():
            break
    assert results[first] == naive_greedy(model, PROMPTS[0], 10)
    assert results[second] == naive_greedy(model, PROMPTS[3], 10)


def test_queue_holds_when_kv_budget_full(model):
    llm = LLM(model, max_num_seqs=2, max_model_len=64)
    ids = [llm.add_request(p, GREEDY) for p in PROMPTS]
    llm.step()
    assert len(llm.scheduler.running) == 2 and len(llm.scheduler.waiting) == 3
    done = {}
    while llm.has_unfinished():
        assert len(llm.scheduler.running) <= 2
        done.update({o.request_id: o for o in llm.step() if o.finished})
    for rid, prompt in zip(ids, PROMPTS):
        assert done[rid].outputs[0].token_ids == naive_greedy(model, prompt, 10)


def test_prompt_longer_than_max_model_len_is_refused(model):
    llm = LLM(model, max_num_seqs=1, max_model_len=16)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.add_request(list(range(20)), GREEDY)
    out = llm.generate([list(range(10))], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 6


def test_abort_frees_slot(model):
    llm = LLM(model, max_num_seqs=1, max_model_len=64)
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    a = llm.add_request(PROMPTS[0], long)
    b = llm.add_request(PROMPTS[3], GREEDY)
    llm.step()
    llm.step()
    assert [s.request_id for s in llm.scheduler.running] == [a]
    llm.abort(a)
    outs = {o.request_id: o for o in llm.step()}
    assert outs[a].finished and outs[a].outputs[0].finish_reason == "abort"
    assert [s.request_id for s in llm.scheduler.running] == [b]
    done = {}
    while llm.has_unfinished():
        done.update({o.request_id: o for o in llm.step() if o.finished})
    assert done[b].outputs[0].token_ids == naive_greedy(model, PROMPTS[3], 10)


def test_stream_interval_hands_out_every_few_tokens(model):
    """stream_interval=3: a running request's first token at once, then an output per 3 new tokens, the rest with
    its end; the deltas add up to the same answer as every token streamed (two requests sharing the batch)."""
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    deltas = {}
    llm = LLM(model, max_num_seqs=2, max_model_len=64, stream_interval=3)
    ids = [llm.add_request(PROMPTS[0], sp), llm.add_request(PROMPTS[3], sp)]
    while llm.has_unfinished():
        for out in llm.step():
            deltas.setdefault(out.request_id, []).append(out.outputs[0].delta_token_ids)
    for rid, prompt in zip(ids, [PROMPTS[0], PROMPTS[3]]):
        assert [len(d) for d in deltas[rid]] == [1, 3, 3, 3]
        assert [t for d in deltas[rid] for t in d] == naive_greedy(model, prompt, 10)
    with pytest.raises(ValueError, match="stream_interval"):
        LLM(model, max_num_seqs=1, max_model_len=64, stream_interval=0)


def test_seed_reproducible_regardless_of_batch(model):
    sp = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, max_tokens=12, seed=1234, ignore_eos=True)
    alone = LLM(model, max_num_seqs=4, max_model_len=64).generate([PROMPTS[1]], sp)[0].outputs[0].token_ids
    other = SamplingParams(temperature=1.2, max_tokens=7, seed=7, ignore_eos=True)
    mixed = LLM(model, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=8).generate(
        [PROMPTS[0], PROMPTS[1], PROMPTS[3]], [other, sp, SamplingParams(temperature=0, max_tokens=3)])
    assert mixed[1].outputs[0].token_ids == alone
    unseeded = SamplingParams(temperature=0.9, max_tokens=12, ignore_eos=True)
    llm = LLM(model, max_num_seqs=4, max_model_len=64)
    assert llm.generate([PROMPTS[1]], unseeded)[0].outputs[0].token_ids != alone  # 1 in 10^20 to collide


def test_n_greater_than_one(model):
    llm = LLM(model, max_num_seqs=4, max_model_len=64)
    out = llm.generate(PROMPTS[1], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    again = llm.generate(PROMPTS[1], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5, ignore_eos=True))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert again.num_cached_tokens > 0
    greedy = llm.generate(PROMPTS[3], SamplingParams(n=2, temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids == naive_greedy(model, PROMPTS[3], 6)


def test_logprobs(model):
    llm = LLM(model, max_num_seqs=2, max_model_len=64)
    out = llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=5, logprobs=4, ignore_eos=True))[0]
    comp = out.outputs[0]
    ids = list(PROMPTS[3])
    for token, lp in zip(comp.token_ids, comp.logprobs):
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
        assert lp.token_id == token and lp.logprob == pytest.approx(float(ref[token]), abs=1e-4)
        assert lp.top[0].token_id == token  # greedy picks the top entry
        values = [t.logprob for t in lp.top]
        assert values == sorted(values, reverse=True) and len(values) == 4
        assert sum(torch.tensor(values).exp()) <= 1 + 1e-5
        ids.append(token)
    sampled = llm.generate(PROMPTS[3], SamplingParams(temperature=1.0, max_tokens=5, logprobs=0, seed=3))[0]
    assert all(lp.logprob <= 0 and lp.top == [] for lp in sampled.outputs[0].logprobs)


def test_sampling_filters_reduce_to_greedy(model):
    llm = LLM(model, max_num_seqs=4, max_model_len=64)
    expect = naive_greedy(model, PROMPTS[1], 6)
    for sp in (SamplingParams(temperature=1.5, top_k=1, max_tokens=6, ignore_eos=True),
               SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=6, ignore_eos=True),
               SamplingParams(temperature=1.5, min_p=1.0, max_tokens=6, ignore_eos=True)):
        assert llm.generate(PROMPTS[1], sp)[0].outputs[0].token_ids == expect
    forced = SamplingParams(temperature=0.7, max_tokens=4, logit_bias={17: 100.0}, ignore_eos=True)
    assert llm.generate(PROMPTS[1], forced)[0].outputs[0].token_ids == [17] * 4
    no_repeat = SamplingParams(temperature=0, max_tokens=20, presence_penalty=100.0, ignore_eos=True)
    toks = llm.generate(PROMPTS[1], no_repeat)[0].outputs[0].token_ids
    assert len(set(toks)) == len(toks)
    rep = SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1e4, ignore_eos=True)
    toks = llm.generate(PROMPTS[1], rep)[0].outputs[0].token_ids
    assert not set(toks) & set(PROMPTS[1]) and len(set(toks)) == len(toks)


def test_stop_token_ids(model):
    llm = LLM(model, max_num_seqs=2, max_model_len=64)
    expect = naive_greedy(model, PROMPTS[1], 10)
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[expect[3]]))[0]
    cut = expect.index(expect[3]) + 1
    assert out.outputs[0].token_ids == expect[:cut] and out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason == expect[3]


@pytest.mark.parametrize("use_moe", [False, True])
@pytest.mark.parametrize("family", ["minimind2", "minimind3"])
def test_families_and_moe_batched(family, use_moe):
    m = tiny_model(family, use_moe, vocab_size=256)
    llm = LLM(m, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        assert out.outputs[0].token_ids == naive_greedy(m, prompt, 10)


def test_bf16_and_int8_run(model):
    ref = naive_greedy(model, PROMPTS[1], 8)
    for kwargs in ({"dtype": "bfloat16"}, {"dtype": "bfloat16", "kv_dtype": "float32"}, {"quantization": "int8"},
                   {"quantization": "dynamic"}):
        out = LLM(model, max_num_seqs=2, max_model_len=64, **kwargs).generate(PROMPTS[1], GREEDY)[0]
        assert len(out.outputs[0].token_ids) == 10
        assert out.outputs[0].token_ids[:2] == ref[:2], kwargs  # low precision may drift later, not at once
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is never cast


def test_int8_linear_matches_dequantized():
    from minimind.engine.quant import Int8Linear

    w = torch.randn(96, 64)
    lin = Int8Linear(w)
    x = torch.randn(5, 64).bfloat16()
    ref = x.float() @ lin.dequantize().T
    torch.testing.assert_close(lin(x).float(), ref, rtol=2e-2, atol=5e-2)
    assert (lin.dequantize() - w).abs().max() <= w.abs().max() / 127


def test_speculative_greedy_equals_plain(model):
    draft = tiny_model(vocab_size=256, seed=1, num_hidden_layers=1)
    plain = LLM(model, max_num_seqs=2, max_model_len=64).generate(PROMPTS, GREEDY)
    spec_llm = LLM(model, max_num_seqs=2, max_model_len=64, draft_model=draft, num_speculative_tokens=3)
    spec = spec_llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert spec_llm.speculator.proposed > 0
    selfdraft = LLM(model, max_num_seqs=1, max_model_len=64, draft_model=model, num_speculative_tokens=4)
    out = selfdraft.generate(PROMPTS[1], GREEDY)[0]
    assert out.outputs[0].token_ids == plain[1].outputs[0].token_ids
    assert selfdraft.speculator.accepted == selfdraft.speculator.proposed  # a draft equal to the target


def test_background_thread_serves_concurrent_streams(model):
    expect = [naive_greedy(model, p, 10) for p in PROMPTS]
    results = [None] * len(PROMPTS)
    with LLM(model, max_num_seqs=3, max_model_len=64).start() as llm:
        def client(i):
            results[i] = [t for out in llm.stream(PROMPTS[i], GREEDY) for t in out.outputs[0].delta_token_ids]
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], GREEDY)] == expect[:2]
    assert results == expect


def test_int8_quantization_in_row_blocks_equals_whole_matrix():
    """Int8Linear quantizes block by block (bounded load memory); per-row absmax scales make that exact."""
    from minimind.engine.quant import QUANT_BLOCK_ROWS, Int8Linear

    gen = torch.Generator().manual_seed(0)
    rows = 2 * QUANT_BLOCK_ROWS + 37  # two full blocks and a partial one
    w = torch.randn(rows, 24, generator=gen) * torch.rand(rows, 1, generator=gen)
    lin = Int8Linear(w.bfloat16())
    wb = w.bfloat16().float()
    scale = wb.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    assert torch.equal(lin.qweight, torch.round(wb / scale[:, None]).clamp(-127, 127).to(torch.int8))
    assert torch.equal(lin.scales, scale.bfloat16())


def test_logits_processors_hook_runs_per_sequence_before_sampling():
    """SamplingParams.logits_processors: called once per step with that sequence's own output ids, cloned for each
    of n; a processor that allows one token decides the output whatever the sampler does."""
    from conftest import tiny_model
    from minimind.engine import LLM, SamplingParams

    vocab, clones = 256, []

    class OnlyOne:
        def __init__(self):
            self.seen = []

        def clone(self):
            clones.append(OnlyOne())
            return clones[-1]

        def __call__(self, token_ids, logits):
            self.seen.append(list(token_ids))
            allowed = (7 * len(token_ids) + 11) % vocab
            return torch.full_like(logits, float("-inf")).index_fill_(0, torch.tensor([allowed]), 0.0)

    template = OnlyOne()
    llm = LLM(tiny_model(vocab_size=vocab), max_num_seqs=4, max_model_len=64)
    want = [(7 * i + 11) % vocab for i in range(6)]
    for params in (SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logits_processors=[template]),
                   SamplingParams(temperature=1.0, top_p=0.9, n=2, seed=3, max_tokens=6, ignore_eos=True,
                                  logits_processors=[template])):
        clones.clear()
        out = llm.generate([[5, 6, 7]], params)[0]
        assert [o.token_ids for o in out.outputs] == [want] * params.n
        assert len(clones) == params.n and template.seen == []
        for c in clones:
            assert c.seen == [want[:i] for i in range(6)]


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_counts_each_matrix_once(tied):
    """fp32 weights: vocab x hidden once when the embedding and lm_head are tied, twice when not, plus the
    layer matrices computed from the config (not from the runner)."""
    from conftest import tiny_model
    from minimind.engine import LLM

    model = tiny_model(vocab_size=256, tie_word_embeddings=tied)
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    c = model.config
    hq, hkv, d, h, inter = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size, c.intermediate_size
    per_layer = h * (hq + 2 * hkv) * d + hq * d * h + 3 * inter * h
    want = 4 * (c.vocab_size * h * (1 if tied else 2) + c.num_hidden_layers * per_layer)
    assert LLM(model, max_num_seqs=1, max_model_len=32, dtype="float32").runner.weight_bytes == want


def test_weight_bytes_of_moe_counts_experts():
    from conftest import tiny_model
    from minimind.engine import LLM

    model = tiny_model(vocab_size=256, use_moe=True, tie_word_embeddings=True)
    c = model.config
    hq, hkv, d, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    moe = sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())  # experts + router
    want = 4 * (c.vocab_size * h + c.num_hidden_layers * (h * (hq + 2 * hkv) * d + hq * d * h) + moe)
    assert LLM(model, max_num_seqs=1, max_model_len=32, dtype="float32").runner.weight_bytes == want


@pytest.mark.parametrize("kwargs", [{}, {"quantization": "int8"}, {"dtype": "bfloat16"}, {"fused": False}],
                         ids=["fp32", "int8", "bf16", "torch-path"])
def test_engine_from_path_releases_its_own_model_only(tmp_path, kwargs):
    """LLM(path) loads the model itself and empties each matrix once the runner holds its own copy (an int8 build
    never holds an fp32 and an int8 copy in full). Its answers equal an LLM built from the same weights handed in
    as a module (loaded as LLM(path) loads them), and a module handed in is never touched."""
    from minimind.checkpoint.loader import load_model

    tiny_model(vocab_size=256, tie_word_embeddings=False).save_pretrained(tmp_path / "m")
    module = load_model(tmp_path / "m", dtype="float32" if "quantization" in kwargs else kwargs.get("dtype"),
                        light=True)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    from_module = LLM(module, max_num_seqs=2, max_model_len=64, **kwargs)
    from_path = LLM(tmp_path / "m", max_num_seqs=2, max_model_len=64, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    for a, b in zip(from_module.generate(PROMPTS[:3], params), from_path.generate(PROMPTS[:3], params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [x.logprob for x in a.outputs[0].logprobs] == [x.logprob for x in b.outputs[0].logprobs]
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("field, params", [
    ("stop_token_ids", SamplingParams(stop_token_ids=[5, -1])),
    ("stop_token_ids", SamplingParams(stop_token_ids=[10**12])),
    ("logit_bias", SamplingParams(logit_bias={10**12: 1.0})),
    ("logit_bias", SamplingParams(logit_bias={-3: -100.0})),
])
def test_token_ids_outside_the_vocabulary_are_refused(model, field, params):
    """A token id the model cannot produce in stop_token_ids or logit_bias is an error naming the field, not a
    silent no-op."""
    llm = LLM(model, max_num_seqs=1, max_model_len=64)
    with pytest.raises(ValueError, match=rf"{field}: token id -?\d+ is outside the vocabulary \(0 to "):
        llm.add_request([1, 2, 3], params)
    assert not llm.has_unfinished()
