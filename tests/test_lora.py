"""MiniMind's custom LoRA: wrapping rule, key layout, math, merge/unmerge, original file formats, errors.

Expected values come from plain tensor math on a copy of the model without LoRA (W + B @ A patched by hand),
and original-format files are written by hand the way the original trainers wrote them.
"""
from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch

from conftest import ERA_IDS, ERAS, tiny_model
from minimind.checkpoint import lora as L
from minimind.errors import CheckpointError

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200], [3, 4, 5, 6, 7, 8, 9, 10]])
ATTN = ("self_attn.q_proj", "self_attn.o_proj")


def square_names(layers: int = 2, parts=ATTN) -> list[str]:
    return [f"model.layers.{i}.{p}" for i in range(layers) for p in parts]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def random_adapters(names, rank: int, hidden: int = 64, seed: int = 1, dtype=torch.float32) -> dict:
    """{name: (A [r, hidden], B [hidden, r])} with B non-zero so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    return {n: ((0.05 * torch.randn(rank, hidden, generator=g)).to(dtype),
                (0.05 * torch.randn(hidden, rank, generator=g)).to(dtype)) for n in names}


def original_file(adapters: dict, prefix: str = "") -> dict:
    """The dict the original save_lora wrote: `{prefix}{name}.lora.A.weight` / `.B.weight`."""
    sd = {}
    for name, (a, b) in adapters.items():
        sd[f"{prefix}{name}.lora.A.weight"] = a
        sd[f"{prefix}{name}.lora.B.weight"] = b
    return sd


def patched(plain, adapters: dict):
    """A LoRA-free copy of `plain` whose square weights were patched by hand: W + B @ A."""
    model = copy.deepcopy(plain)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (a, b) in adapters.items():
            params[f"{name}.weight"] += b.float() @ a.float()
    return model


@pytest.mark.parametrize("family,use_moe", ERAS, ids=ERA_IDS)
def test_wraps_exactly_square_linears_with_original_keys(family, use_moe):
    model = tiny_model(family, use_moe)
    base_keys = set(model.state_dict())
    q_param = model.model.layers[0].self_attn.q_proj.weight
    L.apply_lora(model)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, L.LoRALinear)}
    assert wrapped == set(square_names())
    assert model.model.layers[0].self_attn.q_proj.weight is q_param  # shared, not copied
    lora_keys = {f"{n}.lora.{ab}.weight" for n in square_names() for ab in "AB"}
    sd = model.state_dict()
    assert set(sd) == base_keys | lora_keys
    assert sd["model.layers.1.self_attn.o_proj.lora.A.weight"].shape == (8, 64)
    assert sd["model.layers.1.self_attn.o_proj.lora.B.weight"].shape == (64, 8)
    assert not sd["model.layers.0.self_attn.q_proj.lora.B.weight"].any()  # B = 0: a fresh adapter is a no-op
    assert 0.01 < sd["model.layers.0.self_attn.q_proj.lora.A.weight"].std() < 0.03


def test_square_rule_is_shape_based_not_name_based():
    model = tiny_model("minimind2", intermediate_size=64)  # MLP becomes square too: the original wraps it
    L.apply_lora(model)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, L.LoRALinear)}
    assert wrapped == set(square_names(parts=ATTN + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")))


def test_apply_is_idempotent_and_refuses_another_rank():
    model = L.apply_lora(tiny_model(), rank=4)
    a = model.model.layers[0].self_attn.q_proj.lora.A.weight.clone()
    L.apply_lora(model, rank=4)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora.A.weight, a)
    assert not isinstance(model.model.layers[0].self_attn.q_proj.lora.A, L.LoRALinear)
    with pytest.raises(ValueError, match="rank"):
        L.apply_lora(model, rank=8)


def test_forward_equals_hand_patched_weights_and_single_layer_math():
    plain = tiny_model()
    adapters = random_adapters(square_names(), rank=8)
    model = L.load_lora(copy.deepcopy(plain), original_file(adapters))
    assert not torch.allclose(logits(model), logits(plain), atol=1e-3)  # the adapter really matters
    torch.testing.assert_close(logits(model), logits(patched(plain, adapters)), atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 64)
    layer = model.model.layers[1].self_attn.o_proj
    w = plain.model.layers[1].self_attn.o_proj.weight
    a, b = adapters["model.layers.1.self_attn.o_proj"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w.T + (x @ a.T) @ b.T, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_matches_unmerged_and_unmerge_is_bit_exact(dtype):
    plain = tiny_model("minimind3").to(dtype)
    adapters = random_adapters(square_names(), rank=16)
    model = L.load_lora(copy.deepcopy(plain), original_file(adapters))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = logits(model)
    L.merge_lora(model)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w, before["model.layers.0.self_attn.q_proj.weight"])
    a, b = (t.to(dtype).float() for t in adapters["model.layers.0.self_attn.q_proj"])  # as stored in the model
    expect_w = (before["model.layers.0.self_attn.q_proj.weight"].float() + b @ a).to(dtype)
    assert torch.equal(w, expect_w)  # fp32 math, one rounding
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(logits(model), out, atol=tol, rtol=tol)  # adapter no longer added twice
    L.merge_lora(model)  # merging twice is a no-op
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, expect_w)
    L.unmerge_lora(model)
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert torch.equal(logits(model), out)


def test_save_load_round_trip(tmp_path):
    plain = tiny_model()
    model = L.load_lora(copy.deepcopy(plain), original_file(random_adapters(square_names(), rank=8)))
    path = L.save_lora(model, tmp_path / "lora" / "lora_identity_64.pth")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {f"{n}.lora.{ab}.weight" for n in square_names() for ab in "AB"}
    assert all(v.dtype == torch.float16 for v in raw.values())
    again = L.load_lora(copy.deepcopy(plain), path)
    expect = {n: (raw[f"{n}.lora.A.weight"].float(), raw[f"{n}.lora.B.weight"].float()) for n in square_names()}
    torch.testing.assert_close(logits(again), logits(patched(plain, expect)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_loads_v2_file_fp32_rank8(tmp_path, prefix):
    plain = tiny_model("minimind2")
    adapters = random_adapters(square_names(), rank=8)
    path = tmp_path / "lora_medical_64.pth"
    torch.save(original_file(adapters, prefix), path)  # what 2025 train_lora.py wrote (DDP: `module.` keys)
    model = L.load_lora(copy.deepcopy(plain), path)  # applies LoRA itself
    assert {m.rank for m in L.lora_layers(model).values()} == {8}
    torch.testing.assert_close(logits(model), logits(patched(plain, adapters)), atol=1e-5, rtol=1e-5)


def test_loads_v3_file_fp16_rank16_after_default_apply(tmp_path):
    plain = tiny_model("minimind3")
    adapters = random_adapters(square_names(), rank=16, dtype=torch.float16)
    path = tmp_path / "lora_identity_64.pth"
    torch.save(original_file(adapters), path)
    model = L.apply_lora(copy.deepcopy(plain))  # the seed workflow: apply_lora(model) (rank 8) then load_lora
    L.load_lora(model, path)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.rank == 16 and layer.lora.A.weight.dtype == torch.float32
    torch.testing.assert_close(logits(model), logits(patched(plain, adapters)), atol=1e-5, rtol=1e-5)


def test_merged_state_dict_and_seed_workflow_load_into_plain_model(tmp_path):
    plain = tiny_model()
    adapters = random_adapters(square_names(), rank=8)
    model = L.load_lora(copy.deepcopy(plain), original_file(adapters))
    expect = logits(patched(plain, adapters))
    sd = L.merged_state_dict(model)
    assert not any(".lora." in k for k in sd)
    assert not L.lora_layers(model)["model.layers.0.self_attn.q_proj"].merged  # model untouched
    fresh = tiny_model(seed=5)
    fresh.load_state_dict(sd, strict=True)
    torch.testing.assert_close(logits(fresh), expect, atol=1e-5, rtol=1e-5)
    # seeds: merge_lora(model); torch.save(model.state_dict(), ...) -> a plain checkpoint
    torch.save(L.merge_lora(model).state_dict(), tmp_path / "merged.pth")
    fresh2 = tiny_model(seed=6)
    fresh2.load_state_dict(torch.load(tmp_path / "merged.pth", weights_only=True), strict=True)
    torch.testing.assert_close(logits(fresh2), expect, atol=1e-5, rtol=1e-5)


def _error(model, source) -> str:
    with pytest.raises(CheckpointError) as info:
        L.load_lora(model, source)
    assert not L.lora_layers(model)  # a refused file leaves the model unchanged
    return str(info.value)


def test_wrong_hidden_size_is_explained(tmp_path):
    path = tmp_path / "lora_identity_128.pth"
    torch.save(original_file(random_adapters(square_names(), rank=8, hidden=128)), path)
    msg = _error(tiny_model(), path)
    assert str(path) in msg and "rank 8" in msg and "hidden 128" in msg and "64" in msg


def test_file_without_lora_keys(tmp_path):
    path = tmp_path / "full_sft_64.pth"
    torch.save(tiny_model().state_dict(), path)
    msg = _error(tiny_model(), path)
    assert str(path) in msg and "no LoRA" in msg


def test_partial_adapter_is_refused(tmp_path):
    path = tmp_path / "partial.pth"
    torch.save(original_file(random_adapters(square_names(layers=1), rank=8)), path)  # layer 1 missing
    msg = _error(tiny_model(), path)
    assert str(path) in msg and "model.layers.1.self_attn" in msg
    torch.save(original_file(random_adapters(square_names(layers=3), rank=8)), path)  # a layer too many
    assert "model.layers.2" in _error(tiny_model(), path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(os.urandom(4096))
    assert str(path) in _error(tiny_model(), path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_not_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "lora_evil_64.pth"
    payload = {"model.layers.0.self_attn.q_proj.lora.A.weight": _Evil(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    msg = _error(tiny_model(), path)
    assert str(path) in msg
    assert not marker.exists()
    control = tmp_path / "control"  # the payload is real: an unsafe load does run it
    pickle.loads(pickle.dumps(_Evil(control)))
    assert control.exists()


def test_resolve_lora_path_historic_layouts(tmp_path):
    out = tmp_path / "out"
    layouts = [(out / "lora" / "lora_identity_512.pth", False),  # v2 train/eval
               (out / "lora_identity_512_moe.pth", True),  # v3 train, MoE
               (out / "lora_identity_512.pth", False)]  # v3 train / eval_llm
    for path, moe in layouts:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        assert L.resolve_lora_path("lora_identity", save_dir=out, hidden_size=512, use_moe=moe) == path
        path.unlink()
    given = tmp_path / "anywhere.pth"
    given.write_bytes(b"x")
    assert L.resolve_lora_path(given) == given
    with pytest.raises(CheckpointError) as info:
        L.resolve_lora_path("lora_identity", save_dir=out, hidden_size=768)
    msg = str(info.value)
    assert "lora_identity" in msg
    for expect in (out / "lora" / "lora_identity_768.pth", out / "lora_identity_768.pth"):
        assert str(expect) in msg


def test_load_model_with_lora_end_to_end(tmp_path, monkeypatch):
    import minimind

    plain = tiny_model("minimind3")
    weights = tmp_path / "full_sft_64.pth"
    torch.save({k: v.half() for k, v in plain.state_dict().items()}, weights)  # the original's native save
    adapters = random_adapters(square_names(), rank=16, dtype=torch.float16)
    (tmp_path / "out" / "lora").mkdir(parents=True)
    lora_file = tmp_path / "out" / "lora" / "lora_identity_64.pth"
    torch.save(original_file(adapters), lora_file)

    reference = tiny_model("minimind3", seed=3)
    reference.load_state_dict({k: v.float() for k, v in torch.load(weights, weights_only=True).items()})
    expect = logits(patched(reference, adapters))
    model = minimind.load_model(weights, lora=lora_file)
    torch.testing.assert_close(logits(model), expect, atol=1e-4, rtol=1e-4)
    assert minimind.lora.lora_layers(model)["model.layers.1.self_attn.o_proj"].rank == 16

    monkeypatch.chdir(tmp_path)  # by name, as `--lora_weight lora_identity` with save_dir out
    by_name = minimind.load_model(weights, lora="lora_identity")
    torch.testing.assert_close(logits(by_name), expect, atol=1e-4, rtol=1e-4)
