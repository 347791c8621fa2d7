"""Closed engines on the real stack: a request straight to an engine replica's port is refused
without the engine secret, including vLLM's LoRA-loading routes, while the gateway (which holds
the secret) still answers through the SDK."""

from __future__ import annotations

import httpx
import pytest

from serve.contract.secret import engine_secret

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "hi"}]
CHAT = {"model": "tiny-a", "messages": MSG, "max_tokens": 1}


def _engine_urls(stack) -> list[str]:
    urls = [url for _, url in stack.replicas("tiny-a")]
    assert len(urls) == 2, urls  # tiny-a runs two replicas in the shared stack
    return urls


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-engine-secret-0123456789"},
                                     {"Authorization": "Bearer test"}])  # an API key is not the secret
def test_engine_refuses_requests_without_its_secret(stack, headers):
    for url in _engine_urls(stack):
        for path, body in [("/v1/chat/completions", CHAT),
                           ("/v1/completions", {"model": "tiny-a", "prompt": "hi", "max_tokens": 1}),
                           ("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": "/etc"}),
                           ("/v1/unload_lora_adapter", {"lora_name": "tiny-a-lora"}),
                           # vLLM's own --api-key would leave these two open.
                           ("/invocations", CHAT),
                           ("/adapters", {"name": "evil", "src": "/etc"})]:
            r = httpx.post(url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (url, path, r.status_code, r.text[:200])
            assert r.json()["error"]["code"] == "invalid_api_key"


def test_engine_answers_its_secret_and_keeps_the_probe_open(stack):
    secret = engine_secret()
    assert secret, "the stack's engines run with a generated engine secret"
    for url in _engine_urls(stack):
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        r = httpx.post(url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {secret}"},
                       timeout=60)
        assert r.status_code == 200, r.text[:200]
        assert r.json()["usage"]["completion_tokens"] == 1


def test_gateway_holds_the_secret(stack):
    client = stack.client()
    r = client.chat.completions.create(model="tiny-a", messages=MSG, max_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 2
    # The adapter loaded at start went through the engine's guarded LoRA endpoint with the secret.
    r = client.chat.completions.create(model="tiny-a-lora", messages=MSG, max_tokens=2,
                                       extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 2
