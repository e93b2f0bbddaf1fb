"""The terminal conversation behind `minimind chat`: prompts with history, answers streamed with their speeds.

Tokens come from the engine on the CPU (its prefix cache keeps the conversation's KV between turns), on another
device (`--device cuda`) from transformers' `generate` with the same settings.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from queue import SimpleQueue
from time import perf_counter

from ..text.detok import IncrementalDetokenizer
from ..text.reply import parse_reply
from ..web.backend import chat_prompt, engine_outputs


def speed_line(prompt_tokens: int, prefill_s: float, decode_tokens: int, decode_s: float) -> str:
    def rate(n: int, s: float) -> str:
        return f"{n / s:.0f} tok/s" if s > 0 else "- tok/s"

    return (f"[prefill {prompt_tokens} tok in {prefill_s:.2f}s = {rate(prompt_tokens, prefill_s)} | "
            f"decode {decode_tokens} tok in {decode_s:.2f}s = {rate(decode_tokens, decode_s)}]")


def engine_tokens(llm, ids: list[int], params) -> Iterator[int]:
    """Token ids of one answer from the engine as they come (stop tokens not yielded); closing aborts it."""
    stops = set(params.stop_token_ids or ())
    with closing(engine_outputs(llm, ids, params)) as outputs:
        for out in outputs:
            yield from (t for t in out.delta_token_ids if t not in stops)


def hf_tokens(model, ids: list[int], params) -> Iterator[int]:
    """The same from transformers' generate (devices the engine does not run on); closing stops it."""
    import torch
    from transformers import StoppingCriteria

    done = threading.Event()
    tokens: SimpleQueue = SimpleQueue()

    class Streamer:  # generate() calls put(prompt ids) first, then put(new ids) per step, then end()
        prompt = True

        def put(self, value):
            if not self.prompt:
                for t in value.reshape(-1).tolist():
                    tokens.put(t)
            self.prompt = False

        def end(self):
            tokens.put(None)

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), done.is_set(), dtype=torch.bool, device=input_ids.device)

    if params.seed is not None:
        torch.manual_seed(params.seed)
    sample = params.temperature > 0
    kwargs = dict(do_sample=sample, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k) \
        if sample else dict(do_sample=False)
    input_ids = torch.tensor([ids], device=model.device)
    failed: list[BaseException] = []

    def run():
        try:
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           max_new_tokens=params.max_tokens, repetition_penalty=params.repetition_penalty,
                           eos_token_id=sorted(params.stop_token_ids or ()),
                           pad_token_id=next(iter(params.stop_token_ids or [0])), streamer=Streamer(),
                           stopping_criteria=[Stop()], **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            failed.append(exc)
        tokens.put(None)  # the reader stops at the first None (end() put one already when generate finished)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    stops = set(params.stop_token_ids or ())
    try:
        while (t := tokens.get()) is not None:
            if t not in stops:
                yield t
    finally:
        done.set()
        worker.join()
    if failed:
        raise failed[0]


class Conversation:
    """Builds each prompt (template or bos + text), streams the answer, keeps the last `historys` turns.

    generate(ids, params) -> iterator of token ids: `engine_tokens` bound to an LLM, or `hf_tokens` to a model."""

    def __init__(self, generate, tokenizer, params, info, *, context: int | None = None, system: str | None = None,
                 historys: int = 0, open_thinking: bool | None = None, pretrain: bool = False,
                 show_speed: bool = True):
        self.generate, self.tokenizer, self.params, self.info, self.context = generate, tokenizer, params, info, context
        self.system, self.historys, self.open_thinking = system, max(historys, 0), open_thinking
        self.pretrain, self.show_speed = pretrain, show_speed
        self.turns: list[tuple[str, str]] = []

    def prompt_text(self, question: str) -> str:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.turns[-self.historys:] if self.historys else []:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": question})
        return chat_prompt(self.tokenizer, messages, self.pretrain, self.open_thinking)

    def answer(self, question: str, out=None) -> str:
        """Stream the answer to `out` (stdout); Ctrl-C stops this answer only. Returns the text written."""
        out = out or sys.stdout
        ids = self.tokenizer.encode(self.prompt_text(question), add_special_tokens=False)
        if self.context and len(ids) >= self.context:
            self.info.print(f"the prompt has {len(ids)} tokens, the model's context is {self.context}: lower "
                            "--historys", style="red", markup=False)
            return ""
        detok = IncrementalDetokenizer(self.tokenizer)
        pieces: list[str] = []
        count, stopped = 0, False
        start = first = last = perf_counter()
        tokens = self.generate(ids, self.params)
        try:
            for token in tokens:
                last = perf_counter()
                first = last if count == 0 else first
                count += 1
                if piece := detok.push(token):
                    pieces.append(piece)
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:
            stopped = True
        finally:
            tokens.close()  # frees the engine's slot at once when the answer was stopped
        end = perf_counter()
        pieces.append(detok.flush())
        out.write(pieces[-1] + "\n")
        out.flush()
        if stopped:
            self.info.print("[stopped]", style="yellow", markup=False)
        if self.show_speed:  # prefill = time to the first token; decode = the steps after it (n-1 tokens)
            prefill = (first if count else end) - start
            self.info.print(speed_line(len(ids), prefill, max(count - 1, 0), last - first if count else 0.0),
                            style="dim", markup=False, highlight=False)
        reply = "".join(pieces)
        if not self.pretrain:
            self.turns.append((question, parse_reply(reply, started_in_think=bool(self.open_thinking),
                                                     parse_tools=False)[1]))
        return reply
