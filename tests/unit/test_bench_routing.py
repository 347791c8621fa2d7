"""`make bench-routing`'s pure parts: the seeded workloads (bench/workloads.py: sizes, reuse
structure, arrivals), what a run computes (bench/routing_stats.py: goodput, percentiles, vLLM's
counters per replica, issue 27 §3's goals), the distinct-prefix count (bench/routing.py) and the
open-loop replayer (bench/routing_load.py) against a small streaming server on a thread."""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
from collections import Counter
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from bench import routing_load
from bench import routing_stats as stats
from bench import workloads as wl
from bench.routing import BLOCK, distinct_prefix_tokens
from serve.config import Config
from serve.gateway.server import serving_on_thread

CONFIG = Config.model_validate({"models": [{"name": "m", "source": "builtin://tiny", "accelerator": "cpu"}],
                                "gateway": {"port": 0, "metrics_port": 0, "drain_timeout_s": 1}})


def test_workloads_are_seeded() -> None:
    for make in (lambda s: wl.tenants(20, s), lambda s: wl.conversations(4, 3, s), lambda s: wl.zipf(50, s),
                 lambda s: wl.uniform(10, s)):
        assert make(3) == make(3)
        assert make(3) != make(4)


def test_tenants_have_one_long_system_prompt_each_and_poisson_arrivals() -> None:
    reqs = wl.tenants(2000, seed=1, tenants=16, system_words=1480, rate=2.0)
    assert len(reqs) == 2000
    systems: dict[str, set[str]] = {}
    for r in reqs:
        (role, system), (urole, question) = r.messages
        assert (role, urole) == ("system", "user")
        systems.setdefault(r.group, set()).add(system)
        assert 8 <= len(question.split()) <= 24
    assert len(systems) == 16 and all(len(s) == 1 for s in systems.values())
    assert len({next(iter(s)) for s in systems.values()}) == 16
    assert all(len(next(iter(s)).split()) == 1480 + 2 for s in systems.values())  # "tenant N:" + words
    gaps = [b.at - a.at for a, b in itertools.pairwise(reqs)]
    assert min(gaps) >= 0 and reqs[0].at == 0
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.1)  # mean gap 1 / rate
    assert statistics.stdev(gaps) == pytest.approx(0.5, rel=0.15)  # exponential: sd = mean


def test_each_turn_of_a_conversation_resends_the_history_of_the_one_before() -> None:
    reqs = wl.conversations(conversations=32, turns=6, seed=2)
    assert len(reqs) == 32 * 6
    by_id = {r.id: r for r in reqs}
    assert len({r.messages[0] for r in reqs}) == 1  # one app system prompt for every chat
    firsts = [r for r in reqs if r.after is None]
    assert len(firsts) == 32 and len({r.group for r in firsts}) == 32
    for r in reqs:
        if r.after is None:
            assert [m[0] for m in r.messages] == ["system", "user"]
            continue
        prev = by_id[r.after]
        assert prev.group == r.group and r.at >= 0
        # The previous prompt, then its answer, then the new question: the old prompt is a prefix.
        assert r.messages[: len(prev.messages)] == prev.messages
        assert [m[0] for m in r.messages[len(prev.messages):]] == ["assistant", "user"]
    assert Counter(r.group for r in reqs) == {f"chat-{c}": 6 for c in range(32)}


def test_zipf_repeats_follow_the_law_over_the_distinct_queries() -> None:
    reqs = wl.zipf(20_000, seed=3, distinct=1000, s=1.1, query_words=5)
    counts = Counter(r.group for r in reqs)
    assert len(counts) <= 1000
    assert counts.most_common(1)[0][0] == "query-0"
    assert len({r.messages for r in reqs if r.group == "query-7"}) == 1  # a repeat is the same text
    w = wl.zipf_weights(1000, 1.1)
    expected_top100 = sum(w[:100]) / sum(w)  # ~0.77, as make demo's log says
    top100 = sum(counts[f"query-{q}"] for q in range(100)) / len(reqs)
    assert expected_top100 == pytest.approx(0.77, abs=0.01)
    assert top100 == pytest.approx(expected_top100, abs=0.015)


def test_uniform_prompts_share_nothing() -> None:
    reqs = wl.uniform(200, seed=4, prompt_words=50)
    assert len({r.group for r in reqs}) == 200
    starts = {r.messages[0][1].split(":", 1)[1][:60] for r in reqs}
    assert len(starts) == 200


def test_adapters_take_about_half_the_requests_by_whole_groups() -> None:
    base = wl.tenants(400, seed=5, system_words=10)
    lora = wl.with_adapters(base, ["a", "b"], share=0.5)
    assert [(r.id, r.messages, r.at) for r in lora] == [(r.id, r.messages, r.at) for r in base]
    models: dict[str, set[str]] = {}
    for r in lora:
        models.setdefault(r.group, set()).add(r.model)
    assert all(len(m) == 1 for m in models.values())  # a tenant keeps one model
    by_model = Counter(next(iter(m)) for m in models.values())
    assert by_model == {"tiny": 8, "a": 4, "b": 4}
    share = sum(1 for r in lora if r.model != "tiny") / len(lora)
    assert share == pytest.approx(0.5, abs=0.1)


