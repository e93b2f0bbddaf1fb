"""ModelRunner: one fused forward over a mixed batch (decode tokens + prompt chunks) on the slot KV cache.

With the fused C kernel (engine/fused.py) a step runs as one C call instead, unless some of its rows need what
only the torch path does (LoRA adapters, prompt logprobs, pooled hidden states).
The torch path reuses the model's own modules (norms, rotary frequencies) and weights, fused per layer into one
q|k|v and one gate|up matrix (MoE: per expert, routed as the model routes, engine/moe.py), so the math equals
MiniMindForCausalLM.forward. Linear layers see every token of the step at once; attention runs once for all
decode rows (masked to each row's length) and once per prompt chunk. There is no host sync inside the layers
(MoE routing excepted).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..model.rope import apply_rotary
from .kv_cache import KVCache
from .lora_rows import RowLoRA
from .quant import ACTIVATION_FLAGS, BlockLinear, DenseLinear, Int8Linear, make_linear
from .runner_weights import LayerWeights, blocks, cast_module, release_matrices
from .sampling import build_sampling_batch, sample
from .scheduler import Batch

NATIVE_BF16_KERNEL_ROWS = 64


@dataclass
class StepInputs:
    ids: torch.Tensor  # [N] token ids: decode rows first, then prompt chunks
    positions: torch.Tensor  # [N] position of each row's token
    slots: torch.Tensor  # [N] KV slot of each row
    num_decode: int
    # [R] rows whose logits are sampled (None: every row, in order), then the rows of `scored` and of `pooled`
    sample_rows: torch.Tensor | None = None
    scored: list = field(default_factory=list)  # (seq, first prompt position scored, n rows): prompt logprobs
    pooled: list = field(default_factory=list)  # (seq, n rows): final-norm hidden states, no logits
    hidden: torch.Tensor | None = None  # set by forward(): [sum of pooled n, H] fp32
    kernel: bool = False  # the whole step is one fused C call: the fields above are all it reads
    # torch path only
    cos: torch.Tensor | None = None  # [N, 1, D] fp32
    sin: torch.Tensor | None = None
    write_idx: torch.Tensor | None = None  # [N * H_kv] rows of KVCache.k_rows
    # [B_d] KV slots of the decode rows; a slice when they are contiguous (no gather)
    decode_slots: torch.Tensor | slice = field(default_factory=lambda: slice(0, 0))
    decode_len: int = 0  # keys attended by the longest decode row
    decode_mask: torch.Tensor | None = None  # [B_d, 1, 1, decode_len] additive, None when all rows are equally long
    chunks: list = field(default_factory=list)  # (row0, n, slot, pos0, mask [n, pos0+n])
    lora_groups: list = field(default_factory=list)  # [(adapter index, rows [n])]: rows that use a LoRA adapter
    # decode rows on the fused kernel beside prompt chunks that need the torch path (LoRA, prompt logprobs,
    # pooling): its decode rows run as one C call first, the fields above describe the prompt chunks alone; logits
    # come back decode rows first
    fused_decode: StepInputs | None = None


class ModelRunner:
    def __init__(self, model, kv: KVCache, dtype: torch.dtype, quantization: str | None = None,
                 weight_dtype: torch.dtype | None = None, release_model: bool = False):
        """dtype: activations; weight_dtype: dense weight storage when different (bf16 weights, fp32 math).
        release_model: empty each of the model's matrices once the runner holds its own copy (the LLM loaded the
        model itself and nobody else sees it): an int8 build of an fp32 checkpoint then never holds both in full."""
        cfg = model.config
        self.config, self.kv, self.dtype = cfg, kv, dtype
        weight_dtype = weight_dtype or dtype
        self.kv_dtype = kv.k.dtype  # may be fp32 under bf16 weights: CPU attention kernels are faster in fp32
        # fp16 is a storage format only (the fused kernel widens it in registers); torch attends over it in fp32
        self.attn_dtype = torch.float32 if self.kv_dtype == torch.float16 else self.kv_dtype
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                            cfg.head_dim)
        self.scale = self.head_dim ** -0.5
        self.gqa = self.num_heads != self.num_kv_heads
        inner = model.model
        # [V, H] weights, or GGUF blocks (a BlockLinear: rows are dequantized as they are looked up)
        self.embed = blocks(inner.embed_tokens) or inner.embed_tokens.weight.detach().to(weight_dtype)
        self.layers = []
        for layer in inner.layers:
            self.layers.append(LayerWeights(layer, quantization, dtype, weight_dtype))
            if release_model:
                attn, mlp = layer.self_attn, layer.mlp
                release_matrices(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                 *[getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj") if hasattr(mlp, n)],
                                 *([] if hasattr(mlp, "gate_proj") else [mlp]))  # MoE: router and experts
        self.norm = cast_module(inner.norm, dtype)
        self.lm_head = blocks(model.lm_head) or make_linear(model.lm_head.weight, quantization, dtype, weight_dtype)
        if release_model:
            release_matrices(model.lm_head, inner.embed_tokens)
        positions = torch.arange(kv.max_len)[None]
        with torch.no_grad():
            cos, sin = inner.rotary_emb(positions)  # [1, T, D] fp32, same values the model computes
        self.cos_table, self.sin_table = cos[0], sin[0]
        self.vocab_size = cfg.vocab_size
        self.fused = None
        # prompt rows per step the kernel takes; more go to the torch path. bf16 weights and activations on a CPU
        # with native bf16 GEMMs (AVX512-BF16): torch beats the kernel's fp32 math from a few dozen rows
        qkv = self.layers[0].qkv if self.layers else None
        native = isinstance(qkv, DenseLinear) and qkv.weight.dtype == dtype == torch.bfloat16 and not qkv.upcast
        self.kernel_prompt_rows = NATIVE_BF16_KERNEL_ROWS if native else None
        self.lora = RowLoRA(cfg, dtype)

    def enable_fused(self) -> str | None:
        """Route steps through the fused C kernel, and the dense products of the torch path's prompt chunks through
        its packed GEMM (also for models the kernel does not cover). -> None, or why steps stay on torch."""
        from .fused import FusedDecoder, unsupported_reason

        for lw in self.layers:
            for lin in (lw.qkv, lw.o, lw.gate_up, lw.down, self.lm_head, *(lw.moe.linears if lw.moe else ())):
                if isinstance(lin, (DenseLinear, Int8Linear)):
                    lin.packed = True
        reason = unsupported_reason(self)
        if reason is None:
            try:
                self.fused = FusedDecoder(self)
            except (OSError, ValueError) as exc:
                reason = str(exc)
        return reason

    def set_block_activations(self, mode: str) -> None:
        """How GGUF block products take their activations: "auto", "fp32" or "int8" (quant.BlockLinear). Call
        before enable_fused: the kernel reads each matrix's type once."""
        if mode not in ACTIVATION_FLAGS:
            raise ValueError(f"block_activations must be one of {', '.join(ACTIVATION_FLAGS)}, got {mode!r}")
        linears = [self.embed, self.lm_head]
        for lw in self.layers:
            linears += [lw.qkv, lw.o, lw.gate_up, lw.down, *(lw.moe.linears if lw.moe else ())]
        for lin in linears:
            if isinstance(lin, BlockLinear):
                lin.activations = mode

    @property
    def weight_bytes(self) -> int:
        """Bytes of the matrices the runner computes with, each storage once (a tied embedding and lm_head of the
        same dtype are one tensor)."""
        storages: dict[int, int] = {}  # data_ptr -> bytes
        total = 0  # torch.ao packed weights, which expose no tensors
        parts = [self.embed, self.lm_head]
        for lw in self.layers:  # MoE layers: experts instead of gate_up and down
            parts += [lw.qkv, lw.o, lw.gate_up, lw.down, *([lw.moe.router, *lw.moe.linears] if lw.moe else ())]
        for part in parts:
            tensors = [part] if isinstance(part, torch.Tensor) else [
                t for t in (getattr(part, n, None) for n in ("weight", "qweight", "scales", "scales_bf16", "blocks"))
                if isinstance(t, torch.Tensor)]
            if not tensors:
                total += getattr(part, "nbytes", 0)
            for t in tensors:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return total + sum(storages.values())

    # ---------------------------------------------------------------- batch -> tensors
    def prepare(self, batch: Batch) -> tuple[StepInputs, list]:
        """Tensors for one step and the sequences that get a token, in sample_rows order."""
        decode = sorted(batch.decode, key=lambda s: s.slot)
        ids = [s.output_token_ids[-1] if s.output_token_ids else s.prompt_token_ids[-1] for s in decode]
        pos = [s.num_computed for s in decode]
        slots = [s.slot for s in decode]
        fused, sampled = None, list(decode)
        if self.fused is not None and all(s.lora < 0 for s in decode):  # the kernel runs no LoRA
            if self._kernel_takes(batch.prefill):
                return self._prepare_kernel(decode, batch.prefill, ids, pos, slots)
            if decode:  # the chunks take the torch path, the decode rows stay on the kernel
                ids_t, pos_t, slots_t = torch.tensor([ids, pos, slots])
                fused = StepInputs(ids=ids_t, positions=pos_t, slots=slots_t, num_decode=len(decode), kernel=True)
                decode, ids, pos, slots = [], [], [], []
        sample_rows = list(range(len(decode)))
        chunks, scored, pooled = [], [], []
        adapter_rows: dict[int, list[int]] = {}
        for i, s in enumerate(decode):
            if s.lora >= 0:
                adapter_rows.setdefault(s.lora, []).append(i)
        for c in batch.prefill:
            row0 = len(ids)
            if c.seq.lora >= 0:
                adapter_rows.setdefault(c.seq.lora, []).extend(range(row0, row0 + c.length))
            ids += c.token_ids
            pos += range(c.start, c.start + c.length)
            slots += [c.seq.slot] * c.length
            mask = None
            if c.start > 0 and c.length > 1:  # causal mask aligned bottom-right: query i sees keys <= start + i
                q = torch.arange(c.start, c.start + c.length)[:, None]
                mask = torch.zeros(c.length, c.start + c.length, dtype=self.attn_dtype)
                mask.masked_fill_(torch.arange(c.start + c.length)[None, :] > q, torch.finfo(self.attn_dtype).min)
            chunks.append((row0, c.length, c.seq.slot, c.start, mask))
            for r in c.sample_rows:
                sample_rows.append(row0 + r)
                sampled.append(c.seq)
            if c.tokens is None and c.seq.whole_prompt:  # row r's logits score the prompt token at start + r + 1
                n = min(c.length, len(c.seq.prompt_token_ids) - 1 - c.start)
                if c.seq.prompt_logprobs is not None and n > 0:
                    scored.append((c.seq, c.start + 1, range(row0, row0 + n)))
                if c.seq.embed:
                    pooled.append((c.seq, range(row0, row0 + c.length)))
        for _, *_, rows in scored + pooled:
            sample_rows += rows
        pos_t, slots_t = torch.tensor(pos), torch.tensor(slots)
        nd = len(decode)
        decode_slots, decode_len, decode_mask = slice(0, 0), 0, None
        if nd:
            lens = [p + 1 for p in pos[:nd]]
            decode_len = max(lens)
            s0 = slots[0]
            contiguous = slots[:nd] == list(range(s0, s0 + nd))
            decode_slots = slice(s0, s0 + nd) if contiguous else slots_t[:nd]
            if min(lens) != decode_len:
                lens_t = torch.tensor(lens)[:, None]
                decode_mask = torch.zeros(nd, 1, 1, decode_len, dtype=self.attn_dtype)
                decode_mask[:, 0, 0].masked_fill_(torch.arange(decode_len)[None, :] >= lens_t,
                                                  torch.finfo(self.attn_dtype).min)
        inputs = StepInputs(
            ids=torch.tensor(ids), cos=self.cos_table[pos_t][:, None], sin=self.sin_table[pos_t][:, None],
            write_idx=self.kv.write_index(slots_t, pos_t), num_decode=nd, decode_slots=decode_slots,
            decode_len=decode_len, decode_mask=decode_mask, chunks=chunks,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long), positions=pos_t, slots=slots_t,
            lora_groups=[(a, torch.tensor(rows)) for a, rows in adapter_rows.items()], fused_decode=fused,
            scored=[(seq, pos0, len(rows)) for seq, pos0, rows in scored], pooled=[(seq, len(r)) for seq, r in pooled])
        return inputs, sampled

    def _kernel_takes(self, chunks: list) -> bool:
        """The kernel runs no LoRA, scores no prompts, pools no hidden states, and takes kernel_prompt_rows at most."""
        rows, limit = sum(c.length for c in chunks), self.kernel_prompt_rows
        return all(c.seq.lora < 0 and not c.seq.whole_prompt for c in chunks) and (limit is None or rows < limit)

    @staticmethod
    def _prepare_kernel(decode: list, chunks: list, ids: list, pos: list, slots: list) -> tuple[StepInputs, list]:
        """The whole step as one fused C call: the decode rows, then each chunk's rows (consecutive positions of
        its slot); logits of the sampled rows only (a chunk that ends a prompt: its last row)."""
        sampled, rows = list(decode), list(range(len(decode)))
        for c in chunks:
            rows += [len(ids) + r for r in c.sample_rows]
            sampled += [c.seq] * len(c.sample_rows)
            ids += c.token_ids
            pos += range(c.start, c.start + c.length)
            slots += [c.seq.slot] * c.length
        ids_t, pos_t, slots_t = torch.tensor([ids, pos, slots])
        return StepInputs(ids=ids_t, positions=pos_t, slots=slots_t, num_decode=len(decode), kernel=True,
                          sample_rows=torch.tensor(rows, dtype=torch.long) if chunks else None), sampled

    # ---------------------------------------------------------------- forward
    def compile(self) -> None:
        """torch.compile the decode-only step (dynamic batch and KV length); minutes of compile time on 2 cores."""
        self._compiled_decode = torch.compile(self._decode_forward, dynamic=True)

    def forward(self, inp: StepInputs) -> torch.Tensor:
        """-> logits [R, V] fp32 for inp.sample_rows."""
        if inp.kernel:  # one C call (engine/fused.py)
            return self.fused(inp.ids, inp.slots, inp.positions, inp.sample_rows)
        if inp.fused_decode is not None:  # different sequences, different KV slots: the two parts are independent
            d = inp.fused_decode
            return torch.cat([self.fused(d.ids, d.slots, d.positions), self._forward_torch(inp)])
        return self._forward_torch(inp)

    @torch.no_grad()
    def _forward_torch(self, inp: StepInputs) -> torch.Tensor:
        if not inp.chunks and not inp.lora_groups and getattr(self, "_compiled_decode", None) is not None:
            slots = inp.decode_slots
            if isinstance(slots, slice):
                slots = torch.arange(slots.start, slots.stop)
            mask = inp.decode_mask
            if mask is None:
                mask = torch.zeros(inp.num_decode, 1, 1, inp.decode_len, dtype=self.attn_dtype)
            return self._compiled_decode(inp.ids, inp.cos, inp.sin, inp.write_idx, slots, mask)
        h = self._embed(inp.ids)  # [N, H]
        groups = inp.lora_groups
        for layer_idx, lw in enumerate(self.layers):
            a = self._attention(layer_idx, lw, lw.ln1(h), inp)
            h = h + self.lora.apply(lw.o(a), a, layer_idx, "o", groups)
            extra = (lambda name, y, x, i=layer_idx: self.lora.apply(y, x, i, name, groups)) if groups else None
            h = h + _ffn(lw, lw.ln2(h), extra)
        h = self.norm(h[inp.sample_rows])
        if inp.pooled:  # their rows come last and need no logits
            split = h.shape[0] - sum(n for _, n in inp.pooled)
            h, inp.hidden = h[:split], h[split:].float()
            if not split:
                return torch.empty(0, self.vocab_size)
        return self.lm_head(h).float()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed, BlockLinear):
            return self.embed.dequantize(ids).to(self.dtype)
        return F.embedding(ids, self.embed).to(self.dtype)

    def _qkv_to_cache(self, layer_idx: int, lw: LayerWeights, x: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, write_idx: torch.Tensor, groups=()) -> torch.Tensor:
        """x [N, H] -> q [N, Hq, D] (RoPE applied); k (RoPE applied) and v go into the KV rows write_idx."""
        n, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.lora.apply(lw.qkv(x), x, layer_idx, "qkv", groups)  # [N, (Hq + 2 H_kv) * D]
        if lw.q_norm is None:  # q and k heads are adjacent: one RoPE call for both
            qk = apply_rotary(qkv[:, :(hq + hkv) * d].view(n, hq + hkv, d), cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]
        else:  # per-head norm before RoPE (minimind-3, Qwen3)
            q = lw.q_norm(qkv[:, :hq * d].view(n, hq, d))
            k = lw.k_norm(qkv[:, hq * d:(hq + hkv) * d].view(n, hkv, d))
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = qkv[:, (hq + hkv) * d:]  # [N, H_kv * D]
        self.kv.k_rows[layer_idx].index_copy_(0, write_idx, k.reshape(n * hkv, d).to(self.kv_dtype))
        self.kv.v_rows[layer_idx].index_copy_(0, write_idx, v.reshape(n * hkv, d).to(self.kv_dtype))
        return q

    def _attend_decode(self, layer_idx: int, q: torch.Tensor, slots, length: int, mask) -> torch.Tensor:
        """q [B, Hq, D], one query per row, over the first `length` keys of KV slots [B] -> [B, Hq * D]."""
        keys = self.kv.k[layer_idx][slots, :, :length].to(self.attn_dtype)  # [B, H_kv, L, D]
        values = self.kv.v[layer_idx][slots, :, :length].to(self.attn_dtype)
        o = F.scaled_dot_product_attention(q[:, :, None].to(self.attn_dtype), keys, values, attn_mask=mask,
                                           scale=self.scale, enable_gqa=self.gqa)  # [B, Hq, 1, D]
        return o.reshape(q.shape[0], -1)

    def _decode_forward(self, ids, cos, sin, write_idx, slots, mask) -> torch.Tensor:
        """Decode rows only, tensors only (what torch.compile sees): ids [B], slots [B], mask [B, 1, 1, L]."""
        h = self._embed(ids)
        for layer_idx, lw in enumerate(self.layers):
            q = self._qkv_to_cache(layer_idx, lw, lw.ln1(h), cos, sin, write_idx)
            o = self._attend_decode(layer_idx, q, slots, mask.shape[-1], mask)
            h = h + lw.o(o.to(self.dtype))
            h = h + _ffn(lw, lw.ln2(h))
        return self.lm_head(self.norm(h)).float()

    def _attention(self, layer_idx: int, lw: LayerWeights, x: torch.Tensor, inp: StepInputs) -> torch.Tensor:
        n, hq, d = x.shape[0], self.num_heads, self.head_dim
        q = self._qkv_to_cache(layer_idx, lw, x, inp.cos, inp.sin, inp.write_idx, inp.lora_groups)
        out = torch.empty(n, hq * d, dtype=x.dtype)
        nd = inp.num_decode
        if nd:
            out[:nd] = self._attend_decode(layer_idx, q[:nd], inp.decode_slots, inp.decode_len, inp.decode_mask)
        k_cache, v_cache = self.kv.k[layer_idx], self.kv.v[layer_idx]  # [slots, H_kv, T, D]
        for row0, length, slot, pos0, mask in inp.chunks:
            qc = q[row0:row0 + length].transpose(0, 1)[None].to(self.attn_dtype)  # [1, H, n, D]
            keys = k_cache[slot:slot + 1, :, :pos0 + length].to(self.attn_dtype)
            values = v_cache[slot:slot + 1, :, :pos0 + length].to(self.attn_dtype)
            o = F.scaled_dot_product_attention(qc, keys, values, attn_mask=mask, is_causal=mask is None and length > 1,
                                               scale=self.scale, enable_gqa=self.gqa)
            out[row0:row0 + length] = o[0].transpose(0, 1).reshape(length, hq * d)
        return out

    @staticmethod
    def hand_out_prompt_rows(inp: StepInputs, logits: torch.Tensor, num_sampled: int) -> torch.Tensor:
        """Give the scored rows' logits and the pooled hidden states of a forward to their sequences; -> the
        logits of the sampled rows."""
        at = num_sampled
        for seq, pos0, n in inp.scored:
            seq.add_prompt_logprobs(logits[at:at + n], pos0)
            at += n
        at = 0
        for seq, n in inp.pooled:
            seq.add_hidden(inp.hidden[at:at + n])
            at += n
        return logits[:num_sampled]

    # ---------------------------------------------------------------- sampling
    def sample(self, logits: torch.Tensor, seqs: list):
        for i, seq in enumerate(seqs):  # SamplingParams.logits_processors, per row before any sampling step
            for processor in seq.logits_processors:
                logits[i] = processor(seq.output_token_ids, logits[i])
        if all(s.params.is_plain_greedy for s in seqs):  # the common chat/bench case: skip building the batch
            return logits.argmax(dim=-1), None, None, None
        return sample(logits, build_sampling_batch(seqs, logits.shape[-1]))


def _ffn(lw, x: torch.Tensor, extra=None) -> torch.Tensor:
    """The block's feed-forward: MoE, or SwiGLU with the fused gate|up weight. x [N, H] -> [N, H].
    extra(matrix name, y, x) -> y adds per-row LoRA outputs."""
    if lw.moe is not None:
        return lw.moe(x)
    gate_up = lw.gate_up(x)
    if extra is not None:
        gate_up = extra("gate_up", gate_up, x)
    gate, up = gate_up.chunk(2, dim=-1)
    a = lw.act(gate) * up
    return lw.down(a) if extra is None else extra("down", lw.down(a), a)
