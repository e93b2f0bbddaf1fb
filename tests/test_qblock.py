"""GGUF block-quantized weights (Q8_0, Q4_0, Q4_1, Q5_0) run from their file bytes through kernels/qblock.c: checked
against the `gguf` package's own dequantization of the same blocks."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from minimind.engine.fused import block_linear
from minimind.engine.quant import BlockLinear

TYPES = {"Q8_0": 8, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6}


def _activation_reference(x: np.ndarray) -> np.ndarray:
    """x as the kernel sees it: per 32 values, scale amax / 127 stored as fp16, q = rint(x * 127 / amax)."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(blocks * inv)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    return (q * d).reshape(x.shape).astype(np.float64)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows_in", [1, 3, 5, 70])
def test_block_product_equals_gguf_dequantized(name, rows_in):
    rng = np.random.default_rng(rows_in)
    n, k = 42, 96  # 3 blocks per row (an odd last one); 42 rows: a part tile of weight rows
    w = rng.normal(size=(n, k)).astype(np.float32) + (0.3 if name == "Q4_1" else 0.0)  # Q4_1: an offset to carry
    qtype = gguf.GGMLQuantizationType(TYPES[name])
    blocks = quantize(w, qtype)  # [n, k / 32 * block bytes] uint8, the file layout
    lin = BlockLinear(torch.from_numpy(blocks), TYPES[name], k)
    lin.activations = "int8"  # llama.cpp's numbers: activations rounded to 8 bits per block
    x = rng.normal(size=(rows_in, k)).astype(np.float32)
    x[0, :32] *= 50  # one loud block next to quiet ones: scales are per block
    y = block_linear(lin, torch.from_numpy(x))
    if y is None:
        pytest.skip("the C kernels cannot be built here (no compiler)")
    w_ref = dequantize(blocks, qtype).astype(np.float64)  # gguf's reading of the blocks
    assert w_ref.shape == (n, k)
    ref = _activation_reference(x) @ w_ref.T
    # the block sums are kept as fp16 (as llama.cpp's Q8_1 does), hence not exact
    bound = 2e-3 * (np.abs(_activation_reference(x)) @ np.abs(w_ref).T) + 1e-5
    assert np.all(np.abs(y.numpy() - ref) <= bound)
    # and close to the unquantized activations (the price of 8-bit activations)
    full = x.astype(np.float64) @ w_ref.T
    assert np.abs(y.numpy() - full).max() <= 0.02 * np.abs(full).max()
    # one or two rows take the weight-rows tile, more rows the activation-rows tile: the same sums in the same order
    assert torch.equal(block_linear(lin, torch.from_numpy(x[:1])), y[:1])


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows_in", [1, 2, 4, 5, 13, 70])
@pytest.mark.parametrize("mode", ["fp32", "auto"])
def test_fp32_activation_product_equals_dequantized_matrix(name, rows_in, mode):
    """activations "fp32": the product of gguf's dequantized matrix with x as it is, up to fp32 rounding of the
    sums, through each kernel (1-4 rows: kernels/qfloat.c; 5-11: rows widened for the dense tiles; 12 and more: the
    packed GEMM). "auto" (the default): the same from 12 rows on, 8-bit activations below."""
    rng = np.random.default_rng(rows_in)
    n, k = 42, 96  # 42 rows: whole passes of 4 weight rows and a tail
    w = rng.normal(size=(n, k)).astype(np.float32) + (0.3 if name == "Q4_1" else 0.0)
    qtype = gguf.GGMLQuantizationType(TYPES[name])
    blocks = quantize(w, qtype)
    lin = BlockLinear(torch.from_numpy(blocks), TYPES[name], k)
    assert lin.activations == "auto"
    lin.activations = mode
    x = rng.normal(size=(rows_in, k)).astype(np.float32)
    x[0, :32] *= 50
    y = block_linear(lin, torch.from_numpy(x))
    if y is None:
        pytest.skip("the C kernels cannot be built here (no compiler)")
    w_ref = dequantize(blocks, qtype).astype(np.float64)
    full = mode == "fp32" or rows_in >= 12
    xr = x.astype(np.float64) if full else _activation_reference(x)
    ref = xr @ w_ref.T
    bound = (1e-5 if full else 2e-3) * (np.abs(xr) @ np.abs(w_ref).T) + 1e-5
    assert np.all(np.abs(y.numpy() - ref) <= bound)


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_fallback_and_rows(name):
    """Without the kernels (packed off) a call dequantizes with gguf's code; rows() gives embedding rows."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 64)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType(TYPES[name])
    blocks = quantize(w, qtype)
    lin = BlockLinear(torch.from_numpy(blocks), TYPES[name], 64)
    lin.packed = False
    x = torch.from_numpy(rng.normal(size=(2, 64)).astype(np.float32))
    ref = torch.from_numpy(dequantize(blocks, qtype))
    torch.testing.assert_close(lin(x), x @ ref.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.dequantize(torch.tensor([5, 2])), ref[[5, 2]])


def test_wrong_block_bytes_are_refused():
    with pytest.raises(ValueError, match="not a Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K matrix of 64 columns"):
        BlockLinear(torch.zeros(4, 35, dtype=torch.uint8), 8, 64)
