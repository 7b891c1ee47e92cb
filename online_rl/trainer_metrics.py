"""Prometheus metrics of the online trainer, on a registry of its own, served on `metrics_port` (`/metrics`).

Rounds by outcome, pairs by source, the feedback backlog, each version's last gate metrics, phase and gate seconds,
feedback-to-served latency (an event's arrival to the promotion of the version trained on it), when the last round
ended, and how many versions wait for a gate: what the alert rules in deploy/k8s watch.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)
SECONDS_BUCKETS = (5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 3600)


class TrainerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.rounds = Counter("alignloop_trainer_rounds", "Rounds by outcome", ["outcome"], registry=r)
        self.pairs = Counter("alignloop_trainer_pairs", "Training pairs by source", ["source"], registry=r)
        self.backlog = Gauge(
            "alignloop_trainer_feedback_backlog", "Feedback events read and not yet acknowledged", registry=r
        )
        self.gate_metric = Gauge(
            "alignloop_trainer_gate_metric", "A version's last gate metrics", ["version", "metric"], registry=r
        )
        self.phase_seconds = Histogram(
            "alignloop_trainer_phase_seconds", "Seconds per round phase", ["phase"], buckets=SECONDS_BUCKETS, registry=r
        )
        self.feedback_to_served = Histogram(
            "alignloop_trainer_feedback_to_served_seconds",
            "From a feedback event's arrival to the promotion of the version trained on it",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.last_round = Gauge(
            "alignloop_trainer_last_round_timestamp_seconds", "When the last round ended (Unix time)", registry=r
        )
        self.ungated = Gauge(
            "alignloop_trainer_ungated_versions",
            "Versions published and not yet gated (candidate, gate_failed)",
            registry=r,
        )

    def serve(self, host: str, port: int) -> bool:
        """Serves /metrics on host:port; False (and a warning) when the port cannot be bound."""
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            logger.warning("trainer metrics not served host=%s port=%d error=%s", host, port, error)
            return False
        logger.info("trainer metrics served url=http://%s:%d/metrics", host, port)
        return True
