"""Stored responses are bounded: per record size, per chain length, per key TTL, and without
Redis the gateway's own store expires and holds at most so many."""

from __future__ import annotations

import asyncio
from typing import Any

from serve.config import Config
from serve.gateway.auth import hash_key
from serve.gateway.backends import Backends
from serve.gateway.response_store import ResponseStore
from serve.gateway.service import Gateway
from tests.fakes import FakeTime, FakeUpstream


def gateway(**gw: Any) -> Gateway:
    cfg = Config.model_validate({
        "models": [{"name": "m", "source": "x"}],
        "auth": {"keys": [{"name": "k", "sha256": hash_key("sk")},
                          {"name": "brief", "sha256": hash_key("sk-b"), "responses_ttl_s": 60}]},
        "gateway": gw,
    })
    backends = Backends()
    backends.update({"m": [("m#1", "http://m")]})
    return Gateway(cfg, backends, FakeUpstream(text="ok"))


def test_a_chain_longer_than_max_turns_is_refused() -> None:
    async def main() -> None:
        gw = gateway(responses_max_turns=3)
        key = gw.keys.by_name("k")
        prev = None
        for _ in range(3):
            a = await gw.handle(key, "/v1/responses", {"model": "m", "input": "x", "previous_response_id": prev})
            assert a.status == 200 and a.body is not None
            prev = a.body["id"]
        fourth = await gw.handle(key, "/v1/responses", {"model": "m", "input": "x", "previous_response_id": prev})
        assert fourth.status == 400 and fourth.body is not None
        assert fourth.body["error"]["param"] == "previous_response_id"

    asyncio.run(main())


def test_a_response_too_large_to_keep_is_answered_but_not_stored() -> None:
    async def main() -> None:
        gw = gateway(responses_max_bytes=2000)
        key = gw.keys.by_name("k")
        small = await gw.handle(key, "/v1/responses", {"model": "m", "input": "x"})
        assert small.body is not None and small.body["store"] is True
        big = await gw.handle(key, "/v1/responses", {"model": "m", "input": "y" * 3000})
        assert big.status == 200 and big.body is not None and big.body["store"] is False
        assert (await gw.response_store.record(big.body["id"])) is None
        bg = await gw.handle(key, "/v1/responses", {"model": "m", "input": "y" * 3000, "background": True})
        assert bg.status == 400

    asyncio.run(main())


def test_the_in_process_store_expires_per_key_and_holds_at_most_max_local() -> None:
    async def main() -> None:
        clock = FakeTime(0.0)
        store = ResponseStore(None, 3600, max_local=2, ttl_by_key={"brief": 60}, clock=clock.time)
        await store.put("a", "k", {}, [])
        await store.put("b", "brief", {}, [])
        clock.now += 61
        assert await store.record("b") is None and await store.record("a") is not None  # brief's TTL
        await store.put("c", "k", {}, [])
        await store.put("d", "k", {}, [])
        assert await store.record("a") is None  # the oldest went first
        assert await store.record("c") is not None and await store.record("d") is not None
        clock.now += 3600
        assert await store.record("c") is None  # the gateway's TTL

    asyncio.run(main())


def test_a_keys_responses_ttl_reaches_redis(redis_url: str) -> None:
    async def main() -> None:
        store = ResponseStore(redis_url, 3600, ttl_by_key={"brief": 60})
        try:
            await store.put("r1", "brief", {}, [])
            await store.put("r2", "k", {}, [])
            assert 0 < await store.redis.ttl("llmserve:responses:r1") <= 60
            assert 60 < await store.redis.ttl("llmserve:responses:r2") <= 3600
        finally:
            await store.close()

    asyncio.run(main())