def test_a_salt_goes_before_the_first_message_only() -> None:
    r = wl.conversations(1, 2, seed=0)[1]
    body = r.body("[0123]")
    assert body["messages"][0]["content"] == "[0123] " + r.messages[0][1]
    assert [m["content"] for m in body["messages"][1:]] == [c for _, c in r.messages[1:]]
    assert body["stream"] and body["ignore_eos"] and body["max_tokens"] == r.max_tokens
    assert r.body()["messages"][0]["content"] == r.messages[0][1]


class WordTokenizer:
    """Texts of numbers, one token each; the chat template adds one token in front."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return [-1] + [int(w) for m in messages for w in m["content"].split()]


def test_distinct_prefix_tokens_counts_each_shared_full_block_once() -> None:
    shared = " ".join(map(str, range(BLOCK * 2)))  # with the template's token: 2 blocks shared, 1 token on
    reqs = [wl.Request(i, (("user", f"{shared} " + " ".join(str(1000 * i + k) for k in range(10))),), 0.0, f"g{i}")
            for i in range(3)]
    out = distinct_prefix_tokens(reqs, WordTokenizer())
    # 1 + 2*BLOCK + 10 tokens each: the first two blocks are the same in all three.
    assert out == {"tokens": 2 * BLOCK, "shared_tokens": 2 * BLOCK, "longest_prompt": 2 * BLOCK + 11, "groups": 3}
    # The same prompts on another model are other blocks (vLLM keys them by adapter too), and a
    # block one request alone makes is distinct but shared by none.
    other = [wl.Request(9, reqs[0].messages, 0.0, "g9", model="lora")]
    out = distinct_prefix_tokens([*reqs, *other], WordTokenizer())
    assert (out["tokens"], out["shared_tokens"]) == (4 * BLOCK, 2 * BLOCK)


def rows(ttfts: list[float | None]) -> list[dict]:
    return [{"ok": t is not None, "ttft_s": t, "replica": f"r{i % 2}"} if t is not None else {"ok": False}
            for i, t in enumerate(ttfts)]


def test_goodput_counts_finished_requests_within_the_slo_per_second() -> None:
    s = stats.summarize(rows([0.1, 0.2, 0.5, 1.0, 3.0, None]), wall_s=2.0, slo_s=0.5)
    assert (s["ok"], s["errors"]) == (5, 1)
    assert s["goodput_req_per_s"] == pytest.approx(3 / 2.0)  # 0.1, 0.2 and 0.5 (the bound is within)
    assert s["req_per_s"] == pytest.approx(5 / 2.0)
    assert s["within_slo"] == pytest.approx(3 / 6)  # of every request sent, failed ones included
    assert s["ttft_ms"]["p50"] == pytest.approx(500)
    assert s["ttft_ms"]["p90"] == pytest.approx(1000 + 0.6 * 2000)
    assert s["requests_by_replica_header"] == {"r0": 3, "r1": 2}


BARE = """# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 4096.0
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 1024.0
vllm:external_prefix_cache_hits_total{engine="0",model_name="tiny"} 999.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"} 7.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny"} 1.0
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
"""
RAY = """ray_vllm_prefix_cache_queries_total{ReplicaId="a",engine="0",model_name="tiny"} 100
ray_vllm_prefix_cache_hits_total{ReplicaId="a",engine="0",model_name="tiny"} 60
ray_vllm_prefix_cache_queries_total{ReplicaId="b",engine="0",model_name="tiny"} 50
ray_vllm_prefix_cache_hits_total{ReplicaId="b",engine="0",model_name="tiny"} 0
ray_vllm_request_success_total{ReplicaId="b",engine="0",finished_reason="length",model_name="tiny"} 4
ray_serve_num_router_requests_total{deployment="x"} 5
"""


def test_engine_counters_of_a_bare_replica_and_of_ray_replicas() -> None:
    assert stats.engine_counters(BARE) == {"": {stats.HITS: 1024.0, stats.QUERIES: 4096.0, stats.SUCCESS: 8.0}}
    ray = stats.engine_counters(RAY, by_label="ReplicaId")
    assert ray == {"a": {stats.HITS: 60.0, stats.QUERIES: 100.0, stats.SUCCESS: 0.0},
                   "b": {stats.HITS: 0.0, stats.QUERIES: 50.0, stats.SUCCESS: 4.0}}


def test_hit_rate_is_over_the_run_only() -> None:
    before = {"a": {stats.HITS: 100.0, stats.QUERIES: 400.0, stats.SUCCESS: 2.0}}
    after = {"a": {stats.HITS: 400.0, stats.QUERIES: 800.0, stats.SUCCESS: 6.0},
             "b": {stats.HITS: 0.0, stats.QUERIES: 0.0, stats.SUCCESS: 0.0}}
    d = stats.counter_delta(before, after)
    assert d["a"] == {stats.HITS: 300.0, stats.QUERIES: 400.0, stats.SUCCESS: 4.0, "hit_rate": 0.75}
    assert math.isnan(d["b"]["hit_rate"])
    assert stats.spread([4.0, 0.0]) == 1.0 and stats.spread([3.0, 3.0]) == 0.5


def cell(p90: float, goodput: float = 1.0, rps: float = 1.0) -> dict:
    return {"ttft_ms": {"p50": p90 / 2, "p90": p90, "p99": p90 * 2}, "goodput_req_per_s": goodput, "req_per_s": rps}


def test_goals_compare_our_router_with_each_peer() -> None:
    ours, rr = stats.GOAL_ROUTER, stats.ROUND_ROBIN
    results = {
        "tenants": {rr: cell(1000, 1.0), stats.VR_CACHE: cell(600), stats.VR_KV: cell(500), ours: cell(500, 1.5)},
        "conversations": {rr: cell(1000, 1.0), stats.VR_CACHE: cell(400), ours: cell(501, 1.49)},
        "uniform": {rr: cell(1, rps=2.0), ours: cell(1, rps=1.93)},
        "tenants+lora": {rr: cell(1000), ours: cell(500)},
    }
    got = {g["name"]: g for g in stats.goals(results)}
    assert len(got) == 10
    rr_goal = got["tenants: TTFT p90 / round robin's"]
    assert rr_goal["met"] and rr_goal["measured"] == 0.5
    assert got["tenants: TTFT p90 / vllm-router cache_aware's"]["met"]
    assert got["tenants: TTFT p90 / vllm-router kv_aware's"]["met"]  # equal is no worse
    assert got["tenants: goodput / round robin's"]["met"]
    assert not got["conversations: TTFT p90 / round robin's"]["met"]  # 0.501
    assert not got["conversations: TTFT p90 / vllm-router cache_aware's"]["met"]
    assert not got["conversations: goodput / round robin's"]["met"]  # 1.49
    kv = got["conversations: TTFT p90 / vllm-router kv_aware's"]  # not run: listed, unmet, said so
    assert kv["measured"] is None and not kv["met"] and "not measured" in kv["note"]
    assert not got["uniform: throughput / round robin's"]["met"]  # 0.965: just under
    assert got["uniform: throughput / round robin's"]["measured"] == 0.965
    lora = got["tenants+lora: (TTFT p90 / round robin's) over the same without adapters"]
    assert lora["met"] and lora["measured"] == 1.0
    results["uniform"][ours] = cell(1, rps=1.94)
    assert {g["name"]: g for g in stats.goals(results)}["uniform: throughput / round robin's"]["met"]


async def slow_chat(request: Request) -> StreamingResponse:
    """First token after the `max_tokens` the request asks for, in tenths of a second."""
    body = await request.json()
    delay = body["max_tokens"] / 10

    async def events() -> Any:
        await asyncio.sleep(delay)
        yield b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
        yield b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"x-llmserve-replica": "tiny#r1"})


def test_the_replayer_waits_for_the_previous_turn_and_fails_what_the_deadline_cuts() -> None:
    reqs = [wl.Request(0, (("user", "a"),), 0.0, "c", max_tokens=3),  # first token after 0.3 s
            wl.Request(1, (("user", "a"), ("assistant", "x"), ("user", "b")), 0.2, "c", after=0, max_tokens=1),
            wl.Request(2, (("user", "z"),), 0.1, "u", max_tokens=1),
            wl.Request(3, (("user", "late"),), 0.0, "l", max_tokens=30)]  # 3 s: past the deadline
    app = Starlette(routes=[Route("/v1/chat/completions", slow_chat, methods=["POST"])])
    with serving_on_thread(app, CONFIG) as server:
        port = server.servers[0].sockets[0].getsockname()[1]
        out = asyncio.run(routing_load.replay(f"http://127.0.0.1:{port}/v1", reqs, "[s]", deadline_s=1.5))
    rows = {r["id"]: r for r in out["requests"]}
    assert [rows[i]["ok"] for i in range(4)] == [True, True, True, False]
    assert rows[3]["status"] == "deadline" and out["wall_s"] < 2.5
    assert rows[0]["ttft_s"] == pytest.approx(0.3, abs=0.15)
    # Turn 2 left 0.2 s (its think time) after turn 1 had finished; the open-loop one at its time.
    assert rows[1]["sent_s"] >= rows[0]["end_s"] + 0.2
    assert rows[2]["sent_s"] == pytest.approx(0.1, abs=0.1)
    assert rows[0]["replica"] == "tiny#r1" and rows[0]["prompt_tokens"] == 3
