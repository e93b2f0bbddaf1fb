"""The fused C decode step (engine/fused.py) against the model's own forward on the same weights and KV.

For each weight format the reference is MiniMindForCausalLM in fp32 holding exactly the values the kernel
reads (bf16-rounded, or int8 x scale dequantized; on CPUs without native bf16 the activations are fp32), fed a
DynamicCache with the same keys/values the slot cache holds. For int8 the kernel also quantizes each product's
input to int8 in blocks of 32 (kernels/q8.c): the reference re-derives that format in torch (`fake_q8`). Rows use different slots (not contiguous), positions and batch sizes around the kernel's tile
widths; a hidden size that is not a multiple of 8 takes the scalar tails.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model
from minimind.engine import LLM, SamplingParams
from minimind.engine.fused import unsupported_reason


def _needs_kernel(llm: LLM) -> None:
    if llm.runner.fused is None:
        pytest.skip(f"fused kernel unavailable here: {unsupported_reason(llm.runner) or 'no C compiler'}")


def _reference_model(model, llm: LLM, weights: str):
    """fp32 copy of `model` holding the runner's weight values."""
    ref = copy.deepcopy(model).float()
    if weights == "fp32":
        return ref
    runner, cfg = llm.runner, model.config
    with torch.no_grad():  # embedding and projections stored in bf16; norms as the runner keeps them
        for name, p in ref.named_parameters():
            if "norm" not in name:
                p.copy_(p.bfloat16().float())
        for layer, lw in zip(ref.model.layers, runner.layers):
            for mine, theirs in ((layer.input_layernorm, lw.ln1), (layer.post_attention_layernorm, lw.ln2),
                                 (getattr(layer.self_attn, "q_norm", None), lw.q_norm),
                                 (getattr(layer.self_attn, "k_norm", None), lw.k_norm)):
                if mine is not None:
                    mine.weight.copy_(theirs.weight.float())
        ref.model.norm.weight.copy_(runner.norm.weight.float())
    if weights == "bf16":
        return ref
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    with torch.no_grad():
        for layer, lw in zip(ref.model.layers, runner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v = lw.qkv.dequantize().split([q_rows, kv_rows, kv_rows])
            attn.q_proj.weight.copy_(q), attn.k_proj.weight.copy_(k), attn.v_proj.weight.copy_(v)
            attn.o_proj.weight.copy_(lw.o.dequantize())
            gate, up = lw.gate_up.dequantize().chunk(2)
            mlp.gate_proj.weight.copy_(gate), mlp.up_proj.weight.copy_(up)
            mlp.down_proj.weight.copy_(lw.down.dequantize())
        ref.lm_head.weight = torch.nn.Parameter(runner.lm_head.dequantize())  # unties: embedding stays bf16
    _quantize_inputs(ref)
    return ref


def fake_q8(x: torch.Tensor, margin: list[float] | None = None) -> torch.Tensor:
    """The activation format of kernels/q8.c written out in torch, quantized and dequantized: per row a unit
    rmax / (127 * 128), per block of 32 an integer scale s = clamp(ceil(bmax * 128 / rmax), 1, 128), values
    rint(x / (unit * s)) clamped to +-127. `margin[0]` is lowered to the closest any value came to a rounding
    boundary (where a last-bit difference in x may round the other way)."""
    shape, k = x.shape, x.shape[-1]
    if k % 32 or k > 8192:  # the kernel keeps such products in fp32
        return x
    blocks = x.reshape(-1, k // 32, 32)
    bmax = blocks.abs().amax(-1, keepdim=True)
    rmax = bmax.amax(1, keepdim=True)
    unit = rmax / torch.tensor(127.0 * 128)
    s = torch.clamp(torch.ceil(bmax * 128.0 / rmax), 1, 128)
    scaled = blocks * (1.0 / (unit * s))
    if margin is not None:
        margin[0] = min(margin[0], (scaled - scaled.floor() - 0.5).abs().min().item())
    q = torch.clamp(torch.round(scaled), -127, 127)
    return torch.where(rmax > 0, q * s * unit, 0.0).reshape(shape)


def _quantize_inputs(ref) -> None:
    """every projection of `ref` sees its input through fake_q8, as the int8 kernel computes"""
    ref.q8_margin = [1.0]

    def forward_of(linear):
        return lambda x: torch.nn.functional.linear(fake_q8(x, ref.q8_margin), linear.weight)

    for module in ref.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = forward_of(module)


def check_row(ref, llm: LLM, got: torch.Tensor, token: int, slot: int, pos: int, weights: str, msg: str) -> bool:
    """The kernel's logits of one decode row against the reference model's; True when excused: the reference's fp32
    activations differ from the kernel's by ~1e-6 relative (its exp, summation order), so with int8 weights a value
    within 1e-3 of a rounding boundary of fake_q8 may round the other way: one step of one block, carried through
    the layers (up to ~5e-2 here). Callers allow that for at most a tenth of the rows."""
    if weights == "int8":
        ref.q8_margin[0] = 1.0
    expect = _reference_logits(ref, llm, token, slot, pos)
    if weights == "int8" and ref.q8_margin[0] < 1e-3 and not torch.allclose(got, expect, 1e-4, 2e-4):
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-1)
        return True
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=2e-4, msg=msg)
    return False


