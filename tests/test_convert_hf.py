"""`--to hf` and `--to native`: standard architectures load in plain transformers (no remote code) and give our
logits; round trips are bit-exact."""
from __future__ import annotations

import json

import pytest
import torch

from minimind.checkpoint.loader import load_model, load_tokenizer, read_checkpoint
from minimind.convert import export_hf, export_native
from test_convert_util import PROMPT, native_era, state_dicts_equal

STANDARD = [("minimind2", "LlamaForCausalLM"), ("2510", "LlamaForCausalLM"), ("minimind3", "Qwen3ForCausalLM"),
            ("minimind3-moe", "Qwen3MoeForCausalLM"), ("minimind2-moe", "Qwen2MoeForCausalLM")]


@pytest.mark.parametrize("era,cls", STANDARD, ids=[e for e, _ in STANDARD])
def test_hf_export_loads_in_plain_transformers(tmp_path, era, cls):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pth, tok = native_era(tmp_path, era)
    arch = "qwen2_moe" if era == "minimind2-moe" else None
    out = export_hf(pth, tmp_path / "hf", tokenizer=tok, dtype="float32", arch=arch, show_progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [cls] and "auto_map" not in cfg
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no trust_remote_code
    assert type(hf).__name__ == cls
    ours = load_model(pth, dtype="float32")
    hf_tok = AutoTokenizer.from_pretrained(out)
    prompt = hf_tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert prompt == load_tokenizer(tok).apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([hf_tok(prompt)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)


def test_minimind2_moe_defaults_to_own_folder(tmp_path):
    pth, tok = native_era(tmp_path, "minimind2-moe")
    out = export_hf(pth, tmp_path / "hf", tokenizer=tok, show_progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "minimind" and "auto_map" not in cfg and (out / "README.md").is_file()
    config, _ = read_checkpoint(out)
    assert config.use_moe and config.n_shared_experts == 1
    ids = torch.tensor([[1, 300, 400, 2]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids).logits, load_model(pth)(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("era", ["minimind2", "minimind3", "minimind3-moe", "minimind2-moe"])
def test_native_hf_native_round_trip_is_bit_exact(tmp_path, era):
    pth, tok = native_era(tmp_path, era)
    hf = export_hf(pth, tmp_path / "hf", tokenizer=tok, show_progress=False)  # auto dtype: fp16 like the source
    back = export_native(hf, tmp_path / "back.pth")
    original = torch.load(pth, weights_only=True)
    again = torch.load(back, weights_only=True)
    assert state_dicts_equal(original, again) == []
    assert again["lm_head.weight"].data_ptr() == again["model.embed_tokens.weight"].data_ptr()  # tied, one copy


def test_hf_tokenizer_config_is_transformers4_compatible(tmp_path):
    pth, tok = native_era(tmp_path, "minimind3")
    out = export_hf(pth, tmp_path / "hf", tokenizer=tok, show_progress=False)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["extra_special_tokens"] == {}
    assert cfg["chat_template"] == (out / "chat_template.jinja").read_text()
    assert "<|im_start|>" in cfg["additional_special_tokens"]
    config = json.loads((out / "config.json").read_text())
    assert "rope_parameters" not in config and config["rope_theta"] == 1e6


def test_yarn_exported_as_hf_yarn(tmp_path):
    from transformers import AutoModelForCausalLM

    pth, tok = native_era(tmp_path, "minimind3")
    ours = load_model(pth, inference_rope_scaling=True, dtype="float32")
    out = export_hf(ours, tmp_path / "hf", tokenizer=tok, dtype="float32", show_progress=False)
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["factor"] == 16
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)


def test_legacy_yarn_is_dropped_with_a_warning(tmp_path, caplog):
    pth, tok = native_era(tmp_path, "2510")
    ours = load_model(pth, inference_rope_scaling="legacy")
    with caplog.at_level("WARNING", logger="minimind"):
        out = export_hf(ours, tmp_path / "hf", tokenizer=tok, show_progress=False)
    assert "legacy YaRN" in caplog.text
    assert json.loads((out / "config.json").read_text())["rope_scaling"] is None


def lora_file(path, layers: int = 2, hidden: int = 64, rank: int = 8, seed: int = 1):
    """A minimind-3 style LoRA file written by hand: fp16 A/B for q_proj and o_proj (the square Linears of
    these models), B non-zero so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        for proj in ("q_proj", "o_proj"):
            name = f"model.layers.{i}.self_attn.{proj}.lora"
            sd[f"{name}.A.weight"] = (0.1 * torch.randn(rank, hidden, generator=gen)).half()
            sd[f"{name}.B.weight"] = (0.1 * torch.randn(hidden, rank, generator=gen)).half()
    torch.save(sd, path)
    return path


def test_merged_lora_export_defaults_to_float32(tmp_path):
    from safetensors.torch import load_file

    from minimind.convert import main

    pth, tok = native_era(tmp_path, "minimind3")  # fp16 weights: `auto` would otherwise round W + BA to fp16
    lora = lora_file(tmp_path / "lora.pth")
    assert main([str(pth), str(tmp_path / "hf"), "--to", "hf", "--tokenizer", str(tok), "--lora", str(lora)]) == 0
    out = tmp_path / "hf"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    ids = torch.tensor([[1, 300, 400, 500, 600, 2]])
    with torch.no_grad():  # logits up to ~90: fp32 rounding gives 5e-5, an fp16 W + BA 4e-2
        torch.testing.assert_close(load_model(out)(ids).logits,
                                   load_model(pth, lora=lora, dtype="float32")(ids).logits, atol=1e-3, rtol=0)


def test_qwen2_moe_export_loads_back_exactly(tmp_path):
    pth, tok = native_era(tmp_path, "minimind2-moe")
    out = export_hf(pth, tmp_path / "hf", tokenizer=tok, arch="qwen2_moe", show_progress=False)
    config, _ = read_checkpoint(out)
    assert config.use_moe and config.n_shared_experts == 1 and not config.qk_norm
    ids = torch.tensor([[1, 300, 400, 2]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids).logits, load_model(pth)(ids).logits, atol=0, rtol=0)
    back = export_native(out, tmp_path / "back.pth")  # halving the doubled down_proj is exact
    assert state_dicts_equal(torch.load(pth, weights_only=True), torch.load(back, weights_only=True)) == []


@pytest.mark.parametrize("era,flag,kind", [("minimind3", [], True), ("minimind2-moe", ["legacy"], "legacy")])
def test_convert_inference_rope_scaling(tmp_path, era, flag, kind):
    from minimind.convert import main

    pth, tok = native_era(tmp_path, era)
    out = tmp_path / "hf"
    assert main([str(pth), str(out), "--to", "hf", "--tokenizer", str(tok), "--dtype", "float32",
                 "--inference_rope_scaling", *flag]) == 0
    ids = torch.arange(3, 60)[None]
    ours = load_model(pth, inference_rope_scaling=kind, dtype="float32")
    with torch.no_grad():
        want = ours(ids).logits
        assert not torch.allclose(load_model(pth, dtype="float32")(ids).logits, want, atol=1e-3)
        torch.testing.assert_close(load_model(out)(ids).logits, want, atol=1e-5, rtol=0)
    assert main([str(pth), str(tmp_path / "n.pth"), "--to", "native", "--inference_rope_scaling"]) == 2


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exports_are_readable_minus_umask(tmp_path, umask):
    import os
    import stat

    pth, tok = native_era(tmp_path, "minimind2")
    old = os.umask(umask)
    try:
        out = export_hf(pth, tmp_path / "hf", tokenizer=tok, show_progress=False)
        native = export_native(out, tmp_path / "n.pth")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 & ~umask
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {
        f.name: 0o644 & ~umask for f in out.iterdir()}
    assert stat.S_IMODE(native.stat().st_mode) == 0o644 & ~umask


@pytest.mark.parametrize("era", ["minimind2", "minimind3", "minimind3-moe"])
def test_peft_adapter_in_peft_equals_our_lora(tmp_path, era):
    pytest.importorskip("peft", reason="peft (the dev extra) is not installed")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from minimind.convert import main

    pth, tok = native_era(tmp_path, era)
    lora = lora_file(tmp_path / "lora.pth")
    base = export_hf(pth, tmp_path / "base", tokenizer=tok, dtype="float32", show_progress=False)
    assert main([str(lora), str(tmp_path / "adapter"), "--to", "peft", "--base", str(base)]) == 0
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (8, 8, ["o_proj", "q_proj"])
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([[1, 300, 400, 500, 600, 2]])
    with torch.no_grad():
        want = load_model(pth, lora=lora, dtype="float32")(ids).logits
        assert not torch.allclose(load_model(pth, dtype="float32")(ids).logits, want, atol=1e-3)
        torch.testing.assert_close(adapted(ids).logits, want, atol=1e-5, rtol=0)


def test_peft_needs_a_fitting_base(tmp_path):
    from minimind.convert import main

    pth, _ = native_era(tmp_path, "minimind3")
    lora = lora_file(tmp_path / "lora.pth", hidden=32)
    assert main([str(lora), str(tmp_path / "a"), "--to", "peft"]) == 2  # no --base
    with pytest.raises(Exception, match="hidden"):
        main([str(lora), str(tmp_path / "a"), "--to", "peft", "--base", str(pth)])
    assert not (tmp_path / "a").exists()


def test_qwen2_moe_with_a_live_shared_gate_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from minimind.errors import CheckpointError

    pth, tok = native_era(tmp_path, "minimind2-moe")
    out = export_hf(pth, tmp_path / "hf", tokenizer=tok, arch="qwen2_moe", show_progress=False)
    sd = load_file(out / "model.safetensors")
    sd["model.layers.1.mlp.shared_expert_gate.weight"][0, 3] = 0.5  # sigmoid(gate x) is no longer a constant 0.5
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shared_expert_gate"):
        load_model(out)
