"""A GGUF's Q8_0 / Q4_0 / Q4_1 / Q5_0 matrices run from their file bytes (engine/quant.py BlockLinear, kernels/qblock.c;
Q4_K / Q6_K of a Q4_K_M file: kernels/qkblock.c, activations as llama.cpp's Q8_K),
checked against llama.cpp on the same file with an fp32 KV cache: with block_activations="int8" both quantize
activations per 32 values the same way, so their log-probabilities agree to ~1e-5, prompt (prefill) and generated
tokens (fused decode) alike. With "fp32" they equal an fp32 model of the dequantized file; the default "auto" takes
fp32 activations for prompts (12 rows or more) and 8-bit ones for decode steps."""
from __future__ import annotations

from itertools import islice

import gguf
import numpy as np
import pytest
import torch

import minimind
from minimind.engine import LLM, SamplingParams
from test_gguf_loading import llama, write_gguf

TYPES = {"Q8_0": gguf.GGMLQuantizationType.Q8_0, "Q4_0": gguf.GGMLQuantizationType.Q4_0,
         "Q4_1": gguf.GGMLQuantizationType.Q4_1, "Q5_0": gguf.GGMLQuantizationType.Q5_0}
PROMPT = [5, 17, 42, 3, 99, 7, 64, 23]


def _log_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("name", TYPES)
def test_block_weights_match_llama_cpp(tmp_path, name, tied):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    path = write_gguf(tmp_path / f"m-{name}.gguf", llama(tie_word_embeddings=tied, hidden_size=64,
                                                         intermediate_size=96), "llama", TYPES[name])
    model = minimind.load_model(path, light=True, keep_blocks=True)
    assert model.model.layers[0].self_attn.q_proj.gguf_blocks[0] == int(TYPES[name])
    llm = LLM(model, max_num_seqs=1, max_model_len=64, block_activations="int8")
    assert llm.runner.fused is not None, "the fused kernel should take block weights"
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6, logprobs=5, ignore_eos=True))[0].outputs[0]

    ref = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # GGML_TYPE_F32: llama.cpp's default F16 cache rounds keys/values
    ref.eval(PROMPT + out.token_ids[:-1])
    worst = 0.0
    for step, logprob in enumerate(out.logprobs):  # step 0 from the prompt chunk, the rest from decode steps
        theirs = _log_softmax(ref.scores[len(PROMPT) - 1 + step])
        for top in logprob.top:
            worst = max(worst, abs(top.logprob - theirs[top.token_id]))
        assert out.token_ids[step] == int(np.argmax(theirs))
    assert worst < 1e-3, worst


def _worst_logprob_gaps(ours, ref) -> list[float]:
    """Per step, the largest |log-probability difference| over the top tokens both report."""
    gaps = []
    for la, lb in zip(ours.logprobs, ref.logprobs):
        theirs = {t.token_id: t.logprob for t in lb.top}
        gaps.append(max(abs(t.logprob - theirs[t.token_id]) for t in la.top if t.token_id in theirs))
    return gaps


@pytest.mark.parametrize("name", TYPES)
def test_fp32_activations_equal_the_dequantized_model(tmp_path, name):
    """block_activations="fp32": log-probabilities of the prompt, batch-1 and batched decode steps equal those of
    the fp32 model gguf's dequantization gives (dense weights, the plain fp32 kernels). "auto": the prompt's (16
    rows: the widened GEMM) equal them too; its decode steps round activations to 8 bits, close but not equal."""
    path = write_gguf(tmp_path / f"m-{name}.gguf", llama(hidden_size=64, intermediate_size=96), "llama", TYPES[name])
    prompts = [PROMPT * 2, PROMPT[:5], [9, 8, 7]]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5, ignore_eos=True)
    dense = LLM(minimind.load_model(path, light=True), max_num_seqs=3, max_model_len=64)
    assert not hasattr(dense.runner.layers[0].qkv, "blocks")
    refs = [r.outputs[0] for r in dense.generate(prompts, params)]
    for mode in ("fp32", "auto"):
        llm = LLM(minimind.load_model(path, light=True, keep_blocks=True), max_num_seqs=3, max_model_len=64,
                  block_activations=mode, enable_prefix_caching=False)  # the prompt alone: 16 rows again
        assert llm.runner.layers[0].qkv.code >= 16 and llm.runner.fused is not None
        for ours, ref in zip((r.outputs[0] for r in llm.generate(prompts, params)), refs):
            gaps = _worst_logprob_gaps(ours, ref)
            if mode == "fp32":
                assert ours.token_ids == ref.token_ids and max(gaps) < 1e-4, gaps
            else:  # while both have generated the same tokens
                same = next((i for i, (a, b) in enumerate(zip(ours.token_ids, ref.token_ids)) if a != b), len(gaps))
                assert max(gaps[:same + 1]) < 0.05, gaps
        first = _worst_logprob_gaps(*(r.outputs[0] for r in (llm.generate(prompts[0], params)[0],
                                                             dense.generate(prompts[0], params)[0])))[0]
        assert first < 1e-4, (mode, first)


