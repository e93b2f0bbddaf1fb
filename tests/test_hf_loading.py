"""HF folders (custom minimind, Llama, Qwen3, Qwen3-MoE) loaded by `minimind.load_model` reproduce the logits
of transformers' own models on the same weights; broken folders fail with a CheckpointError naming the file."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
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
X = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(3))


def hf_model(cls, config, seed: int = 0):
    torch.manual_seed(seed)
    return randomize_(cls(config), seed).eval()


def assert_same_logits(folder, reference):
    ours = minimind.load_model(folder)
    torch.testing.assert_close(ours(X).logits, reference(X).logits, atol=1e-4, rtol=1e-4)
    return ours


def llama_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    return LlamaConfig(**{**base, **kw})


LLAMA_CASES = {
    "untied-gqa": dict(),
    "tied-mha": dict(tie_word_embeddings=True, num_key_value_heads=4),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 64}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32}),
    "head_dim-32": dict(head_dim=32, tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_folder(tmp_path, case):
    ref = hf_model(LlamaForCausalLM, llama_config(**LLAMA_CASES[case]))
    ref.save_pretrained(tmp_path)
    ours = assert_same_logits(tmp_path, ref)
    assert ours.config.tie_word_embeddings == ref.config.tie_word_embeddings
    if case == "yarn":  # HF's default attention factor 0.1*ln(4)+1 had to be filled in
        assert ours.model.rotary_emb.attention_scaling == pytest.approx(1.1386, abs=1e-4)


def test_llama_sharded_and_pytorch_bin(tmp_path):
    ref = hf_model(LlamaForCausalLM, llama_config())
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_same_logits(tmp_path / "sharded", ref)
    (tmp_path / "bin").mkdir()
    ref.config.to_json_file(tmp_path / "bin" / "config.json")
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert_same_logits(tmp_path / "bin", ref)


def test_llama_without_lm_head_is_tied(tmp_path):
    """transformers' Llama defaults to untied, but an export without lm_head.weight can only mean tied."""
    ref = hf_model(LlamaForCausalLM, llama_config(tie_word_embeddings=True))
    sd = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    cfg = ref.config.to_dict()
    cfg.pop("tie_word_embeddings")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(sd, tmp_path / "model.safetensors")
    assert_same_logits(tmp_path, ref)


@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_folder(tmp_path, tied):
    cfg = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, tie_word_embeddings=tied, rope_theta=1e6)
    ref = hf_model(Qwen3ForCausalLM, cfg)
    ref.save_pretrained(tmp_path)
    ours = assert_same_logits(tmp_path, ref)
    assert ours.config.qk_norm and not ours.config.rms_norm_fp32_weight and ours.config.head_dim == 32


def test_qwen3_with_minimind3_yarn(tmp_path):
    """minimind-3's convert script with inference_rope_scaling: the standard YaRN dict (attention_factor 1.0)
    written in transformers-4 form (`rope_scaling` + top-level `rope_theta`)."""
    cfg = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=32768, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "beta_fast": 32.0,
                                       "beta_slow": 1.0, "original_max_position_embeddings": 2048,
                                       "attention_factor": 1.0})
    ref = hf_model(Qwen3ForCausalLM, cfg)
    ref.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(rope_theta=1e6, rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 16,
                                             "original_max_position_embeddings": 2048, "attention_factor": 1.0,
                                             "type": "yarn"})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = assert_same_logits(tmp_path, ref)
    assert ours.config.rope_scaling["factor"] == 16 and ours.model.rotary_emb.attention_scaling == 1.0


def qwen3_moe(norm_topk_prob: bool = True, **kw):
    cfg = Qwen3MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob, **kw)
    return hf_model(Qwen3MoeForCausalLM, cfg)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-tf5", "per-expert"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_folder(tmp_path, fused, norm_topk_prob):
    ref = qwen3_moe(norm_topk_prob)
    ref.save_pretrained(tmp_path, save_original_format=not fused)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys()) == fused  # noqa: SIM118 - safe_open
    ours = assert_same_logits(tmp_path, ref)
    assert ours.config.use_moe and ours.config.num_experts == 4 and ours.config.num_experts_per_tok == 2


