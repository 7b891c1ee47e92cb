"""Prometheus metrics of one gateway, on a registry of its own (so several apps can live in one test process).

Requests by status and adapter version, error responses by status, time to first token and end-to-end latency,
tokens in and out, feedback by kind and version, thumbs by version, hot-swap events, the version each alias serves
(as a number and as an `adapter` label to join on), promotions staged or refused, and record writes that failed or
are waiting. Service traffic (the trainer's gate) is counted apart, in `alignloop_service_requests`, and in none of
the per-version user metrics.

Everything here is a counter or a histogram that sums over replicas, so the rates that matter are PromQL over all
of them; e.g. the thumbs-up rate of each version over the last hour:

    sum by (adapter) (increase(alignloop_thumbs_total{rating="up"}[1h]))
      / sum by (adapter) (increase(alignloop_thumbs_total[1h]))
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("alignloop_requests", "Chat completion requests", ["status", "adapter"], registry=r)
        self.service_requests = Counter(
            "alignloop_service_requests",
            "Requests of alignloop's own services (the gate)",
            ["status", "adapter"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "alignloop_time_to_first_token_seconds",
            "Time to the first content token",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "alignloop_request_latency_seconds",
            "End-to-end chat completion latency",
            ["adapter", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("alignloop_prompt_tokens", "Prompt tokens", ["adapter"], registry=r)
        self.completion_tokens = Counter("alignloop_completion_tokens", "Completion tokens", ["adapter"], registry=r)
        self.feedback = Counter("alignloop_feedback", "Feedback and preference events", ["kind", "adapter"], registry=r)
        self.thumbs = Counter("alignloop_thumbs", "Thumbs by adapter version", ["adapter", "rating"], registry=r)
        self.errors = Counter(
            "alignloop_error_responses", "Error responses of the API by HTTP status", ["status", "code"], registry=r
        )
        self.swaps = Counter(
            "alignloop_swap_events", "Alias moves applied by this gateway", ["alias", "action"], registry=r
        )
        self.current_version = Gauge(
            "alignloop_current_version", "Adapter version an alias serves (0: base model)", ["alias"], registry=r
        )
        self.alias_adapter = Gauge(
            "alignloop_alias_adapter",
            "1 for the adapter version an alias serves (policy-vN or base), to join per-version metrics on",
            ["alias", "adapter"],
            registry=r,
        )
        self.promotions = Counter(
            "alignloop_promotions",
            "Promotions through this gateway by outcome (promoted, refused)",
            ["outcome"],
            registry=r,
        )
        self.staging_seconds = Histogram(
            "alignloop_staging_seconds",
            "Seconds to stage a version on every healthy vLLM replica before its alias moves",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.registry_revision = Gauge("alignloop_registry_revision", "Registry revision applied", registry=r)
        self.record_failures = Counter(
            "alignloop_record_write_failures", "Records that could not be written", ["kind"], registry=r
        )
        self.records_pending = Gauge(
            "alignloop_records_pending", "Generation records waiting to be written", registry=r
        )
        self.upstreams_healthy = Gauge("alignloop_upstreams_healthy", "Healthy vLLM servers", registry=r)
        self._alias_adapters: dict[str, str] = {}

    def observe_thumbs(self, adapter: str, rating: int) -> None:
        self.thumbs.labels(adapter=adapter, rating="up" if rating > 0 else "down").inc()

    def serve_alias(self, alias: str, adapter: str) -> None:
        """Marks `adapter` as what `alias` serves (and nothing else)."""
        previous = self._alias_adapters.get(alias)
        if previous is not None and previous != adapter:
            self.alias_adapter.remove(alias, previous)
        self._alias_adapters[alias] = adapter
        self.alias_adapter.labels(alias=alias, adapter=adapter).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
