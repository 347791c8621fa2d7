"""A streamed cascade decided on a prefix: the first byte waits for k student tokens, not its answer.

With `cascade.decide_after_tokens: k`, a streamed chat or completions request asks the student to
stream with logprobs and holds back its first k tokens (or all of it, if it finishes sooner). The
pure `decide_prefix` judges exactly those tokens. Accepted: the held chunks go out and the rest of
the student's stream follows as it comes. Escalated: the student's stream is closed (vLLM aborts
the request on disconnect) and the request goes on to the teacher. Nothing reaches the client
before the decision, so no client sees half a student answer followed by a teacher's.

The student is asked for `continuous_usage_stats` (vLLM puts the running usage in every chunk):
an aborted student is billed for the prompt and the tokens it made, which the final usage chunk of
a stream it never finishes would not tell. The client sees those fields only if it asked for them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from serve.gateway.answer import Answer
from serve.gateway.context import RequestContext
from serve.gateway.dispatch import Dispatcher
from serve.gateway.errors import APIError
from serve.gateway.metrics import Metrics
from serve.gateway.sse import StreamAssembler
from serve.gateway.stages.student import student_failed
from serve.gateway.upstream import UpstreamResponse
from serve.policies.cascade import CascadePolicy, Decision, decide_prefix
from serve.sse_events import Event, EventParser


@dataclass
class Prefix:
    """What the student streamed up to the decision: the events held back, and what they say."""

    held: list[bytes] = field(default_factory=list)  # whole SSE events, each ending in a blank line
    parser: EventParser = field(default_factory=lambda: EventParser(keep_empty=True))  # .pending: a cut event
    text: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None  # the latest running usage
    broken: bool = False  # an error event or bad JSON: no answer to judge
    done: bool = False  # [DONE] or the stream ended

    def feed(self, chunk: bytes) -> None:
        for ev in self.parser.feed(chunk):
            self.held.append(ev.raw)
            self._take(ev)

    def _take(self, ev: Event) -> None:
        if not ev.data:
            return  # SSE comments carry no answer
        if ev.done:
            self.done = True
            return
        try:
            obj = ev.json()
        except ValueError:
            self.broken = True
            return
        if obj is None or "error" in obj:
            self.broken = True
            return
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        for c in obj.get("choices") or []:
            self._take_choice(c)

    def _take_choice(self, c: Any) -> None:
        if not isinstance(c, dict):
            self.broken = True
            return
        delta = c.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else c.get("text")
        if isinstance(piece, str):
            self.text.append(piece)
        lp = c.get("logprobs")
        if isinstance(lp, dict):
            entries = lp["content"] if isinstance(lp.get("content"), list) else \
                [{"logprob": v} for v in lp.get("token_logprobs") or []]
            self.logprobs += [float(e["logprob"]) for e in entries
                              if isinstance(e, dict) and isinstance(e.get("logprob"), (int, float))]
        if c.get("finish_reason") is not None:
            self.finish_reason = c["finish_reason"]

    def decision(self, policy: CascadePolicy, request: dict[str, Any], k: int) -> Decision:
        if self.broken:
            return Decision(True, "malformed")
        # Exactly the first k tokens: a chunk that carried several must not widen the prefix.
        return decide_prefix(policy, request, "".join(self.text), self.logprobs[:k], self.finish_reason)


async def read_prefix(chunks: AsyncIterator[bytes], k: int) -> Prefix:
    """Read the student's stream until k tokens, its finish, its end, or a broken event."""
    prefix = Prefix()
    while len(prefix.logprobs) < k and prefix.finish_reason is None and not prefix.done and not prefix.broken:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            prefix.done = True
            break
        prefix.feed(chunk)
    return prefix