def test_block_weights_are_not_dequantized_into_memory(tmp_path):
    """The runner holds the file's blocks (about 1/4 (Q8_0) of fp32), not fp32 copies."""
    path = write_gguf(tmp_path / "m.gguf", llama(tie_word_embeddings=True, hidden_size=64, intermediate_size=96),
                      "llama", TYPES["Q8_0"])
    blocks = LLM(minimind.load_model(path, light=True, keep_blocks=True), max_num_seqs=1, max_model_len=32)
    dense = LLM(minimind.load_model(path, light=True), max_num_seqs=1, max_model_len=32)
    assert blocks.runner.weight_bytes < 0.35 * dense.runner.weight_bytes


def test_torch_path_equals_dequantized_weights(tmp_path):
    """Without the fused kernel (fused=False) and with packed products off, block layers compute with gguf's
    dequantized weights in fp32: the same greedy tokens as the model loaded dequantized."""
    path = write_gguf(tmp_path / "m.gguf", llama(hidden_size=64, intermediate_size=96), "llama", TYPES["Q4_1"])
    llm = LLM(minimind.load_model(path, light=True, keep_blocks=True), max_num_seqs=1, max_model_len=32,
              fused=False)
    for lw in llm.runner.layers:
        for lin in (lw.qkv, lw.o, lw.gate_up, lw.down):
            lin.packed = False
    llm.runner.lm_head.packed = False
    dense = LLM(minimind.load_model(path, light=True), max_num_seqs=1, max_model_len=32, fused=False)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert llm.generate(PROMPT, params)[0].outputs[0].token_ids == dense.generate(PROMPT, params)[0].outputs[0].token_ids
    torch.testing.assert_close(llm.runner._embed(torch.tensor(PROMPT)), dense.runner._embed(torch.tensor(PROMPT)))


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("era", ["minimind2", "minimind3"])
def test_our_quantized_export_runs_like_llama_cpp(tmp_path, era, outtype):
    """`minimind convert --to gguf --outtype q4_0` (etc.): stock llama.cpp loads the file and its greedy tokens
    equal ours on the same file."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    from minimind.convert import export_gguf
    from test_convert_util import native_era

    pth, tok = native_era(tmp_path, era)
    out = export_gguf(pth, tmp_path / f"m-{outtype}.gguf", outtype, tokenizer=tok, show_progress=False)
    model = minimind.load_model(out, light=True, keep_blocks=True)
    assert model.model.layers[0].mlp.down_proj.gguf_blocks[0] == int(TYPES[outtype.upper()])
    ours = LLM(model, max_num_seqs=1, max_model_len=64, block_activations="int8").generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    ref = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, verbose=False, type_k=0, type_v=0)
    theirs = list(islice(ref.generate(PROMPT, top_k=1, temp=0.0, repeat_penalty=1.0), 8))
    assert ours == theirs


def _q4_k_m_file(tmp_path, **overrides):
    """`convert --quant q4_k_m` of a 2-layer minimind-3 shape of whole super-blocks: layer 0 all Q4_K, layer 1 with
    Q6_K attn_v (a q|k|v of both types) and ffn_down; the tied embedding / output Q6_K."""
    from minimind.convert import export_gguf
    from test_convert_gguf import _whole_block_model

    pth, tok = _whole_block_model(tmp_path, **overrides)
    return export_gguf(pth, tmp_path / "m-q4km.gguf", "q4_k_m", tokenizer=tok, show_progress=False)


def test_q4_k_m_matches_llama_cpp_batched(tmp_path):
    """Q4_K / Q6_K blocks (activations as llama.cpp's Q8_K): log-probabilities equal llama.cpp's on the same file,
    for the prompt (prefill), batch-1 and batched fused decode steps."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    path = _q4_k_m_file(tmp_path)
    model = minimind.load_model(path, light=True, keep_blocks=True)
    layers = model.model.layers
    assert [layers[i].self_attn.v_proj.gguf_blocks[0] for i in (0, 1)] == [12, 14]
    assert model.lm_head.gguf_blocks[0] == 14
    llm = LLM(model, max_num_seqs=3, max_model_len=64, block_activations="int8")
    assert llm.runner.fused is not None and llm.runner.layers[1].qkv.table is not None
    prompts = [PROMPT, PROMPT[:5], [9, 8, 7]]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5, ignore_eos=True)
    ref = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False,
                          type_k=0, type_v=0)
    for prompt, result in zip(prompts, llm.generate(prompts, params)):  # three rows per decode step
        out = result.outputs[0]
        ref.reset()
        ref.eval(prompt + out.token_ids[:-1])
        worst = 0.0
        for step, logprob in enumerate(out.logprobs):
            theirs = _log_softmax(ref.scores[len(prompt) - 1 + step])
            worst = max(worst, *(abs(top.logprob - theirs[top.token_id]) for top in logprob.top))
            assert out.token_ids[step] == int(np.argmax(theirs))
        assert worst < 1e-3, worst


