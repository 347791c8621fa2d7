"""The cache-aware router on tiny-a's two real engine replicas: a shared prefix reaches one replica's
vLLM prefix cache (vLLM's own hit counter rises there, not on the other), and a load skew on that
replica moves the prefix's next requests to the other one."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

import httpx
import pytest

pytestmark = pytest.mark.integration

def engine_hits(url: str) -> int:
    """vLLM's prefix-cache hits (tokens) on one replica: the counts vLLM adds to
    vllm:prefix_cache_hits, which the replica's /metrics lacks under Ray's stat logger (they go to
    Ray's metrics, off in tests); the replica's /llmserve/stats sums them (serve/engine/direct.py)."""
    r = httpx.get(url + "/llmserve/stats", timeout=10)
    r.raise_for_status()
    return r.json()["prefix_cache_tokens"]["hits"]


def system_prompt() -> dict[str, str]:
    # New to every engine (the nonce comes first), long enough for vLLM to cache whole blocks of it.
    return {"role": "system", "content": f"[{uuid.uuid4().hex}] You are the order-status assistant of a large "
                                         "shop. Answer briefly and politely, citing the order number. " * 4}


def ask(client, system, question: str) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-a", messages=[system, {"role": "user", "content": question}], max_tokens=2, temperature=0)
    return raw.headers["x-llmserve-replica"]


@pytest.fixture(scope="module")
def replicas(stack):
    assert stack.config.gateway.routing.policy == "cache_aware"
    found = dict(stack.replicas("tiny-a"))
    assert len(found) == 2
    return found


def test_a_shared_prefix_reaches_one_replicas_prefix_cache(stack, replicas):
    client, system = stack.client(), system_prompt()
    before = {rid: engine_hits(url) for rid, url in replicas.items()}
    landed = [ask(client, system, f"Where is order {n}?") for n in range(6)]
    assert len(set(landed)) == 1, landed
    (chosen,) = set(landed)
    (other,) = set(replicas) - {chosen}
    after = {rid: engine_hits(url) for rid, url in replicas.items()}
    # Five requests after the first each find the system prompt's blocks cached (some 250 tokens).
    assert after[chosen] - before[chosen] >= 5 * 100, (before, after)
    assert after[other] == before[other], (before, after)


def test_a_load_skew_moves_a_prefix_to_the_other_replica(stack, replicas):
    client, system = stack.client(), system_prompt()
    home = ask(client, system, "Where is order 1?")
    (other,) = set(replicas) - {home}
    backends = stack.server.config.app.state.gateway.backends
    home_ep = next(e for e in backends.endpoints("tiny-a") if e.replica_id == home)
    # Five long streams of the same prefix: the first four stay home (its cache); the fifth ties
    # (1 - 4 x load_weight = 0) and the tie goes to the prefix's rendezvous replica, home again.
    started, release = threading.Barrier(6), threading.Event()
    streams, errors = [], []

    def hold(n: int) -> None:
        try:
            stream = client.chat.completions.create(
                model="tiny-a", messages=[system, {"role": "user", "content": f"Tell me about order {n}."}],
                max_tokens=100, stream=True, extra_body={"ignore_eos": True},
                logprobs=True, top_logprobs=20)  # big chunks: unread, they fill the socket and hold the stream
            streams.append(stream)
            next(iter(stream))
        except Exception as e:  # the assertions below name it
            errors.append(e)
            started.abort()
            return
        with contextlib.suppress(threading.BrokenBarrierError):
            started.wait(60)
        release.wait(60)

    threads = [threading.Thread(target=hold, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    try:
        with contextlib.suppress(threading.BrokenBarrierError):  # a stream that failed breaks it
            started.wait(60)
        assert not errors, errors
        assert home_ep.in_flight >= 5  # the skew is there while the next requests are routed
        moved = [ask(client, system, f"Where is order {n}?") for n in range(2, 5)]
        assert home_ep.in_flight >= 5
        assert moved == [other] * 3, moved
    finally:
        release.set()
        for s in list(streams):
            s.close()  # the gateway closes the engine's stream: vLLM aborts the request
        for t in threads:
            t.join(30)
    deadline = time.monotonic() + 10
    while home_ep.in_flight and time.monotonic() < deadline:
        time.sleep(0.1)
    assert home_ep.in_flight == 0
