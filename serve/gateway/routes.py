"""Routes: virtual models whose requests run through a policy chain.

    cache -> (cascade(student, teacher) | target) -> fallback(next models)

The decisions come from serve/policies (pure); this module performs the calls they imply, adds
the accounting headers, and stores answers in the head cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from serve.cache.store import CacheEntry, HeadCache
from serve.config import RouteSpec
from serve.gateway import responses
from serve.gateway.answer import Answer
from serve.gateway.cascade_stream import on_a_prefix, stream_student
from serve.gateway.errors import APIError, normalize
from serve.gateway.metrics import Metrics
from serve.gateway.responses import RESPONSES
from serve.gateway.sse import COMPLETE_FINISH, StreamAssembler, replay
from serve.gateway.upstream import UpstreamResponse
from serve.policies.cache_key import Normalization, cache_key, is_deterministic
from serve.policies.cascade import DEFAULT_REFUSALS, CascadePolicy, choice_text, decide
from serve.policies.fallback import Failure, FallbackPolicy, classify_status

logger = logging.getLogger("llmserve.routes")

# A chunk that carries usage (not `"usage":null`): the only chunks the relay looks inside.
_USAGE = re.compile(rb'"usage":\s*\{')

# (model, path, body, stream) -> (response, replica id); raises APIError. Provided by the Gateway.
Sender = Callable[[str, str, bytes, bool, dict[str, Any]], Awaitable[tuple[UpstreamResponse, str]]]
# (outcome, model, usage) -> cost in USD; records token and cost metrics.
Biller = Callable[["Outcome", str, Any], float]
# (answer body, model that produced it) -> None; stores the route's own answer in the head cache.
Store = Callable[[dict[str, Any], str], None]


@dataclass
class Outcome:
    """What one request through a route did, for headers and metrics."""

    route: str
    key: str = "anonymous"  # the API key's name, for per-key cost
    served_by: str = ""
    replica: str = ""  # the engine replica that answered (prefix affinity is visible here)
    cache: str = "bypass"  # hit | miss | bypass
    cost_usd: float = 0.0
    escalated: str | None = None
    models: list[str] = field(default_factory=list)
    path: str = ""
    request: dict[str, Any] | None = None  # kept for shadow traffic
    def headers(self) -> dict[str, str]:
        h = {"x-llmserve-route": self.route, "x-llmserve-served-by": self.served_by,
             "x-llmserve-cache": self.cache, "x-llmserve-cost-usd": f"{self.cost_usd:.10f}"}
        if self.escalated:
            h["x-llmserve-escalated"] = self.escalated
        if self.replica:
            h["x-llmserve-replica"] = self.replica
        return h


def _failure_of(e: APIError) -> Failure:
    return {"model_not_ready": Failure.UNAVAILABLE, "engine_unavailable": Failure.UNAVAILABLE,
            "overloaded": Failure.OVERLOADED, "timeout": Failure.TIMEOUT}.get(
        e.code or "", classify_status(e.status) or Failure.ENGINE_ERROR)


def complete(body: dict[str, Any]) -> bool:
    """Whether a whole answer may be cached: every choice ended normally (as a stored stream must;
    an aborted or errored choice is not what the same request gets next time)."""
    return all(c.get("finish_reason") in COMPLETE_FINISH for c in body.get("choices") or [])


def with_cost(body: dict[str, Any], cost: float) -> dict[str, Any]:
    """Put the cost into `usage` as an extra field; the SDK keeps unknown fields."""
    usage = body.get("usage")
    if isinstance(usage, dict):
        usage["cost_usd"] = round(cost, 10)
    return body


class RouteRunner:
    def __init__(self, send: Sender, bill: Biller, metrics: Metrics, cache: HeadCache | None) -> None:
        self.send = send
        self.bill = bill
        self.metrics = metrics
        self.cache = cache
        self._background: set[asyncio.Task] = set()  # held so the loop does not drop them mid-flight
        self._rng = random.Random()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- entry ---------------------------------------------------------------------------------
    async def handle(self, route: RouteSpec, path: str, payload: dict[str, Any], key_name: str,
                     raw: bytes | None = None) -> Answer:
        out = Outcome(route=route.name, key=key_name, path=path, request=payload)
        stream = bool(payload.get("stream"))
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        ckey = self._cache_key(route, path, payload)
        if ckey is not None and self.cache is not None:
            entry = await self.cache.get(route.name, ckey)
            self.metrics.cache_redis_up.set(1 if self.cache.redis_up else 0)
            if self.cache.redis_configured:  # off the request path: the answer does not wait for it
                self._spawn(self.cache.record(route.name, entry is not None))
            if entry is not None:
                out.cache, out.served_by = "hit", f"cache:{entry.model}"
                self.metrics.cache.labels(route.name, "hit").inc()
                return self._answer_cached(entry, stream, include_usage, out)
            out.cache = "miss"
            self.metrics.cache.labels(route.name, "miss").inc()
        elif route.cache is not None:
            self.metrics.cache.labels(route.name, "bypass").inc()

        store: Store | None = None
        if ckey is not None and self.cache is not None and route.cache is not None and route.cache.store_online:
            cache, ttl = self.cache, route.cache.ttl_s

            def store(body: dict[str, Any], model: str) -> None:
                entry = CacheEntry(response=body, model=model, created_at=time.time(), route=route.name)
                self._spawn(cache.put(route.name, ckey, entry, ttl))

        chain: list[str] = []
        if route.cascade is not None:
            student = await self._try_student(route, path, payload, out, store)
            if student is not None:
                return student
            chain = [route.cascade.teacher]
        else:
            chain = [route.target] if route.target else []
        chain += [m for m in route.fallback if m not in chain]
        return await self._run_chain(route, path, payload, chain, out, store, raw)

    def _cache_key(self, route: RouteSpec, path: str, payload: dict[str, Any]) -> str | None:
        spec = route.cache
        if spec is None or not spec.enabled or payload.get("n", 1) not in (1, None):
            return None
        if not is_deterministic(payload, spec.cacheable, path=path):  # embeddings always are
            return None
        norm = Normalization(whitespace=spec.normalize_whitespace, case=spec.normalize_case)
        return cache_key(route.name, path, payload, norm)

    def _answer_cached(self, entry: CacheEntry, stream: bool, include_usage: bool, out: Outcome) -> Answer:
        body = dict(entry.response)
        body["llmserve_provenance"] = {"model": entry.model, "created_at": entry.created_at,
                                       "batch_id": entry.batch_id}
        self.metrics.requests.labels(out.route, out.served_by, "200").inc()
        # A hit spends no model tokens: usage and cost are zero; provenance says who produced it.
        if out.path == RESPONSES:
            body["id"], body["created_at"] = responses.fresh_id(), int(time.time())
            body["usage"] = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "cost_usd": 0.0}
            if stream:
                return Answer.replayed(responses.replay(body), out.headers())
            return Answer(200, body, headers=out.headers())
        body["id"] = f"cache-{uuid.uuid4().hex[:24]}"
        body["created"] = int(time.time())
        body["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cost_usd": 0.0}
        if stream:
            return Answer.replayed(replay(body, include_usage), out.headers())
        return Answer(200, body, headers=out.headers())

    # ---- cascade -------------------------------------------------------------------------------
    async def _try_student(self, route: RouteSpec, path: str, payload: dict[str, Any], out: Outcome,
                           store: Store | None) -> Answer | None:
        """Ask the student (buffered, with logprobs); answer with it if the policy accepts it.
        Returns None when the request must go on to the teacher."""
        cs = route.cascade
        assert cs is not None
        policy = CascadePolicy(min_mean_logprob=cs.min_mean_logprob, escalate_on_length=cs.escalate_on_length,
                               escalate_on_schema_failure=cs.escalate_on_schema_failure,
                               refusal_patterns=tuple(cs.refusal_patterns or DEFAULT_REFUSALS))
        on_prefix = on_a_prefix(cs, path, payload, policy)  # decided on k tokens, then streamed
        if path == RESPONSES:
            req = responses.student_request(payload, cs.student, cs.max_student_tokens)
            asked_logprobs = responses.LOGPROBS_INCLUDE in (payload.get("include") or [])
        else:
            chat = path.endswith("/chat/completions")
            asked_logprobs = bool(payload.get("logprobs"))
            req = {k: v for k, v in payload.items() if k not in ("stream", "stream_options")}
            req["model"] = cs.student
            req["logprobs"] = True if chat else max(1, int(payload.get("logprobs") or 1))
            limit_key = "max_completion_tokens" if chat and "max_completion_tokens" in payload else "max_tokens"
            asked = payload.get(limit_key)
            if not on_prefix:  # the cap bounds the buffer; a prefix-decided answer is not buffered
                req[limit_key] = min(asked, cs.max_student_tokens) if isinstance(asked, int) \
                    else cs.max_student_tokens
        if on_prefix:
            return await stream_student(self, route, path, payload, req, policy, out, store, asked_logprobs)
        try:
            resp, replica = await self.send(cs.student, path, json.dumps(req).encode(), False, payload)
        except APIError as e:
            return self.student_failed(route.name, cs.student, out, e)
        if resp.status >= 400:
            return self.student_failed(route.name, cs.student, out, resp)
        body = json.loads(resp.body)
        out.cost_usd += self.bill(out, cs.student, body.get("usage"))
        out.models.append(cs.student)
        if path == RESPONSES:  # judged as the chat choice it amounts to
            decision = decide(policy, responses.chat_view_of_request(payload), responses.as_chat(body))
        else:
            decision = decide(policy, payload, body)
        self.metrics.cascade.labels(route.name, "escalate" if decision.escalate else "accept",
                                    decision.reason).inc()
        if decision.escalate:
            out.escalated = decision.reason
            self.metrics.escalations.labels(route.name, decision.reason).inc()
            return None
        if not asked_logprobs:
            if path == RESPONSES:
                responses.strip_logprobs(body)
            for c in body.get("choices", []):
                c["logprobs"] = None
        out.served_by, out.replica = cs.student, replica
        if store is not None and complete(body) and (path != RESPONSES or responses.cacheable(body)):
            # An accepted student answer is the route's own answer (what the route serves for this
            # request), so it may be cached. (Its cost is added to the same dict below; harmless,
            # a hit replaces `usage` anyway.)
            store(body, cs.student)
        with_cost(body, out.cost_usd)
        self.metrics.requests.labels(route.name, cs.student, "200").inc()
        if payload.get("stream"):
            if path == RESPONSES:
                return Answer.replayed(responses.replay(body), out.headers())
            include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
            return Answer.replayed(replay(body, include_usage), out.headers())
        return Answer(200, body, headers=out.headers())

    def student_failed(self, route: str, student: str, out: Outcome,
                       err: APIError | UpstreamResponse) -> Answer | None:
        """The student could not answer: escalate (None), unless the request itself is wrong (the
        teacher would say so too), which is the answer."""
        if isinstance(err, APIError):
            out.escalated = f"student_{_failure_of(err).value}"
        else:
            failure = classify_status(err.status)
            if failure == Failure.CLIENT_ERROR:
                self.metrics.requests.labels(route, student, str(err.status)).inc()
                return Answer.engine_error(err.status, normalize(err.status, err.body), out.headers())
            out.escalated = f"student_{failure.value if failure else 'error'}"
        self._count_escalation(route, out.escalated)
        return None

    def _count_escalation(self, route: str, reason: str) -> None:
        self.metrics.cascade.labels(route, "escalate", reason).inc()
        self.metrics.escalations.labels(route, reason).inc()

    # ---- target + fallback ---------------------------------------------------------------------
    async def _run_chain(self, route: RouteSpec, path: str, payload: dict[str, Any], chain: list[str],
                         out: Outcome, store: Store | None, raw: bytes | None) -> Answer:
        policy = FallbackPolicy(tuple(chain), route.max_attempts)
        stream = bool(payload.get("stream"))
        # Streams are billed from their usage chunk: ask for it, and drop it again if the client
        # did not ask for it.
        # (A Responses stream always ends with its usage, in response.completed.)
        strip_usage = stream and path != RESPONSES and not (payload.get("stream_options") or {}).get("include_usage")
        sent = {**payload, "stream_options": {**(payload.get("stream_options") or {}), "include_usage": True}} \
            if strip_usage else payload
        model: str | None = chain[0] if chain else None
        failures = 0
        last: Answer | None = None
        while model is not None:
            if raw is not None and sent is payload and model == payload.get("model"):
                body = raw  # unchanged request: forward the client's own bytes
            else:
                body = json.dumps({**sent, "model": model}).encode()
            try:
                resp, out.replica = await self.send(model, path, body, stream, payload)
                failure = classify_status(resp.status)
            except APIError as e:
                failure = _failure_of(e)
                last = Answer.error(e, out.headers())
                self.metrics.requests.labels(route.name, model, str(e.status)).inc()
            else:
                if failure is None:
                    # Only the primary's answer is the route's own: a fallback's answer is served
                    # but never cached, or it would stand in for the primary for the whole TTL.
                    primary = model == chain[0]
                    return self._answer(route, model, resp, out, store if primary else None, strip_usage)
                last = Answer.engine_error(resp.status, normalize(resp.status, resp.body), out.headers())
                self.metrics.requests.labels(route.name, model, str(resp.status)).inc()
            failures += 1
            nxt = policy.next_target(failures, failure, bytes_sent=False)
            if nxt is not None:
                self.metrics.fallbacks.labels(route.name, model, failure.value).inc()
                logger.info("route %s: %s failed (%s), falling back to %s", route.name, model, failure.value, nxt)
            model = nxt
        if last is None:
            last = Answer.error(APIError(503, f"Route `{route.name}` has no model to send to.",
                                         code="engine_unavailable"))
        return last

    def _answer(self, route: RouteSpec, model: str, resp: UpstreamResponse, out: Outcome,
                store: Store | None, strip_usage: bool) -> Answer:
        out.served_by = model
        out.models.append(model)
        self.metrics.requests.labels(route.name, model, str(resp.status)).inc()
        if resp.chunks is None:
            body = json.loads(resp.body)
            out.cost_usd += self.bill(out, model, body.get("usage"))
            if store is not None and complete(body) and (out.path != RESPONSES or responses.cacheable(body)):
                # The same dict is then given its cost; harmless, a hit replaces `usage` anyway.
                store(body, model)
            self._maybe_shadow(route, out, body)
            return Answer(resp.status, with_cost(body, out.cost_usd), headers=out.headers())
        return Answer(resp.status, chunks=self._relay(route.name, model, resp, out, store, strip_usage),
                      headers=out.headers())

    async def _relay(self, route: str, model: str, resp: UpstreamResponse, out: Outcome,
                     store: Store | None, strip_usage: bool) -> AsyncIterator[bytes]:
        """Pass the stream through; bill the usage chunk and rebuild the answer for the cache.
        (A Responses stream is billed from its final event, which carries the whole response.)"""
        is_responses = out.path == RESPONSES
        assembler: StreamAssembler | responses.ResponsesAssembler | None = None
        if is_responses:
            assembler = responses.ResponsesAssembler()
        elif store is not None:
            assembler = StreamAssembler()
        assert resp.chunks is not None
        try:
            async for chunk in resp.chunks:
                if assembler is not None:
                    assembler.feed(chunk)
                    if assembler.done:
                        if isinstance(assembler, responses.ResponsesAssembler):
                            chunk = self._bill_responses_final(model, assembler, chunk, out)
                        # Store before the last bytes go out: a client that hangs up right after
                        # [DONE] cancels this generator before it would run past the loop.
                        whole = assembler.response()
                        if whole is not None and store is not None and (
                                not is_responses or responses.cacheable(whole)):
                            store(whole, model)
                        assembler = None
                if not is_responses and _USAGE.search(chunk):
                    chunk = self._bill_usage_chunk(route, model, chunk, out, strip_usage)
                if chunk:
                    yield chunk
        finally:
            await resp.aclose()

    def _bill_responses_final(self, model: str, assembler: responses.ResponsesAssembler, chunk: bytes,
                              out: Outcome) -> bytes:
        """Bill a Responses stream's usage, and put the cost into its final event when that event
        is whole in this chunk (vLLM writes each event at once)."""
        final = assembler.final or {}
        out.cost_usd += self.bill(out, model, final.get("usage"))
        events = chunk.split(b"\n\n")
        for i, ev in enumerate(events):
            head, sep, data = ev.partition(b"data: ")
            if sep and assembler.kind.encode() in data:
                try:
                    obj = json.loads(data)
                except ValueError:
                    return chunk
                with_cost(obj.get("response") or {}, out.cost_usd)
                events[i] = head + sep + json.dumps(obj, separators=(",", ":")).encode()
                return b"\n\n".join(events)
        return chunk

    def _maybe_shadow(self, route: RouteSpec, out: Outcome, answer: dict[str, Any]) -> None:
        """Mirror a share of answered requests to the route's candidate, off the request path.
        (Chat and completions only: agreement is measured on their choices.)"""
        shadow = route.shadow
        if shadow is None or out.path == RESPONSES or self._rng.random() >= shadow.fraction or out.request is None:
            return
        self._spawn(self._shadow(route.name, shadow.model, out.path, out.request, answer))

    async def _shadow(self, route: str, model: str, path: str, request: dict[str, Any],
                      answer: dict[str, Any]) -> None:
        from serve.students.metrics import token_overlap

        body = {k: v for k, v in request.items() if k not in ("stream", "stream_options")}
        body["model"] = model
        try:
            resp, _ = await self.send(model, path, json.dumps(body).encode(), False, request)
            if resp.status != 200:
                self.metrics.shadow.labels(route, model, "error").inc()
                return
            theirs = json.loads(resp.body)
        except Exception:  # a shadow never affects anything but its own counters
            self.metrics.shadow.labels(route, model, "error").inc()
            return
        agree = token_overlap(choice_text(theirs["choices"][0]), choice_text(answer["choices"][0]))
        self.metrics.shadow.labels(route, model, "ok").inc()
        self.metrics.shadow_agreement.labels(route, model).observe(agree)

    def _bill_usage_chunk(self, route: str, model: str, chunk: bytes, out: Outcome, strip: bool) -> bytes:
        kept = []
        for ev in chunk.split(b"\n\n"):
            if ev.startswith(b"data: {") and _USAGE.search(ev):
                try:
                    obj = json.loads(ev[6:])
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                    out.cost_usd += self.bill(out, model, obj["usage"])
                    if strip and not obj.get("choices"):
                        continue  # the usage-only chunk the client did not ask for
                    if strip:
                        obj["usage"] = None
                    else:
                        with_cost(obj, out.cost_usd)
                    ev = b"data: " + json.dumps(obj, separators=(",", ":")).encode()
            kept.append(ev)
        return b"\n\n".join(kept)