def test_other_block_types_are_dequantized_with_a_notice(tmp_path, caplog):
    """Q5_1 has no kernel: dequantized at load, and one line says so."""
    path = write_gguf(tmp_path / "m.gguf", llama(hidden_size=64, intermediate_size=96), "llama",
                      gguf.GGMLQuantizationType.Q5_1)
    with caplog.at_level("WARNING", logger="minimind"):
        model = minimind.load_model(path, light=True, keep_blocks=True)
    notes = [r.getMessage() for r in caplog.records if "dequantized to fp32 at load" in r.getMessage()]
    assert len(notes) == 1 and "Q5_1" in notes[0]
    assert not hasattr(model.model.layers[0].mlp.down_proj, "gguf_blocks")


def test_q4_k_m_fallback_rows_stay_in_blocks(tmp_path):
    """FFN 320 is no whole super-block: llama.cpp's Q4_K_M stores ffn_down as Q5_0 (Q4_K's fallback) or Q8_0
    (Q6_K's); both have kernels, so every matrix stays in its blocks."""
    model = minimind.load_model(_q4_k_m_file(tmp_path, intermediate_size=320), light=True, keep_blocks=True)
    assert [model.model.layers[i].mlp.down_proj.gguf_blocks[0] for i in (0, 1)] == [6, 8]
    assert model.model.layers[0].mlp.gate_proj.gguf_blocks[0] == 12


@pytest.mark.parametrize("activations", ["fp32", "int8"])
@pytest.mark.parametrize("name", ["Q8_0", "Q4_1"])
def test_block_prompt_chunks_run_on_the_kernel(tmp_path, name, activations):
    """Prompt chunks (whole, chunked, prefix-cache hits) and decode rows of a block model in one kernel call: each
    step's logits equal the torch path's (the same block products, kernels/qblock.c)."""
    from test_engine_mixed import assert_kernel_steps_match_torch

    path = write_gguf(tmp_path / "m.gguf", llama(hidden_size=64, intermediate_size=96), "llama", TYPES[name])
    for chunk in (512, 8):
        sizes = {"max_num_seqs": 3, "max_model_len": 96, "max_num_batched_tokens": chunk}
        llms = [LLM(minimind.load_model(path, light=True, keep_blocks=True), block_activations=activations, **sizes)
                for _ in range(2)]
        # activations quantized per 32 values: a last-bit difference in one may round it the other way
        assert_kernel_steps_match_torch(*llms, atol=1e-2)