def test_qwen3_moe_transformers4_files(tmp_path):
    """A transformers-4 folder: `num_experts`, top-level rope_theta, per-expert tensors written by hand."""
    ref = qwen3_moe()
    sd = {}
    for key, value in ref.state_dict().items():
        if key.endswith("experts.gate_up_proj"):  # [E, 2I, H]: gate rows first, then up rows
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                sd[key.replace("gate_up_proj", f"{e}.gate_proj.weight")] = value[e, :inter].clone()
                sd[key.replace("gate_up_proj", f"{e}.up_proj.weight")] = value[e, inter:].clone()
        elif key.endswith("experts.down_proj"):  # [E, H, I]
            for e in range(value.shape[0]):
                sd[key.replace("down_proj", f"{e}.down_proj.weight")] = value[e].clone()
        else:
            sd[key] = value
    cfg = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=96, hidden_size=64,
               intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
               rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, tie_word_embeddings=False,
               decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False, sliding_window=None,
               max_window_layers=2, torch_dtype="float32", transformers_version="4.51.0")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(sd, tmp_path / "model.safetensors")
    assert_same_logits(tmp_path, ref)


# ------------------------------------------------------------------------------------- custom minimind
MINIMIND2_CONFIG = {  # config.json of the original MiniMind2 custom export (fields as in issue #405)
    "architectures": ["MiniMindForCausalLM"],
    "auto_map": {"AutoConfig": "model_minimind.MiniMindConfig",
                 "AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"},
    "aux_loss_alpha": 0.1, "bos_token_id": 1, "dropout": 0.0, "eos_token_id": 2, "flash_attn": True,
    "hidden_act": "silu", "hidden_size": 64, "intermediate_size": None, "max_position_embeddings": 32768,
    "max_seq_len": 8192, "model_type": "minimind", "n_routed_experts": 4, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 8, "num_experts_per_tok": 2, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "scoring_func": "softmax",
    "seq_aux": True, "torch_dtype": "float32", "transformers_version": "4.48.0", "use_moe": False,
    "vocab_size": 96,
}


def test_minimind2_custom_config_and_bin(tmp_path):
    """MiniMind2 dense == Llama; FFN width comes from the original formula (64 -> 192) since the field is null."""
    ref = hf_model(LlamaForCausalLM, llama_config(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                                  intermediate_size=192, rope_theta=1e6, tie_word_embeddings=True))
    (tmp_path / "config.json").write_text(json.dumps(MINIMIND2_CONFIG))
    sd = {k: v.clone() for k, v in ref.state_dict().items()}  # the original .bin stores the tied head twice
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = assert_same_logits(tmp_path, ref)
    assert ours.config.family == "minimind2" and ours.config.intermediate_size == 192


