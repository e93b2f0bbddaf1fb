"""GGUF Q4_K and Q6_K blocks from fp32 weights, in numpy (the `gguf` package dequantizes K-quants but cannot write
them). Block layouts as the GGUF spec and `gguf.quants` define them (kernels/qkblock.c spells them out).

The search follows the shape of llama.cpp's reference quantizers, vectorized over all blocks of a matrix:
- Q4_K: per 32 values an (unsigned 4-bit) scale and min fitted by weighted least squares over 21 candidate
  grids (weights mean |x| of the super-block + |x|), then the 8 scales and 8 mins of a 256-value super-block
  quantized to 6 bits against fp16 super-scales, and the values re-rounded with the scales as stored;
- Q6_K: per 16 values a signed scale chosen among 19 grids by x^2-weighted error, the 16 scales quantized to int8
  against one fp16 super-scale, the values re-rounded to -32..31.
"""
from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K, Q6_K = 12, 14  # ggml type ids
BLOCK_BYTES = {Q4_K: 144, Q6_K: 210}


def _rint(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int32)  # round half to even, as llama.cpp's nearest_int


def _fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int = 15, nstep: int = 20):
    """x, w [n, 32] -> (scale [n], min [n] >= 0 to subtract, levels [n, 32] in 0..nmax) minimizing
    sum w (scale * level - min - x)^2 over the candidate grids."""
    lo = np.minimum(x.min(1), 0)
    span = x.max(1) - lo
    flat = span <= 0
    span = np.where(flat, 1, span)
    sum_w, sum_x = w.sum(1), (w * x).sum(1)

    def levels(iscale):
        return np.clip(_rint(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(np.float32)

    best_l = levels(nmax / span)
    best_scale, best_min = span / nmax, lo
    best_err = (w * (best_scale[:, None] * best_l + best_min[:, None] - x) ** 2).sum(1)
    for step in range(nstep + 1):
        lv = levels((-1.0 + 0.1 * step + nmax) / span)
        sum_l, sum_l2, sum_xl = (w * lv).sum(1), (w * lv * lv).sum(1), (w * lv * x).sum(1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = np.where(ok, det, 1)
        scale = (sum_w * sum_xl - sum_x * sum_l) / det
        mn = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = mn > 0  # the min must stay <= 0: refit the scale alone
        scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, 1), scale)
        mn = np.where(pos, 0, mn)
        err = (w * (scale[:, None] * lv + mn[:, None] - x) ** 2).sum(1)
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale, best_min = np.where(better, scale, best_scale), np.where(better, mn, best_min)
        best_l = np.where(better[:, None], lv, best_l)
    best_scale = np.where(flat, 0, best_scale)
    return best_scale, np.where(flat, -lo, -best_min), best_l


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_q4_k(weight: np.ndarray) -> np.ndarray:
    """weight [rows, cols] (cols a multiple of 256) -> uint8 [rows, cols / 256 * 144]."""
    rows, cols = weight.shape
    x = weight.reshape(-1, QK_K).astype(np.float32)  # [S, 256] super-blocks
    n = x.shape[0]
    av = np.sqrt((x * x).mean(1, keepdims=True))
    sub = x.reshape(n * 8, 32)
    scale, mins, _ = _fit_scale_min(sub, (av + np.abs(x)).reshape(n * 8, 32))
    scale, mins = scale.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = scale.max(1), mins.max(1)
    inv_s = np.where(max_scale > 0, 63 / np.where(max_scale > 0, max_scale, 1), 0)
    inv_m = np.where(max_min > 0, 63 / np.where(max_min > 0, max_min, 1), 0)
    ls = np.minimum(_rint(inv_s[:, None] * scale), 63)
    lm = np.minimum(_rint(inv_m[:, None] * mins), 63)
    d, dmin = _fp16(max_scale / 63), _fp16(max_min / 63)
    # the levels again, against the scales as stored
    dj = d.astype(np.float32)[:, None] * ls
    dm = dmin.astype(np.float32)[:, None] * lm
    safe = np.where(dj > 0, dj, 1)
    lv = np.clip(_rint((sub.reshape(n, 8, 32) + dm[..., None]) / safe[..., None]), 0, 15)
    lv = np.where((dj > 0)[..., None], lv, 0).reshape(n, QK_K)
    out = np.zeros((n, 144), dtype=np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(n, 2)
    out[:, 2:4] = dmin.view(np.uint8).reshape(n, 2)
    sc = np.zeros((n, 12), dtype=np.int32)
    sc[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    sc[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    out[:, 4:16] = sc
    chunks = lv.reshape(n, 4, 2, 32)  # 64-value chunks: low nibbles the first 32, high nibbles the next 32
    out[:, 16:] = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, 128)
    return out.reshape(rows, cols // QK_K * 144)


def quantize_q6_k(weight: np.ndarray) -> np.ndarray:
    """weight [rows, cols] (cols a multiple of 256) -> uint8 [rows, cols / 256 * 210]."""
    rows, cols = weight.shape
    x = weight.reshape(-1, QK_K).astype(np.float32)
    n = x.shape[0]
    g = x.reshape(n * 16, 16)
    idx = np.abs(g).argmax(1)
    gmax = g[np.arange(g.shape[0]), idx]  # the value of largest magnitude, with its sign
    zero = np.abs(gmax) < 1e-15
    gmax = np.where(zero, 1, gmax)
    w = g * g
    best_scale, best = np.zeros(g.shape[0], np.float32), np.full(g.shape[0], -np.inf, np.float32)
    for step in [0, *range(-9, 10)]:  # 0 first: the plain grid, then its neighbours
        lv = np.clip(_rint(-(32 + 0.1 * step) / gmax[:, None] * g), -32, 31).astype(np.float32)
        sumlx, suml2 = (w * g * lv).sum(1), (w * lv * lv).sum(1)
        scale = sumlx / np.where(suml2 > 0, suml2, 1)
        score = scale * sumlx
        better = (suml2 > 0) & (score > best)
        best, best_scale = np.where(better, score, best), np.where(better, scale, best_scale)
    best_scale = np.where(zero, 0, best_scale).reshape(n, 16)
    pick = np.abs(best_scale).argmax(1)
    smax = best_scale[np.arange(n), pick]
    has = np.abs(smax) > 1e-15
    iscale = np.where(has, -128 / np.where(has, smax, 1), 0)
    d = _fp16(np.where(has, 1 / np.where(has, iscale, 1), 0))
    ls = np.minimum(_rint(iscale[:, None] * best_scale), 127)
    dj = d.astype(np.float32)[:, None] * ls  # [n, 16]
    safe = np.where(dj != 0, dj, 1)
    lv = np.clip(_rint(x.reshape(n, 16, 16) / safe[..., None]), -32, 31) + 32
    lv = np.where((dj != 0)[..., None], lv, 32).reshape(n, 2, 4, 32)  # [n, half, quarter, 32]
    out = np.zeros((n, 210), dtype=np.uint8)
    ql = np.concatenate([lv[:, :, 0] & 0x0F | (lv[:, :, 2] & 0x0F) << 4,
                         lv[:, :, 1] & 0x0F | (lv[:, :, 3] & 0x0F) << 4], axis=2)  # [n, half, 64]
    qh = (lv[:, :, 0] >> 4) | (lv[:, :, 1] >> 4) << 2 | (lv[:, :, 2] >> 4) << 4 | (lv[:, :, 3] >> 4) << 6
    out[:, 0:128] = ql.reshape(n, 128)
    out[:, 128:192] = qh.reshape(n, 64)
    out[:, 192:208] = ls.astype(np.int8).view(np.uint8)
    out[:, 208:210] = d.view(np.uint8).reshape(n, 2)
    return out.reshape(rows, cols // QK_K * 210)


def quantize_k(weight: np.ndarray, ggml_type: int) -> np.ndarray:
    """Q4_K (12) or Q6_K (14) blocks of a [rows, cols] matrix, in row chunks (bounds the fp32 temporaries)."""
    fn = {Q4_K: quantize_q4_k, Q6_K: quantize_q6_k}[ggml_type]
    if weight.shape[-1] % QK_K:
        raise ValueError(f"row length {weight.shape[-1]} is not a multiple of {QK_K}")
    flat = weight.reshape(-1, weight.shape[-1])
    step = max(1, (1 << 20) // weight.shape[-1])
    out = np.concatenate([fn(flat[r:r + step]) for r in range(0, flat.shape[0], step)])
    return out.reshape(*weight.shape[:-1], out.shape[-1])
