"""The fused C decode step (kernels/*.c): build it once per machine, describe the runner's weights to it.

A step's decode rows and prompt chunks (dense and MoE models) go through one C call instead of ~250 torch ops
per step; LoRA rows, prompt logprobs, pooled hidden states and anything the kernel does not cover keep the torch
path. The shared library is compiled at first use with the system C compiler (`$CC`, else cc/gcc; -O3
-march=native -fopenmp) into the minimind cache and reused; without a compiler the engine runs the torch path and
says so once.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("minimind")
KERNELS = Path(__file__).with_name("kernels")
# one library; kernels.h shared
SOURCES = ("decode.c", "moe.c", "linear.c", "q8.c", "qblock.c", "qkblock.c", "qfloat.c", "attention.c", "sample.c")
W_F32, W_BF16, W_I8 = 0, 1, 2
CODES = {torch.float32: W_F32, torch.bfloat16: W_BF16, torch.int8: W_I8}  # weight dtype -> Mat.type
P = ctypes.c_void_p


class Mat(ctypes.Structure):
    _fields_ = [("w", P), ("scale", P), ("type", ctypes.c_int64), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64)]


class Moe(ctypes.Structure):
    # router: [E, hidden] fp32; gate_up, down: Mat arrays of the routed experts, then the shared ones
    _fields_ = [(name, ctypes.c_int64) for name in ("n_experts", "top_k", "renorm", "n_shared")] + [
        ("router", P), ("gate_up", P), ("down", P)]


class Layer(ctypes.Structure):
    _fields_ = [("ln1", P), ("ln2", P), ("q_norm", P), ("k_norm", P), ("qkv", Mat), ("o", Mat),
                ("gate_up", Mat), ("down", Mat), ("k_cache", P), ("v_cache", P), ("moe", P)]


class Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim",
                                                    "inter", "vocab", "max_len")] + [
        ("eps", ctypes.c_double), ("layers", P), ("embed", Mat), ("norm", P), ("lm_head", Mat),
        ("kv_f16", ctypes.c_int64)]


def build() -> Path:
    """Compile kernels/*.c for this CPU (cached by sources, compiler and flags) -> path of the .so."""
    cc = next((shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if cc is None:
        raise OSError("no C compiler found (set $CC or install gcc)")
    # torch's wheel ships libgomp with the system soname (libgomp.so.1); torch is imported first, so the loader
    # binds our library to that same runtime: one OpenMP thread pool per process, not two.
    flags = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-lm"]
    sources = [KERNELS / name for name in SOURCES]
    source = b"".join(path.read_bytes() for path in [*sources, KERNELS / "kernels.h"])
    key = hashlib.sha256(source + cc.encode() + " ".join(flags).encode() + sys.platform.encode()).hexdigest()[:16]
    from ..checkpoint.default_model import cache_dir  # the one minimind cache root ($MINIMIND_HOME, XDG, ~/.cache)

    out = cache_dir() / "kernels" / f"decode-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build beside the target, publish atomically
        tmp_so = Path(tmp) / out.name
        cmd = [cc, *map(str, sources), "-o", str(tmp_so), *flags]
        run = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if run.returncode != 0:
            raise OSError(f"compiling {', '.join(SOURCES)} failed: {' '.join(cmd)}\n{run.stderr.strip()[-2000:]}")
        os.replace(tmp_so, out)
    return out


def load_library() -> ctypes.CDLL:
    return _open(str(build()))


@functools.cache  # a process loads a given .so once anyway; keep one handle with its signature set
def _open(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.minimind_decode.restype = ctypes.c_int
    lib.minimind_decode.argtypes = [ctypes.POINTER(Model), ctypes.c_int64, P, P, P, P, P, P, ctypes.c_int64, P,
                                    ctypes.c_int]
    lib.minimind_decode_steps.restype = ctypes.c_int
    lib.minimind_decode_steps.argtypes = [ctypes.POINTER(Model), *[ctypes.c_int64] * 4, P, P, P, ctypes.c_float,
                                          ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_int64,
                                          ctypes.c_int64, P, ctypes.c_int64, P, ctypes.c_int]
    lib.minimind_sample.restype = ctypes.c_int
    lib.minimind_sample.argtypes = [P, ctypes.c_int64, ctypes.c_int64, *[P] * 7, ctypes.c_int]
    lib.minimind_linear.restype = ctypes.c_int
    lib.minimind_linear.argtypes = [ctypes.POINTER(Mat), P, ctypes.c_int64, P, ctypes.c_int]
    return lib


@functools.cache
def _linear_library() -> ctypes.CDLL | None:
    try:
        return load_library()
    except OSError as e:  # no compiler: prompt chunks keep torch's upcast + fp32 GEMM
        log.info("prompt linears stay on torch: %s", str(e).splitlines()[0])
        return None


def packed_linear(weight: torch.Tensor, x: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [M, K] (fp32) times a weight [N, K]^T -> [M, N] fp32 through the C kernels: fp32 or bf16 weights through
    the packed micro-kernel (bf16 widened in registers: no fp32 copy per call), int8 weights with their fp32 per-row
    `scales` through int8-quantized activations (kernels/q8.c; K a multiple of 32, else widened like bf16), exactly
    as the fused decode step computes them. None when the kernel cannot be built here or does not take this weight."""
    lib, code = _linear_library(), CODES.get(weight.dtype)
    if lib is None or code is None or (code == W_I8 and scales is None) or x.dim() != 2 or not weight.is_contiguous():
        return None
    mat = Mat(weight.data_ptr(), None if scales is None else scales.data_ptr(), code, weight.shape[0], weight.shape[1])
    return _run_linear(lib, mat, x)


def block_linear(lin, x: torch.Tensor) -> torch.Tensor | None:
    """x [M, K] times a GGUF block-quantized weight (quant.BlockLinear) -> [M, N] fp32 (kernels/qblock.c), or None
    when the kernels cannot be built here."""
    lib = _linear_library()
    if lib is None or x.dim() != 2:
        return None
    table = None if lin.table is None else lin.table.data_ptr()  # rows of two K-quant types: where each part is
    return _run_linear(lib, Mat(lin.blocks.data_ptr(), table, lin.code, lin.rows, lin.cols), x)


def _run_linear(lib, mat: Mat, x: torch.Tensor) -> torch.Tensor:
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], mat.rows, dtype=torch.float32)
    if lib.minimind_linear(ctypes.byref(mat), x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads()):
        raise MemoryError("packed linear could not allocate its scratch buffers")
    return y


def sample_rows(logits: torch.Tensor, temperature, top_k, top_p, min_p, seeds, steps) -> torch.Tensor | None:
    """One token per row of logits [B, V] (fp32, not changed): argmax where temperature is 0, else a Gumbel-max draw
    (sampling.gumbel_noise's noise) after temperature, top-k, top-p and min-p as sampling.filter_logits applies
    them, without sorting the vocabulary (kernels/sample.c). Per-row parameters: [B] tensors. None when the kernels
    cannot be built here."""
    lib = _linear_library()
    if lib is None or logits.dtype != torch.float32 or logits.dim() != 2:
        return None
    args = [logits.contiguous(), temperature.float().contiguous(), top_k.long().contiguous(),
            top_p.float().contiguous(), min_p.float().contiguous(), seeds.long().contiguous(), steps.long().contiguous()]
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    if lib.minimind_sample(args[0].data_ptr(), logits.shape[0], logits.shape[1], *(t.data_ptr() for t in args[1:]),
                           out.data_ptr(), torch.get_num_threads()):
        raise MemoryError("the sampler could not allocate its scratch rows")
    return out


def unsupported_reason(runner) -> str | None:
    """Why the fused kernel cannot run this runner's model, or None when it can."""
    cfg = runner.config
    if runner.kv_dtype not in (torch.float32, torch.float16):
        return f"KV cache dtype {runner.kv_dtype} (the kernel keeps fp32 or fp16)"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act}"
    if not hasattr(runner.embed, "blocks") and runner.embed.dtype not in (torch.float32, torch.bfloat16):
        return f"embedding dtype {runner.embed.dtype}"
    for lw in runner.layers:
        for lin in (lw.qkv, lw.o, *((lw.gate_up, lw.down) if lw.moe is None else lw.moe.linears)):
            if _mat_parts(lin) is None:
                return f"{type(lin).__name__} weights"
    if _mat_parts(runner.lm_head) is None:
        return f"{type(runner.lm_head).__name__} lm_head"
    return None


def _mat_parts(lin):
    """(weight tensor, fp32 scales or None, type code) for linears the kernel reads, else None."""
    if hasattr(lin, "blocks"):  # quant.BlockLinear: GGUF blocks, [rows, bytes per row] uint8
        return lin.blocks, lin.table, lin.code
    weight = getattr(lin, "weight", None)
    if weight is not None and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous():
        return weight, None, CODES[weight.dtype]
    qweight = getattr(lin, "qweight", None)
    if qweight is not None and qweight.dtype == torch.int8:
        return qweight, lin.scales_f32, W_I8
    return None


class FusedDecoder:
    """Holds the ctypes description of a runner's weights and KV cache; call with a step's rows -> logits."""

    def __init__(self, runner):
        self.lib = load_library()
        cfg, kv = runner.config, runner.kv
        self._keep: list[torch.Tensor] = []  # every tensor the C side points into stays alive here
        eps = {float(n.eps) for lw in runner.layers for n in (lw.ln1, lw.ln2, lw.q_norm, lw.k_norm) if n is not None}
        if len(eps) != 1:
            raise ValueError(f"norms with different eps {sorted(eps)}")
        layers = (Layer * len(runner.layers))()
        self._moe = []  # the ctypes arrays the layers point to
        for i, lw in enumerate(runner.layers):
            dense = lw.moe is None
            layers[i] = Layer(self._vec(lw.ln1), self._vec(lw.ln2), self._vec(lw.q_norm), self._vec(lw.k_norm),
                              self._mat(lw.qkv), self._mat(lw.o), self._mat(lw.gate_up) if dense else Mat(),
                              self._mat(lw.down) if dense else Mat(), kv.k[i].data_ptr(), kv.v[i].data_ptr(),
                              None if dense else self._moe_ptr(lw.moe))
        self._layers = layers
        dense = [lw.down for lw in runner.layers if lw.moe is None]
        inter = (getattr(dense[0], "cols", None) or _mat_parts(dense[0])[0].shape[1]) if dense else 0
        self.vocab = cfg.vocab_size
        embed = runner.embed if hasattr(runner.embed, "blocks") else runner.embed.contiguous()
        self._keep.append(embed)
        self.model = Model(len(runner.layers), cfg.hidden_size, runner.num_heads, runner.num_kv_heads,
                           runner.head_dim, inter, cfg.vocab_size, kv.max_len, eps.pop(), ctypes.cast(layers, P),
                           self._mat(embed) if hasattr(embed, "blocks") else
                           Mat(embed.data_ptr(), None, CODES[embed.dtype], *embed.shape), self._vec(runner.norm),
                           self._mat(runner.lm_head), int(kv.k.dtype == torch.float16))
        self.seconds_per_token: float | None = None  # of the last steps() call
        # [max_len, D] fp32 RoPE tables; the kernel reads row positions[b] for row b
        self.cos, self.sin = (t.float().contiguous() for t in (runner.cos_table, runner.sin_table))

    def _vec(self, norm) -> int | None:
        if norm is None:
            return None
        w = norm.weight.detach().float().contiguous()
        self._keep.append(w)
        return w.data_ptr()

    def _moe_ptr(self, moe) -> int:
        pairs = moe.experts + moe.shared
        gate_up, down = (Mat * len(pairs))(*(self._mat(g) for g, _ in pairs)), (Mat * len(pairs))(
            *(self._mat(d) for _, d in pairs))
        self._keep.append(moe.router)
        desc = Moe(len(moe.experts), moe.top_k, int(moe.renormalize), len(moe.shared), moe.router.data_ptr(),
                   ctypes.cast(gate_up, P), ctypes.cast(down, P))
        self._moe += [gate_up, down, desc]
        return ctypes.addressof(desc)

    def _mat(self, lin) -> Mat:
        w, scales, code = _mat_parts(lin)
        self._keep += [w] + ([scales] if scales is not None else [])
        # GGUF blocks: the logical shape, not the bytes' (rows of two K-quant types are one flat byte buffer)
        rows, cols = (lin.rows, lin.cols) if hasattr(lin, "blocks") else w.shape
        return Mat(w.data_ptr(), None if scales is None else scales.data_ptr(), code, rows, cols)

    def __call__(self, ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                 out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """ids, slots, positions: [B] int64, one token per row (decode rows, and prompt chunks as consecutive
        positions of one slot) -> logits [len(out_rows), V] fp32 of rows out_rows (None: every row)."""
        ids, slots, positions = (t.to(torch.int64).contiguous() for t in (ids, slots, positions))
        n_out = ids.shape[0] if out_rows is None else out_rows.shape[0]
        if out_rows is not None:  # an empty tensor's data_ptr may be NULL, which the kernel reads as every row
            out_rows = out_rows.to(torch.int64).contiguous() if n_out else torch.zeros(1, dtype=torch.int64)
        logits = torch.empty(n_out, self.vocab, dtype=torch.float32)
        status = self.lib.minimind_decode(ctypes.byref(self.model), ids.shape[0], ids.data_ptr(), slots.data_ptr(),
                                          positions.data_ptr(), self.cos.data_ptr(), self.sin.data_ptr(),
                                          None if out_rows is None else out_rows.data_ptr(), n_out,
                                          logits.data_ptr(), torch.get_num_threads())
        _check(status, self.cos.shape[0])
        return logits

    def steps(self, n: int, token: int, slot: int, position: int, params, seed: int, step: int,
              stop_ids) -> list[int]:
        """Up to n decode steps of one sequence in one C call: feed `token` at `position`, then each token picked
        as sample_rows picks it with params' temperature / top_k / top_p / min_p (steps step, step + 1, ...),
        stopping after a token of stop_ids -> the tokens picked."""
        stops = torch.tensor(sorted(stop_ids), dtype=torch.int64)
        out, logits = torch.empty(n, dtype=torch.int64), torch.empty(self.vocab, dtype=torch.float32)
        start = time.perf_counter()
        count = self.lib.minimind_decode_steps(ctypes.byref(self.model), n, token, slot, position, self.cos.data_ptr(),
                                               self.sin.data_ptr(), logits.data_ptr(), params.temperature, params.top_k,
                                               params.top_p, params.min_p, seed, step,
                                               stops.data_ptr(), len(stops), out.data_ptr(), torch.get_num_threads())
        _check(min(count, 0), self.cos.shape[0])
        self.seconds_per_token = (time.perf_counter() - start) / count
        return out[:count].tolist()


def _check(status: int, max_len: int) -> None:
    if status == -2:
        raise IndexError(f"position outside the KV cache (max_len {max_len}) or output row outside the step's rows")
    if status != 0:
        raise MemoryError("fused step could not allocate its scratch buffers")
