"""MiniMindConfig: presets match the released models, bad fields are rejected, config.json round trips."""
from __future__ import annotations

import json

import pytest
import torch

from minimind.config import PRESETS, MiniMindConfig

# Parameter counts of the released models as published (minimind-compat.md, issues #200 / #826, README).
RELEASED = {"minimind2-small": 25.83e6, "minimind2": 104.03e6, "minimind2-moe": 145.03e6,
            "minimind-3": 63.91e6, "minimind-3-moe": 198.42e6}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_have_the_released_parameter_counts(name):
    from minimind.model import MiniMindForCausalLM

    with torch.device("meta"):
        model = MiniMindForCausalLM(MiniMindConfig.from_preset(name))
    count = sum(p.numel() for p in model.parameters())  # the tied head is counted once
    assert abs(count - RELEASED[name]) < 0.006e6, count


def test_era_defaults():
    v2, v3 = MiniMindConfig(), MiniMindConfig.from_preset("minimind-3")
    assert (v2.hidden_size, v2.num_key_value_heads, v2.intermediate_size, v2.rms_norm_eps) == (512, 2, 1408, 1e-5)
    assert (v3.head_dim, v3.num_key_value_heads, v3.intermediate_size, v3.rms_norm_eps) == (96, 4, 2432, 1e-6)
    assert v3.qk_norm and not v2.qk_norm
    assert MiniMindConfig(hidden_size=640).intermediate_size == 1728
    assert MiniMindConfig(hidden_size=768).intermediate_size == 2048


def test_unknown_field_is_rejected_with_a_suggestion():
    with pytest.raises(ValueError, match="hiden_size.*did you mean 'hidden_size'"):
        MiniMindConfig(hiden_size=512)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_attention_heads=8, num_key_value_heads=3), "multiple of"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(use_moe=True, num_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(family="minimind4"), "family must be one of"),
    (dict(inference_rope_scaling="x8"), "inference_rope_scaling"),
    (dict(head_dim=7, hidden_size=56), "even"),
    (dict(scoring_func="sigmoid"), "scoring_func"),
])
def test_contradictory_fields_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MiniMindConfig(**kwargs)


def test_json_round_trip(tmp_path):
    cfg = MiniMindConfig.from_preset("minimind-3-moe", inference_rope_scaling=True, tie_word_embeddings=False)
    cfg.to_json_file(tmp_path / "config.json")
    back = MiniMindConfig.from_json_file(tmp_path / "config.json")
    for key in ("family", "hidden_size", "num_key_value_heads", "head_dim", "intermediate_size", "use_moe",
                "num_experts", "num_experts_per_tok", "n_shared_experts", "rope_scaling", "tie_word_embeddings",
                "qk_norm", "rms_norm_eps"):
        assert getattr(back, key) == getattr(cfg, key), key
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "minimind"


def test_original_minimind2_config_json_is_accepted():
    """Fields the original MiniMind2 config.json carries (issue #405 style)."""
    original = {"architectures": ["MiniMindForCausalLM"], "auto_map": {"AutoConfig": "model_minimind.MiniMindConfig"},
                "aux_loss_alpha": 0.1, "bos_token_id": 1, "dropout": 0.0, "eos_token_id": 2, "flash_attn": True,
                "hidden_act": "silu", "hidden_size": 640, "intermediate_size": None, "max_position_embeddings": 32768,
                "model_type": "minimind", "n_routed_experts": 4, "n_shared_experts": 1, "norm_topk_prob": True,
                "num_attention_heads": 8, "num_experts_per_tok": 2, "num_hidden_layers": 8,
                "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "scoring_func": "softmax",
                "seq_aux": True, "torch_dtype": "bfloat16", "transformers_version": "4.48.0", "use_moe": True,
                "vocab_size": 6400}
    original.pop("model_type")
    cfg = MiniMindConfig(**original)
    assert cfg.num_experts == 4 and cfg.n_shared_experts == 1 and cfg.intermediate_size == 1728


@pytest.mark.parametrize("flag,factor", [(True, 16), ("legacy", 4), (False, None)])
def test_inference_rope_scaling_values(flag, factor):
    cfg = MiniMindConfig(inference_rope_scaling=flag)
    assert (cfg.rope_scaling or {}).get("factor") == factor


def test_2510_early_config_json_keeps_the_legacy_formula():
    legacy = {"beta_fast": 4, "beta_slow": 1, "factor": 4, "original_max_position_embeddings": 2048, "type": "yarn"}
    cfg = MiniMindConfig(inference_rope_scaling=True, rope_scaling=legacy)
    assert cfg.rope_scaling["rope_type"] == "minimind_legacy_yarn"
