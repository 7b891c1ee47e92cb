"""Prometheus metrics of one gateway, on a registry of its own (so several apps can live in one test process).

Requests by status and adapter version, time to first token and end-to-end latency, tokens in and out, feedback by
kind and version with the thumbs-up rate, hot-swap events, the version each alias serves, and record writes that
failed or are waiting. Service traffic (the trainer's gate) is counted apart, in `alignloop_service_requests`, and
in none of the per-version user metrics.
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
        self.thumbs_up_rate = Gauge("alignloop_thumbs_up_rate", "Thumbs up / all thumbs", ["adapter"], registry=r)
        self.swaps = Counter(
            "alignloop_swap_events", "Alias moves applied by this gateway", ["alias", "action"], registry=r
        )
        self.current_version = Gauge(
            "alignloop_current_version", "Adapter version an alias serves (0: base model)", ["alias"], registry=r
        )
        self.registry_revision = Gauge("alignloop_registry_revision", "Registry revision applied", registry=r)
        self.record_failures = Counter(
            "alignloop_record_write_failures", "Records that could not be written", ["kind"], registry=r
        )
        self.records_pending = Gauge(
            "alignloop_records_pending", "Generation records waiting to be written", registry=r
        )
        self.upstreams_healthy = Gauge("alignloop_upstreams_healthy", "Healthy vLLM servers", registry=r)
        self._thumbs_totals: dict[str, list[int]] = {}

    def observe_thumbs(self, adapter: str, rating: int) -> None:
        self.thumbs.labels(adapter=adapter, rating="up" if rating > 0 else "down").inc()
        up, total = self._thumbs_totals.setdefault(adapter, [0, 0])
        self._thumbs_totals[adapter] = [up + (rating > 0), total + 1]
        up, total = self._thumbs_totals[adapter]
        self.thumbs_up_rate.labels(adapter=adapter).set(up / total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
