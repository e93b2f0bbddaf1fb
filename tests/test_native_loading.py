"""Native .pth checkpoints (config-less fp16 state_dicts): inference of the architecture, and every bad file."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from conftest import ERA_IDS, ERAS, tiny_model
from minimind.checkpoint.dtypes import resolve_dtype
from minimind.checkpoint.loader import load_model
from minimind.checkpoint.spec import seed_path as resolve_seed_path
from minimind.errors import CheckpointError

torch.set_grad_enabled(False)


def save_original_way(model, path):
    """What the original trainers do: fp16 copies of every state_dict entry, no config."""
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


@pytest.mark.parametrize("family,use_moe", ERAS, ids=ERA_IDS)
def test_architecture_is_inferred_from_keys_and_shapes(tmp_path, family, use_moe):
    src = tiny_model(family, use_moe, vocab_size=6400, num_hidden_layers=3)
    path = save_original_way(src, tmp_path / "weights.bin")  # name says nothing on purpose
    model = load_model(path)
    for key in ("family", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "use_moe", "qk_norm", "tie_word_embeddings"):
        assert getattr(model.config, key) == getattr(src.config, key), key
    if use_moe:
        for key in ("num_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size"):
            assert getattr(model.config, key) == getattr(src.config, key), key
    x = torch.randint(0, 6400, (1, 11))
    torch.testing.assert_close(model(x).logits, src.half().float()(x).logits, atol=1e-4, rtol=1e-4)


def test_untied_minimind3_head_is_detected(tmp_path):
    src = tiny_model("minimind3", tie_word_embeddings=False)
    model = load_model(save_original_way(src, tmp_path / "w.pth"))
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model.lm_head.weight, src.lm_head.weight.half().float())


def test_seed_flag_style_resolves_the_original_file_name():
    assert str(resolve_seed_path("out", "full_sft", 512, False)) == os.path.join("out", "full_sft_512.pth")
    assert str(resolve_seed_path("out", "reason", 640, True)) == os.path.join("out", "reason_640_moe.pth")


@pytest.mark.parametrize("dtype,expected", [(None, torch.float32), ("bfloat16", torch.bfloat16),
                                            ("float32", torch.float32), ("float16", torch.bfloat16)])
def test_dtypes_on_cpu_never_fp16(tmp_path, dtype, expected, caplog):
    path = save_original_way(tiny_model("minimind2"), tmp_path / "w.pth")
    model = load_model(path, dtype=dtype)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == expected
    if dtype == "float16":
        assert "bfloat16" in caplog.text  # said, not silent
    assert resolve_dtype(None, "cuda") == torch.bfloat16


def test_inference_rope_scaling_option(tmp_path):
    path = save_original_way(tiny_model("minimind3", vocab_size=6400), tmp_path / "w.pth")
    x = torch.randint(0, 6400, (1, 20))
    plain, yarn, legacy = (load_model(path, inference_rope_scaling=v)(x).logits for v in (False, True, "legacy"))
    assert load_model(path, inference_rope_scaling=True).config.rope_scaling["factor"] == 16
    assert (plain - yarn).abs().max() > 1e-4 and (yarn - legacy).abs().max() > 1e-4


# ----------------------------------------------------------------------------- bad files

def test_legacy_checkpoint_gets_an_explanation(tmp_path):
    legacy = {"tok_embeddings.weight": torch.zeros(10, 4), "layers.0.attention.wq.weight": torch.zeros(4, 4),
              "layers.0.feed_forward.w1.weight": torch.zeros(8, 4), "output.weight": torch.zeros(10, 4)}
    torch.save(legacy, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match=r"old\.pth.*legacy MiniMind checkpoint.*tok_embeddings"):
        load_model(tmp_path / "old.pth")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_crafted_pickle_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Evil()}, f)
    torch.save({"x": _Evil()}, tmp_path / "evil_zip.pth")
    for name in ("evil.pth", "evil_zip.pth"):
        with pytest.raises(CheckpointError, match=rf"{name}.*refused to unpickle"):
            load_model(tmp_path / name)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_truncated_file(tmp_path):
    path = save_original_way(tiny_model("minimind2"), tmp_path / "w.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"w\.pth.*(truncated|corrupt)"):
        load_model(path)


def test_missing_tensor_is_named(tmp_path):
    sd = tiny_model("minimind2").state_dict()
    del sd["model.layers.1.mlp.down_proj.weight"]
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"w\.pth.*missing key.*layers\.1\.mlp\.down_proj"):
        load_model(tmp_path / "w.pth")


def test_wrong_shape_is_named(tmp_path):
    sd = tiny_model("minimind2").state_dict()
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 64)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"w\.pth.*shape mismatch.*up_proj"):
        load_model(tmp_path / "w.pth")


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "Git LFS pointer"),
    (b"hello, this is not a model at all", "not a model file"),
])
def test_not_a_model(tmp_path, content, message):
    (tmp_path / "f.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"f\.pth.*{message}"):
        load_model(tmp_path / "f.pth")


def test_state_dict_of_something_else(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth.*embed_tokens"):
        load_model(tmp_path / "other.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth.*does not contain a state_dict"):
        load_model(tmp_path / "list.pth")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth.*does not exist"):
        load_model(tmp_path / "nope.pth")
