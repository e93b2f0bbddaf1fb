"""A request (one prompt, n completions) and the iterator that streams its outputs to a caller thread."""
from __future__ import annotations

import queue
from dataclasses import dataclass, field

from .sequence import RequestOutput, Sequence


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    stream: queue.Queue | None
    metrics: dict = field(default_factory=dict)
    emitted: int = 0  # tokens of its longest completion at the last output

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def due(self, interval: int) -> bool:
        """Whether a running request's next output is due (the caller then takes it): every step at interval 1;
        else its first token at once, then whenever `interval` more tokens are in."""
        if interval == 1:
            return True
        made = max(len(s.output_token_ids) for s in self.seqs)
        if made - self.emitted >= interval or (self.emitted == 0 and made > 0):
            self.emitted = made
            return True
        return False

    def output(self) -> RequestOutput:
        first = self.seqs[0]  # prompt logprobs: complete once the prompt is computed, never changed after
        return RequestOutput(self.request_id, self.prompt_token_ids, [s.output() for s in self.seqs], self.finished,
                             first.num_cached, dict(self.metrics),
                             None if first.in_prefill else first.prompt_logprobs, first.embedding)


class RequestStream:
    """Iterates a request's RequestOutput updates; drives the engine itself when no background loop runs."""

    def __init__(self, llm, request_id: str, q: queue.Queue):
        self.llm, self.request_id, self._queue = llm, request_id, q
        self.final: RequestOutput | None = None

    def __iter__(self):
        while self.final is None:
            try:
                item = self._queue.get(timeout=0.05) if self.llm._thread else self._queue.get_nowait()
            except queue.Empty:
                if self.llm._thread is None:
                    self.llm.step()
                continue
            if isinstance(item, BaseException):
                raise RuntimeError("engine step failed") from item  # noqa: TRY004 - re-raised across threads
            if item.finished:
                self.final = item
            yield item

    def result(self) -> RequestOutput:
        for _ in self:
            pass
        return self.final

    def abort(self) -> None:
        self.llm.abort(self.request_id)
