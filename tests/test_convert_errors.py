"""Bad input gives clear errors and leaves nothing half-written; the CLI and the int8 format."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from minimind.checkpoint.int8 import dequantize_state_dict, read_int8_folder
from minimind.checkpoint.loader import load_model
from minimind.convert import ConvertError, export_gguf, export_hf, export_native, main, quantize_int8
from minimind.errors import CheckpointError
from test_convert_util import native_era


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_unsupported_source(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(CheckpointError, match="not a model file"):
        export_native(bad, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_native(tmp_path / "missing.pth", tmp_path / "x.pth")


def test_unknown_outtype_and_missing_tokenizer(tmp_path):
    pth, _ = native_era(tmp_path, "minimind2")
    with pytest.raises(ConvertError, match="unknown GGUF outtype 'q4_k'"):
        export_gguf(pth, tmp_path / "m.gguf", "q4_k")
    with pytest.raises(ConvertError, match="--tokenizer"):
        export_gguf(pth, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


def test_existing_destination_needs_force(tmp_path):
    pth, tok = native_era(tmp_path, "minimind2")
    (tmp_path / "out.gguf").write_text("keep me")
    with pytest.raises(ConvertError, match="--force"):
        export_gguf(pth, tmp_path / "out.gguf", tokenizer=tok)
    assert (tmp_path / "out.gguf").read_text() == "keep me"
    export_gguf(pth, tmp_path / "out.gguf", tokenizer=tok, force=True, show_progress=False)
    assert (tmp_path / "out.gguf").read_bytes()[:4] == b"GGUF"
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConvertError, match="folder exists"):
        export_hf(pth, tmp_path / "hf", tokenizer=tok)


def test_lora_that_does_not_fit(tmp_path):
    pth, tok = native_era(tmp_path, "minimind2")
    lora = tmp_path / "lora_identity_512.pth"
    torch.save({"model.layers.0.self_attn.q_proj.lora.A.weight": torch.zeros(8, 512),
                "model.layers.0.self_attn.q_proj.lora.B.weight": torch.zeros(512, 8)}, lora)
    with pytest.raises(CheckpointError, match="hidden 512, model hidden is 64"):
        export_hf(pth, tmp_path / "hf", tokenizer=tok, lora=lora)
    assert not (tmp_path / "hf").exists()


def test_lora_is_merged(tmp_path):
    pth, tok = native_era(tmp_path, "minimind3")
    gen = torch.Generator().manual_seed(1)
    sd = {}
    for i in range(2):
        for proj in ("q_proj", "o_proj"):
            sd[f"model.layers.{i}.self_attn.{proj}.lora.A.weight"] = torch.randn(16, 64, generator=gen).half() * 0.1
            sd[f"model.layers.{i}.self_attn.{proj}.lora.B.weight"] = torch.randn(64, 16, generator=gen).half() * 0.1
    lora = tmp_path / "lora.pth"
    torch.save(sd, lora)
    out = export_hf(pth, tmp_path / "hf", tokenizer=tok, lora=lora, dtype="float32", show_progress=False)
    ids = torch.tensor([[1, 200, 300, 400]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids).logits, load_model(pth, lora=lora)(ids).logits,
                                   atol=1e-4, rtol=0)


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    pth, tok = native_era(tmp_path, "minimind2")
    from minimind.convert import gguf_export

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_export, "_encode", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(pth, tmp_path / "out.gguf", tokenizer=tok, show_progress=False)
    assert not (tmp_path / "out.gguf").exists() and _leftovers(tmp_path) == []


def test_native_refuses_unrepresentable_model(tmp_path):
    from conftest import tiny_model

    model = tiny_model("minimind2", num_attention_heads=4, num_key_value_heads=2, rope_theta=1e5)
    with pytest.raises(ConvertError, match="config-less .pth cannot describe"):
        export_native(model, tmp_path / "x.pth")


def test_cli_errors_are_one_line(tmp_path, capsys):
    pth, _ = native_era(tmp_path, "minimind2")
    assert main([str(pth), str(tmp_path / "m.gguf"), "--to", "gguf", "--outtype", "q2"]) == 2
    assert "unknown GGUF outtype 'q2'" in capsys.readouterr().err
    assert main([str(pth), str(tmp_path / "m.pth"), "--to", "native", "--outtype", "f16"]) == 2
    assert main([str(pth), str(tmp_path / "x"), "--to", "native", "--dtype", "int8"]) == 2
    assert main([str(pth), str(tmp_path / "n.pth"), "--to", "native"]) == 0


def test_int8_quantize_format_and_accuracy(tmp_path):
    from minimind.convert import main_quantize

    pth, tok = native_era(tmp_path, "minimind3")
    assert main_quantize([str(pth), str(tmp_path / "q"), "--tokenizer", str(tok), "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "minimind_int8"
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    w = "model.layers.0.mlp.gate_proj.weight"
    assert sd[w].dtype == torch.int8 and sd[w + "_scale"].dtype == torch.float32
    assert sd["model.embed_tokens.weight"].dtype == torch.float32
    config, deq = read_int8_folder(tmp_path / "q")
    assert set(deq) == {k for k in sd if not k.endswith("_scale")}
    from minimind.model import MiniMindForCausalLM

    model = MiniMindForCausalLM(config).eval()
    model.load_state_dict(dequantize_state_dict(sd))
    ref = load_model(pth)
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).all() and (a - b).abs().max() < 0.05 * b.abs().max()
    with pytest.raises(ConvertError, match="exists"):
        quantize_int8(pth, tmp_path / "q")


# `make test` builds .venv-t4 (transformers 4.57); TRANSFORMERS4_PYTHON points at another 4.x interpreter
TRANSFORMERS4 = os.environ.get("TRANSFORMERS4_PYTHON") or str(Path(__file__).resolve().parents[1] / ".venv-t4/bin/python")


@pytest.mark.skipif(not Path(TRANSFORMERS4).exists(),
                    reason="no transformers 4.x interpreter (`make test` builds .venv-t4; or set TRANSFORMERS4_PYTHON)")
@pytest.mark.parametrize("era,cls", [("2510", "LlamaForCausalLM"), ("minimind3-moe", "Qwen3MoeForCausalLM"),
                                     ("minimind2-moe", "Qwen2MoeForCausalLM")])
def test_hf_export_loads_in_transformers_4(tmp_path, era, cls):
    python = TRANSFORMERS4
    pth, tok = native_era(tmp_path, era)
    arch = "qwen2_moe" if era == "minimind2-moe" else None
    out = export_hf(pth, tmp_path / "hf", tokenizer=tok, dtype="float32", arch=arch, show_progress=False)
    script = ("import sys, torch, transformers as t; m = t.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
              "k = t.AutoTokenizer.from_pretrained(sys.argv[1]); "
              "p = k.apply_chat_template([{'role': 'user', 'content': 'Hi'}], tokenize=False, add_generation_prompt=True); "
              "i = torch.tensor([k(p)['input_ids']]); print(t.__version__, type(m).__name__, repr(p)); "
              "torch.save(m(i).logits.detach(), sys.argv[2])")
    run = subprocess.run([python, "-c", script, str(out), str(tmp_path / "l.pt")], capture_output=True, text=True, check=False,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("4.") and cls in run.stdout
    from minimind.checkpoint.loader import load_tokenizer

    k = load_tokenizer(tok)
    prompt = k.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert repr(prompt) in run.stdout
    ids = torch.tensor([k(prompt)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "l.pt", weights_only=True), load_model(pth)(ids).logits, atol=1e-4, rtol=0)
    shutil.rmtree(out)


def test_cli_hf_int8_and_loaded_model_with_lora(tmp_path):
    from minimind.model.lora import apply_lora

    pth, tok = native_era(tmp_path, "minimind2")
    assert main([str(pth), str(tmp_path / "q"), "--to", "hf", "--dtype", "int8", "--tokenizer", str(tok),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bits"] == 8
    model = load_model(pth)
    apply_lora(model, rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.normal_(0, 0.05)
        ids = torch.tensor([[1, 20, 30, 40]])
        expected = model(ids).logits
    out = export_hf(model, tmp_path / "merged", tokenizer=tok, dtype="float32", show_progress=False)
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids).logits, expected, atol=1e-4, rtol=0)
