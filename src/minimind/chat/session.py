"""The terminal chat behind `minimind chat`: load, then stream answers with their prefill/decode speeds."""
from __future__ import annotations

import argparse
import sys
from time import perf_counter

from .detok import IncrementalDetokenizer
from .generate import GenerationSettings, stop_token_ids, stream_generate
from .template import is_pretrain_weight, pretrain_prompt, render_prompt, split_reasoning

# The original eval_llm.py's auto-test questions, and an English set for the (English) default model.
QUESTIONS_ZH = ["你有什么特长？", "为什么天空是蓝色的", "请用Python写一个计算斐波那契数列的函数",
                '解释一下"光合作用"的基本过程', "如果明天下雨，我应该如何出门", "比较一下猫和狗作为宠物的优缺点",
                "解释什么是机器学习", "推荐一些中国的美食"]
QUESTIONS_EN = ["What are you good at?", "Why is the sky blue?",
                "Write a Python function that computes Fibonacci numbers.",
                "Explain the basic process of photosynthesis.", "If it rains tomorrow, how should I go out?",
                "Compare cats and dogs as pets.", "What is machine learning?", "Recommend some Chinese dishes."]


def speed_line(prompt_tokens: int, prefill_s: float, decode_tokens: int, decode_s: float) -> str:
    def rate(n: int, s: float) -> str:
        return f"{n / s:.0f} tok/s" if s > 0 else "- tok/s"

    return (f"[prefill {prompt_tokens} tok in {prefill_s:.2f}s = {rate(prompt_tokens, prefill_s)} | "
            f"decode {decode_tokens} tok in {decode_s:.2f}s = {rate(decode_tokens, decode_s)}]")


class ChatSession:
    """Builds each prompt (template or bos + text), streams the answer, keeps the last `historys` turns."""

    def __init__(self, model, tokenizer, settings: GenerationSettings, info, *, system: str | None = None,
                 historys: int = 0, open_thinking: bool | None = None, pretrain: bool = False, show_speed: bool = True,
                 llm=None):
        self.model, self.tokenizer, self.settings, self.info = model, tokenizer, settings, info
        self.llm = llm  # the engine: its prefix cache keeps the conversation's KV between turns
        self.system, self.historys, self.open_thinking = system, max(historys, 0), open_thinking
        self.pretrain, self.show_speed = pretrain, show_speed
        self._stream = None
        self.turns: list[tuple[str, str]] = []

    def prompt_text(self, question: str) -> str:
        if self.pretrain:
            return pretrain_prompt(self.tokenizer, question)
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.turns[-self.historys:] if self.historys else []:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": question})
        return render_prompt(self.tokenizer, messages, open_thinking=self.open_thinking)

    def answer(self, question: str, out=None) -> str:
        """Stream the answer to `out` (stdout); Ctrl-C stops this answer only. Returns the text written."""
        out = out or sys.stdout
        ids = self.tokenizer.encode(self.prompt_text(question), add_special_tokens=False)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and len(ids) >= limit:
            self.info.print(f"the prompt has {len(ids)} tokens, the model's context is {limit}: lower --historys",
                            style="red", markup=False)
            return ""
        detok = IncrementalDetokenizer(self.tokenizer)
        pieces: list[str] = []
        count, stopped = 0, False
        start = first = last = perf_counter()
        try:
            tokens = self._engine_tokens(ids) if self.llm is not None else stream_generate(
                self.model, self.tokenizer, ids, self.settings)
            for token in tokens:
                last = perf_counter()
                first = last if count == 0 else first
                count += 1
                piece = detok.push(token)
                if piece:
                    pieces.append(piece)
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:
            stopped = True
        end = perf_counter()
        pieces.append(detok.flush())
        out.write(pieces[-1] + "\n")
        out.flush()
        if stopped:
            self.info.print("[stopped]", style="yellow", markup=False)
        if self.show_speed:
            # prefill = time to the first token; decode = the steps after it (n-1 tokens)
            prefill = (first if count else end) - start
            self.info.print(speed_line(len(ids), prefill, max(count - 1, 0), last - first if count else 0.0),
                            style="dim", markup=False, highlight=False)
        if stopped and self.llm is not None and self._stream is not None:
            self._stream.abort()
        reply = "".join(pieces)
        if not self.pretrain:
            self.turns.append((question, split_reasoning(reply, started_in_think=bool(self.open_thinking))[1]))
        return reply


    def _engine_tokens(self, ids: list[int]):
        """Token ids of one answer from the engine, as they come (stop tokens are not yielded)."""
        from ..engine import SamplingParams

        st = self.settings
        params = SamplingParams(max_tokens=st.max_new_tokens, temperature=st.temperature, top_p=st.top_p,
                                top_k=st.top_k, repetition_penalty=st.repetition_penalty, seed=st.seed,
                                stop_token_ids=sorted(st.stop_ids))
        self._stream = self.llm.stream(ids, params)
        for update in self._stream:
            for token in update.outputs[0].delta_token_ids:
                if token not in st.stop_ids:
                    yield token


