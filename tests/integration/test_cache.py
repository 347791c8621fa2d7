"""A head cache that never lies, on the real stack: `llmserve cache invalidate` reaches every
running gateway's in-process LRU, a streamed answer is stored whole (logprobs too), and requests
that differ in a parameter vLLM honours never share an entry."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.support import free_port, serving

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def msgs(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def second_gateway(stack):
    """Another gateway process's worth of state (its own LRU), in this process, on the same Redis
    and engines: what a second gateway replica is."""
    from openai import OpenAI

    from serve.gateway.server import build_gateway, ray_snapshot_source

    gateway = stack.config.gateway.model_copy(update={"port": free_port(), "metrics_port": free_port()})
    # No batch worker: one per batch database is the stack's.
    batch = stack.config.batch.model_copy(update={"enabled": False})
    config = stack.config.model_copy(update={"gateway": gateway, "batch": batch})
    app = build_gateway(config, ray_snapshot_source(stack.registry))
    with serving(app, config):
        yield OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="test", max_retries=0, timeout=120)


def cache_state(client, question, **kw) -> str:
    raw = client.chat.completions.with_raw_response.create(model="head", messages=question, max_tokens=8,
                                                           temperature=0, **kw)
    return raw.headers["x-llmserve-cache"]


def test_cache_invalidate_reaches_every_gateway_within_a_second(stack, second_gateway):
    first = stack.client()
    tag = uuid.uuid4().hex[:6]
    q1, q2 = msgs(f"Track parcel {tag}"), msgs(f"Cancel parcel {tag}")
    for q in (q1, q2):
        assert cache_state(first, q) == "miss"
        assert cache_state(first, q) == "hit"  # from the first gateway's LRU
        assert cache_state(second_gateway, q) == "hit"  # through Redis, now in the second one's LRU too
        assert cache_state(second_gateway, q) == "hit"
    done = subprocess.run([sys.executable, "-m", "serve.cli", "cache", "invalidate", "--route", "head",
                           "--redis-url", stack.redis.url], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    time.sleep(1.0)
    # One question per gateway: a miss stores its answer again, which the other one could find.
    assert cache_state(first, q1) == "miss"
    assert cache_state(second_gateway, q2) == "miss"


def test_streamed_answer_is_stored_with_its_logprobs(stack):
    client = stack.client()
    ask = {"model": "head", "messages": msgs(f"Describe parcel {uuid.uuid4().hex[:6]}"), "max_tokens": 8,
           "temperature": 0, "logprobs": True, "top_logprobs": 2}
    raw = client.chat.completions.with_raw_response.create(**ask, stream=True)
    chunks = list(raw.parse())
    assert (raw.headers["x-llmserve-cache"], raw.headers["x-llmserve-served-by"]) == ("miss", "tiny-b")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    hit = client.chat.completions.with_raw_response.create(**ask)
    assert hit.headers["x-llmserve-cache"] == "hit"
    cached = hit.parse().choices[0]
    fresh = client.chat.completions.create(**{**ask, "model": "tiny-b"}).choices[0]  # the route's model, uncached
    assert cached.message.content == fresh.message.content == streamed
    assert cached.finish_reason == fresh.finish_reason
    assert [t.token for t in cached.logprobs.content] == [t.token for t in fresh.logprobs.content]
    assert [t.logprob for t in cached.logprobs.content] == pytest.approx(
        [t.logprob for t in fresh.logprobs.content], abs=1e-3)
    assert [len(t.top_logprobs) for t in cached.logprobs.content] == [2] * len(fresh.logprobs.content)

    # A streamed hit replays them as an engine streams them.
    again = client.chat.completions.with_raw_response.create(**ask, stream=True)
    replayed = [t.token for c in again.parse() if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content or []]
    assert again.headers["x-llmserve-cache"] == "hit"
    assert replayed == [t.token for t in fresh.logprobs.content]


@pytest.mark.parametrize("extra", [{"min_tokens": 6}, {"ignore_eos": True}])
def test_engine_parameters_do_not_share_an_entry(stack, extra):
    client = stack.client()
    question = msgs(f"Refund order {uuid.uuid4().hex[:6]}")
    assert cache_state(client, question) == "miss"
    assert cache_state(client, question) == "hit"
    assert cache_state(client, question, extra_body=extra) == "miss"
    assert cache_state(client, question, extra_body=extra) == "hit"  # it has an entry of its own


# ---- between tenants (issue 26) ----------------------------------------------------------------
def _key(name: str, **kw):
    import hashlib

    from serve.config import ApiKey

    return ApiKey(name=name, sha256=hashlib.sha256(name.encode()).hexdigest(), **kw)


@pytest.fixture(scope="module")
def tenant_gateway(stack):
    """A gateway on the stack's engines and Redis with tenant routes and keys: a cache scoped per
    key, a cached cascade the tests promote, keys with a `cache_salt` (one vLLM would refuse, set
    past the config's check, to see that the key's own salt is what reaches vLLM)."""
    from serve.config import RouteSpec
    from serve.gateway.server import build_gateway, ray_snapshot_source

    cascade = {"student": "tiny-a-lora", "teacher": "tiny-b", "min_mean_logprob": -1000, "escalate_on_length": False}
    own = {"name": "tenant-own", "target": "tiny-b", "cache": {"ttl_s": 600, "scope": "key"}}
    routes = [*stack.config.routes, RouteSpec.model_validate(own),
              RouteSpec.model_validate({"name": "tenant-cascade", "cache": {"ttl_s": 600}, "cascade": cascade})]
    keys = [*stack.config.auth.keys, _key("tenant-a"), _key("tenant-b"), _key("salted", cache_salt="tenant-salt-1"),
            _key("bad-salt").model_copy(update={"cache_salt": "vllm@refuses"})]
    gateway = stack.config.gateway.model_copy(update={"port": free_port(), "metrics_port": free_port()})
    config = stack.config.model_copy(update={
        "gateway": gateway, "routes": routes, "batch": stack.config.batch.model_copy(update={"enabled": False}),
        "auth": stack.config.auth.model_copy(update={"keys": keys})})
    app = build_gateway(config, ray_snapshot_source(stack.registry))
    from openai import OpenAI

    with serving(app, config):
        yield lambda key: OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key=key, max_retries=0,
                                 timeout=120)


def ask_raw(client, model, question, **kw):
    return client.chat.completions.with_raw_response.create(model=model, messages=question, max_tokens=8,
                                                            temperature=0, **kw)


def test_a_route_scoped_per_key_shares_no_entry_between_keys_and_shows_no_provenance(tenant_gateway):
    a, b = tenant_gateway("tenant-a"), tenant_gateway("tenant-b")
    q = msgs(f"My order number is {uuid.uuid4().hex[:6]}")
    assert [ask_raw(c, "tenant-own", q).headers["x-llmserve-cache"] for c in (a, a, b, b)] == ["miss", "hit"] * 2
    hit = ask_raw(b, "tenant-own", q)
    assert hit.headers["x-llmserve-cache"] == "hit" and "llmserve_provenance" not in (hit.parse().model_extra or {})
    # On a route-scoped cache the second key gets the first key's entry; provenance only for an admin.
    q2 = msgs(f"My ticket number is {uuid.uuid4().hex[:6]}")
    assert cache_state(a, q2) == "miss" and cache_state(b, q2) == "hit"
    admin = ask_raw(tenant_gateway("test"), "head", q2)
    assert admin.parse().model_extra["llmserve_provenance"]["model"] == "tiny-b"


def test_a_keys_cache_salt_is_what_vllm_gets(tenant_gateway):
    from openai import BadRequestError

    q = msgs(f"Salted question {uuid.uuid4().hex[:6]}")
    # vLLM refuses a salt with `@`: the key's own salt reached it (the request itself carries none).
    with pytest.raises(BadRequestError) as e:
        ask_raw(tenant_gateway("bad-salt"), "tiny-b", q)
    assert "cache_salt" in str(e.value)
    # ...and a key with a salt replaces the client's: the same refused salt, sent by the client, never reaches vLLM.
    with pytest.raises(BadRequestError):
        ask_raw(tenant_gateway("tenant-a"), "tiny-b", q, extra_body={"cache_salt": "vllm@refuses"})
    salted = ask_raw(tenant_gateway("salted"), "tiny-b", q, extra_body={"cache_salt": "vllm@refuses"})
    assert salted.http_response.status_code == 200
    # The salt keeps the key's head-cache entries apart too.
    states = [cache_state(tenant_gateway(k), q) for k in ("salted", "salted", "tenant-a", "tenant-a")]
    assert states == ["miss", "hit"] * 2


def test_a_promotion_and_a_rollback_make_the_old_students_answers_miss(stack, tenant_gateway):
    import asyncio

    from serve.students.registry import LifecycleStore

    client = tenant_gateway("tenant-a")
    q = msgs(f"Promoted question {uuid.uuid4().hex[:6]}")

    def state():
        raw = ask_raw(client, "tenant-cascade", q)
        return raw.headers["x-llmserve-cache"], raw.headers["x-llmserve-served-by"]

    assert [state(), state()] == [("miss", "tiny-a-lora"), ("hit", "cache:tiny-a-lora")]

    async def change(promote: bool) -> None:
        store = LifecycleStore(stack.redis.url)
        try:
            if promote:  # what `llmserve students promote` records once the gate passes
                await store.promote("tenant-cascade", "student", "tiny-a", "tiny-a-lora", "test")
            else:
                assert await store.rollback("tenant-cascade") is not None
        finally:
            await store.close()

    def until_served_by(model: str) -> list[tuple[str, str]]:
        seen = [state()]
        deadline = time.monotonic() + 30
        while seen[-1][1] not in (model, f"cache:{model}") and time.monotonic() < deadline:
            time.sleep(0.2)  # the gateway's lifecycle loop picks the change up within a second
            seen.append(state())
        return seen

    asyncio.run(change(promote=True))
    try:
        seen = until_served_by("tiny-a")
        # The old student's entry answered until the route moved, never after: the new one misses, then hits.
        assert seen[-1] == ("miss", "tiny-a") and set(seen[:-1]) <= {("hit", "cache:tiny-a-lora")}
        assert state() == ("hit", "cache:tiny-a")
    finally:
        asyncio.run(change(promote=False))
    seen = until_served_by("tiny-a-lora")
    assert seen[-1] == ("miss", "tiny-a-lora") and set(seen[:-1]) <= {("hit", "cache:tiny-a")}
    assert state() == ("hit", "cache:tiny-a-lora")