def _reference_logits(ref, llm: LLM, token: int, slot: int, pos: int) -> torch.Tensor:
    cache = DynamicCache(config=ref.config)
    for layer in range(ref.config.num_hidden_layers):
        cache.update(llm.kv.k[layer, slot, :, :pos][None].float(), llm.kv.v[layer, slot, :, :pos][None].float(), layer)
    with torch.no_grad():
        out = ref(torch.tensor([[token]]), position_ids=torch.tensor([[pos]]), past_key_values=cache)
    return out.logits[0, -1].float()


CASES = [("minimind2", {}), ("minimind3", {}), ("minimind2", {"hidden_size": 40, "num_attention_heads": 4}),
         ("minimind2", {"hidden_size": 192, "num_attention_heads": 2, "num_key_value_heads": 1})]


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("family,overrides", CASES, ids=["minimind2", "minimind3-qk-norm", "hidden40-tails",
                                                             "head-dim96"])
def test_fused_step_equals_model_forward(family, overrides, weights):
    model = tiny_model(family, vocab_size=300, **overrides)
    kwargs = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "int8": {"quantization": "int8"}}[weights]
    llm = LLM(model, max_num_seqs=40, max_model_len=160, **kwargs)
    _needs_kernel(llm)
    ref = _reference_model(model, llm, weights)
    gen = torch.Generator().manual_seed(1)
    llm.kv.k.normal_(generator=gen), llm.kv.v.normal_(generator=gen)  # any cache content must be attended right
    # B == 1 row streaming, dot-product tiles below 12 rows (8 for fp32), packed GEMM panels of 16 from there
    # (a half-empty panel, a second panel with one row, two full panels, a third with one row); int8: 2 x 4 tiles
    # and their 2-, 1-row and odd-weight-row edges
    excused, total = 0, 0
    for rows in (1, 2, 3, 5, 8, 13, 17, 32, 33):
        total += rows
        slots = torch.randperm(40, generator=gen)[:rows]
        # positions past 64 take more than one chunk of values in the grouped attention
        positions = torch.randint(0, 159, (rows,), generator=gen)
        ids = torch.randint(0, 300, (rows,), generator=gen)
        logits = llm.runner.fused(ids, slots, positions)
        for b in range(rows):
            if check_row(ref, llm, logits[b], int(ids[b]), int(slots[b]), int(positions[b]), weights,
                         f"{rows} rows, row {b}"):
                excused += 1
                continue
            # the kernel wrote this row's new key/value at its position; the reference computed the same
            cache = DynamicCache(config=ref.config)
            with torch.no_grad():
                ref(torch.tensor([[int(ids[b])]]), position_ids=positions[b].view(1, 1), past_key_values=cache)
            for got, want in ((llm.kv.k, cache.layers[0].keys), (llm.kv.v, cache.layers[0].values)):
                torch.testing.assert_close(got[0, slots[b], :, positions[b]], want[0, :, 0],
                                           rtol=1e-4, atol=1e-5)
    assert excused <= total // 10, f"{excused} of {total} rows differ beyond rounding-boundary noise"