def _load(source: dict, args: argparse.Namespace, device: str):
    from ..checkpoint.detect import detect
    from ..checkpoint.loader import check_tokenizer_matches, load_model, load_tokenizer

    if source["model"] is None:
        try:
            from ..checkpoint import default_model  # noqa: F401  (present once the default model is installed)
        except ImportError as exc:
            raise RuntimeError(f"no model given and the embedded default model is unavailable ({exc}); pass "
                               "--model PATH, or --load_from/--save_dir/--weight for the original layout") from None
    if source["model"] is not None:
        detect(source["model"])  # an unusable model path is named as such, not as a tokenizer problem
    tokenizer = load_tokenizer(source["tokenizer"])  # before the weights: it is quick and fails early
    # On CPU the engine runs the model: its plain-torch class loads without transformers' modeling stack (~90 MB);
    # HF generate (other devices) needs MiniMindForCausalLM.
    model = load_model(source["model"], inference_rope_scaling=args.inference_rope_scaling,
                       dtype=None if args.dtype == "auto" else args.dtype, device=device, light=device == "cpu")
    check_tokenizer_matches(tokenizer, model.config, where=str(source["tokenizer"] or "default tokenizer"))
    if args.lora_weight not in (None, "", "None", "none"):
        from ..model.lora import load_lora, resolve_lora_path

        path = resolve_lora_path(args.lora_weight, args.save_dir, args.hidden_size or model.config.hidden_size,
                                 bool(args.use_moe))
        load_lora(model, path)
    return model, tokenizer


def _utf8_safe() -> None:
    # A non-UTF-8 console must not crash mid-answer on a Chinese character.
    for stream in (sys.stdout, sys.stderr):
        if (stream.encoding or "").lower().replace("-", "") != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def run(args: argparse.Namespace) -> int:
    import warnings

    import torch

    # torch warns about the protocol of a non-checkpoint pickle right before the loader's own clear error
    warnings.filterwarnings("ignore", message="Detected pickle protocol")
    from rich.console import Console

    from ..apps.chat import resolve_sampling, resolve_source

    _utf8_safe()
    single = args.prompt is not None
    info = Console(stderr=single, highlight=False)
    source = resolve_source(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = _load(source, args, device)
    cfg = model.config
    if args.num_hidden_layers and args.num_hidden_layers != cfg.num_hidden_layers:
        info.print(f"warning: --num_hidden_layers {args.num_hidden_layers} ignored: the weights have "
                   f"{cfg.num_hidden_layers} layers", style="yellow", markup=False)
    temperature, top_p = resolve_sampling(args)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=top_p,
                                  top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                                  stop_ids=stop_token_ids(tokenizer, model))
    open_thinking = None if args.open_thinking is None else bool(args.open_thinking)
    llm = None
    if device == "cpu":  # the engine (preallocated KV, prefix cache across turns) is the CPU fast path
        from ..engine import LLM

        llm = LLM(model, tokenizer=tokenizer, max_num_seqs=1, max_model_len=min(cfg.max_position_embeddings, 4096))
    name = "embedded default model (SmolLM2-135M-Instruct)" if source["model"] is None else str(source["model"])
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) / 1e6
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    # With the engine the session needs only its config: dropping the model frees the weights the engine keeps
    # its own (fused) copies of.
    session = ChatSession(model if llm is None else llm, tokenizer, settings, info, system=args.system,
                          historys=args.historys, open_thinking=open_thinking,
                          pretrain=is_pretrain_weight(source["weight"]), show_speed=bool(args.show_speed), llm=llm)
    del model
    info.print(f"[bold cyan]MiniMind chat[/] {name} [dim]| {getattr(cfg, 'era', cfg.model_type)}, {params:.2f}M "
               f"params, {device} {dtype}, temperature "
               f"{temperature}, top_p {top_p}{', pretrain prompt' if session.pretrain else ''}[/]")
    if single:
        session.answer(args.prompt)
        return 0
    mode = args.mode
    prompt = "[0] 自动测试 auto test\n[1] 手动输入 manual chat\n"
    while mode is None:  # ask again on a typo (e.g. a question typed before choosing) instead of exiting
        try:
            choice = input(prompt).strip()
        except (EOFError, KeyboardInterrupt):
            return 0
        if choice in ("0", "1"):
            mode = int(choice)
        else:
            prompt = f"please type 0 or 1 (got {choice[:40]!r}): "
    info.print("[dim]Ctrl-C stops an answer; an empty line or Ctrl-D exits.[/]")
    if mode == 0:
        english = source["model"] is None or len(tokenizer) != 6400
        for question in QUESTIONS_EN if english else QUESTIONS_ZH:
            print(f"💬: {question}\n🤖: ", end="", flush=True)
            session.answer(question)
            print()
        return 0
    while True:
        try:
            question = input("💬: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not question.strip():
            return 0
        print("🤖: ", end="", flush=True)
        session.answer(question)
        print()
