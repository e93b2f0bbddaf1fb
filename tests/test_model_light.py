"""The plain-torch MiniMindLM the engine loads: same keys and logits as MiniMindForCausalLM, loaded without
transformers' modeling stack, weights cast while read."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from minimind.checkpoint.loader import load_model
from minimind.model.core import MiniMindLM

CONFIGS = [("minimind2", False), ("minimind3", False), ("minimind2", True), ("minimind3", True)]
CONFIG_IDS = ["minimind2", "minimind3-qk-norm", "minimind2-moe", "minimind3-moe"]


@pytest.mark.parametrize(("family", "moe"), CONFIGS, ids=CONFIG_IDS)
def test_light_class_matches_hf_class(family, moe):
    hf = tiny_model(family, use_moe=moe)
    light = MiniMindLM(hf.config).eval()
    light.load_state_dict(hf.state_dict())
    assert list(light.state_dict()) == list(hf.state_dict())
    assert light.lm_head.weight is light.model.embed_tokens.weight  # tied as in the HF class
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row exercises positions_from_mask / build_mask
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}, {"logits_to_keep": 1}):
            assert torch.equal(light(ids, **kwargs).logits, hf(ids, **kwargs).logits), kwargs


@pytest.mark.parametrize(("family", "moe"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("fmt", ["hf-folder", "pth"])
def test_saved_checkpoint_loads_identically_into_both_classes(tmp_path, family, moe, fmt):
    model = tiny_model(family, use_moe=moe)
    if fmt == "hf-folder":
        path = tmp_path / "m"
        model.save_pretrained(path)
    else:
        path = tmp_path / "m.pth"
        torch.save({k: v.half() for k, v in model.state_dict().items()}, path)  # the original fp16 layout
    for dtype in ("float32", "bfloat16"):
        light, hf = load_model(path, dtype=dtype, light=True), load_model(path, dtype=dtype)
        assert type(light).__name__ == "MiniMindLM" and type(hf).__name__ == "MiniMindForCausalLM"
        a, b = light.state_dict(), hf.state_dict()
        assert list(a) == list(b)
        for key in a:
            assert a[key].dtype == getattr(torch, dtype) and torch.equal(a[key], b[key]), key
        assert light.config.to_dict() == hf.config.to_dict()
        ids = torch.randint(3, 256, (1, 9))
        with torch.no_grad():
            assert torch.equal(light(ids).logits, hf(ids).logits)


def test_safetensors_reader_casts_like_load_file(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from minimind.checkpoint import safetensors_file

    tensors = {"a": torch.randn(37, 5), "b": torch.randn(3, dtype=torch.float64).to(torch.bfloat16),
               "ids": torch.arange(11, dtype=torch.int64), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    monkeypatch.setattr(safetensors_file, "_CHUNK", 48)  # several chunks per tensor
    ref = load_file(str(tmp_path / "t.safetensors"))
    for dtype in (None, torch.bfloat16, torch.float32):
        got = safetensors_file.read_safetensors(tmp_path / "t.safetensors", dtype)
        assert set(got) == set(ref)
        for key, value in ref.items():
            want = value.to(dtype) if dtype is not None and value.is_floating_point() else value
            assert got[key].dtype == want.dtype and torch.equal(got[key], want), (key, dtype)


def test_engine_never_imports_transformers_modeling(tmp_path):
    """LLM(path) + generate in a clean interpreter: no modeling_utils / GenerationMixin (their ~90 MB of RSS)."""
    tiny_model().save_pretrained(tmp_path / "hf")
    torch.save(tiny_model("minimind3").state_dict(), tmp_path / "m.pth")
    script = (
        "import sys\n"
        "from minimind.engine import LLM, SamplingParams\n"
        "for path in sys.argv[1:]:\n"
        "    llm = LLM(path, dtype='bfloat16', max_num_seqs=2, max_model_len=64)\n"
        "    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))\n"
        "    assert len(out[0].outputs[0].token_ids) == 4\n"
        "heavy = ['transformers.modeling_utils', 'transformers.generation.utils', 'minimind.model.modeling']\n"
        "print([m for m in heavy if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "hf"), str(tmp_path / "m.pth")],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_llm_accepts_either_class(tmp_path):
    from minimind.engine import LLM, SamplingParams

    tiny_model().save_pretrained(tmp_path)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = [LLM(m, max_num_seqs=1, max_model_len=64, fused=False).generate([[4, 9, 2]], params)[0]
            for m in (load_model(tmp_path), load_model(tmp_path, light=True))]
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
