"""The head cache between tenants (issue 26), through the gateway's service layer with a fake engine:
what one key's request leaves in the cache tells another key nothing (its per-request fields, when
and by which batch an entry was made), a route may keep each key's entries apart, a key's
`cache_salt` reaches the engine and splits entries, an entry stops answering once the route is no
longer served by the model and weights that made it, and the in-process LRU is bounded in bytes."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import pytest
from pydantic import ValidationError

from serve.cache.pipeline import batch_entries
from serve.cache.store import LRU, CacheEntry, HeadCache
from serve.config import ApiKey, Config
from serve.gateway.backends import Backends
from serve.gateway.service import Gateway
from serve.gateway.upstream import UpstreamResponse
from tests.fakes import FakeUpstream

CHAT, RESPONSES, EMBEDDINGS = "/v1/chat/completions", "/v1/responses", "/v1/embeddings"


def key(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "sha256": hashlib.sha256(name.encode()).hexdigest(), **kw}


CONFIG = Config.model_validate({
    "models": [{"name": "student", "source": "x"}, {"name": "student-v2", "source": "x2"},
               {"name": "teacher", "source": "y"}, {"name": "embed", "source": "e", "task": "embed"}],
    "routes": [
        {"name": "shared", "target": "teacher", "cache": {"ttl_s": 60}},
        {"name": "own", "target": "teacher", "cache": {"ttl_s": 60, "scope": "key"}},
        {"name": "assistant", "cascade": {"student": "student", "teacher": "teacher", "min_mean_logprob": -1.0},
         "cache": {"ttl_s": 60}},
        {"name": "vectors", "target": "embed", "cache": {"ttl_s": 60}},
    ],
    "auth": {"keys": [key("alice"), key("bob"), key("ops", admin=True), key("salted", cache_salt="s3cr3t-salt"),
                      key("salted2", cache_salt="other-salt")]},
})
KEYS = {k.name: k for k in CONFIG.auth.keys}


class EchoingEngine(FakeUpstream):
    """The fake engine, echoing what vLLM's ResponsesResponse echoes of the request and a
    per-request `metrics` block, as vLLM does."""

    def _responses(self, model: str, text: str, payload: dict, stream: bool) -> UpstreamResponse:
        resp = super()._responses(model, text, payload, stream)
        if stream:
            return resp
        body = json.loads(resp.body)
        body.update(user=payload.get("user"), metadata=payload.get("metadata"),
                    service_tier=payload.get("service_tier", "auto"), previous_response_id=None,
                    metrics={"queued_s": 0.25})
        return UpstreamResponse(200, {}, json.dumps(body).encode())

    async def post(self, base_url: str, path: str, body: bytes, *, stream: bool, timeout_s: float) -> UpstreamResponse:
        if path == EMBEDDINGS:
            self.calls.append((base_url, path, json.loads(body)))
            out = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
                   "model": "embed", "usage": {"prompt_tokens": 1, "total_tokens": 1}}
            return UpstreamResponse(200, {}, json.dumps(out).encode())
        return await super().post(base_url, path, body, stream=stream, timeout_s=timeout_s)


def gateway(engine: FakeUpstream | None = None, cache: HeadCache | None = None) -> tuple[Gateway, FakeUpstream]:
    engine = engine or EchoingEngine(logprob=-0.1)
    backends = Backends()
    backends.update({m: [(f"{m}#1", f"http://{m}")] for m in ("student", "student-v2", "teacher", "embed")})
    return Gateway(CONFIG, backends, engine, cache=cache or HeadCache(None)), engine


async def ask(gw: Gateway, who: str, model: str = "shared", path: str = CHAT, **kw: Any) -> tuple[str, dict]:
    body: dict[str, Any] = {"model": model, "temperature": 0, **kw}
    if path == CHAT:
        body.setdefault("messages", [{"role": "user", "content": "Where is my parcel?"}])
    elif path == RESPONSES:
        body.setdefault("input", "Where is my parcel?")
    answer = await gw.handle(KEYS[who], path, body)
    assert answer.status == 200 and answer.body is not None, answer.body
    for _ in range(5):  # the cache write runs off the request path
        await asyncio.sleep(0)
    return answer.headers["x-llmserve-cache"], answer.body


# ---- per-request fields -----------------------------------------------------------------------
async def test_a_hit_carries_the_replaying_requests_own_fields_never_the_makers():
    cache = HeadCache(None)
    gw, engine = gateway(cache=cache)
    state, made = await ask(gw, "alice", path=RESPONSES, user="alice-4711", metadata={"ticket": "A-1"})
    assert state == "miss" and made["user"] == "alice-4711" and made["metrics"] == {"queued_s": 0.25}
    state, got = await ask(gw, "bob", path=RESPONSES, user="bob-9", metadata={"ticket": "A-1"})
    assert state == "hit" and len(engine.calls) == 1
    assert (got["user"], got["metadata"], got["metrics"]) == ("bob-9", {"ticket": "A-1"}, None)
    assert got["id"] != made["id"] and got["output"][0]["id"] != made["output"][0]["id"]
    assert got["output"][0]["content"][0]["text"] == made["output"][0]["content"][0]["text"]
    state, anon = await ask(gw, "bob", path=RESPONSES, metadata={"ticket": "A-1"})  # no user of its own
    assert state == "hit" and anon["user"] is None and anon["store"] is True
    # Nothing of the request that made it is kept: not in this process, not in what Redis would hold.
    [stored] = [e for _, e, _ in cache._lru._data.values()]
    assert "alice-4711" not in stored.dumps() and "queued_s" not in stored.dumps()


async def test_a_hit_continues_the_replaying_requests_own_conversation():
    gw, _ = gateway()
    _, first = await ask(gw, "alice", path=RESPONSES, input="Start")
    _, made = await ask(gw, "alice", path=RESPONSES, input="Go on", previous_response_id=first["id"])
    _, again = await ask(gw, "alice", path=RESPONSES, input="Start")
    _, hit = await ask(gw, "alice", path=RESPONSES, input="Go on", previous_response_id=again["id"])
    assert made["previous_response_id"] == first["id"] and hit["previous_response_id"] == again["id"]


# ---- provenance -------------------------------------------------------------------------------
async def test_provenance_is_shown_to_admin_keys_only():
    gw, _ = gateway()
    await ask(gw, "alice")
    state, bob = await ask(gw, "bob")
    assert state == "hit" and "llmserve_provenance" not in bob
    state, ops = await ask(gw, "ops")
    assert state == "hit" and ops["llmserve_provenance"]["model"] == "teacher"
    assert ops["llmserve_provenance"]["created_at"] > 0


# ---- scope ------------------------------------------------------------------------------------
async def test_a_route_scoped_per_key_keeps_each_keys_entries_its_own():
    gw, engine = gateway()
    assert [(await ask(gw, who, "own"))[0] for who in ("alice", "alice", "bob", "bob")] == ["miss", "hit"] * 2
    assert len(engine.calls) == 2
    # The default scope is the route: every key of it shares one entry.
    assert [(await ask(gw, who, "shared"))[0] for who in ("alice", "bob")] == ["miss", "hit"]


# ---- cache_salt -------------------------------------------------------------------------------
async def test_a_keys_cache_salt_reaches_the_engine_and_splits_entries():
    gw, engine = gateway()
    assert (await ask(gw, "salted", cache_salt="client-chosen"))[0] == "miss"
    assert engine.calls[-1][2]["cache_salt"] == "s3cr3t-salt"  # the key's, not the client's
    assert (await ask(gw, "salted"))[0] == "hit"
    assert (await ask(gw, "alice"))[0] == "miss"  # unsalted: shares nothing with the salted key
    assert "cache_salt" not in engine.calls[-1][2]
    assert (await ask(gw, "salted2"))[0] == "miss"
    assert engine.calls[-1][2]["cache_salt"] == "other-salt"
    assert (await ask(gw, "salted", path=RESPONSES))[0] == "miss"
    assert engine.calls[-1][2]["cache_salt"] == "s3cr3t-salt"
    # vLLM's pooling requests take no salt: embeddings go as sent.
    await ask(gw, "salted", "vectors", EMBEDDINGS, input="x")
    assert engine.calls[-1][1] == EMBEDDINGS and "cache_salt" not in engine.calls[-1][2]


@pytest.mark.parametrize("salt", ["a@b", "a/b", "a\\b", "a\x00b", "", "x" * 129])
def test_a_salt_vllm_would_refuse_is_refused_at_config_load(salt):
    with pytest.raises(ValidationError):
        ApiKey.model_validate(key("k", cache_salt=salt))


# ---- model and weights ------------------------------------------------------------------------
async def test_a_promotion_or_rollback_makes_the_old_students_answers_miss():
    gw, _ = gateway(EchoingEngine(text_by_model={"student": "old answer", "student-v2": "new answer"},
                                  logprob=-0.1))
    assert (await ask(gw, "alice", "assistant"))[0] == "miss"
    state, body = await ask(gw, "alice", "assistant")
    assert state == "hit" and body["choices"][0]["message"]["content"] == "old answer"
    assert gw.catalog.override_route("assistant", "student", "student-v2")  # `llmserve students promote`
    state, body = await ask(gw, "alice", "assistant")
    assert state == "miss" and body["choices"][0]["message"]["content"] == "new answer"
    assert (await ask(gw, "alice", "assistant"))[0] == "hit"
    assert gw.catalog.reset_route("assistant")  # `llmserve students rollback`
    state, body = await ask(gw, "alice", "assistant")
    assert state == "miss" and body["choices"][0]["message"]["content"] == "old answer"


async def test_an_adapter_reloaded_from_other_weights_makes_its_answers_miss():
    gw, _ = gateway()
    assert gw.catalog.add_adapter("lora", "student", "/w/v1", "sha256:aaa")
    assert gw.catalog.override_route("shared", "target", "lora")
    assert [(await ask(gw, "ops"))[0] for _ in range(2)] == ["miss", "hit"]
    _, body = await ask(gw, "ops")
    assert (body["llmserve_provenance"]["model"], body["llmserve_provenance"]["digest"]) == ("lora", "sha256:aaa")
    gw.catalog.add_adapter("lora", "student", "/w/v2", "sha256:bbb")  # same name, new weights
    assert [(await ask(gw, "ops"))[0] for _ in range(2)] == ["miss", "hit"]


def test_batch_filled_entries_record_model_and_digest_and_no_body_provenance():
    line = {"custom_id": "k1", "response": {"status_code": 200, "body": {
        "id": "x", "choices": [], "kv_transfer_params": {"remote": 1},
        "llmserve_provenance": {"batch_id": "batch-old", "created_at": 1.0}}}}
    failed = {"custom_id": "k2", "response": {"status_code": 500, "body": {}}}
    [(k, entry)] = batch_entries([json.dumps(line), json.dumps(failed)], "r", "teacher", "sha256:t", "batch-1", 5.0)
    assert (k, entry.model, entry.digest, entry.batch_id, entry.created_at) == ("k1", "teacher", "sha256:t",
                                                                                 "batch-1", 5.0)
    assert entry.response == {"id": "x", "choices": [], "kv_transfer_params": None}


# ---- bytes ------------------------------------------------------------------------------------
def entry(text: str) -> CacheEntry:
    return CacheEntry(response={"text": text}, model="m", created_at=0)


def test_lru_is_bounded_in_bytes_least_recently_used_first():
    size = len(entry("x" * 100).dumps().encode())
    lru = LRU(1000, clock=lambda: 0.0, max_bytes=3 * size)
    for k in "abc":
        lru.put(k, entry("x" * 100), 60)
    assert lru.bytes == 3 * size
    lru.get("a")
    lru.put("d", entry("x" * 100), 60)  # over the budget: b, the least recently used, goes
    assert [k for k in "abcd" if lru.get(k) is not None] == ["a", "c", "d"] and lru.bytes == 3 * size
    lru.put("big", entry("x" * 1000), 60)  # larger than the whole budget: not kept, nothing evicted
    assert lru.get("big") is None and len(lru) == 3
    lru.put("a", entry("x"), 60)  # replacing an entry counts its new size only
    assert lru.bytes == 2 * size + len(entry("x").dumps().encode())
    assert lru.drop_prefix("") == 3 and lru.bytes == 0


async def test_head_cache_lru_holds_at_most_its_bytes():
    cache = HeadCache(None, lru_max_bytes=10_000)
    await cache.put_many("r", [(f"k{i}", entry("y" * 1000)) for i in range(50)])
    assert cache._lru.bytes <= 10_000 and await cache.get("r", "k49") is not None
    assert await cache.get("r", "k0") is None


def test_a_replayed_tool_call_gets_a_fresh_id_and_the_entry_is_not_changed():
    from serve.gateway.dialects.chat import ChatCompletions

    call = {"id": "chatcmpl-tool-abc", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    stored = {"choices": [{"index": 0, "message": {"role": "assistant", "tool_calls": [call]}}]}
    body = dict(stored)
    ChatCompletions().for_request(body, {}, None)
    [fresh] = body["choices"][0]["message"]["tool_calls"]
    assert fresh["id"].startswith("chatcmpl-tool-") and fresh["id"] != call["id"]
    assert stored["choices"][0]["message"]["tool_calls"][0]["id"] == "chatcmpl-tool-abc"