@pytest.mark.parametrize("family,overrides", [CASES[0], CASES[1], CASES[3]], ids=["minimind2", "minimind3-qk-norm",
                                                                              "head-dim96"])
def test_fused_step_with_fp16_kv_cache(family, overrides):
    """kv_dtype="float16": the kernel attends over the fp16 cache widened exactly and stores new keys/values rounded
    to nearest (as torch's .half()); the reference attends over the same values in fp32."""
    model = tiny_model(family, vocab_size=300, **overrides)
    llm = LLM(model, max_num_seqs=8, max_model_len=160, kv_dtype="float16")
    _needs_kernel(llm)
    assert llm.kv.k.dtype == torch.float16 and llm.kv.nbytes == 2 * llm.kv.k.numel() * 2
    ref = copy.deepcopy(model).float()
    gen = torch.Generator().manual_seed(2)
    llm.kv.k.copy_(torch.randn(llm.kv.k.shape, generator=gen)), llm.kv.v.copy_(torch.randn(llm.kv.v.shape, generator=gen))
    rounded, written = 0, 0
    for rows in (1, 5, 8):
        slots = torch.randperm(8, generator=gen)[:rows]
        positions = torch.randint(0, 159, (rows,), generator=gen)  # lengths off the 8-key tiles, past one value chunk
        ids = torch.randint(0, 300, (rows,), generator=gen)
        logits = llm.runner.fused(ids, slots, positions)
        for b in range(rows):
            expect = _reference_logits(ref, llm, int(ids[b]), int(slots[b]), int(positions[b]))
            # the one difference: the kernel attends the new token's key/value rounded to fp16, the reference not
            torch.testing.assert_close(logits[b], expect, rtol=1e-3, atol=1e-3, msg=f"{rows} rows, row {b}")
            cache = DynamicCache(config=ref.config)
            with torch.no_grad():
                ref(torch.tensor([[int(ids[b])]]), position_ids=positions[b].view(1, 1), past_key_values=cache)
            for got, want in ((llm.kv.k, cache.layers[0].keys), (llm.kv.v, cache.layers[0].values)):
                got, want = got[0, slots[b], :, positions[b]], want[0, :, 0]
                torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-3)
                rounded += int((got != want.half()).sum())  # the kernel's fp32 value may sit across a rounding edge
                written += got.numel()
    assert rounded <= written // 50, f"{rounded} of {written} stored values are not round-to-nearest"


