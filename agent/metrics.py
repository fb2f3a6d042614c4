"""Prometheus metrics of one agent (its own registry, so tests and agents never share)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

NS = "spanflame"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.otlp_requests = Counter(f"{NS}_otlp_requests", "OTLP /v1/traces requests by result",
                                     ["result"], registry=r)
        self.otlp_spans = Counter(f"{NS}_otlp_spans", "spans received over OTLP", registry=r)
        self.otlp_spans_rejected = Counter(f"{NS}_otlp_spans_rejected",
                                           "spans rejected (partial success)", registry=r)
        self.spans_held = Gauge(f"{NS}_spans_held", "spans held in memory", registry=r)
        self.spans_evicted = Counter(f"{NS}_spans_evicted", "spans dropped from memory (bound)",
                                     registry=r)
        self.forward_sent = Counter(f"{NS}_otlp_forward_sent", "OTLP requests forwarded",
                                    registry=r)
        self.forward_dropped = Counter(f"{NS}_otlp_forward_dropped",
                                       "OTLP requests not forwarded, by reason", ["reason"],
                                       registry=r)
        self.forward_retries = Counter(f"{NS}_otlp_forward_retries", "forwarding retries",
                                       registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
