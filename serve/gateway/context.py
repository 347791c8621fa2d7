"""One request's context: what was asked (through which dialect), which route admitted it, and
what the route's stages did with it (who answered, the cache, the cost, an escalation).

The service layer makes one per admitted request and hands it down: the route's stages read the
request and record what they did here, so no stage calls back up into the one that called it.
The accounting headers of the answer are read off the context at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from serve.config import RouteSpec
from serve.gateway.dialects.base import Conversation, Dialect, View
from serve.policies.tier_prompt import prompt_for

# (answer body, model that produced it) -> None: stores the route's own answer in the head cache.
Store = Callable[[dict[str, Any], str], None]


@dataclass
class RequestContext:
    """An admitted request on its way through the route's stages."""

    route: RouteSpec
    dialect: Dialect
    payload: dict[str, Any]  # as the dialect will send it (Responses: the whole conversation)
    view: View  # the typed view the dialect parsed once
    key: str = "anonymous"  # the API key's name, for per-key cost
    admin: bool = False  # the key is an admin's (sees how a cached answer was made)
    raw: bytes | None = None  # the client's own bytes, forwarded when the request is unchanged
    affinity: str | None = None  # the prompt prefix replicas are chosen by (their prefix cache)
    served_by: str = ""
    replica: str = ""  # the engine replica that answered (prefix affinity is visible here)
    cache: str = "bypass"  # hit | miss | bypass
    cost_usd: float = 0.0
    tokens: int = 0  # prompt and output tokens billed so far, every model's (settles the key's budget)
    sending: str | None = None  # the model working on a whole answer right now (set by the dispatcher)
    escalated: str | None = None
    models: list[str] = field(default_factory=list)
    store: Store | None = None  # set by the cache stage on a miss the route may fill
    conversation: Conversation | None = None  # set by a dialect whose requests continue state

    @property
    def path(self) -> str:
        return self.dialect.path

    def sent_to(self, model: str) -> dict[str, Any]:
        """The request as `model` gets it: the client's, led by the route's prompt for that model's
        tier (serve/policies/tier_prompt.py). The one place a tier prompt is applied; the same dict
        when the route has none."""
        return self.dialect.with_prompt(self.payload, prompt_for(self.route, model))

    def headers(self) -> dict[str, str]:
        h = {"x-llmserve-route": self.route.name, "x-llmserve-served-by": self.served_by,
             "x-llmserve-cache": self.cache, "x-llmserve-cost-usd": f"{self.cost_usd:.10f}"}
        if self.escalated:
            h["x-llmserve-escalated"] = self.escalated
        if self.replica:
            h["x-llmserve-replica"] = self.replica
        return h


class Background:
    """Tasks started off the request path (cache writes, shadow calls), held so the event loop does
    not drop them mid-flight."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
