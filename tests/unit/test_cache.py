"""The head cache must never answer wrong: its key, the stream assembler/replay, and invalidation
across gateways (two HeadCache instances on one real redis-server)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import time

import pytest

from serve.cache.store import CacheEntry, HeadCache
from serve.gateway.sse import StreamAssembler, replay
from serve.policies.cache_key import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    EMBEDDINGS_PATH,
    NON_OUTPUT_FIELDS,
    Normalization,
    cache_key,
    is_deterministic,
)
from tests.support import free_port

CHAT = {"model": "r", "messages": [{"role": "user", "content": "What  is\tthe capital of France? "}],
        "temperature": 0, "max_tokens": 16}


def key(payload, path=CHAT_PATH, route="r", norm=None):
    return cache_key(route, path, payload, norm or Normalization())


# ---- key ------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [
    # Passed through to vLLM by the validator: each changes what the engine returns.
    {"min_tokens": 4}, {"ignore_eos": True}, {"stop_token_ids": [13]}, {"allowed_token_ids": [1, 2, 3]},
    {"chat_template_kwargs": {"enable_thinking": False}},
    {"structured_outputs": {"json": {"type": "object"}}}, {"guided_json": {"type": "object"}},
    {"guided_regex": "[a-z]+"}, {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
    {"bad_words": ["x"]}, {"skip_special_tokens": False}, {"return_token_ids": True}, {"cache_salt": "t1"},
    {"frobnicate_v99": 3},  # a parameter some future vLLM adds: differs by default
    # The classic sampling parameters.
    {"max_tokens": 17}, {"temperature": 0.5}, {"seed": 1}, {"stop": ["x"]}, {"top_p": 0.9}, {"logprobs": True},
    {"messages": [{"role": "system", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "user", "content": "What is the capital of France?", "name": "bob"}]},
])
def test_key_changes_with_every_field_that_reaches_the_engine(change):
    assert key(CHAT) != key({**CHAT, **change})


def test_key_ignores_whitespace_transport_and_listed_fields():
    same = {**CHAT, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "stream": True, "stream_options": {"include_usage": True}, "user": "u1", "request_id": "abc",
            "priority": 5, "model": "whatever", "seed": None}  # null is the engine's default
    assert key(CHAT) == key(same)


def test_allowlist_is_the_reviewed_one():
    # Adding a field here makes requests that differ in it share an answer: review it, then update.
    assert {"model", "stream", "stream_options", "user", "request_id", "priority"} == NON_OUTPUT_FIELDS


def test_key_namespaced_by_route_and_endpoint():
    assert key(CHAT) != key(CHAT, route="other")
    prompt = {"model": "r", "prompt": "hi", "temperature": 0}
    assert key(prompt, CHAT_PATH) != key(prompt, COMPLETIONS_PATH)
    assert key(prompt, COMPLETIONS_PATH) != key(prompt, EMBEDDINGS_PATH)
    # Both query fields count: a chat body with a stray `prompt` is not the plain chat body.
    assert key(CHAT) != key({**CHAT, "prompt": "x"})


def test_embedding_key_is_its_input_verbatim():
    emb = {"model": "r", "input": "the quick brown fox"}
    assert key(emb, EMBEDDINGS_PATH) == key(dict(emb), EMBEDDINGS_PATH)
    assert key(emb, EMBEDDINGS_PATH) != key({**emb, "input": "the slow brown fox"}, EMBEDDINGS_PATH)
    assert key(emb, EMBEDDINGS_PATH) != key({**emb, "input": ["the quick brown fox"]}, EMBEDDINGS_PATH)
    # Whitespace changes an embedding: not normalised away.
    assert key(emb, EMBEDDINGS_PATH) != key({**emb, "input": "the  quick brown fox"}, EMBEDDINGS_PATH)
    assert key(emb, EMBEDDINGS_PATH) != key({**emb, "dimensions": 8}, EMBEDDINGS_PATH)


def test_case_normalisation_is_opt_in_and_odd_input_hashes():
    upper = {**CHAT, "messages": [{"role": "user", "content": "WHAT is the capital of France?"}]}
    assert key(CHAT) != key(upper)
    assert key(CHAT, norm=Normalization(case=True)) == key(upper, norm=Normalization(case=True))
    for payload in [{"messages": "not a list"}, {"messages": [1, None, {"content": None}]}, {"prompt": [1, 2]}]:
        assert len(key(payload)) == 64
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": " a  b "}]}]}
    assert key(parts) == key({"messages": [{"role": "user", "content": [{"type": "text", "text": "a b"}]}]})


@pytest.mark.parametrize("payload,cacheable,path,expected", [
    ({"temperature": 0}, False, CHAT_PATH, True), ({}, False, CHAT_PATH, False),
    ({"temperature": 0.7}, False, CHAT_PATH, False), ({"temperature": 0.7}, True, CHAT_PATH, True),
    ({"temperature": False}, False, CHAT_PATH, False), ({"input": "x"}, False, EMBEDDINGS_PATH, True),
    ({"temperature": 0.7}, False, "", False),
])
def test_determinism(payload, cacheable, path, expected):
    assert is_deterministic(payload, cacheable, path=path) is expected


# ---- stream assembler ----------------------------------------------------------------------
def sse(*objs) -> bytes:
    return b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs) + b"data: [DONE]\n\n"


def chunk(*choices, **top):
    # vLLM's exclude_unset output: explicitly-null fields (token_ids, prompt_token_ids) are sent.
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "choices": list(choices), **top}


def delta(d, finish=None, logprobs=None, **kw):
    return {"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": finish, "token_ids": None, **kw}


USAGE = {"prompt_tokens": 5, "total_tokens": 12, "completion_tokens": 7}
ROLE = chunk(delta({"role": "assistant", "content": ""}), prompt_token_ids=None)


def assemble(data: bytes, step: int | None = None):
    a = StreamAssembler()
    step = step or len(data)
    for i in range(0, len(data), step):  # chunk boundaries fall anywhere
        a.feed(data[i:i + step])
    return a.response()


def tool(index, **kw):
    return {"index": index, **kw}


def test_tool_call_stream_assembles_to_the_unstreamed_body():
    data = sse(
        ROLE,
        chunk(delta({"tool_calls": [tool(0, id="call-a", type="function", function={"name": "get_weather"})]})),
        chunk(delta({"tool_calls": [tool(0, function={"arguments": '{"city": '})]})),
        chunk(delta({"tool_calls": [tool(0, function={"arguments": '"Paris"}'})]})),
        chunk(delta({"tool_calls": [tool(1, id="call-b", type="function",
                                         function={"name": "get_time", "arguments": "{}"})]})),
        chunk(delta({}, finish="tool_calls", stop_reason=None)),
        chunk(usage=USAGE),
    )
    expected = {"id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m", "usage": USAGE,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call-a", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"id": "call-b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                    "logprobs": None, "finish_reason": "tool_calls", "stop_reason": None}]}
    assert assemble(data) == expected
    assert assemble(data, step=7) == expected


def lp(token, logprob):
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()),
            "top_logprobs": [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]}


def test_logprobs_stream_keeps_every_token():
    data = sse(
        ROLE,
        chunk(delta({"content": "Par"}, logprobs={"content": [lp("Par", -0.1)]})),
        chunk(delta({"content": "is"}, logprobs={"content": [lp("is", -0.2)]})),
        chunk(delta({"content": "."}, finish="stop", logprobs={"content": [lp(".", -0.3)]}, stop_reason=None)),
    )
    (choice,) = assemble(data)["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Paris."}
    assert choice["logprobs"] == {"content": [lp("Par", -0.1), lp("is", -0.2), lp(".", -0.3)]}
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", None)


def test_completion_logprobs_stream_concatenates_each_list():
    def c(text, lps, finish=None, stop_reason=None):
        return {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m", "choices": [
            {"index": 0, "text": text, "logprobs": lps, "finish_reason": finish, "stop_reason": stop_reason}]}

    data = sse(c("Hel", {"tokens": ["Hel"], "token_logprobs": [-0.5], "top_logprobs": [{"Hel": -0.5}],
                          "text_offset": [0]}),
               c("lo", {"tokens": ["lo"], "token_logprobs": [-0.25], "top_logprobs": [{"lo": -0.25}],
                        "text_offset": [3]}, finish="length", stop_reason=None))
    body = assemble(data)
    assert body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "Hello", "finish_reason": "length", "stop_reason": None,
                                "logprobs": {"tokens": ["Hel", "lo"], "token_logprobs": [-0.5, -0.25],
                                             "top_logprobs": [{"Hel": -0.5}, {"lo": -0.25}], "text_offset": [0, 3]}}]


HELLO = [ROLE, chunk(delta({"content": "Hi"})), chunk(delta({}, finish="stop", stop_reason=None))]


@pytest.mark.parametrize("data", [
    sse(*HELLO)[: -len(b"data: [DONE]\n\n")],  # no [DONE]: the stream was cut
    sse(*HELLO[:2]),  # [DONE] but the choice never finished
    sse(*HELLO, chunk({"index": 1, "delta": {"content": "x"}, "finish_reason": None})),  # choice 1 unfinished
    sse(*HELLO[:2], {"error": {"message": "engine stream broke", "code": "engine_error"}}),
    sse(*HELLO[:2], chunk(delta({}, finish="abort"))),  # the engine gave up: not its answer
    sse(*HELLO[:2]).replace(b"[DONE]", b"{not json") + b"data: [DONE]\n\n",
    sse(*HELLO) + b"data: " + json.dumps(HELLO[1]).encode() + b"\n\n",  # data after [DONE]
    sse(*HELLO, chunk(delta({"content": "late"}))),  # content after the choice finished
])
def test_incomplete_or_broken_stream_is_not_stored(data):
    assert assemble(sse(*HELLO)) is not None  # the same stream, whole, is stored
    assert assemble(data) is None


@pytest.mark.parametrize("extra", [
    chunk(delta({"reasoning_content": "hmm"})), chunk(delta({"reasoning": "hmm"})),
    chunk(delta({"refusal": "no"})), chunk(delta({"content": "x"}, token_ids=[5])),
    chunk(delta({"content": "x"}), prompt_token_ids=[1, 2]), chunk(delta({"content": "x"}), metrics={"a": 1}),
    chunk(delta({"tool_calls": [tool(0, id="c", type="function", function={"name": "f"}, extra_flag=1)]})),
    chunk(delta({"content": [{"type": "text", "text": "echoed part"}]})),
    chunk(delta({"content": "x"}, logprobs={"content": [], "refusal": [lp("n", -1)]})),
    {**chunk(delta({"content": "x"})), "object": "chat.completion.something"},
])
def test_a_field_it_cannot_reassemble_means_do_not_store(extra):
    assert assemble(sse(*HELLO[:2], chunk(delta({"content": "x"})), HELLO[2])) is not None
    assert assemble(sse(*HELLO[:2], extra, HELLO[2])) is None


# ---- replay ---------------------------------------------------------------------------------
def random_body(rng: random.Random, chat: bool) -> dict:
    def word():
        return "".join(rng.choice("abcxyz {}\":,") for _ in range(rng.randint(1, 6)))

    choices = []
    for i in range(rng.randint(1, 2)):
        toks = [word() for _ in range(rng.randint(1, 4))]
        if chat:
            calls = [{"id": f"call-{i}-{k}", "type": "function",
                      "function": {"name": f"fn{k}", "arguments": json.dumps({"q": word()})}}
                     for k in range(rng.choice([0, 0, 1, 2]))]
            msg = {"role": "assistant", "content": "".join(toks) if not calls or rng.random() < 0.5 else None}
            if calls:
                msg["tool_calls"] = calls
            logprobs = {"content": [lp(t, -rng.random()) for t in toks]} if rng.random() < 0.7 else None
            choice = {"index": i, "message": msg, "logprobs": logprobs,
                      "finish_reason": "tool_calls" if calls else rng.choice(["stop", "length"])}
        else:
            logprobs = {"tokens": toks, "token_logprobs": [-rng.random() for _ in toks],
                        "top_logprobs": [{t: -0.5} for t in toks], "text_offset": list(range(len(toks)))}
            choice = {"index": i, "text": "".join(toks), "logprobs": logprobs if rng.random() < 0.7 else None,
                      "finish_reason": rng.choice(["stop", "length"])}
        if rng.random() < 0.5:
            choice["stop_reason"] = rng.choice([None, "###", 2])
        choices.append(choice)
    return {"id": "x-1", "object": "chat.completion" if chat else "text_completion", "created": 9, "model": "m",
            "choices": choices, "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}


@pytest.mark.parametrize("seed", range(40))
def test_replay_then_assemble_gives_back_the_body(seed):
    body = random_body(random.Random(seed), chat=seed % 4 != 3)
    assert assemble(b"".join(replay(body, include_usage=True))) == body


def test_sdk_stream_helper_sees_the_same_tool_calls_and_logprobs():
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    body = random_body(random.Random(0), chat=True)
    body["choices"][0]["message"] = {"role": "assistant", "content": "ok", "tool_calls": [
        {"id": "call-1", "type": "function", "function": {"name": "lookup", "arguments": '{"id": 7}'}}]}
    body["choices"][0]["logprobs"] = {"content": [lp("ok", -0.25)]}
    state = ChatCompletionStreamState()
    for event in replay(body, include_usage=True):
        data = event.removeprefix(b"data: ").strip()
        if data != b"[DONE]":
            state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(data)))
    got = state.get_final_completion().choices[0]
    assert got.message.content == "ok"
    assert [(t.id, t.function.name, t.function.arguments) for t in got.message.tool_calls] == [
        ("call-1", "lookup", '{"id": 7}')]
    assert [(x.token, x.logprob) for x in got.logprobs.content] == [("ok", -0.25)]


def test_replay_of_a_vllm_body_keeps_what_a_client_reads():
    """A stored non-streamed vLLM body carries many null fields; replay drops those, streams the
    rest (reasoning too), and never streams a usage chunk unless asked."""
    msg = {"role": "assistant", "content": "Hi", "refusal": None, "annotations": None, "audio": None,
           "function_call": None, "tool_calls": [], "reasoning": "thinking..."}
    body = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "system_fingerprint": "fp",
            "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": "stop",
                         "stop_reason": None, "token_ids": None}], "usage": USAGE, "prompt_logprobs": None}
    events = [json.loads(e[6:]) for e in replay(body, include_usage=False) if e != b"data: [DONE]\n\n"]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas == [{"role": "assistant", "content": ""}, {"reasoning": "thinking..."}, {"content": "Hi"}, {}]
    assert all(e["system_fingerprint"] == "fp" and "usage" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


# ---- HeadCache on a real Redis --------------------------------------------------------------


def entry(text="Paris"):
    return CacheEntry(response={"choices": [{"message": {"content": text}}]}, model="m", created_at=0)


def route_name(request) -> str:
    return f"r:{request.node.name}*"  # `:` and `*` must not confuse key prefixes or SCAN patterns


async def test_invalidation_reaches_another_gateways_lru_within_a_second(redis_url, request):
    route = route_name(request)
    one, two = HeadCache(redis_url), HeadCache(redis_url)
    follower = asyncio.get_running_loop().create_task(one.follow_invalidations())
    try:
        await one.put(route, "k", entry())
        assert (await one.get(route, "k")).response == entry().response
        assert (await two.get(route, "k")).response == entry().response  # shared through Redis
        await two.invalidate(route)
        deadline = time.monotonic() + 1.0
        while await one.get(route, "k") is not None:
            assert time.monotonic() < deadline, "the other gateway still serves an invalidated entry"
            await asyncio.sleep(0.02)
        assert await two.get(route, "k") is None
    finally:
        follower.cancel()
        await one.close()
        await two.close()


async def test_no_answer_of_an_older_generation_once_the_new_one_is_seen(redis_url, request):
    route = route_name(request)
    one, two = HeadCache(redis_url), HeadCache(redis_url)
    try:
        assert await one.get(route, "k") is None  # lookup misses; the answer is computed...
        await two.invalidate(route)  # ...while someone invalidates the route
        assert await one.sync_generations() == [route]
        await one.put(route, "k", entry("stale"))  # the answer of the old generation arrives
        assert await one.get(route, "k") is None
        assert await two.get(route, "k") is None
        await one.put(route, "k", entry("fresh"))  # a later answer (no pending lookup) is stored
        assert (await two.get(route, "k")).response == entry("fresh").response
        assert await one.list_keys(route) == ["k"]
    finally:
        await one.close()
        await two.close()


async def test_lookup_reads_the_generation_with_the_entry(redis_url, request):
    """Without any poll: a gateway whose LRU misses asks Redis, and learns of an invalidation there."""
    route = route_name(request)
    one, two = HeadCache(redis_url), HeadCache(redis_url)
    try:
        await one.put(route, "a", entry())
        await two.invalidate(route)
        await two.put(route, "b", entry("new"))
        # "b" is not in one's LRU: the lookup asks Redis, reads the moved generation with it, and
        # drops the old generation's "a" from the LRU on the way.
        assert (await one.get(route, "b")).response == entry("new").response
        assert await one.get(route, "a") is None
    finally:
        await one.close()
        await two.close()


async def test_a_redis_that_lost_its_data_drops_the_lru(redis_url, request):
    import redis.asyncio as aioredis

    route = route_name(request)
    one = HeadCache(redis_url)
    raw = aioredis.from_url(redis_url)
    try:
        await one.invalidate(route)  # generation 1
        await one.put(route, "k", entry())
        await raw.flushall()  # generation key gone: back to 0
        assert await one.sync_generations() == [route]
        assert await one.get(route, "k") is None
    finally:
        await raw.aclose()
        await one.close()


async def test_dead_redis_costs_no_latency_and_keeps_the_lru():
    # A Redis that accepts connections and never answers: every operation costs the full timeout.
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        cache = HeadCache(f"redis://127.0.0.1:{blackhole.getsockname()[1]}/0", op_timeout_s=0.2)
        try:
            await cache.put("r", "k", entry())  # the write times out once and marks Redis down
            assert not cache.redis_up and cache.redis_errors >= 1
            started = time.monotonic()
            assert (await cache.get("r", "k")).response == entry().response
            assert await cache.get("r", "other") is None
            assert await cache.sync_generations() == []
            await cache.put("r", "k2", entry())
            assert time.monotonic() - started < 0.1  # no Redis round trip while it is down
            assert await cache.invalidate("r") == 2
            assert await cache.get("r", "k") is None
        finally:
            await cache.close()
    await asyncio.wait_for(HeadCache(None).follow_invalidations(), 1)  # nothing to follow: returns


async def test_route_names_cannot_reach_each_others_entries(redis_url):
    one, two = HeadCache(redis_url), HeadCache(redis_url)
    try:
        for route in ("a", "a:x", "a*"):
            await one.put(route, "k", entry(route))
        assert await one.invalidate("a") == 1
        for route in ("a:x", "a*"):  # neither one's LRU nor Redis lost them
            assert (await one.get(route, "k")).response == entry(route).response
            assert (await two.get(route, "k")).response == entry(route).response
        assert await two.list_keys("a") == [] and await two.list_keys("a:x") == ["k"]
    finally:
        await one.close()
        await two.close()


def test_cli_invalidate_moves_the_generation_and_fails_without_redis(redis_url, capsys):
    import redis

    from serve.cli.cache import cmd_cache_invalidate

    r = redis.Redis.from_url(redis_url)
    r.set(HeadCache.full_key("cli", 0, "k"), entry().dumps())
    args = argparse.Namespace(config=None, route="cli", redis_url=redis_url)
    assert cmd_cache_invalidate(args) == 0
    assert int(r.get(HeadCache.gen_key("cli"))) == 1 and r.keys("llmserve:cache:cli:*") == []
    assert "dropped 1 entries" in capsys.readouterr().out
    dead = argparse.Namespace(config=None, route="cli", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert cmd_cache_invalidate(dead) == 1
    r.close()
