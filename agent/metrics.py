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
        self.spans_held_bytes = Gauge(f"{NS}_spans_held_bytes",
                                      "estimated bytes of the spans held in memory", registry=r)
        self.spans_evicted = Counter(f"{NS}_spans_evicted",
                                     "spans dropped from memory at the byte bound (they stay "
                                     "in the store, but later samples cannot link to them)",
                                     registry=r)
        self.forward_sent = Counter(f"{NS}_otlp_forward_sent", "OTLP requests forwarded",
                                    registry=r)
        self.forward_dropped = Counter(f"{NS}_otlp_forward_dropped",
                                       "OTLP requests not forwarded, by reason", ["reason"],
                                       registry=r)
        self.forward_retries = Counter(f"{NS}_otlp_forward_retries", "forwarding retries",
                                       registry=r)

        self.ingest_requests = Counter(f"{NS}_ingest_requests",
                                       "Pyroscope-compatible ingest requests by result",
                                       ["endpoint", "result"], registry=r)
        self.ingest_profiles = Counter(f"{NS}_ingest_profiles", "profiles ingested",
                                       ["endpoint"], registry=r)
        self.ingest_queue = Gauge(f"{NS}_ingest_queue",
                                  "ingest requests admitted (reading, waiting or being decoded); "
                                  "more are answered 429", registry=r)
        self.ingest_truncated = Counter(f"{NS}_ingest_stacks_truncated",
                                        "ingested stacks deeper than the limit, truncated",
                                        registry=r)
        self.http_connections = Gauge(f"{NS}_http_connections", "open HTTP connections",
                                      ["server"], registry=r)
        self.http_closed = Counter(f"{NS}_http_connections_closed",
                                   "HTTP connections closed by the agent, by reason (header, "
                                   "body or send timeout; evicted or refused at the cap)",
                                   ["server", "reason"], registry=r)
        self.http_busy = Counter(f"{NS}_http_busy", "requests answered 503 at the in-flight "
                                 "request cap", ["server"], registry=r)
        self.export_sent = Counter(f"{NS}_export_sent", "profiles pushed to Pyroscope",
                                   registry=r)
        self.export_dropped = Counter(f"{NS}_export_dropped",
                                      "profiles not pushed to Pyroscope, by reason", ["reason"],
                                      registry=r)
        self.export_retries = Counter(f"{NS}_export_retries", "Pyroscope push retries",
                                      registry=r)
        self.processes = Gauge(f"{NS}_processes", "Python processes being profiled", registry=r)
        self.windows = Counter(f"{NS}_windows", "profile windows written, by result", ["result"],
                               registry=r)
        self.sampler_failures = Counter(f"{NS}_sampler_failures",
                                        "py-spy runs that failed (restarted with backoff)",
                                        registry=r)
        self.rate = Gauge(f"{NS}_sampling_rate_hz", "current py-spy sampling rate per process",
                          registry=r)
        self.sampler_processes = Gauge(f"{NS}_processes_by_sampler",
                                       "profiled processes by stack source (bpf: the kernel "
                                       "walker; py-spy; none: not profiled)", ["sampler"],
                                       registry=r)
        self.degraded = Gauge(f"{NS}_degraded",
                              "1 while something runs below what was asked, by what",
                              ["what"], registry=r)
        self.agent_cpu = Gauge(f"{NS}_agent_cpu_ratio",
                               "agent CPU (itself and py-spy) over the last window, in cores",
                               registry=r)
        self.store_bytes = Gauge(f"{NS}_store_bytes",
                                 "bytes the store takes on disk (its directory, as du -sb counts)",
                                 registry=r)
        self.store_profile_bytes = Gauge(f"{NS}_store_profile_bytes",
                                         "bytes of the stored profiles themselves", registry=r)
        self.store_full = Counter(f"{NS}_store_disk_full",
                                  "writes refused because the store's disk is full",
                                  registry=r)
        self.store_compacted = Counter(f"{NS}_store_compacted",
                                       "window profiles merged into per-minute ones",
                                       registry=r)
        self.store_spans_thinned = Counter(f"{NS}_store_spans_thinned",
                                           "spans older than an hour deleted, not among the "
                                           "slowest of their name and minute (nor their traces)",
                                           registry=r)
        self.store_deleted = Counter(f"{NS}_store_deleted", "profiles deleted by retention",
                                     registry=r)
        self.probe_drops = Gauge(f"{NS}_probe_drops", "eBPF probe drops and errors, by kind",
                                 ["kind"], registry=r)
        self.api_requests = Counter(f"{NS}_api_requests", "HTTP API requests by endpoint and status",
                                    ["endpoint", "status"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
