"""The fused C decode step on MoE models (kernels/moe.c) against the model's own forward on the same weights and KV.

As in test_engine_fused.py, the reference is MiniMindForCausalLM in fp32 holding exactly the values the kernel reads
(bf16-rounded, or int8 x scale dequantized with each product's input through fake_q8); its MoE module routes with
torch's softmax / topk / renormalisation, independently of the kernel's routing. The router stays fp32 on both sides.
Batches put rows on different experts (checked), so the kernel's grouping of rows per expert is exercised.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import tiny_model
from minimind.engine import LLM, SamplingParams
from minimind.engine.fused import unsupported_reason
from test_engine_fused import _needs_kernel, _reference_logits, check_row, fake_q8

FAMILIES = ["minimind2", "minimind3"]  # v2: top-2 of 4 + a shared expert; v3: top-1 of 4, renormalised


def _reference_model(model, llm: LLM, weights: str):
    """fp32 copy of `model` holding the runner's weight values; int8: inputs of the experts' and attention's
    products through fake_q8 (the router's stays fp32, as in the kernel)."""
    ref = copy.deepcopy(model).float()
    if weights == "fp32":
        return ref
    runner, cfg = llm.runner, model.config
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" not in name and not name.endswith("mlp.gate.weight"):
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
        for layer, lw in zip(ref.model.layers, runner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v = lw.qkv.dequantize().split([q_rows, kv_rows, kv_rows])
            attn.q_proj.weight.copy_(q), attn.k_proj.weight.copy_(k), attn.v_proj.weight.copy_(v)
            attn.o_proj.weight.copy_(lw.o.dequantize())
            mine = list(mlp.experts) + list(getattr(mlp, "shared_experts", ()))
            for expert, (gate_up, down) in zip(mine, lw.moe.experts + lw.moe.shared, strict=True):
                gate, up = gate_up.dequantize().chunk(2)
                expert.gate_proj.weight.copy_(gate), expert.up_proj.weight.copy_(up)
                expert.down_proj.weight.copy_(down.dequantize())
        ref.lm_head.weight = torch.nn.Parameter(runner.lm_head.dequantize())  # unties: embedding stays bf16
    ref.q8_margin = [1.0]

    def forward_of(linear):
        return lambda x: torch.nn.functional.linear(fake_q8(x, ref.q8_margin), linear.weight)

    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("mlp.gate"):
            module.forward = forward_of(module)
    return ref


def _record_routes(ref) -> list:
    """top-1 expert of every row the reference's first MoE layer routes, appended as it runs"""
    seen = []
    gate = ref.model.layers[0].mlp.gate
    gate.register_forward_hook(lambda mod, args, out: seen.extend(out.argmax(-1).flatten().tolist()))
    return seen


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("family", FAMILIES, ids=["minimind2-moe", "minimind3-moe"])
def test_fused_moe_step_equals_model_forward(family, weights):
    model = tiny_model(family, use_moe=True, vocab_size=300)
    kwargs = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "int8": {"quantization": "int8"}}[weights]
    llm = LLM(model, max_num_seqs=40, max_model_len=160, **kwargs)
    _needs_kernel(llm)
    ref = _reference_model(model, llm, weights)
    routes = _record_routes(ref)
    gen = torch.Generator().manual_seed(3)
    llm.kv.k.normal_(generator=gen), llm.kv.v.normal_(generator=gen)
    # 1 row; dot-product tiles; 13+ rows take the packed GEMM for the step, and experts with fewer rows do not
    excused, total = 0, 0
    for rows in (1, 2, 5, 8, 13, 17, 33):
        total += rows
        slots = torch.randperm(40, generator=gen)[:rows]
        positions = torch.randint(0, 159, (rows,), generator=gen)
        ids = torch.randint(0, 300, (rows,), generator=gen)
        logits = llm.runner.fused(ids, slots, positions)
        routes.clear()
        for b in range(rows):
            excused += check_row(ref, llm, logits[b], int(ids[b]), int(slots[b]), int(positions[b]), weights,
                                 f"{rows} rows, row {b}")
        if rows >= 5:
            assert len(set(routes)) > 1, f"all {rows} rows on one expert: the batch tests no grouping"
    assert excused <= total // 10, f"{excused} of {total} rows differ beyond rounding-boundary noise"


@pytest.mark.parametrize("family", FAMILIES, ids=["minimind2-moe", "minimind3-moe"])
def test_moe_engine_uses_fused_kernel_and_matches_torch_path(family):
    """Whole generations (prompt chunks on torch joining fused decode rows in mixed steps), fused vs the torch
    path: greedy tokens and logprobs agree (fp32)."""
    model = tiny_model(family, use_moe=True, vocab_size=256)
    prompts = [[5, 6, 7], list(range(10, 47)), [9], list(range(100, 120)), [3, 1, 4, 1, 5, 9, 2, 6]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    fused = LLM(model, max_num_seqs=4, max_model_len=96)
    assert unsupported_reason(fused.runner) is None
    _needs_kernel(fused)
    plain = LLM(model, max_num_seqs=4, max_model_len=96, fused=False)
    assert plain.runner.fused is None
    for a, b in zip(fused.generate(prompts, params), plain.generate(prompts, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_moe_engine_generates_through_fused_kernel(weights):
    """bf16 and int8 experts end to end: every step of the generation (prompts, then decode) is one kernel call
    whose logits are the reference model's for the same cache (the greedy token is the reference's argmax)."""
    model = tiny_model("minimind2", use_moe=True, vocab_size=256)
    kwargs = {"bf16": {"dtype": "bfloat16"}, "int8": {"quantization": "int8"}}[weights]
    llm = LLM(model, max_num_seqs=4, max_model_len=96, **kwargs)
    _needs_kernel(llm)
    ref = _reference_model(model, llm, weights)
    calls, fused = [], llm.runner.fused

    def checked(ids, slots, positions, out_rows=None):
        logits = fused(ids, slots, positions, out_rows)
        for j, b in enumerate(range(ids.shape[0]) if out_rows is None else out_rows.tolist()):
            expect = _reference_logits(ref, llm, int(ids[b]), int(slots[b]), int(positions[b]))
            torch.testing.assert_close(logits[j], expect, rtol=0, atol=1e-1 if weights == "int8" else 2e-4)
        calls.append(logits.shape[0])
        return logits

    llm.runner.fused = checked
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([[5, 6, 7], list(range(10, 30)), [9]], params)
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert sum(calls) >= 3 * 5 and max(calls) == 3  # each sequence's decode steps, batched


def test_qwen3_moe_gguf_decodes_like_llama_cpp(tmp_path):
    """minimind-3-moe exported as a Qwen3-MoE GGUF (f32): our fused MoE decode steps give llama.cpp's
    log-probabilities on the same file (fp32 KV cache on both sides) and its greedy tokens."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    from minimind.checkpoint.gguf_reader import SUPPORTED_ARCHS
    from minimind.convert import export_gguf
    from test_convert_util import native_era
    from test_engine_gguf_blocks import _log_softmax

    if "qwen3moe" not in SUPPORTED_ARCHS:
        pytest.skip("checkpoint/gguf_reader.py does not read qwen3moe")
    pth, tok = native_era(tmp_path, "minimind3-moe")
    path = export_gguf(pth, tmp_path / "moe.gguf", "f32", tokenizer=tok, show_progress=False)
    llm = LLM(str(path), max_num_seqs=1, max_model_len=64)
    _needs_kernel(llm)
    assert llm.config.use_moe and llm.config.num_experts_per_tok == 1
    prompt = [5, 17, 42, 3, 99, 7, 64, 23]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True))[0].outputs[0]
    ref = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # GGML_TYPE_F32 cache
    ref.eval(prompt + out.token_ids[:-1])
    worst = 0.0
    for step, logprob in enumerate(out.logprobs):  # step 0 from the prompt chunk, the rest from fused decode steps
        theirs = _log_softmax(ref.scores[len(prompt) - 1 + step])
        assert out.token_ids[step] == int(np.argmax(theirs))
        for top in logprob.top:
            worst = max(worst, abs(top.logprob - theirs[top.token_id]))
    assert worst < 1e-3, worst


def test_quantized_qwen3_moe_gguf_keeps_its_expert_blocks(tmp_path):
    """A Q8_0 Qwen3-MoE GGUF: the experts stay in their blocks (views of one copy of each stacked tensor), and with
    fp32 activations the fused MoE steps give the log-probabilities of the dequantized file's fp32 model."""
    import minimind
    from minimind.convert import export_gguf
    from test_convert_util import native_era
    from test_engine_gguf_blocks import _worst_logprob_gaps

    pth, tok = native_era(tmp_path, "minimind3-moe")
    path = export_gguf(pth, tmp_path / "moe-q8_0.gguf", "q8_0", tokenizer=tok, show_progress=False)
    model = minimind.load_model(path, light=True, keep_blocks=True)
    experts = model.model.layers[0].mlp.experts
    assert all(e.gate_proj.gguf_blocks[0] == 8 and e.down_proj.gguf_blocks[0] == 8 for e in experts)
    prompts = [[5, 17, 42, 3, 99, 7, 64, 23] * 2, [9, 8, 7]]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5, ignore_eos=True)
    dense = LLM(minimind.load_model(path, light=True), max_num_seqs=2, max_model_len=64)
    llm = LLM(model, max_num_seqs=2, max_model_len=64, block_activations="fp32")
    _needs_kernel(llm)
    assert type(llm.runner.layers[0].moe.experts[0][0]).__name__ == "BlockLinear"
    for ours, ref in zip(llm.generate(prompts, params), dense.generate(prompts, params)):
        assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
        assert max(_worst_logprob_gaps(ours.outputs[0], ref.outputs[0])) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_prompt_chunks_run_on_the_kernel(family):
    """Prompt chunks (whole, chunked, prefix-cache hits) and decode rows of an MoE model in one kernel call: each
    step's logits equal the torch path's."""
    from test_engine_mixed import assert_kernel_steps_match_torch

    model = tiny_model(family, use_moe=True, vocab_size=256)
    for chunk in (512, 8):
        sizes = {"max_num_seqs": 3, "max_model_len": 96, "max_num_batched_tokens": chunk}
        assert_kernel_steps_match_torch(LLM(model, **sizes), LLM(model, **sizes))