async def stream_student(dispatch: Dispatcher, metrics: Metrics, ctx: RequestContext, req: dict[str, Any],
                         policy: CascadePolicy, asked_logprobs: bool) -> Answer | None:
    """The streamed student, decided on its first `decide_after_tokens` tokens. Returns the answer
    when accepted (or when the request itself is wrong), None when the teacher must answer."""
    cs = ctx.route.cascade
    assert cs is not None and cs.decide_after_tokens is not None
    k = cs.decide_after_tokens
    client_opts = ctx.payload.get("stream_options") or {}
    req = {**req, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    try:
        resp, replica = await dispatch.send_json(ctx, cs.student, req, stream=True)
    except APIError as e:
        return student_failed(metrics, ctx, cs.student, e)
    if resp.status >= 400 or resp.chunks is None:
        if resp.status < 400:  # an engine that answered a stream request whole: nothing to relay
            resp.status = 502
        return student_failed(metrics, ctx, cs.student, resp)
    chunks = resp.chunks.__aiter__()
    try:
        prefix = await read_prefix(chunks, k)
    except BaseException:
        await resp.aclose()
        raise
    decision = prefix.decision(policy, ctx.payload, k)
    ctx.models.append(cs.student)
    metrics.cascade.labels(ctx.route.name, "escalate" if decision.escalate else "accept", decision.reason).inc()
    if decision.escalate:
        await resp.aclose()  # the engine aborts the request when its stream is closed
        # Billed for what it did until the abort: the latest running usage (prompt + tokens made).
        usage = prefix.usage or {"prompt_tokens": 0, "completion_tokens": len(prefix.logprobs)}
        dispatch.charge(ctx, cs.student, usage)
        ctx.escalated = decision.reason
        metrics.escalations.labels(ctx.route.name, decision.reason).inc()
        return None
    ctx.served_by, ctx.replica = cs.student, replica
    metrics.requests.labels(ctx.route.name, cs.student, "200").inc()
    relay = Relay(dispatch, cs.student, ctx, strip_logprobs=not asked_logprobs,
                  include_usage=bool(client_opts.get("include_usage")),
                  continuous=bool(client_opts.get("continuous_usage_stats")), usage=prefix.usage)
    return Answer(200, chunks=relay.run(resp, chunks, prefix), headers=ctx.headers())


def _made(usage: dict[str, Any]) -> int:
    n = usage.get("completion_tokens")
    return n if isinstance(n, int) else 0


class Relay:
    """The accepted student's stream as the client asked for it: logprobs and running usage only if
    it asked; the final usage chunk billed (with the cost in it) and kept only if it asked."""

    def __init__(self, dispatch: Dispatcher, model: str, ctx: RequestContext, *,
                 strip_logprobs: bool, include_usage: bool, continuous: bool, usage: dict[str, Any] | None) -> None:
        self.dispatch, self.model, self.ctx, self.store = dispatch, model, ctx, ctx.store
        self.strip_logprobs, self.include_usage, self.continuous = strip_logprobs, include_usage, continuous
        self.usage = usage
        self.billed = False
        self.assembler = StreamAssembler() if self.store is not None else None

    async def run(self, resp: UpstreamResponse, chunks: AsyncIterator[bytes], prefix: Prefix) -> AsyncIterator[bytes]:
        try:
            for held in prefix.held:
                if (out := self.event(held)):
                    yield out
            async for chunk in chunks:
                for event in prefix.parser.feed(chunk):
                    if (out := self.event(event.raw)):
                        yield out
            if prefix.parser.pending:
                yield prefix.parser.pending
        finally:
            if not self.billed and self.usage is not None:  # the client left before the usage chunk
                self.bill(self.usage)
            await resp.aclose()

    def bill(self, usage: dict[str, Any]) -> None:
        self.billed = True
        self.dispatch.charge(self.ctx, self.model, usage)

    def event(self, event: bytes) -> bytes:
        """One event for the client (b"" to drop it); bytes unchanged when nothing needs removing."""
        if event.startswith(b"data: {"):
            event = self._rewrite(event)
        if self.assembler is not None and event:
            self.assembler.feed(event)
            if self.assembler.done:
                whole = self.assembler.response()
                if whole is not None and self.store is not None:
                    self.store(whole, self.model)
                self.assembler = None
        return event

    def _rewrite(self, event: bytes) -> bytes:
        try:
            obj = json.loads(event[6:])
        except ValueError:
            return event
        if not isinstance(obj, dict):
            return event
        changed = False
        if isinstance(obj.get("usage"), dict):
            # Latest, not last seen: the held events replay usage older than the prefix's.
            if self.usage is None or _made(obj["usage"]) >= _made(self.usage):
                self.usage = obj["usage"]
            if not obj.get("choices"):  # the final usage chunk: the whole answer's usage
                self.bill(obj["usage"])
                if not self.include_usage:
                    return b""
                obj["usage"]["cost_usd"] = round(self.ctx.cost_usd, 10)
                changed = True
            elif not self.continuous:
                del obj["usage"]  # running usage the gateway asked for, not the client
                changed = True
        if self.strip_logprobs:
            for c in obj.get("choices") or []:
                if isinstance(c, dict) and c.get("logprobs") is not None:
                    c["logprobs"] = None  # asked for only to decide
                    changed = True
        if not changed:
            return event
        return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
