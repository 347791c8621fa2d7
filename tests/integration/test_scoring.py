"""vLLM's scoring endpoints through the gateway, on the real tiny embedding engine (httpx: the
openai SDK has no score or rerank API)."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration


def post(stack, path: str, body: dict, key: str = "test") -> httpx.Response:
    root = stack.base_url.removesuffix("/v1")
    return httpx.post(root + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_score_pairs_one_text_against_several(stack):
    r = post(stack, "/v1/score", {"model": "tiny-embed", "text_1": "a cat", "text_2": ["a cat", "the stock market"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1] and all(isinstance(d["score"], float) for d in body["data"])
    # The same text against itself scores highest (cosine similarity of identical embeddings).
    assert body["data"][0]["score"] > body["data"][1]["score"]
    assert r.headers["x-llmserve-served-by"] == "tiny-embed" and body["usage"]["prompt_tokens"] > 0


def test_rerank_orders_documents_and_keeps_top_n(stack):
    r = post(stack, "/v1/rerank", {"model": "tiny-embed", "query": "a cat", "documents": ["the stock market", "a cat"],
                                   "top_n": 1})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 1 and results[0]["index"] == 1


def test_score_on_a_generate_model_is_400_and_a_forbidden_model_404(stack):
    r = post(stack, "/v1/score", {"model": "tiny-b", "text_1": "a", "text_2": "b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    # The `limited` key may use tiny-a only: the embedding model is as unknown to it as a missing one.
    r = post(stack, "/v1/score", {"model": "tiny-embed", "text_1": "a", "text_2": "b"}, key="limited")
    assert r.status_code == 404
