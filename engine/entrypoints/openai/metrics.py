"""Prometheus metrics of one server, in a registry of its own (several apps can live in one
process, as tests build them). Engine gauges and counters are read from `llm.stats()` when
scraped (the caller runs the scrape in a thread: stats() waits for the engine loop between two
steps); the server itself counts requests, prompt tokens and latency. vLLM's names that
gateways route by are exported too (vllm:num_requests_running, ...)."""
from __future__ import annotations

from typing import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ...formula import Model

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class EngineCollector(Collector):
    """The engine's snapshot (`llm.stats()`) as metrics, read at scrape time."""

    def __init__(self, llm, models: Mapping[str, Model], prompt_tokens: Counter) -> None:
        self.llm = llm
        self.names = {model.spec: name for name, model in reversed(list(models.items()))}
        self.prompt_tokens = prompt_tokens

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, value=value)

    def collect(self) -> Iterable[Metric]:
        stats = self.llm.stats()
        yield self._gauge("lmarith_requests_running", "Requests being decoded.", stats.requests_running)
        yield self._gauge("lmarith_requests_waiting", "Requests queued for admission.",
                          stats.requests_waiting)
        yield self._gauge("lmarith_kv_pages_total", "KV cache pages in the pool.", stats.kv_pages_total)
        yield self._gauge("lmarith_kv_pages_free", "Free KV cache pages (cached prefixes included).",
                          stats.kv_pages_free)
        yield self._gauge("lmarith_kv_pages_cached", "Free pages still holding a reusable prefix.",
                          stats.kv_pages_cached)
        for name, doc, value in (
                ("lmarith_generated_tokens", "Tokens generated.", stats.tokens_generated),
                ("lmarith_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.",
                 stats.prefix_cache_hit_tokens),
                ("lmarith_preemptions", "Requests preempted for lack of KV pages.", stats.preemptions),
                ("lmarith_proposed_tokens", "Speculative tokens verified.", stats.proposed_tokens),
                ("lmarith_accepted_tokens", "Speculative tokens accepted.", stats.accepted_tokens)):
            yield CounterMetricFamily(name, doc, value=value)
        calls = CounterMetricFamily("lmarith_forward_calls", "Batched forwards per model.",
                                    labels=["model"])
        for spec, count in stats.forward_calls.items():
            calls.add_metric([self.names.get(spec, str(getattr(spec, "path", spec)))], count)
        yield calls
        yield from self._vllm(stats)

    def _vllm(self, stats) -> Iterable[Metric]:
        """vLLM's names for the same numbers (gateways route by these)."""
        used = (1.0 - stats.kv_pages_free / stats.kv_pages_total) if stats.kv_pages_total else 0.0
        yield self._gauge("vllm:num_requests_running", "Requests being decoded (vLLM name).",
                          stats.requests_running)
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting (vLLM name).",
                          stats.requests_waiting)
        yield self._gauge("vllm:kv_cache_usage_perc", "KV cache usage, 1 = full (vLLM name).", used)
        yield CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache "
                                  "(vLLM name).", value=stats.prefix_cache_hit_tokens)
        queries = sum(s.samples[0].value for s in self.prompt_tokens.collect())
        yield CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens of finished requests, "
                                  "summed over terms (vLLM name).", value=queries)


class ServerMetrics:
    """Every metric of one app, and the scrape."""

    def __init__(self, llm, models: Mapping[str, Model]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.prompt_tokens = Counter("lmarith_prompt_tokens", "Prompt tokens of finished requests, "
                                     "summed over each formula's terms.", registry=self.registry)
        self.completion_tokens = Counter("lmarith_completion_tokens",
                                         "Tokens returned to clients.", registry=self.registry)
        self.requests = Counter("lmarith_requests", "HTTP generation requests by outcome "
                                "(ok, error, disconnected).", ["endpoint", "outcome"],
                                registry=self.registry)
        self.latency = Histogram("lmarith_request_latency_seconds", "Seconds from a generation "
                                 "request's arrival to its last byte.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(llm, models, self.prompt_tokens))

    def finished(self, endpoint: str, outcome: str, seconds: float, prompt_tokens: int = 0,
                 completion_tokens: int = 0) -> None:
        """Record one generation request at its end."""
        self.requests.labels(endpoint, outcome).inc()
        self.latency.labels(endpoint).observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)

    def scrape(self) -> bytes:
        """The text exposition (blocks briefly on the engine loop: call it in a thread)."""
        return generate_latest(self.registry)
