"""Compatibility with checkpoints written by the ORIGINAL jingyaogong/minimind code of every era.

The data in tests/data/reference/ (see its README.md) was produced by running the original model code,
trainers' save routines, LoRA helpers and scripts/convert_model.py of each era on tiny random models; the
reference logits and greedy continuations come from the original forward pass (and its own KV cache).
Here every case is loaded with OUR `minimind.load_model` and must reproduce those numbers.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data" / "reference"
MANIFEST = json.loads((DATA / "manifest.json").read_text(encoding="utf-8"))
CASES = MANIFEST["cases"]
MODEL_CASES = [c for c in CASES if not c.get("expect_error")]
ERROR_CASES = [c for c in CASES if c.get("expect_error")]
ATOL = 1e-4


@pytest.fixture(scope="session")
def reference_root(tmp_path_factory) -> Path:
    """The archive unpacked once per session (weights, HF folders, LoRA files, reference logits)."""
    root = tmp_path_factory.mktemp("minimind_reference")
    with tarfile.open(DATA / MANIFEST["archive"], "r:xz") as tf:
        tf.extractall(root, filter="data")
    return root


_MODELS: dict[str, object] = {}


def _load(case: dict, root: Path):
    if case["id"] not in _MODELS:
        from minimind import load_model

        lora = str(root / case["lora"]) if case.get("lora") else None
        model = load_model(str(root / case["path"]), lora=lora,
                           inference_rope_scaling=case["inference_rope_scaling"], dtype="float32")
        _MODELS[case["id"]] = model
    return _MODELS[case["id"]]


def _reference(case: dict, root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(root / case["logits"]))


def _describe(case: dict) -> str:
    return (f"{case['id']}: era {case['era']} @ {case['commit'][:7]}, {case['format']}, path {case['path']}, "
            f"lora {case.get('lora')}, inference_rope_scaling={case['inference_rope_scaling']!r}")


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c["id"] for c in MODEL_CASES])
def test_reference_logits(case, reference_root):
    model = _load(case, reference_root)
    ref = _reference(case, reference_root)
    ids = torch.tensor([case["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    assert logits.shape == (len(case["input_ids"]), 6400), _describe(case)
    positions = case["logits_positions"]
    torch.testing.assert_close(logits[positions], ref["logits_last"], atol=ATOL, rtol=0,
                               msg=lambda m: f"{_describe(case)}\nfull-vocab logits at positions {positions}: {m}")
    cols = ref["cols"]
    torch.testing.assert_close(logits[:, cols], ref["logits_cols"], atol=ATOL, rtol=0,
                               msg=lambda m: f"{_describe(case)}\nlogits of {len(cols)} vocab ids at every prompt "
                                             f"position: {m}")


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c["id"] for c in MODEL_CASES])
def test_reference_greedy(case, reference_root):
    model = _load(case, reference_root)
    seq = list(case["input_ids"])
    with torch.no_grad():
        for _ in range(len(case["greedy_ids"])):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[len(case["input_ids"]):] == case["greedy_ids"], _describe(case)


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c["id"] for c in ERROR_CASES])
def test_legacy_checkpoint_refused(case, reference_root):
    from minimind import load_model
    from minimind.errors import CheckpointError

    with pytest.raises(CheckpointError) as info:
        load_model(str(reference_root / case["path"]))
    message = str(info.value).lower()
    assert any(word.lower() in message for word in case["expect_error"]["message_contains_any"]), message


@pytest.mark.parametrize("case", [c for c in MODEL_CASES if c.get("differs_from")],
                         ids=[c["id"] for c in MODEL_CASES if c.get("differs_from")])
def test_reference_data_is_discriminative(case, reference_root):
    """RoPE-scaled references must differ from their unscaled twin, else the YaRN cases would prove nothing."""
    twin = next(c for c in MODEL_CASES if c["id"] == case["differs_from"])
    a, b = _reference(case, reference_root), _reference(twin, reference_root)
    assert (a["logits_last"] - b["logits_last"]).abs().max() > 100 * ATOL


def test_manifest_points_at_existing_files(reference_root):
    for case in CASES:
        assert (reference_root / case["path"]).exists(), case["id"]
        if case.get("lora"):
            assert (reference_root / case["lora"]).is_file(), case["id"]
        if case.get("logits"):
            assert (reference_root / case["logits"]).is_file(), case["id"]
