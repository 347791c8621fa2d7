"""What the cluster tests share: clients under load through the SDK, every outcome kept, and the
timings a test prints."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from openai import APIConnectionError, OpenAI


def timings_out(record: dict) -> None:
    """The measured times, for the closing note (and anyone reading a CI log)."""
    print("cluster timings:", json.dumps(record))
    path = os.environ.get("LLMSERVE_CLUSTER_TIMINGS")
    if path:
        Path(path).write_text(json.dumps(record, indent=1))


class Load:
    """Clients in threads, each request on a new connection; every outcome kept."""

    def __init__(self, base_url: str, api_key: str, model: str = "tiny-a", retry: bool = True) -> None:
        self.base_url, self.api_key, self.model, self.retry = base_url, api_key, model, retry
        self.failures: list[str] = []
        self.retried: list[str] = []  # connection errors retried once (a draining gateway's)
        self.ok = 0
        self.engines: Counter[str] = Counter()
        self.gateways: Counter[str] = Counter()
        self.first_seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def _client(self) -> OpenAI:
        http = httpx.Client(headers={"connection": "close"}, timeout=120)
        return OpenAI(base_url=self.base_url, api_key=self.api_key, http_client=http, max_retries=0)

    def _one(self, client: OpenAI) -> None:
        try:
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=self.model, messages=[{"role": "user", "content": "hello"}], max_tokens=8)
            except APIConnectionError as e:
                if not self.retry:
                    raise
                # A gateway replica being scaled down closes its listener, then the connections it
                # has not read a request from yet; one of ours can land there in that instant (in
                # a cluster the Service stops sending before the pod goes; here the gateways share
                # a port). Nothing was answered, so the SDK retries it as its default
                # max_retries does: once. Counted, and bounded below.
                with self._lock:
                    self.retried.append(f"{time.strftime('%H:%M:%S')} {e}"[:200])
                raw = client.chat.completions.with_raw_response.create(
                    model=self.model, messages=[{"role": "user", "content": "hello"}], max_tokens=8)
            reply = raw.parse()
            assert reply.choices[0].message.content is not None
            engine, gateway = raw.headers.get("x-llmserve-replica", "?"), raw.headers.get("x-llmserve-gateway", "?")
            with self._lock:
                self.ok += 1
                self.engines[engine] += 1
                self.gateways[gateway] += 1
                for k in (f"engine:{engine}", f"gateway:{gateway}"):
                    self.first_seen.setdefault(k, time.monotonic())
        except Exception as e:  # every failure is kept and fails the test
            with self._lock:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {type(e).__name__}: {e}"[:300])

    def start(self, clients: int, pause_s: float = 0.0) -> None:
        self._stop.clear()

        def loop() -> None:
            client = self._client()
            while not self._stop.is_set():
                self._one(client)
                if pause_s:
                    self._stop.wait(pause_s)

        self._threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=150)
        assert not any(t.is_alive() for t in self._threads), "a client is stuck"
