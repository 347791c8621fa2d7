"""A real Prometheus scrapes the gateway: the metrics the dashboard and alerts use arrive with the
values the gateway reports (Debian's `prometheus`, on loopback, for this test only)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import free_port

pytestmark = pytest.mark.integration

WANTED = ("llmserve_request_latency_seconds_count", "llmserve_time_to_first_token_seconds_count")


def _get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _gateway_totals(metrics_text: str) -> dict[str, float]:
    totals = dict.fromkeys(WANTED, 0.0)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals


class Prometheus:
    def __init__(self, workdir, target: str) -> None:
        exe = shutil.which("prometheus")
        assert exe, "prometheus is not installed (`make k8s-tools` installs Debian's prometheus package)"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "llmserve-gateway", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}],
        }))
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"prometheus exited with {self.proc.returncode}"
            try:
                _get(f"{self.url}/-/ready", timeout=1)
                return
            except OSError:
                assert time.monotonic() < deadline, "prometheus did not become ready"
                time.sleep(0.2)

    def query(self, expr: str) -> list[dict]:
        body = json.loads(_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def prometheus(stack, tmp_path):
    prom = Prometheus(tmp_path, f"127.0.0.1:{stack.config.gateway.metrics_port}")
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


def test_prometheus_scrapes_the_gateway_metrics(stack, prometheus) -> None:
    client = stack.client()
    messages = [{"role": "user", "content": "Hello"}]
    for _ in range(3):
        r = client.chat.completions.create(model="tiny-a", messages=messages, max_tokens=4)
        assert r.choices[0].message.content is not None
    stream = client.chat.completions.create(model="tiny-a", messages=messages, max_tokens=4, stream=True)
    assert [c for c in stream]

    expected = _gateway_totals(stack.metrics())
    assert all(v > 0 for v in expected.values()), expected
    deadline = time.monotonic() + 30
    while True:
        seen = {name: prometheus.scalar(f"sum({name})") for name in WANTED}
        if all(seen[n] >= expected[n] > 0 for n in WANTED):
            break
        assert time.monotonic() < deadline, f"prometheus has {seen}, the gateway reports {expected}"
        time.sleep(0.5)
    [target] = prometheus.query('up{job="llmserve-gateway"}')
    assert target["value"][1] == "1"
    # The series the dashboard and alerts select on carry the model label.
    assert prometheus.query('llmserve_request_latency_seconds_count{model="tiny-a"}')
