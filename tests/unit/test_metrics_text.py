"""The integration suite's metric readers (tests/support.py) against text the
gateway really renders: they read gauges without labels, match labels exactly, and refuse a name
no metric declares, so an assertion on a metric can fail."""

from __future__ import annotations

import asyncio

import pytest
from starlette.testclient import TestClient

from serve.cache.store import HeadCache
from serve.config import Config
from serve.gateway.app import create_app, create_metrics_app
from serve.gateway.backends import Backends
from serve.gateway.metrics import Metrics
from tests.fakes import FakeUpstream
from tests.support import counter, gauge

CONFIG = Config.model_validate({"auth": {"enabled": False}, "models": [{"name": "a", "source": "x"}]})


def test_redis_up_gauge_reads_zero_while_redis_is_down_and_one_after():
    now = [1000.0]
    # Port 1 on loopback: nothing listens, so every Redis operation is refused at once.
    cache = HeadCache("redis://127.0.0.1:1/0", clock=lambda: now[0], retry_after_s=5, op_timeout_s=1)
    app = create_app(CONFIG, Backends(), FakeUpstream(), cache=cache)
    scrape = TestClient(create_metrics_app(app.state.gateway))
    assert gauge(scrape.get("/metrics").text, "llmserve_cache_redis_up") == 1  # not known to be down yet
    asyncio.run(cache.get("head", "k"))  # refused: the cache marks Redis down for retry_after_s
    assert gauge(scrape.get("/metrics").text, "llmserve_cache_redis_up") == 0
    now[0] += 6  # past the retry window the cache tries Redis again and says so
    assert gauge(scrape.get("/metrics").text, "llmserve_cache_redis_up") == 1


def test_counter_matches_labels_exactly_and_sums_series():
    m = Metrics()
    m.fallbacks.labels("head", "tiny-b", "unavailable").inc(2)
    m.fallbacks.labels("head", "tiny-b", "timeout").inc(1)
    m.cost.labels("r", "tiny-b", "k").inc(0.25)
    m.cost.labels("r", "model-x", "k").inc(0.5)
    text = m.render().decode()
    assert counter(text, "llmserve_fallbacks_total", route="head", from_model="tiny-b") == 3
    assert counter(text, "llmserve_fallbacks_total", from_model="tiny-b", failure="timeout") == 1
    assert counter(text, "llmserve_cost_usd_total") == 0.75
    assert counter(text, "llmserve_cost_usd_total", model="tiny-b") == 0.25
    assert counter(text, "llmserve_cost_usd_total", model="tiny") == 0  # a prefix is not a match
    assert counter(text, "llmserve_fallbacks_total", model="tiny-b") == 0  # nor is another label's suffix
    assert counter(text, "llmserve_escalations_total") == 0  # declared, never incremented


def test_a_name_no_metric_declares_is_an_error_not_zero():
    text = Metrics().render().decode()
    with pytest.raises(AssertionError, match="no metric family"):
        counter(text, "llmserve_cache_redis_up_total")
    with pytest.raises(AssertionError, match="no metric family"):
        gauge(text, "llmserve_redis_up")
    with pytest.raises(AssertionError, match="0 matching samples"):
        gauge(text, "llmserve_ready_replicas", model="a")  # a labelled gauge nobody has set
