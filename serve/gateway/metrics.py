"""Prometheus metrics of the gateway, in one registry owned by the app (no module globals).

Naming: ``llmserve_<thing>_<unit>``; labels are bounded sets (route and model names come from
config, status is an HTTP code, key is an API key's configured name, never the secret).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llmserve_requests", "Requests answered, by route, model and HTTP status.",
                                ["route", "model", "status"], registry=r)
        self.latency = Histogram("llmserve_request_latency_seconds", "End-to-end request latency.",
                                 ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llmserve_time_to_first_token_seconds", "Time to the first streamed chunk.",
                              ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("llmserve_time_per_output_token_seconds",
                              "Mean time per output token after the first.", ["route", "model"],
                              buckets=TPOT_BUCKETS, registry=r)
        self.tokens = Counter("llmserve_tokens", "Tokens processed, by model and kind (prompt|completion).",
                              ["model", "kind"], registry=r)
        self.cost = Counter("llmserve_cost_usd", "Cost of answered requests in USD.",
                            ["route", "model", "key"], registry=r)
        self.cache = Counter("llmserve_cache_requests", "Head-cache lookups by result (hit|miss|bypass).",
                             ["route", "result"], registry=r)
        self.cache_redis_up = Gauge("llmserve_cache_redis_up", "1 when the shared cache (Redis) is reachable.",
                                    registry=r)
        self.cache_redis_errors = Counter("llmserve_cache_redis_errors", "Failed Redis operations.", registry=r)
        self.cascade = Counter("llmserve_cascade_decisions", "Cascade decisions by outcome and reason.",
                               ["route", "decision", "reason"], registry=r)
        self.escalations = Counter("llmserve_escalations", "Requests escalated from student to teacher.",
                                   ["route", "reason"], registry=r)
        self.fallbacks = Counter("llmserve_fallbacks", "Requests moved to the next model of a route.",
                                 ["route", "from_model", "failure"], registry=r)
        self.shadow = Counter("llmserve_shadow_requests", "Requests mirrored to a route's candidate, by result.",
                              ["route", "model", "result"], registry=r)
        self.shadow_agreement = Histogram("llmserve_shadow_agreement",
                                          "Token-overlap agreement of a shadow answer with the live one.",
                                          ["route", "model"], buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0), registry=r)
        self.rate_limited = Counter("llmserve_rate_limited", "Requests rejected by a rate limit.",
                                    ["key", "limit"], registry=r)
        self.in_flight = Gauge("llmserve_in_flight_requests", "Requests in flight to engines, by model.",
                               ["model"], registry=r)
        self.replicas = Gauge("llmserve_ready_replicas", "Engine replicas the gateway can send to.",
                              ["model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