def test_fp16_kv_cache_fused_matches_torch_path():
    """Whole generations with kv_dtype="float16": the fused kernel and the torch path (which widens the cache for
    SDPA) see the same rounded keys and values, so greedy tokens and logprobs agree."""
    model = tiny_model(vocab_size=256)
    prompts = [[5, 6, 7], list(range(10, 47)), [9], list(range(100, 120))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    fused = LLM(model, max_num_seqs=4, max_model_len=96, kv_dtype="float16")
    _needs_kernel(fused)
    plain = LLM(model, max_num_seqs=4, max_model_len=96, kv_dtype="float16", fused=False)
    assert plain.kv.k.dtype == torch.float16 and plain.runner.fused is None
    for a, b in zip(fused.generate(prompts, params), plain.generate(prompts, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_position_outside_cache_raises():
    llm = LLM(tiny_model(vocab_size=256), max_num_seqs=2, max_model_len=32)
    _needs_kernel(llm)
    one = torch.tensor([1])
    with pytest.raises(IndexError, match="outside the KV cache"):
        llm.runner.fused(one, one, torch.tensor([32]))


def test_engine_uses_fused_kernel_and_matches_torch_path():
    """Whole generations, fused vs the torch path: greedy tokens and logprobs agree (fp32)."""
    model = tiny_model(vocab_size=256)
    prompts = [[5, 6, 7], list(range(10, 47)), [9], list(range(100, 120)), [3, 1, 4, 1, 5, 9, 2, 6]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    fused = LLM(model, max_num_seqs=4, max_model_len=96)
    _needs_kernel(fused)
    plain = LLM(model, max_num_seqs=4, max_model_len=96, fused=False)
    assert plain.runner.fused is None
    assert fused.runner.layers[0].qkv.packed and not plain.runner.layers[0].qkv.packed  # prompt chunks too
    for a, b in zip(fused.generate(prompts, params), plain.generate(prompts, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_missing_compiler_falls_back(monkeypatch, tmp_path):
    """No C compiler: the engine says why and runs the torch path."""
    from minimind.engine import fused

    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path))  # nothing cached there
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(fused.shutil, "which", lambda name: None)
    with pytest.raises(OSError, match="no C compiler"):
        fused.build()
    llm = LLM(tiny_model(vocab_size=256), max_num_seqs=2, max_model_len=32)
    assert llm.runner.fused is None
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3


@pytest.mark.parametrize("rows", [8, 13, 64, 65, 150])
@pytest.mark.parametrize("out_features,in_features", [(50, 43), (256, 64), (31, 1408)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_linear_equals_fp32_product(rows, out_features, in_features, dtype):
    """Prompt chunks: the packed kernel (x panels of 16 rows, 64 rows per pass, 6-row weight blocks with a tail,
    K not a multiple of 8) against the fp32 product of the same (bf16-rounded) weights."""
    from minimind.engine import fused
    from minimind.engine.quant import DenseLinear

    if fused._linear_library() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(out_features, in_features, generator=gen).to(dtype)
    x = torch.randn(rows, in_features, generator=gen)
    expect = x @ w.float().T
    torch.testing.assert_close(fused.packed_linear(w, x), expect, rtol=1e-5, atol=1e-4)
    lin = DenseLinear(w)
    lin.packed = True  # what ModelRunner.enable_fused sets
    if dtype == torch.float32 or lin.upcast:  # fp32 weights, and bf16 ones on CPUs without native bf16
        torch.testing.assert_close(lin(x), expect, rtol=1e-5, atol=1e-4)
    if lin.upcast:
        torch.testing.assert_close(lin(x.bfloat16()).float(), (x.bfloat16().float() @ w.float().T).bfloat16().float(),
                                   rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rows,out_features,in_features", [(1, 37, 64), (1, 20, 96), (2, 5, 96), (3, 8, 512), (5, 33, 1408),
                                                           (8, 64, 64), (33, 7, 128), (130, 41, 256)])
def test_int8_linear_equals_q8_format(rows, out_features, in_features):
    """int8 weights x int8-quantized activations (kernels/q8.c; every tile edge: 1-4 activation rows, odd weight
    rows, 64-row passes) against fake_q8's values times the dequantized weight in float64. Outlier columns make
    the per-32 block scales matter; an all-zero row must give zeros."""
    from minimind.engine import fused
    from minimind.engine.quant import Int8Linear

    if fused._linear_library() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(rows)
    lin = Int8Linear(torch.randn(out_features, in_features, generator=gen), torch.float32)
    x = torch.randn(rows, in_features, generator=gen)
    x[:, 3] *= 40  # an outlier in the first block only
    x[rows // 2] = 0
    expect = (fake_q8(x).double() @ lin.dequantize().double().T).float()
    got = fused.packed_linear(lin.qweight, x, lin.scales_f32)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    assert not got[rows // 2].any()
    lin.packed = True  # what ModelRunner.enable_fused sets: the layer itself goes through the kernel
    torch.testing.assert_close(lin(x), got, rtol=0, atol=0)
    # a width the format does not cover keeps fp32 activations (as the fused decode step does for it)
    narrow = Int8Linear(torch.randn(5, 40, generator=gen), torch.float32)
    x40 = torch.randn(3, 40, generator=gen)
    torch.testing.assert_close(fused.packed_linear(narrow.qweight, x40, narrow.scales_f32),
                               (x40.double() @ narrow.dequantize().double().T).float(), rtol=1e-5, atol=1e-5)


def test_long_prompt_in_one_kernel_call():
    """A 2000-token prompt as one chunk (max_num_batched_tokens=2048): the kernel's scratch scales with the rows;
    logprobs equal the torch path's."""
    model = tiny_model(vocab_size=256)
    prompt = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2)
    sizes = {"max_num_seqs": 1, "max_model_len": 2048, "max_num_batched_tokens": 2048}
    fused = LLM(model, **sizes)
    _needs_kernel(fused)
    a, b = (llm.generate(prompt, params)[0].outputs[0] for llm in (fused, LLM(model, **sizes, fused=False)))
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logprobs, b.logprobs):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
