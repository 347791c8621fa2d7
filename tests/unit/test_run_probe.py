"""`llmserve run`'s readiness probe (serve/cli/run.py): a real completion, or /health with API keys on."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from serve.cli.run import _probe


class KeysOn(http.server.BaseHTTPRequestHandler):
    """A gateway with API keys on and its engines ready: a completion without a key is a 401."""

    def do_POST(self) -> None:
        self.send_response(401)
        self.end_headers()

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def base() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeysOn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_with_keys_on_the_probe_asks_health_and_ends(base):
    """Without a key a completion never succeeds; /health says the gateway reaches its engines."""
    assert _probe(base, "tiny", keys_on=True) is True


def test_with_keys_off_readiness_is_a_real_completion(base):
    assert _probe(base, "tiny", keys_on=False) is False  # the 401 here is not a completion
