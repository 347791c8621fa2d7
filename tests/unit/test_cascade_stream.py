"""Streamed cascade decided on a prefix (cascade.decide_after_tokens): what the client gets, when,
what the decision saw, and what it cost. A scripted engine streams token by token with logprobs
and running usage, as vLLM does, and can pause mid-answer until the test releases it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from serve.cache.store import HeadCache
from serve.config import Config
from serve.gateway.backends import Backends
from serve.gateway.service import Gateway
from serve.gateway.stages.prefix import Prefix
from serve.gateway.upstream import UpstreamResponse
from serve.policies.cascade import CascadePolicy, Decision, decide_prefix, prefix_decidable

K = 3
PROMPT = 3  # prompt tokens the scripted engine reports
CHAT = "/v1/chat/completions"


def config(k: int | None = K, cache: bool = False) -> Config:
    return Config.model_validate({
        "auth": {"enabled": False},
        "models": [
            {"name": "student", "source": "x", "price": {"input_per_million": 1, "output_per_million": 2}},
            {"name": "teacher", "source": "y", "price": {"input_per_million": 10, "output_per_million": 20}},
        ],
        "routes": [{"name": "assistant", "cascade": {
            "student": "student", "teacher": "teacher", "min_mean_logprob": -1.0, "decide_after_tokens": k},
            **({"cache": {"ttl_s": 60}} if cache else {})}],
    })


class ScriptedEngine:
    """Per model: a list of (token, logprob). Records the requests, the events it yielded, how far
    each stream got, and whether it was closed before its end."""

    def __init__(self, scripts: dict[str, list[tuple[str, float]]], pause_after: int | None = None,
                 finish: str = "stop", per_chunk: int = 1) -> None:
        self.scripts = scripts
        self.per_chunk = per_chunk  # tokens per chunk (vLLM sends several with speculative decoding)
        self.finish = finish  # the student's finish_reason
        self.pause_after = pause_after  # the student stops after this many tokens until released
        self.release: asyncio.Event | None = None
        self.calls: list[dict[str, Any]] = []
        self.yielded: dict[str, list[bytes]] = {}
        self.tokens_sent: dict[str, int] = {}
        self.finished: set[str] = set()
        self.closed_early: set[str] = set()

    async def post(self, base_url: str, path: str, body: bytes, *, stream: bool, timeout_s: float) -> UpstreamResponse:
        payload = json.loads(body)
        # What was closed when this request came: the student must be gone before the teacher starts.
        self.calls.append({**payload, "_stream": stream, "_closed_before": set(self.closed_early)})
        model = payload["model"]
        toks = self.scripts[model]
        if not stream:
            lp = {"content": [{"token": t, "logprob": v, "top_logprobs": []} for t, v in toks]} \
                if payload.get("logprobs") else None
            out = {"id": "x", "object": "chat.completion", "created": 1, "model": model,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(t for t, _ in toks)},
                                "logprobs": lp, "finish_reason": "stop"}],
                   "usage": self._usage(len(toks))}
            return UpstreamResponse(200, {}, json.dumps(out).encode())
        return UpstreamResponse(200, {}, chunks=self._stream(model, payload, toks))

    @staticmethod
    def _usage(n: int) -> dict[str, int]:
        return {"prompt_tokens": PROMPT, "completion_tokens": n, "total_tokens": PROMPT + n}

    async def _stream(self, model: str, payload: dict[str, Any], toks: list[tuple[str, float]]) -> AsyncIterator[bytes]:
        opts = payload.get("stream_options") or {}
        running = bool(opts.get("continuous_usage_stats"))
        sent = self.yielded.setdefault(model, [])

        def event(choices: list[dict[str, Any]], n: int, usage: bool = False) -> bytes:
            obj: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                                   "model": model, "choices": choices}
            if running or usage:
                obj["usage"] = self._usage(n)
            # Spaced JSON, unlike the gateway's compact rewrite: relayed bytes show whether they were touched.
            ev = b"data: " + json.dumps(obj).encode() + b"\n\n"
            sent.append(ev)
            return ev

        try:
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}], 0)
            for i in range(0, len(toks), self.per_chunk):
                if model == "student" and i == self.pause_after:
                    assert self.release is not None
                    await self.release.wait()
                group = toks[i:i + self.per_chunk]
                entries: list[Any] = [{"token": t, "logprob": v, "bytes": None, "top_logprobs": []} for t, v in group]
                logprobs = {"content": entries} if payload.get("logprobs") else None
                n = i + len(group)
                self.tokens_sent[model] = n  # counted as it leaves: the consumer may never resume us
                yield event([{"index": 0, "delta": {"content": "".join(t for t, _ in group)}, "logprobs": logprobs,
                              "finish_reason": None}], n)
            finish = self.finish if model == "student" else "stop"
            yield event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}], len(toks))
            if opts.get("include_usage"):
                yield event([], len(toks), usage=True)
            sent.append(b"data: [DONE]\n\n")
            yield b"data: [DONE]\n\n"
            self.finished.add(model)
        finally:
            if model not in self.finished:
                self.closed_early.add(model)

    async def close(self) -> None:
        pass


def gateway(engine: ScriptedEngine, k: int | None = K, cache: bool = False) -> Gateway:
    backends = Backends()
    backends.update({m: [(f"{m}#1", f"http://{m}")] for m in ("student", "teacher")})
    return Gateway(config(k, cache), backends, engine, cache=HeadCache(None) if cache else None)


def ask(**kw: Any) -> dict[str, Any]:
    return {"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "stream": True, **kw}


async def collect(gw: Gateway, payload: dict[str, Any]) -> tuple[dict[str, str], list[bytes]]:
    answer = await gw.handle(None, CHAT, payload)
    assert answer.chunks is not None, answer.body
    events: list[bytes] = []
    async for chunk in answer.chunks:
        events += [e + b"\n\n" for e in chunk.split(b"\n\n") if e]
    return answer.headers, events


def objs(events: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(e[6:]) for e in events if e != b"data: [DONE]\n\n"]


def content(events: list[bytes]) -> str:
    return "".join(c["delta"].get("content") or "" for o in objs(events) for c in o["choices"])


SURE, UNSURE = -0.1, -5.0
# Confident for its first K tokens, lost after (whole mean below -1): kept on the prefix.
SURE_THEN_LOST = [(f"s{i} ", SURE) for i in range(K)] + [(f"l{i} ", UNSURE) for i in range(5)]
# Unsure for its first K tokens, confident after (whole mean above -1): escalated on the prefix.
LOST_THEN_SURE = [(f"l{i} ", UNSURE) for i in range(K)] + [(f"s{i} ", -0.01) for i in range(20)]
TEACHER = [("the ", -0.2), ("teacher ", -0.2)]


def test_accepted_stream_is_the_students_bytes_and_starts_before_the_student_ends() -> None:
    engine = ScriptedEngine({"student": SURE_THEN_LOST, "teacher": TEACHER}, pause_after=K + 2)

    async def go() -> None:
        engine.release = asyncio.Event()
        payload = ask(logprobs=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
        answer = await gw.handle(None, CHAT, payload)
        assert answer.headers["x-llmserve-served-by"] == "student"
        assert "x-llmserve-escalated" not in answer.headers
        assert answer.chunks is not None
        first = await answer.chunks.__anext__()
        # The first byte leaves once K tokens were read: not one more was waited for.
        assert engine.tokens_sent["student"] == K and "student" not in engine.finished
        # Tokens K+1 and K+2 reach the client while the student is held after them, unfinished
        # (a relay that waited for the student's end would time out here).
        got = [first]
        while content([e + b"\n\n" for e in b"".join(got).split(b"\n\n") if e]) != \
                "".join(t for t, _ in SURE_THEN_LOST[:K + 2]):
            got.append(await asyncio.wait_for(answer.chunks.__anext__(), 2))
        assert engine.tokens_sent["student"] == K + 2 and "student" not in engine.finished
        engine.release.set()
        rest = [c async for c in answer.chunks]
        relayed = b"".join([*got, *rest])
        sent = engine.yielded["student"]
        # Byte for byte what the student streamed, but for the final usage chunk, which gets the cost.
        assert relayed.startswith(b"".join(sent[:-2])) and relayed.endswith(sent[-1])
        usage = json.loads(relayed.split(b"\n\n")[-3][6:])["usage"]
        n = len(SURE_THEN_LOST)
        assert usage == {**engine._usage(n), "cost_usd": round((PROMPT * 1 + n * 2) / 1e6, 10)}

    gw = gateway(engine)
    asyncio.run(go())
    student_call = engine.calls[0]
    assert student_call["model"] == "student" and student_call["_stream"] is True
    assert student_call["logprobs"] is True and student_call["stream_options"]["continuous_usage_stats"] is True
    assert "max_tokens" not in student_call  # not capped: nothing is buffered past the prefix
    assert [c["model"] for c in engine.calls] == ["student"]


def test_client_without_logprobs_or_usage_gets_neither() -> None:
    engine = ScriptedEngine({"student": SURE_THEN_LOST, "teacher": TEACHER})
    gw = gateway(engine)
    headers, events = asyncio.run(collect(gw, ask()))
    assert headers["x-llmserve-served-by"] == "student"
    assert content(events) == "".join(t for t, _ in SURE_THEN_LOST)
    assert all(c["logprobs"] is None for o in objs(events) for c in o["choices"])
    assert all("usage" not in o for o in objs(events)) and events[-1] == b"data: [DONE]\n\n"
    # Billed all the same, once, from the usage chunk the gateway asked for and dropped.
    n = len(SURE_THEN_LOST)
    assert billed(gw, "student") == (PROMPT * 1 + n * 2) / 1e6


def billed(gw: Gateway, model: str) -> float:
    return float(gw.metrics.cost.labels("assistant", model, "anonymous")._value.get())


def test_escalated_stream_is_only_the_teacher_and_the_student_was_cut_off() -> None:
    engine = ScriptedEngine({"student": LOST_THEN_SURE, "teacher": TEACHER})
    headers, events = asyncio.run(collect(gateway(engine), ask(stream_options={"include_usage": True})))
    assert headers["x-llmserve-served-by"] == "teacher" and headers["x-llmserve-escalated"] == "low_confidence"
    assert content(events) == "the teacher "
    assert {o["model"] for o in objs(events)} == {"teacher"}
    assert engine.tokens_sent["student"] == K and engine.calls[1]["_closed_before"] == {"student"}
    student_cost = (PROMPT * 1 + K * 2) / 1e6  # the prompt and the K tokens made before the abort
    assert float(headers["x-llmserve-cost-usd"]) == round(student_cost, 10)
    usage = objs(events)[-1]["usage"]
    assert usage["completion_tokens"] == len(TEACHER)
    assert usage["cost_usd"] == round(student_cost + (PROMPT * 10 + len(TEACHER) * 20) / 1e6, 10)


def test_the_decision_sees_exactly_the_prefix() -> None:
    # A student whose first K tokens are sure and later ones lost is kept (whole mean < -1) ...
    engine = ScriptedEngine({"student": SURE_THEN_LOST, "teacher": TEACHER})
    assert asyncio.run(collect(gateway(engine), ask()))[0]["x-llmserve-served-by"] == "student"
    # ... one sure only from token K+1 on is escalated, although its whole mean is above -1.
    engine = ScriptedEngine({"student": LOST_THEN_SURE, "teacher": TEACHER})
    assert asyncio.run(collect(gateway(engine), ask()))[0]["x-llmserve-served-by"] == "teacher"
    # A chunk that carries tokens K and K+1 (several per chunk): the unsure K+1st does not count.
    edge = [(f"s{i} ", SURE) for i in range(K)] + [("x ", -100.0)]
    engine = ScriptedEngine({"student": edge, "teacher": TEACHER}, per_chunk=2)
    assert asyncio.run(collect(gateway(engine), ask()))[0]["x-llmserve-served-by"] == "student"


def test_non_streamed_and_unconfigured_keep_the_whole_answer_decision() -> None:
    # Non-streamed on a prefix route: buffered, judged whole (the lost tail escalates).
    engine = ScriptedEngine({"student": SURE_THEN_LOST, "teacher": TEACHER})
    answer = asyncio.run(gateway(engine).handle(None, CHAT, ask(stream=False)))
    assert answer.headers["x-llmserve-served-by"] == "teacher"
    assert engine.calls[0]["_stream"] is False and engine.calls[0]["max_tokens"] == 512
    # Streamed on a route without decide_after_tokens: the student is asked unstreamed.
    engine = ScriptedEngine({"student": SURE_THEN_LOST, "teacher": TEACHER})
    headers, _ = asyncio.run(collect(gateway(engine, k=None), ask()))
    assert headers["x-llmserve-served-by"] == "teacher" and engine.calls[0]["_stream"] is False
    # A requested schema can only be checked whole: buffered too.
    engine = ScriptedEngine({"student": [('{"a": 1}', SURE)], "teacher": TEACHER})
    headers, _ = asyncio.run(collect(gateway(engine), ask(response_format={"type": "json_object"})))
    assert headers["x-llmserve-served-by"] == "student" and engine.calls[0]["_stream"] is False


def test_a_short_answer_is_judged_whole_including_its_finish() -> None:
    short = [("ok ", SURE)]  # ends before K tokens: the decision sees all of it and its finish
    engine = ScriptedEngine({"student": short, "teacher": TEACHER})
    headers, events = asyncio.run(collect(gateway(engine), ask()))
    assert headers["x-llmserve-served-by"] == "student" and content(events) == "ok "
    assert engine.finished == {"student"} and events[-1] == b"data: [DONE]\n\n"
    # The same, cut off by max_tokens: the finish is part of the decision (escalate_on_length).
    engine = ScriptedEngine({"student": short, "teacher": TEACHER}, finish="length")
    headers, events = asyncio.run(collect(gateway(engine), ask()))
    assert headers["x-llmserve-escalated"] == "length" and content(events) == "the teacher "


def test_decide_prefix_runs_the_whole_answer_checks_on_what_the_prefix_shows() -> None:
    p = CascadePolicy(min_mean_logprob=-1.0)
    assert decide_prefix(p, {}, "a b", [-0.5, -0.7], None) == Decision(False, "accepted", -0.6)
    assert decide_prefix(p, {}, "a b", [-0.5, -1.7], None) == Decision(True, "low_confidence", -1.1)
    assert decide_prefix(p, {}, "a b", [-0.1, -0.1], "length").reason == "length"
    assert decide_prefix(p, {}, "I'm sorry, ", [-0.1, -0.1], None).reason == "refusal"
    assert decide_prefix(p, {}, "", [], None).reason == "malformed"  # no signal: the teacher
    schema = {"response_format": {"type": "json_object"}}
    assert not prefix_decidable(p, schema) and prefix_decidable(p, {})
    # Unfinished JSON is not yet JSON: not judged on the schema (a prefix route buffers such requests).
    assert decide_prefix(p, schema, '{"a"', [-0.1], None).reason == "accepted"
    assert prefix_decidable(CascadePolicy(escalate_on_schema_failure=False), schema)
    # Finished within the prefix, it is the whole answer: the schema is checked.
    assert decide_prefix(p, schema, "not json", [-0.1], "stop").reason == "schema"
    assert decide_prefix(p, schema, '{"a": 1}', [-0.1], "stop").reason == "accepted"


def test_a_client_that_leaves_mid_stream_is_billed_for_what_the_student_made() -> None:
    engine = ScriptedEngine({"student": SURE_THEN_LOST, "teacher": TEACHER})
    gw = gateway(engine)

    async def go() -> None:
        answer = await gw.handle(None, CHAT, ask())
        assert answer.chunks is not None and answer.headers["x-llmserve-served-by"] == "student"
        await answer.chunks.__anext__()
        await answer.chunks.aclose()  # type: ignore[attr-defined]

    asyncio.run(go())
    assert "student" in engine.closed_early
    assert billed(gw, "student") == (PROMPT * 1 + K * 2) / 1e6  # the running usage at the prefix


def test_an_accepted_streamed_student_is_the_routes_answer_and_cached() -> None:
    engine = ScriptedEngine({"student": SURE_THEN_LOST, "teacher": TEACHER})
    gw = gateway(engine, cache=True)

    async def go() -> tuple[dict[str, str], Any]:
        await collect(gw, ask(temperature=0))
        await asyncio.sleep(0.05)  # the store runs off the request path
        hit = await gw.handle(None, CHAT, ask(temperature=0, stream=False))
        return hit.headers, hit.body

    headers, body = asyncio.run(go())
    assert headers["x-llmserve-cache"] == "hit" and headers["x-llmserve-served-by"] == "cache:student"
    assert body["choices"][0]["message"]["content"] == "".join(t for t, _ in SURE_THEN_LOST)
    assert body["choices"][0]["logprobs"] is None and len(engine.calls) == 1


def test_prefix_reads_completions_chunks_and_split_events() -> None:
    prefix = Prefix()
    ev = {"id": "c", "object": "text_completion", "created": 1, "model": "student",
          "choices": [{"index": 0, "text": " a b", "logprobs": {"tokens": [" a", " b"], "token_logprobs": [-0.5, -1.5],
                                                                 "top_logprobs": None, "text_offset": [0, 2]},
                       "finish_reason": None}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    data = b"data: " + json.dumps(ev).encode() + b"\n\n"
    prefix.feed(data[:20])  # an event split across reads is held until whole
    assert prefix.held == [] and prefix.logprobs == []
    prefix.feed(data[20:] + b"data: {bad")
    assert prefix.held == [data] and prefix.text == [" a b"] and prefix.logprobs == [-0.5, -1.5]
    assert prefix.usage == {"prompt_tokens": 3, "completion_tokens": 2} and prefix.parser.pending == b"data: {bad"
    assert prefix.decision(CascadePolicy(min_mean_logprob=-1.0), {}, 1) == Decision(False, "accepted", -0.5)
    prefix.feed(b"\n\n")
    assert prefix.broken and prefix.decision(CascadePolicy(), {}, 1).reason == "malformed"
