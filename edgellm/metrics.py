"""Prometheus metrics, served over HTTP by every service (`--<service>-metrics-port`).

Counters and histograms are updated where the event happens; gauges that mirror state
(queue depths, running batch, KV blocks) are read from that state when scraped, so they
cost nothing on the hot path and can never drift.
"""

from __future__ import annotations

from typing import Callable

import structlog
from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = structlog.get_logger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# gateway
REQUESTS = Counter("edgellm_requests_total", "Finished requests", ["finish_reason"])
ERRORS = Counter("edgellm_errors_total", "Requests ended with an error status", ["code"])
PROMPT_TOKENS = Counter("edgellm_prompt_tokens_total", "Prompt tokens of accepted requests")
GENERATED_TOKENS = Counter("edgellm_generated_tokens_total", "Tokens streamed to clients")
TTFT = Histogram("edgellm_ttft_seconds", "Time to first token at the gateway", buckets=_LATENCY_BUCKETS)
TPOT = Histogram("edgellm_tpot_seconds", "Mean time per output token after the first", buckets=_LATENCY_BUCKETS)
# gateway: per caller (label `key`: the API key's fingerprint, "-" for a gateway without keys)
KEY_REQUESTS = Counter("edgellm_key_requests_total", "Requests admitted past the rate limits, per API key", ["key"])
KEY_TOKENS = Counter("edgellm_key_tokens_total", "Tokens used per API key (kind: prompt, completion)",
                     ["key", "kind"])
RATE_LIMITED = Counter("edgellm_rate_limited_total", "Requests refused over a per-key budget (limit: the option)",
                       ["key", "limit"])
# gateway: fault tolerance
MIGRATIONS = Counter(
    "edgellm_migrations_total", "In-flight requests moved to another service after theirs failed", ["reason", "to"]
)
DEGRADED_REQUESTS = Counter(
    "edgellm_degraded_requests_total",
    "Request attempts run whole on one engine because the other phase had no healthy service",
    ["engine"],
)
FAILURES_DETECTED = Counter(
    "edgellm_failures_detected_total", "Service failures the gateway learned of (monitor verdicts, stream errors)",
    ["source"],
)
# KV transfer
KV_BYTES_SENT = Counter("edgellm_kv_bytes_sent_total", "KV bytes streamed by prefill")
KV_BYTES_RECEIVED = Counter("edgellm_kv_bytes_received_total", "KV bytes accepted by decode")
KV_TRANSFER = Histogram(
    "edgellm_kv_transfer_seconds", "Prefill forward start to decode's ack of the complete KV", buckets=_LATENCY_BUCKETS
)
KV_REJECTED = Counter("edgellm_kv_rejected_total", "KV streams rejected as incomplete or damaged")
# every service: a bound on what callers can make it hold or do was reached (label: the option's name)
LIMIT_HITS = Counter("edgellm_limit_hits_total", "Requests refused (or cut) at a configured limit", ["limit"])


def gauge(name: str, documentation: str, read: Callable[[], float], labels: dict[str, str] | None = None) -> None:
    """A gauge whose value is read from live state at scrape time."""
    g = Gauge(name, documentation, list(labels or {}))
    (g.labels(**labels) if labels else g).set_function(read)


def serve_metrics(port: int, host: str) -> None:
    if port:
        start_http_server(port, addr=host)
        log.info("metrics_listening", port=port)


def engine_gauges(engine) -> None:
    """Running batch, queue and KV block gauges of an EngineLoop, read from its face (info, stats())."""
    num_blocks = engine.info.num_kv_blocks
    gauge("edgellm_engine_running", "Sequences in the decode batch", lambda: engine.stats().num_running)
    gauge("edgellm_engine_waiting", "Sequences queued in the engine", lambda: engine.stats().num_waiting)
    gauge("edgellm_kv_blocks_free", "Free KV blocks", lambda: engine.stats().num_free_kv_blocks)
    gauge("edgellm_kv_blocks_used", "KV blocks in use", lambda: num_blocks - engine.stats().num_free_kv_blocks)
    gauge("edgellm_engine_steps", "Engine steps run", lambda: engine.stats().num_steps)
    gauge("edgellm_engine_preemptions", "Sequences preempted for lack of KV blocks", lambda: engine.stats().num_preemptions)
