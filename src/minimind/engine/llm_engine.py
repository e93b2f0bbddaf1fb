"""LLM: the engine's public face. `generate` for offline batches, `add_request / step / abort /
has_unfinished` as the step core, `stream` iterators, and an optional background thread that owns the
model while other threads (server handlers, UIs) submit through a thread-safe inbox.
"""
from __future__ import annotations

import functools
import logging
import queue
import threading
import time
import uuid

import torch

from .kv_cache import KVCache, SlotManager
from .memory import raise_malloc_thresholds
from .model_runner import ModelRunner
from .multistep import decode_steps
from .quant import native_bf16
from .request import Request, RequestStream
from .sampling import SamplingParams, new_seed
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence, Status, TokenLogprob, TopLogprob, eos_token_ids

log = logging.getLogger("minimind")


class LLM:
    """Continuous-batching generation over a preallocated slot KV cache.

    model_or_path: a MiniMindForCausalLM, a checkpoint path, or None for the embedded default model.
    dtype: "float32" / "bfloat16" (None keeps the model's). quantization: None, "int8" (int8 weights, one scale
    per output channel; the C kernels quantize activations per 32 values, kernels/q8.c), "int4" (4-bit weight
    blocks made at load: Q4_K where rows are whole 256-value super-blocks, else Q4_0; run by the GGUF block
    kernels) or "dynamic" (torch.ao quantize_dynamic). block_activations: how a GGUF's Q8_0/Q4_0/Q4_1/Q5_0 blocks
    meet the activations: "fp32" (the dequantized weights' numbers), "int8" (rounded per 32 values: llama.cpp's) or
    "auto" (fp32 for prompts and large batches, int8 for decode steps; quant.BlockLinear).
    max_model_len / max_num_seqs size the KV cache once; more requests wait in a queue. kv_dtype: its storage,
    None (fp32 when the fused kernel runs or the CPU lacks native bf16, else the activation dtype), "float32",
    "bfloat16" or "float16" (storage only: half the memory and bytes attention reads; it computes in fp32).
    fused: steps on CPU (decode rows and prompt chunks) run as one C call where the kernel covers the model
    (engine/fused.py, built at first use); rows with a LoRA adapter, prompt logprobs or embeddings take the torch
    path, whose products use its packed GEMM. False, or no C compiler, keeps every step on torch.
    lora_adapters: {name: LoRA file or state_dict}; a request picks one with `lora=name` and requests for
    different adapters share batches (an unmerged LoRA already in the model is served merged).
    stream_interval: a running request's output is handed out once its completions have this many new tokens
    (its first token and its end at once): fewer, larger stream chunks.

    Only three options change process-wide state (importing minimind changes nothing):
    threads: torch.set_num_threads; None leaves it as it is.
    keep_freed_memory: glibc keeps freed memory between steps (engine/memory.py), so a step's activations are not
    page-faulted afresh; RSS then stays at the peak of a step.
    decode_mkldnn: whether decode-only steps use oneDNN (switched around each step's forward); None: on except
    for bf16, whose oneDNN GEMV is slower.
    """

    def __init__(self, model_or_path=None, *, tokenizer=None, dtype=None, quantization: str | None = None,
                 max_model_len: int | None = None, max_num_seqs: int = 8, max_num_batched_tokens: int = 512,
                 enable_prefix_caching: bool = True, threads: int | None = None, compile: bool = False,
                 draft_model=None, num_speculative_tokens: int = 4, decode_mkldnn: bool | None = None,
                 kv_dtype=None, fused: bool = True, lora_adapters: dict | None = None, stream_interval: int = 1,
                 keep_freed_memory: bool = True, block_activations: str = "auto"):
        from ..checkpoint.dtypes import resolve_dtype
        from ..checkpoint.loader import load_model, load_tokenizer
        from ..checkpoint.lora import read_adapter
        from ..errors import CheckpointError

        if threads:
            torch.set_num_threads(threads)
        if keep_freed_memory:
            raise_malloc_thresholds()
        owned = not isinstance(model_or_path, torch.nn.Module)  # loaded here: nobody else holds these weights
        model = model_or_path
        if owned:
            # the plain-torch MiniMindLM: the engine needs no transformers modeling code (~90 MB of RSS)
            model = load_model(model_or_path, dtype="float32" if quantization else dtype, light=True,
                               keep_blocks=quantization is None and dtype in (None, "float32", torch.float32))
            if tokenizer is None:
                try:
                    tokenizer = load_tokenizer(model_or_path)
                except CheckpointError as exc:  # weights without tokenizer files still serve token-id prompts
                    log.warning("no tokenizer (%s): only token-id prompts will work", exc)
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self._model_path = getattr(model, "name_or_path", None) or None  # where sampling_defaults are read from
        if quantization == "dynamic":
            act_dtype = torch.float32
        elif dtype is not None:
            act_dtype = resolve_dtype(dtype)
        else:
            act_dtype = torch.bfloat16 if quantization == "int8" else next(model.parameters()).dtype
        self.dtype, self.quantization = act_dtype, quantization
        self.config = cfg = model.config
        model = model.eval()
        self.max_model_len = min(max_model_len or 2048, cfg.max_position_embeddings)
        self.max_num_seqs = max_num_seqs
        if kv_dtype is None:  # bf16 KV only where attention runs natively in bf16: the fused kernel keeps fp32,
            # and without AVX512-BF16 bf16 attention is emulated and several times slower than fp32
            native = act_dtype == torch.float32 or (native_bf16() and not (fused and not compile))
            kv_dtype = act_dtype if native else torch.float32
        # float16 is a KV storage format (half the bytes attention streams, 11-bit mantissa), never a compute dtype
        half = kv_dtype == torch.float16 or str(kv_dtype).lower() in ("float16", "fp16", "half")
        self.kv_dtype = torch.float16 if half else resolve_dtype(kv_dtype)
        self.kv = KVCache(cfg.num_hidden_layers, max_num_seqs, cfg.num_key_value_heads, self.max_model_len,
                          cfg.head_dim, self.kv_dtype)
        # Without native bf16 (AVX2 CPUs) bf16 and int8 weights meet fp32 activations, as llama.cpp computes F16:
        # emulated bf16 math is slower, and rounding every activation flips near-tied answers. MoE experts stay
        # in bf16 (an fp32 copy would double their memory).
        compute = act_dtype
        if act_dtype == torch.bfloat16 and not native_bf16() and not getattr(cfg, "use_moe", False):
            compute = torch.float32
        adapters = {name: read_adapter(model, source)[1] for name, source in (lora_adapters or {}).items()}
        self.runner = ModelRunner(model, self.kv, compute, quantization, weight_dtype=act_dtype, release_model=owned)
        self.runner.set_block_activations(block_activations)
        self.scheduler = Scheduler(SlotManager(max_num_seqs, enable_prefix_caching), self.kv, max_num_batched_tokens)
        # oneDNN's bf16 GEMV streams weights at half the speed of the plain kernel: turn it off for decode steps.
        self.decode_mkldnn = decode_mkldnn if decode_mkldnn is not None else act_dtype != torch.bfloat16
        self.eos_token_ids = eos_token_ids(cfg, tokenizer)
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1 (tokens per streamed output), got {stream_interval}")
        self.stream_interval = stream_interval
        self.speculator = None
        if draft_model is not None:
            from .spec import Speculator

            self.speculator = Speculator(self, draft_model, num_speculative_tokens)
        self.lora_names = {name: self.runner.lora.add(pairs) for name, pairs in adapters.items()}
        if compile:
            self.runner.compile()
        elif fused and torch.device(getattr(model, "device", "cpu")).type == "cpu" and (why := self.runner.enable_fused()):
            log.info("decode steps use the torch path (fused kernel: %s)", why)
        self._requests: dict[str, Request] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @functools.cached_property
    def sampling_defaults(self):
        """What the model's own files recommend for sampling (checkpoint/generation.py); read on first use, since
        parsing a GGUF's metadata takes seconds. The server applies it to fields a request leaves out."""
        from ..checkpoint.generation import sampling_defaults

        return sampling_defaults(self._model_path, self.config)

    # ---------------------------------------------------------------- requests (any thread)
    def encode(self, prompt) -> list[int]:
        """str -> token ids; list of {"role", "content"} messages -> chat template + ids; list[int] as is."""
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            if self.tokenizer is None:
                raise ValueError("chat messages need a tokenizer")
            from ..text.template import render_prompt

            prompt = render_prompt(self.tokenizer, list(prompt))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids or LLM(..., tokenizer=...)")
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return [int(t) for t in prompt]

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    lora: str | None = None) -> str:
        """Queue a prompt (text, chat messages or token ids); returns its request id. Thread-safe.
        lora: the name of one of `lora_adapters` (None = the base model)."""
        return self._submit(prompt, params, request_id, stream=False, lora=lora).request_id

    def _submit(self, prompt, params: SamplingParams | None, request_id: str | None, stream: bool,
                lora: str | None = None) -> Request:
        params = params or SamplingParams()
        if lora is not None and lora not in self.lora_names:
            raise ValueError(f"unknown LoRA adapter {lora!r}; loaded: {sorted(self.lora_names) or 'none'}")
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) + (params.max_tokens != 0) > self.max_model_len:  # max_tokens=0 may fill the context
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        vocab = self.config.vocab_size
        for field, tokens in (("prompt", ids), ("stop_token_ids", params.stop_token_ids or ()),
                              ("logit_bias", params.logit_bias or {})):
            bad = next((t for t in tokens if not 0 <= int(t) < vocab), None)
            if bad is not None:
                raise ValueError(f"{field}: token id {bad} is outside the vocabulary (0 to {vocab - 1})")
        request_id = request_id or uuid.uuid4().hex
        base_seed = params.seed if params.seed is not None else new_seed()
        seqs = [Sequence(request_id, i, ids, params, base_seed + i, self.eos_token_ids, self.tokenizer)
                for i in range(params.n)]
        for seq in seqs:
            seq.wait_for = seqs[0] if seq is not seqs[0] else None
            seq.lora = -1 if lora is None else self.lora_names[lora]
        req = Request(request_id, ids, seqs, queue.Queue() if stream else None, {"arrival": time.perf_counter()})
        self._post("add", req)
        return req

    def abort(self, request_id: str) -> None:
        """Stop a request; its slot is freed at the next step. Thread-safe."""
        self._post("abort", request_id)

    def _post(self, kind: str, item) -> None:
        self._inbox.put((kind, item))
        with self._wakeup:
            self._wakeup.notify()

    def has_unfinished(self) -> bool:
        return not self._inbox.empty() or self.scheduler.has_unfinished()

    # ---------------------------------------------------------------- the step (model-owning thread)
    def step(self) -> list[RequestOutput]:
        """Admit new requests, run one batched forward, sample, and return what changed."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("the background loop owns the model: use stream()/generate() instead of step()")
        touched: dict[str, Request] = {}
        self._drain_inbox(touched)
        batch = self.scheduler.schedule()
        if batch:
            if self.speculator is not None and self.speculator.applies(batch):
                results = self.speculator.step(batch)
            else:
                results = self._run(batch)
            now = time.perf_counter()
            for seq, tokens in results:
                req = self._requests[seq.request_id]
                req.metrics.setdefault("first_token", now)
                if not tokens:  # max_tokens=0: its prompt is computed
                    seq.finish_prompt_only()
                for token, logprob in tokens:
                    if seq.is_finished:
                        break
                    if logprob is not None:
                        seq.logprobs.append(logprob)
                    seq.append_token(token, self.max_model_len)
                if seq.is_finished:
                    self.scheduler.finish(seq)
                touched[seq.request_id] = req
        return self._emit(touched)

    def _run(self, batch):
        """One forward + sample; -> [(seq, [(token, TokenLogprob | None)])], no tokens for a max_tokens=0 prompt
        that was completed."""
        if self._inbox.empty() and (results := decode_steps(self.runner, batch, self.max_model_len)):
            return results
        inputs, seqs = self.runner.prepare(batch)
        for chunk in batch.prefill:
            chunk.seq.num_computed += chunk.length
        for seq in batch.decode:
            seq.num_computed += 1
        use_mkldnn = self.decode_mkldnn or bool(batch.prefill)  # oneDNN is the fast GEMM for prompt chunks
        # set and restored by hand: mkldnn.flags() would also reset oneDNN's TF32 setting, with a warning
        previous = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = use_mkldnn
        try:
            logits = self.runner.forward(inputs)
        finally:
            torch.backends.mkldnn.enabled = previous
        if inputs.scored or inputs.pooled:
            logits = self.runner.hand_out_prompt_rows(inputs, logits, len(seqs))
        results = [(c.seq, []) for c in batch.prefill if c.ends_prompt and c.seq.params.max_tokens == 0]
        if not seqs:
            return results
        tokens, chosen, top_ids, top_lp = (None if t is None else t.tolist() for t in self.runner.sample(logits, seqs))
        if chosen is None:
            return results + [(seq, [(token, None)]) for seq, token in zip(seqs, tokens)]
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            k, logprob = seq.params.logprobs, None
            if k is not None:
                top = [TopLogprob(t, v) for t, v in zip(top_ids[i][:k], top_lp[i][:k])] if k and top_ids else []
                logprob = TokenLogprob(token, chosen[i], top)
            results.append((seq, [(token, logprob)]))
        return results

    def _drain_inbox(self, touched: dict) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._requests[item.request_id] = item
                for seq in item.seqs:
                    self.scheduler.add(seq)
            elif kind == "abort" and item in self._requests:
                req = self._requests[item]
                for seq in req.seqs:
                    if not seq.is_finished:
                        seq.abort()
                        self.scheduler.finish(seq)
                touched[item] = req

    def _emit(self, touched: dict) -> list[RequestOutput]:
        outputs = []
        now = time.perf_counter()
        for request_id, req in touched.items():
            if req.finished:
                req.metrics["finished"] = now
                del self._requests[request_id]
            elif not req.due(self.stream_interval):
                continue  # its new tokens go out with a later output (deltas cover everything since the last)
            out = req.output()
            if req.stream is not None:
                req.stream.put(out)
            outputs.append(out)
        return outputs

    # ---------------------------------------------------------------- convenience loops
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 lora: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Offline batch: every prompt runs to completion; outputs in input order. lora: one adapter name for
        all prompts or one per prompt (None = base model)."""
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                              and isinstance(prompts[0], (dict, int)))
        prompts = [prompts] if single else list(prompts)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        loras = lora if isinstance(lora, list) else [lora] * len(prompts)
        if self._thread is not None:
            streams = [self.stream(p, sp, lora=a) for p, sp, a in zip(prompts, plist, loras)]
            return [s.result() for s in streams]
        ids = [self.add_request(p, sp, lora=a) for p, sp, a in zip(prompts, plist, loras)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def stream(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
               lora: str | None = None) -> RequestStream:
        """Iterator of RequestOutput updates (use .outputs[i].delta_text) for one request."""
        req = self._submit(prompt, params, request_id, stream=True, lora=lora)
        return RequestStream(self, req.request_id, req.stream)

    # ---------------------------------------------------------------- background loop
    def start(self) -> LLM:
        """Run steps on a background thread that owns the model; other threads use stream()/generate()."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="minimind-engine", daemon=True)
            self._thread.start()
        return self

    @classmethod
    def launch(cls, build) -> LLM:
        """`build()` (returning an LLM) runs on a new thread that then stays the LLM's background loop, so the
        thread that loaded the weights is the one that computes with them: libgomp gives every thread that opens
        parallel regions its own team, and two teams on a small CPU make each step pay futex wake-ups."""
        ready: queue.SimpleQueue = queue.SimpleQueue()

        def main():
            try:
                llm = build()
                if not isinstance(llm, cls):
                    raise TypeError(f"build() returned {type(llm).__name__}, not an LLM")
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, which re-raises it
                ready.put(exc)
                return
            llm._stopping, llm._thread = False, threading.current_thread()
            ready.put(llm)
            llm._loop()

        threading.Thread(target=main, name="minimind-engine", daemon=True).start()
        result = ready.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def shutdown(self) -> None:
        thread, self._stopping = self._thread, True
        with self._wakeup:
            self._wakeup.notify_all()
        if thread is not None:
            thread.join()
        self._thread = None

    def _loop(self) -> None:
        while not self._stopping:
            with self._wakeup:
                while not self._stopping and not self.has_unfinished():
                    self._wakeup.wait()
            if self._stopping:
                return
            try:
                self.step()
            except BaseException as exc:  # surface it to every waiting stream instead of dying silently
                log.exception("engine step failed")
                for req in list(self._requests.values()):
                    if req.stream is not None:
                        req.stream.put(exc)
                self._requests.clear()
                self.scheduler.waiting.clear()
                for seq in list(self.scheduler.running):
                    seq.status = Status.FINISHED
                    self.scheduler.finish(seq)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