def test_minimind3_custom_config(tmp_path):
    """minimind-3 custom config (head_dim, tie flag, 2510/v3 rope fields) == Qwen3 on the same weights (fp32)."""
    ref = hf_model(Qwen3ForCausalLM, Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=256,
                                                 num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                                 head_dim=8, rope_theta=1e6, rms_norm_eps=1e-6,
                                                 tie_word_embeddings=True))
    cfg = {"model_type": "minimind", "architectures": ["MiniMindForCausalLM"], "hidden_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8,
           "vocab_size": 96, "tie_word_embeddings": True, "rope_theta": 1e6, "max_position_embeddings": 32768,
           "inference_rope_scaling": False, "rope_scaling": None, "use_moe": False, "num_experts": 4,
           "num_experts_per_tok": 1, "moe_intermediate_size": None, "norm_topk_prob": True,
           "router_aux_loss_coef": 5e-4, "dropout": 0.0, "flash_attn": True, "bos_token_id": 1, "eos_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}, tmp_path / "model.safetensors")
    ours = assert_same_logits(tmp_path, ref)
    assert ours.config.family == "minimind3" and ours.config.intermediate_size == 256  # ceil(64*pi/64)*64


def test_our_own_config_round_trips(tmp_path):
    """config.json written from our MiniMindConfig.to_dict() (family, qk_norm, ...) is read back; reference: Qwen3."""
    from minimind.config import MiniMindConfig

    ref = hf_model(Qwen3ForCausalLM, Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=96,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6,
                                                 tie_word_embeddings=False))
    ours_cfg = MiniMindConfig(family="minimind3", vocab_size=96, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              tie_word_embeddings=False, rms_norm_fp32_weight=False)
    ours_cfg.to_json_file(tmp_path / "config.json")
    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    ours = assert_same_logits(tmp_path, ref)
    assert ours.config.to_dict() == {**ours_cfg.to_dict(), "flash_attn": ours.config.flash_attn}


# ------------------------------------------------------------------------------------- broken folders
def saved_llama(tmp_path, **kw):
    hf_model(LlamaForCausalLM, llama_config(**kw)).save_pretrained(tmp_path)
    return tmp_path


def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        minimind.load_model(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_folder_without_weights(tmp_path):
    (saved_llama(tmp_path) / "model.safetensors").unlink()
    expect_error(tmp_path, str(tmp_path), "no weights file", "git lfs pull")


def test_lfs_pointer(tmp_path):
    (saved_llama(tmp_path) / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n")
    expect_error(tmp_path, "model.safetensors", "Git LFS pointer")


def test_truncated_safetensors(tmp_path):
    weights = saved_llama(tmp_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    expect_error(tmp_path, "model.safetensors", "truncated")


def test_shape_mismatch_names_both_files(tmp_path):
    saved_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    expect_error(tmp_path, "model.safetensors", "config.json", "shape mismatch", "mlp.gate_proj.weight")


def test_missing_tensor(tmp_path):
    ref = hf_model(LlamaForCausalLM, llama_config())
    ref.config.to_json_file(tmp_path / "config.json")
    save_file({k: v for k, v in ref.state_dict().items() if "layers.1.mlp.up_proj" not in k},
              tmp_path / "model.safetensors")
    expect_error(tmp_path, "model.safetensors", "missing", "model.layers.1.mlp.up_proj.weight")


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_llama_with_bias_is_refused(tmp_path, flag):
    saved_llama(tmp_path, **{flag: True})
    expect_error(tmp_path, "config.json", f"{flag}=true")


def test_qwen3_active_sliding_window_is_refused(tmp_path):
    cfg = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, use_sliding_window=True, sliding_window=8,
                      max_window_layers=1)
    hf_model(Qwen3ForCausalLM, cfg).save_pretrained(tmp_path)
    expect_error(tmp_path, "config.json", "sliding-window")


def test_qwen3_moe_dense_layers_are_refused(tmp_path):
    qwen3_moe(mlp_only_layers=[1]).save_pretrained(tmp_path)
    expect_error(tmp_path, "config.json", "layers [1]", "mlp_only_layers")


@pytest.mark.parametrize("extra", [{"original_max_position_embeddings": 256}, {"truncate": False,
                                   "original_max_position_embeddings": 64}])
def test_yarn_where_hf_differs_from_minimind_uses_hf_semantics(tmp_path, extra):
    """original == max_position_embeddings (HF scales anyway, MiniMind would not) or truncate=False: an HF folder
    must give what transformers gives."""
    cfg = llama_config(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, **extra})
    reference = hf_model(LlamaForCausalLM, cfg)
    reference.save_pretrained(tmp_path)
    ours = assert_same_logits(tmp_path, reference)
    assert ours.config.rope_scaling["rope_type"] == "hf_yarn"
