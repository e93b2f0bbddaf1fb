"""Parity with independent implementations: transformers' Llama / Qwen3 / Qwen3-MoE on the same weights."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from conftest import tiny_model

torch.set_grad_enabled(False)


def common(cfg) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                tie_word_embeddings=cfg.tie_word_embeddings)


def rope(cfg, scaling: dict | None = None) -> dict:
    params = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if scaling:
        params = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "yarn", "rope_theta": cfg.rope_theta}
    return {"rope_parameters": params}


def to_hf(hf_model, ours) -> torch.nn.Module:
    sd = {k: v for k, v in ours.state_dict().items()}
    missing, unexpected = hf_model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in k for k in missing), missing  # only a tied head may be absent
    return hf_model.eval()


def input_ids(vocab: int, n: int = 17) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("kv_heads", [2, 8])
def test_minimind2_equals_transformers_llama(kv_heads):
    ours = tiny_model("minimind2", num_key_value_heads=kv_heads)
    hf = to_hf(LlamaForCausalLM(LlamaConfig(**common(ours.config), **rope(ours.config))), ours)
    x = input_ids(ours.config.vocab_size)
    torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_minimind3_equals_transformers_qwen3(tied):
    ours = tiny_model("minimind3", tie_word_embeddings=tied)
    hf = to_hf(Qwen3ForCausalLM(Qwen3Config(**common(ours.config), **rope(ours.config), use_sliding_window=False)),
               ours)
    x = input_ids(ours.config.vocab_size)
    torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-4, rtol=1e-4)


def test_minimind3_moe_equals_transformers_qwen3_moe():
    ours = tiny_model("minimind3", use_moe=True)
    cfg = ours.config
    hf_cfg = Qwen3MoeConfig(**common(cfg), **rope(cfg), num_experts=cfg.num_experts,
                            num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
                            norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
    hf = Qwen3MoeForCausalLM(hf_cfg).eval()
    sd = dict(ours.state_dict())
    hf_keys = hf.state_dict().keys()
    if any(k.endswith("experts.gate_up_proj") for k in hf_keys):  # transformers 5 fused experts layout
        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}.mlp.experts"
            gate = torch.stack([sd.pop(f"{p}.{e}.gate_proj.weight") for e in range(cfg.num_experts)])
            up = torch.stack([sd.pop(f"{p}.{e}.up_proj.weight") for e in range(cfg.num_experts)])
            sd[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1)  # [E, 2I, H]
            sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{e}.down_proj.weight") for e in range(cfg.num_experts)])
    to_hf(hf, type("M", (), {"state_dict": lambda self: sd})())
    x = input_ids(cfg.vocab_size)
    torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head_dim", [64, 96])
def test_standard_yarn_equals_transformers_yarn(head_dim):
    """minimind-3's YaRN (factor 16, attention_factor 1.0) is the standard formula: compare with HF's."""
    heads = 2
    ours = tiny_model("minimind3", inference_rope_scaling=True, hidden_size=heads * head_dim,
                      num_attention_heads=heads, num_key_value_heads=1, head_dim=head_dim)
    plain = tiny_model("minimind3", hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=1,
                       head_dim=head_dim)
    cfg = ours.config
    hf = to_hf(Qwen3ForCausalLM(Qwen3Config(**common(cfg), **rope(cfg, cfg.rope_scaling), use_sliding_window=False)),
               ours)
    x = input_ids(cfg.vocab_size, 40)
    torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-4, rtol=1e-4)
    # and YaRN really changes something (otherwise this test would prove nothing)
    assert (ours(x).logits - plain(x).logits).abs().max() > 1e-3


def test_legacy_yarn_differs_from_standard_and_plain():
    x = input_ids(256, 30)
    outs = [tiny_model("minimind2", inference_rope_scaling=v)(x).logits for v in (False, True, "legacy")]
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    assert (outs[0] - outs[2]).abs().max() > 1e-3
    assert (outs[1] - outs[2]).abs().max() > 1e-3


def test_legacy_yarn_frequencies_follow_the_2510_formula():
    """Recompute the Oct-2025 formula by hand from its definition in minimind-compat.md."""
    import math

    from minimind.config import MiniMindConfig
    from minimind.model.rope import RotaryEmbedding

    cfg = MiniMindConfig(hidden_size=512, inference_rope_scaling="legacy")
    got = RotaryEmbedding(cfg).inv_freq
    dim, base, orig, factor = 64, 1e6, 2048, 4
    expected = []
    freqs = [1 / base ** (2 * i / dim) for i in range(dim // 2)]
    corr = next(i for i in range(dim // 2) if 2 * math.pi / freqs[i] > orig)
    for i, f in enumerate(freqs):
        beta = 1 + (4 - 1) * i / (dim // 2 - 1)
        expected.append(f * ((beta * factor - beta + 1) / (beta * factor) if i < corr else 1 / factor))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=0)


def test_save_pretrained_loads_through_auto_classes_without_remote_code(tmp_path):
    import minimind.model  # noqa: F401  registers model_type "minimind"

    ours = tiny_model("minimind3", use_moe=True)
    ours.save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert type(cfg).__name__ == "MiniMindConfig" and cfg.family == "minimind3" and cfg.use_moe
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = input_ids(256)
    torch.testing.assert_close(back(x).logits, ours(x).logits)
