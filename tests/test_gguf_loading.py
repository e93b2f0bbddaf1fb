"""GGUF (llama.cpp) files of the llama and qwen3 architectures: written here by hand with `gguf.GGUFWriter` the
way llama.cpp's converter lays them out, then loaded by `minimind.load_model`. References: the transformers model
the file was made from (F32) and transformers' own GGUF loader (Q8_0, same dequantized values)."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import minimind
from conftest import randomize_
from minimind.errors import CheckpointError

torch.set_grad_enabled(False)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 300
X = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))

# llama.cpp tensor names (convert_hf_to_gguf.py / gguf tensor map), written out independently of our reader.
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp"}


def gguf_name(hf_name: str) -> str:
    if hf_name in TOP:
        return TOP[hf_name]
    if hf_name.endswith("_exps"):  # model.layers.i.mlp.experts.gate_exps -> blk.i.ffn_gate_exps.weight
        return f"blk.{hf_name.split('.')[2]}.ffn_{hf_name.rsplit('.', 1)[1]}.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER[module]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py, LlamaModel.permute: rotate_half halves -> interleaved pairs, per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20
                            + ["MiniMind says hi to you"] * 10, trainer)
    return tok


def add_tokenizer(writer: gguf.GGUFWriter, tok: Tokenizer) -> None:
    data = json.loads(tok.to_str())["model"]
    tokens = sorted(data["vocab"], key=data["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3 = control
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in data["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(TEMPLATE)


def write_gguf(path, model, arch: str, qtype=gguf.GGMLQuantizationType.F32, yarn=None):
    cfg = model.config
    head_dim = cfg.head_dim
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "yarn":  # as convert_hf_to_gguf.py writes it
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if yarn:  # extra keys, e.g. {"attn_factors": 0.5}
            for method, value in yarn.items():
                getattr(writer, f"add_rope_scaling_{method}")(value)
    if arch == "qwen3moe":
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    add_tokenizer(writer, tiny_bpe())
    for name, tensor in moe_stacked(model.state_dict()).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.numpy().astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_attention_heads, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_attention_heads, cfg.num_key_value_heads)
        if w.ndim >= 2 and qtype != gguf.GGMLQuantizationType.F32 and "gate_inp" not in gguf_name(name):  # norms stay F32, as llama.cpp keeps them
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def moe_stacked(sd: dict) -> dict:
    """transformers-5 fused experts -> llama.cpp's stacked ffn_{gate,up,down}_exps [E, out, in] (other keys kept)."""
    out = {}
    for name, tensor in sd.items():
        if name.endswith("experts.gate_up_proj"):  # [E, 2I, H]: gate rows, then up rows
            gate, up = tensor.chunk(2, dim=1)
            out[name.replace("gate_up_proj", "gate_exps")], out[name.replace("gate_up_proj", "up_exps")] = gate, up
        elif name.endswith("experts.down_proj"):  # [E, H, I]
            out[name.replace("down_proj", "down_exps")] = tensor
        else:
            out[name] = tensor
    return out


def hf(cls, config, seed=0):
    torch.manual_seed(seed)
    return randomize_(cls(config), seed).eval()


def llama(**kw):
    return hf(LlamaForCausalLM, LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1e5,
                                                      max_position_embeddings=512), **kw}))


@pytest.mark.parametrize("tied", [True, False])
def test_llama_f32_matches_the_source_model(tmp_path, tied):
    ref = llama(tie_word_embeddings=tied)
    path = write_gguf(tmp_path / "m.gguf", ref, "llama")
    ours = minimind.load_model(path)
    assert ours.config.tie_word_embeddings == tied and ours.config.num_key_value_heads == 2
    torch.testing.assert_close(ours(X).logits, ref(X).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("extra", [{}, {"yarn_attn_factor": 1.0}, {"attn_factors": 0.5}])
def test_llama_yarn_metadata(tmp_path, extra):
    """llama.cpp's YaRN scales cos/sin by (0.1*ln(s)+1) * `rope.scaling.attn_factor` (llama-context.cpp, PR #17945;
    `yarn_attn_factor` is overwritten there), i.e. HF's default attention factor times that key."""
    scale = (0.1 * np.log(4.0) + 1) * extra.get("attn_factors", 1.0)
    ref = llama(max_position_embeddings=256, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                              "original_max_position_embeddings": 64,
                                                              "attention_factor": float(scale)})
    ours = minimind.load_model(write_gguf(tmp_path / "y.gguf", ref, "llama", yarn=extra))
    assert ours.config.rope_scaling["rope_type"] == "yarn"
    torch.testing.assert_close(ours(X).logits, ref(X).logits, atol=1e-4, rtol=1e-4)


def test_qwen3_f32_matches_the_source_model(tmp_path):
    """head_dim 32 != hidden/heads: only `qwen3.attention.key_length` tells it; no Q/K permutation for qwen3."""
    ref = hf(Qwen3ForCausalLM, Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
                                           rms_norm_eps=1e-6, tie_word_embeddings=True))
    ours = minimind.load_model(write_gguf(tmp_path / "q.gguf", ref, "qwen3"))
    assert ours.config.qk_norm and ours.config.head_dim == 32
    torch.testing.assert_close(ours(X).logits, ref(X).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2])
def test_qwen3moe_f32_matches_the_source_model(tmp_path, top_k):
    ref = hf(Qwen3MoeForCausalLM, Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                                 moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, head_dim=16, num_experts=4,
                                                 num_experts_per_tok=top_k, norm_topk_prob=True, rope_theta=1e6))
    ours = minimind.load_model(write_gguf(tmp_path / "moe.gguf", ref, "qwen3moe"))
    assert ours.config.use_moe and ours.config.num_experts == 4 and ours.config.moe_intermediate_size == 32
    torch.testing.assert_close(ours(X).logits, ref(X).logits, atol=1e-4, rtol=1e-4)


def test_llama_q8_0_matches_transformers_gguf_loader(tmp_path):
    ref = llama(tie_word_embeddings=True)
    path = write_gguf(tmp_path / "m-q8.gguf", ref, "llama", gguf.GGMLQuantizationType.Q8_0)
    ours = minimind.load_model(path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    torch.testing.assert_close(ours(X).logits, theirs(X).logits, atol=1e-4, rtol=1e-4)
    # and Q8_0 is close to, but not exactly, the fp32 source (the dequant path really ran)
    diff = (ours(X).logits - ref(X).logits).abs().max().item()
    assert 0 < diff < 0.1


def test_gguf_tokenizer_from_metadata(tmp_path):
    source = tiny_bpe()
    path = write_gguf(tmp_path / "m.gguf", llama(num_hidden_layers=1), "llama")
    for where in (path, tmp_path):  # the file itself, or a folder holding exactly one .gguf
        tok = minimind.load_tokenizer(where)
        for text in ["hello world, the quick brown fox!", "MiniMind says hi <|im_end|> to  you\n\nok"]:
            assert tok(text)["input_ids"] == source.encode(text).ids
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
        rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
        assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unsupported_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"g\.gguf.*architecture 'gpt2' is not supported"):
        minimind.load_model(tmp_path / "g.gguf")


def test_truncated_gguf(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", llama(num_hidden_layers=1), "llama")
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 4000])
    with pytest.raises(CheckpointError, match=r"m\.gguf: unreadable GGUF file .*truncated or corrupt"):
        minimind.load_model(path)
