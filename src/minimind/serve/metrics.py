"""GET /metrics in the Prometheus text format (names follow vLLM's `vllm:*` set with a `minimind_` prefix).

One CollectorRegistry per app (no process-global state), so tests can run several servers in one process.
Request timings come from the engine's own RequestOutput.metrics (arrival / first token / finished), recorded on
the engine thread by a step hook; gauges are read from the engines when scraped.
"""
from __future__ import annotations

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("minimind_http_requests", "HTTP requests by route and status",
                                     ["method", "route", "status"], registry=r)
        self.requests = Counter("minimind_request_success", "finished generation requests by finish reason",
                                ["model", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("minimind_prompt_tokens", "prompt tokens of finished requests", ["model"],
                                     registry=r)
        self.cached_tokens = Counter("minimind_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache",
                                     ["model"], registry=r)
        self.generation_tokens = Counter("minimind_generation_tokens", "generated tokens", ["model"], registry=r)
        self.ttft = Histogram("minimind_time_to_first_token_seconds", "arrival to first token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.latency = Histogram("minimind_e2e_request_latency_seconds", "arrival to last token", ["model"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("minimind_num_requests_running", "sequences holding a KV slot", ["model"], registry=r)
        self.waiting = Gauge("minimind_num_requests_waiting", "sequences queued for a KV slot", ["model"], registry=r)
        self.kv_usage = Gauge("minimind_kv_cache_usage_perc", "fraction of KV slots in use (1 = full)", ["model"],
                              registry=r)
        self._engines: dict = {}

    def attach(self, model_id: str, engine) -> None:
        self._engines[model_id] = engine
        engine.step_hooks.append(lambda outputs: self._on_step(model_id, outputs))

    def _on_step(self, model_id: str, outputs) -> None:
        for out in outputs:
            if not out.finished:
                continue
            m = out.metrics
            for o in out.outputs:
                self.requests.labels(model_id, o.finish_reason or "unknown").inc()
                self.generation_tokens.labels(model_id).inc(len(o.token_ids))
            self.prompt_tokens.labels(model_id).inc(len(out.prompt_token_ids))
            self.cached_tokens.labels(model_id).inc(out.num_cached_tokens)
            if "arrival" in m and "first_token" in m:
                self.ttft.labels(model_id).observe(m["first_token"] - m["arrival"])
            if "arrival" in m and "finished" in m:
                self.latency.labels(model_id).observe(m["finished"] - m["arrival"])

    def response(self) -> Response:
        for model_id, engine in self._engines.items():
            s = engine.stats()
            self.running.labels(model_id).set(s["running"])
            self.waiting.labels(model_id).set(s["waiting"] + max(0, s["active"] - s["running"] - s["waiting"]))
            self.kv_usage.labels(model_id).set(s["kv_usage"])
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
