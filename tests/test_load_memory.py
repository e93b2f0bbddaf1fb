"""Loading without extra copies: q|k|v and gate|up read into one allocation (the engine's fused matrices are views
of the model's weights), a KV cache that costs memory only where it is written, and the default model's tokenizer
loaded without AutoTokenizer equal to AutoTokenizer's."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import tiny_model
from minimind.checkpoint import safetensors_file
from minimind.checkpoint.safetensors_file import read_safetensors, stacked_view

LINUX = sys.platform.startswith("linux")


def _layer_tensors(dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj.weight": (64, 48), "self_attn.k_proj.weight": (16, 48),
              "self_attn.v_proj.weight": (16, 48), "self_attn.o_proj.weight": (48, 64),
              "mlp.gate_proj.weight": (96, 48), "mlp.up_proj.weight": (96, 48), "mlp.down_proj.weight": (48, 96),
              "input_layernorm.weight": (48,)}
    return {f"model.layers.{i}.{name}": torch.randn(shape, generator=g).to(dtype)
            for i in range(2) for name, shape in shapes.items()}


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_stacked_groups_are_views_equal_to_cat(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    save_file(_layer_tensors(), str(tmp_path / "m.safetensors"))
    ref = load_file(str(tmp_path / "m.safetensors"))
    got = read_safetensors(tmp_path / "m.safetensors", dtype)
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert torch.equal(got[key], value.to(dtype or value.dtype)), key
    for i in range(2):
        for names in safetensors_file.STACKED:
            keys = [f"model.layers.{i}{suffix}" for suffix in names]
            view = stacked_view([got[k] for k in keys])
            assert view is not None, keys  # file order k, o, q, v: q|k|v still share one buffer
            assert view.data_ptr() == got[keys[0]].data_ptr()
            assert torch.equal(view, torch.cat([ref[k] for k in keys]).to(view.dtype))
    # not adjacent in memory: no view (the engine copies them)
    assert stacked_view([got["model.layers.0.mlp.gate_proj.weight"], got["model.layers.1.mlp.up_proj.weight"]]) is None


def test_engine_fuses_without_copying_and_generates_the_same(tmp_path):
    """LLM over a model read from safetensors (q|k|v and gate|up views of its weights) against LLM over the same
    weights built in memory (separate tensors: torch.cat copies them)."""
    import minimind
    from minimind.engine import LLM, SamplingParams

    built = tiny_model()
    built.save_pretrained(tmp_path / "hf")
    loaded = minimind.load_model(tmp_path / "hf", light=True)
    attn, mlp = loaded.model.layers[1].self_attn, loaded.model.layers[1].mlp
    llm = LLM(loaded, max_num_seqs=2, max_model_len=64)
    lw = llm.runner.layers[1]
    assert lw.qkv.weight.data_ptr() == attn.q_proj.weight.data_ptr()
    assert lw.gate_up.weight.data_ptr() == mlp.gate_proj.weight.data_ptr()
    ref = LLM(built, max_num_seqs=2, max_model_len=64)
    assert ref.runner.layers[1].qkv.weight.data_ptr() != built.model.layers[1].self_attn.q_proj.weight.data_ptr()
    params = SamplingParams(max_tokens=12, temperature=0.0)
    prompts = [[5, 9, 17, 3, 44, 2, 8], [1, 2, 3]]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == [
        o.outputs[0].token_ids for o in ref.generate(prompts, params)]


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/statm")
def test_kv_cache_costs_memory_only_where_written():
    from minimind.engine.kv_cache import KVCache

    before = _rss_kb()
    kv = KVCache(num_layers=8, num_slots=4, num_kv_heads=2, max_len=4096, head_dim=64, dtype=torch.float32)
    assert kv.nbytes == 2 * 8 * 4 * 2 * 4096 * 64 * 4  # 128 MiB
    assert _rss_kb() - before < 16 * 1024
    kv.k_rows[3].index_copy_(0, torch.tensor([0, 5]), torch.ones(2, 64))
    assert _rss_kb() - before < 16 * 1024
    assert kv.k[3].sum() == 128 and kv.k.sum() == 128 and kv.v.abs().sum() == 0  # zeros elsewhere


def test_default_tokenizer_equals_autotokenizer(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    import minimind
    from minimind.checkpoint import default_model
    from minimind.config import MiniMindConfig
    from test_default_model import tiny_gguf

    folder = default_model.import_gguf(tiny_gguf(tmp_path), tmp_path / "home" / "models" / default_model.MODEL_NAME)
    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path / "home"))
    ours = minimind.load_tokenizer(None)
    AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
    theirs = AutoTokenizer.from_pretrained(str(folder))
    assert type(ours) is type(theirs)
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    mine, ref = dict(vars(ours)), dict(vars(theirs))
    mine.pop("_tokenizer"), ref.pop("_tokenizer")
    def described(attributes: dict) -> dict:  # dicts compared as dicts: their key order is not behaviour
        return {k: described(v) if isinstance(v, dict) else repr(v) for k, v in attributes.items()}

    assert described(mine) == described(ref)
    for text in ("hi", "What is the capital of France?", "<|im_start|>user\n12345 héllo<|im_end|>", ""):
        assert ours.encode(text) == theirs.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == theirs.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    ours.save_pretrained(tmp_path / "a")
    theirs.save_pretrained(tmp_path / "b")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
