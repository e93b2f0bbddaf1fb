"""Linear layers for the runner: dense (fp32/bf16), int8 (per output channel), GGUF blocks (Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/
Q6_K, as the file stores them) and the seeds' `torch.ao.quantization.quantize_dynamic` path. Each is a callable
x [N, in] -> [N, out].

int8 stores W as int8 with one scale per output row, so a decode step streams a quarter of the fp32 bytes. With the
C kernels (the engine's default) activations are quantized to int8 too, per 32 values (kernels/q8.c; llama.cpp's
Q8_0 scheme), and the products run on integer instructions; on the torch path (LLM(fused=False), no compiler)
activations stay bf16 and `aten._weight_int8pack_mm` dequantizes W inside the kernel.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint.safetensors_file import stacked_view

# Without AVX512-BF16 (e.g. AVX2-only CPUs) bf16 GEMMs are emulated: about 7x slower than fp32 for prompt
# chunks and batched decode. There, from this many rows on, weights are upcast per call and fp32 GEMM runs.
UPCAST_ROWS = 8
PACKED_FP32_MAX_ROWS = 512  # fp32 prompt chunks up to this many rows use the packed kernel, not MKL sgemm
INT8_DEQUANT_ROWS = 64  # the int8 GEMV kernel wins below this many rows, dequantize + fp32 GEMM above
QUANT_BLOCK_ROWS = 2048  # rows quantized at a time (bounds the fp32 temporaries while loading)


def native_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


class DenseLinear:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight.detach().contiguous()  # [out, in]; detached: the model may later empty its parameter
        self.upcast = weight.dtype != torch.float32 and not native_bf16()
        self.packed = False  # prompt chunks through the C packed kernel: ModelRunner.enable_fused turns it on

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        packed = self.packed and ((self.upcast and self.weight.dtype == torch.bfloat16) or (
            self.weight.dtype == x.dtype == torch.float32 and rows <= PACKED_FP32_MAX_ROWS))
        if packed and rows >= UPCAST_ROWS and x.dim() == 2:
            # prompt chunks: the packed GEMM (engine/fused.py) widens bf16 in registers, faster than torch's
            # per-call fp32 copy + sgemm; for fp32 weights faster than MKL at these row counts
            from .fused import packed_linear

            y = packed_linear(self.weight, x)
            if y is not None:
                return y.to(x.dtype)
        if x.dtype != self.weight.dtype:  # bf16 weights, fp32 activations (CPUs without native bf16)
            if rows < UPCAST_ROWS:  # a GEMV (torch-path decode): the bf16 kernel reads half the bytes
                return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype))
        if self.upcast and rows >= UPCAST_ROWS:
            return F.linear(x.float(), self.weight.float()).to(x.dtype)
        return F.linear(x, self.weight)


class Int8Linear:
    def __init__(self, weight: torch.Tensor, act_dtype: torch.dtype = torch.bfloat16):
        out_features = weight.shape[0]
        self.qweight = torch.empty(weight.shape, dtype=torch.int8)
        scale = torch.empty(out_features)  # [out]
        # in blocks of rows: whole-matrix fp32 temporaries (abs, divide, round) of a 49k-row lm_head cost ~450 MB
        for r0 in range(0, out_features, QUANT_BLOCK_ROWS):
            w = weight[r0:r0 + QUANT_BLOCK_ROWS].detach().float()
            s = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            self.qweight[r0:r0 + QUANT_BLOCK_ROWS] = torch.round(w / s[:, None]).clamp_(-127, 127)
            scale[r0:r0 + QUANT_BLOCK_ROWS] = s
        self.scales = scale.to(act_dtype)
        self.scales_bf16 = scale.to(torch.bfloat16)
        self.scales_f32 = self.scales.float()  # what the C kernels multiply by (decode step and prompt chunks)
        self.act_dtype = act_dtype
        self.upcast = not native_bf16()
        # every product through the C kernels (kernels/q8.c), so prompt chunks compute exactly what fused decode
        # steps compute: ModelRunner.enable_fused turns it on
        self.packed = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed and x.dim() == 2:
            from .fused import packed_linear

            y = packed_linear(self.qweight, x, self.scales_f32)
            if y is not None:
                return y.to(self.act_dtype)
        if self.upcast and x.shape[0] >= INT8_DEQUANT_ROWS:  # the int8 kernel is a GEMV: dequantize for GEMMs
            return F.linear(x.float(), self.dequantize()).to(self.act_dtype)
        # torch's int8 kernel is an order of magnitude slower with fp32 input than with bf16: feed it bf16
        out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales_bf16)
        return out.to(self.act_dtype)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]


# GGUF block types the kernels read as they are (kernels/qblock.c, qkblock.c): ggml type id -> kernel code
BLOCK_CODES = {8: 3, 2: 4, 3: 5, 6: 9, 12: 6, 14: 7}  # Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K
MIXED_CODE = 8  # rows of both K-quant types in one matrix (q|k|v of a Q4_K_M file with a Q6_K v)
BLOCK_BYTES = {8: 34, 2: 18, 3: 20, 6: 22, 12: 144, 14: 210}  # bytes per block
BLOCK_VALUES = {8: 32, 2: 32, 3: 32, 6: 32, 12: 256, 14: 256}  # weights per block
K_TYPES = (12, 14)
# added to a block type's code (kernels.h): fp32 activations always, or for products of many rows only
ACTIVATION_FLAGS = {"int8": 0, "fp32": 16, "auto": 32}


def row_bytes(ggml_type: int, cols: int) -> int:
    return cols // BLOCK_VALUES[ggml_type] * BLOCK_BYTES[ggml_type]


class BlockLinear:
    """A GGUF Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q4_K / Q6_K matrix kept in its file layout: blocks [out, bytes per row] uint8.
    Products run through the C kernels; without them each call dequantizes the matrix (gguf's reference code), one
    layer at a time. `BlockLinear.stack` also joins rows of the two K-quant types (then `blocks` is flat and
    `table` says where each part starts).

    activations: "fp32" computes with the dequantized weights and the activations as they are (the numbers of an
    fp32 copy of the matrix); "int8" rounds the activations to 8 bits per block of 32 (K-quants: 256) and runs
    integer dot products (llama.cpp's numbers, the fastest decode); "auto" takes fp32 for products of 12 rows or
    more (prompts, large batches, where blocks widened for the GEMM beat the integer tiles) and int8 for fewer
    (decode steps). K-quants with fp32 activations and few rows widen whole rows first: slower than int8."""

    activations = "auto"

    def __init__(self, blocks: torch.Tensor, ggml_type: int, cols: int, act_dtype: torch.dtype = torch.float32):
        if (ggml_type not in BLOCK_CODES or cols % BLOCK_VALUES[ggml_type]
                or blocks.shape[1] != row_bytes(ggml_type, cols)):
            raise ValueError(f"not a Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K matrix of {cols} columns: type {ggml_type}, "
                             f"{tuple(blocks.shape)} bytes")
        self.blocks = blocks.contiguous()
        self.ggml_type, self.type_code, self.rows, self.cols = ggml_type, BLOCK_CODES[ggml_type], blocks.shape[0], cols
        self.parts = [(ggml_type, self.blocks)]
        self.table = None  # int64 [1 + 3 parts] for mixed rows (kernels/qkblock.c qk_row)
        self.act_dtype = act_dtype
        self.packed = True  # the C kernels are the only fast path for these

    @classmethod
    def stack(cls, kept: list, cols: int) -> BlockLinear | None:
        """One matrix of these (ggml type, uint8 [rows, bytes]) blocks, rows in order (q|k|v, gate|up): of one type,
        or of Q4_K and Q6_K; None for other mixes (the caller dequantizes)."""
        types = [t for t, _ in kept]
        if len(set(types)) == 1:
            raws = [r for _, r in kept]  # read_gguf puts q|k|v and gate|up back to back: a view, no copy
            raw = raws[0] if len(raws) == 1 else stacked_view(raws)
            raw = torch.cat(raws) if raw is None else raw
            return cls(raw, types[0], cols)
        if not all(t in K_TYPES for t in types):
            return None
        runs: list[list] = []  # consecutive parts of one type: [type, [raw, ...]]
        for t, raw in kept:
            if cols % 256 or raw.shape[1] != row_bytes(t, cols):
                return None
            if runs and runs[-1][0] == t:
                runs[-1][1].append(raw)
            else:
                runs.append([t, [raw]])
        flat = torch.cat([r.reshape(-1) for _, raws in runs for r in raws])
        lin = cls.__new__(cls)
        lin.blocks, lin.ggml_type, lin.type_code, lin.cols = flat, None, MIXED_CODE, cols
        lin.parts, table, offset, end = [], [len(runs)], 0, 0
        for t, raws in runs:
            n = sum(r.shape[0] for r in raws)
            lin.parts.append((t, flat[offset:offset + n * row_bytes(t, cols)].view(n, row_bytes(t, cols))))
            end += n
            table += [end, BLOCK_CODES[t], offset]
            offset += n * row_bytes(t, cols)
        lin.rows, lin.table = end, torch.tensor(table, dtype=torch.int64)
        lin.act_dtype, lin.packed = torch.float32, True
        return lin

    @property
    def code(self) -> int:
        """The kernels' weight type (kernels.h) with its activation flag."""
        return self.type_code + ACTIVATION_FLAGS[self.activations]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .fused import block_linear

        y = block_linear(self, x.reshape(-1, self.cols)) if self.packed and x.device.type == "cpu" else None
        if y is None:  # one matrix dequantized at a time, on the activations' device (a GPU: no C kernels there)
            y = F.linear(x.float(), self.dequantize().to(x.device))
        return y.to(self.act_dtype).reshape(*x.shape[:-1], self.rows)

    def dequantize(self, rows=None) -> torch.Tensor:
        """The matrix (or these rows of it) as fp32 [n, cols]."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        if self.table is not None:
            full = torch.cat([torch.from_numpy(dequantize(raw.numpy(), GGMLQuantizationType(t)).copy())
                              for t, raw in self.parts])
            return full if rows is None else full[rows]
        blocks = self.blocks if rows is None else self.blocks[rows]
        return torch.from_numpy(dequantize(blocks.numpy(), GGMLQuantizationType(self.ggml_type)).copy())

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()


class DynamicInt8Linear:
    """torch.ao dynamic quantization of a plain Linear (int8 weights, activations quantized per call)."""

    def __init__(self, weight: torch.Tensor):
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        lin.weight.data = weight.detach().float()
        self.module = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                             dtype=torch.qint8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float())

    @property
    def nbytes(self) -> int:
        return self.module[0].weight().numel()


def int4_linear(weight: torch.Tensor, act_dtype: torch.dtype = torch.float32):
    """4-bit group-wise weight-only: GGUF Q4_K blocks (rows of whole 256-value super-blocks: a 6-bit scale and min
    per 32 weights), else Q4_0 (rows of 32-value blocks: one fp16 scale per 32), else int8 per channel; made once
    at load and run through the same kernels as a GGUF file's blocks."""
    cols = weight.shape[1]
    if cols % 32:
        return Int8Linear(weight, act_dtype)
    parts = []
    for r0 in range(0, weight.shape[0], QUANT_BLOCK_ROWS):  # bounded fp32 temporaries, as Int8Linear
        w = weight[r0:r0 + QUANT_BLOCK_ROWS].detach().float().numpy()
        if cols % 256 == 0:
            from ..checkpoint.kquants import Q4_K, quantize_k

            parts.append(quantize_k(w, Q4_K))
        else:
            from gguf import GGMLQuantizationType
            from gguf.quants import quantize

            parts.append(quantize(w, GGMLQuantizationType.Q4_0))
    blocks = torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))
    return BlockLinear(blocks, 12 if cols % 256 == 0 else 2, cols, act_dtype)


def make_linear(weight: torch.Tensor, quantization: str | None, act_dtype: torch.dtype,
                weight_dtype: torch.dtype | None = None):
    """weight_dtype: storage dtype of dense weights when it differs from the activations' (bf16 under fp32)."""
    if quantization is None:
        return DenseLinear(weight.to(weight_dtype or act_dtype))
    if quantization == "int8":
        return Int8Linear(weight, act_dtype)
    if quantization == "int4":
        return int4_linear(weight, act_dtype)
    if quantization == "dynamic":
        return DynamicInt8Linear(weight)
    raise ValueError(f"unknown quantization {quantization!r}; choose from int8, int4, dynamic")
