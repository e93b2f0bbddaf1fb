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
