"""What one API endpoint supplies to the gateway: a dialect.

Each OpenAI API (chat, completions, Responses, embeddings, tokenize, ...) is one dialect: how a
request is validated, the typed view the gateway reads it through (parsed once: max output tokens
under one name, `n`, `stream`), what the cascade sends the student and what it judges, how a whole
answer (a cache hit, an accepted student) is replayed as a body or a stream, whether an answer may
be cached, and how usage is read and billed from a body or a stream. The route's stages (cache,
cascade, fallback) work only through this interface, so they never ask which API a request is.

The defaults here are those of an endpoint that answers whole JSON bodies with a `usage` object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Protocol

from serve.config import TierPrompt
from serve.gateway.answer import Answer
from serve.sse_events import EventParser

# usage -> the request's whole cost so far, after billing it (the tap writes that into the stream).
Charge = Callable[[Any], float]
# a whole answer read back from a stream -> None (stored in the head cache).
Keep = Callable[[dict[str, Any]], None]
Task = Literal["generate", "embed"]


@dataclass(frozen=True)
class View:
    """A request as the gateway reads it, parsed once after validation."""

    stream: bool = False
    include_usage: bool = False  # streams: the client asked for the usage chunk
    n: int = 1
    choices: int = 0  # sequences the engine generates (n for each prompt); 0: it generates none
    max_output_tokens: int | None = None  # whichever field the API names it by
    max_tokens_field: str = "max_tokens"  # that field's name, for a request the gateway rewrites


@dataclass
class Conversation:
    """A request that continues stored state (Responses' `previous_response_id`, `store`)."""

    previous_response_id: str | None
    items: list[Any]  # the whole conversation as input items, this turn's included
    store: bool  # keep the answer for a follow-up turn
    turns: int = 1  # this turn's place in the chain


class StreamTap(Protocol):
    """Reads an engine's stream as it is relayed: bills its usage, keeps the whole answer for the
    cache, and returns the bytes the client gets (usually the chunk unchanged)."""

    def feed(self, chunk: bytes) -> bytes: ...

    def end(self) -> bytes:
        """Bytes held back when the stream ends (an event cut off by the engine)."""
        ...

    def close(self) -> None:
        """The stream is over: if it ended before its usage (the client left, the engine broke),
        bill what it went through: the prompt and an output token an event, an estimate."""
        ...


class PassThrough:
    """A stream the gateway has nothing to read in."""

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def end(self) -> bytes:
        return b""

    def close(self) -> None:
        pass


class EventTap:
    """What a tap over an event stream holds: the parser that cuts whole events (serve/sse_events.py)
    and the estimate billed if the stream stops before its usage. Subclasses say what `feed` does."""

    def __init__(self, charge: Charge, prompt_tokens: int) -> None:
        self.usage = Estimate(charge, prompt_tokens)
        self.parser = EventParser(keep_empty=True)

    def end(self) -> bytes:
        return self.parser.pending

    def close(self) -> None:
        self.usage.close()


class Estimate:
    """What a tap bills when a stream stops before its usage: the prompt (as the gateway
    estimated it) and one output token for each event relayed (vLLM sends one a decode step)."""

    def __init__(self, charge: Charge, prompt_tokens: int) -> None:
        self.charge, self.prompt_tokens = charge, prompt_tokens
        self.events = 0
        self.billed = False

    def bill(self, usage: Any) -> float:
        self.billed = True
        return self.charge(usage)

    def close(self) -> None:
        if not self.billed:
            self.bill({"prompt_tokens": self.prompt_tokens, "completion_tokens": self.events})


def with_cost(body: dict[str, Any], cost: float) -> dict[str, Any]:
    """Put the cost into `usage` as an extra field; the SDK keeps unknown fields."""
    usage = body.get("usage")
    if isinstance(usage, dict):
        usage["cost_usd"] = round(cost, 10)
    return body


class Dialect:
    """One API endpoint. Subclasses override what differs; see the module docstring."""

    path: str = ""
    task: Task | None = None  # the engine task that serves it; None: any model (tokenizers)
    routed: bool = True  # False: sent to the route's first model as is (no cache, cascade, cost)
    cascades: bool = False  # a cascade may answer it with the student
    shadowable: bool = False  # a route's shadow model may be asked the same (agreement is measured)
    deterministic: bool = False  # no sampling: every request may be cached (embeddings, scores)

    # ---- admission -------------------------------------------------------------------------------
    def coerce(self, payload: dict[str, Any]) -> bool:
        """Apply, in place, the type coercions vLLM's request model for this API applies (so the
        gateway accepts what vLLM accepts); True if a value changed. Raises a 400 naming `param`."""
        return False

    def validate(self, payload: dict[str, Any], max_messages: int) -> None:
        """Raise a 400 naming `param` for what the API does not accept."""

    def view(self, payload: dict[str, Any]) -> View:
        return View()

    # ---- state a request continues from (Responses' previous_response_id) -----------------------
    async def deferred(self, payload: dict[str, Any], key: str) -> Answer | None:
        """An answer now, with the request queued to run later (Responses' `background`), or None
        to run it now. Raises APIError."""
        return None

    async def before(self, payload: dict[str, Any], key: str) -> tuple[dict[str, Any], Conversation | None]:
        """(the request the route runs on, the stored state it continues). Raises APIError."""
        return payload, None

    async def after(self, conversation: Conversation | None, key: str, answer: Answer) -> Answer:
        """What to do with the route's answer before it goes out (e.g. store it)."""
        return answer

    # ---- whole answers: the cache and the cascade --------------------------------------------------
    def cacheable(self, body: dict[str, Any]) -> bool:
        """Whether this whole answer is what the same request would get again."""
        return True

    def usage(self, body: dict[str, Any]) -> Any:
        return body.get("usage")

    def zero_usage(self) -> dict[str, Any]:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cost_usd": 0.0}

    def refresh(self, body: dict[str, Any]) -> None:
        """A replayed answer is a new answer: a fresh id and creation time."""

    # An answer's fields that belong to the request that made it, not to the answer: echoed from
    # it (field -> its value when a request leaves it out), or made for that one run. The head
    # cache keeps them empty, and a hit gets the replaying request's own: no tenant reads another's.
    echoed: Mapping[str, Any] = MappingProxyType({})
    run_fields: tuple[str, ...] = ()

    def for_cache(self, body: dict[str, Any]) -> dict[str, Any]:
        """The answer as the head cache keeps it (a copy): the request's own fields emptied."""
        return {k: None if k in self.echoed or k in self.run_fields else v for k, v in body.items()}

    def for_request(self, body: dict[str, Any], payload: dict[str, Any], conversation: Conversation | None) -> None:
        """A cached answer made this request's own (in place): its echoed fields are this request's."""
        for name, default in self.echoed.items():
            if name in body:
                body[name] = payload.get(name, default)

    def replay(self, body: dict[str, Any], view: View) -> Iterable[bytes]:
        raise NotImplementedError(f"{self.path} is not streamed")

    def whole(self, body: dict[str, Any], view: View, headers: dict[str, str]) -> Answer:
        """A whole answer for the client: the body, or its replay as a stream when it streams."""
        if view.stream:
            return Answer.replayed(self.replay(body, view), headers)
        return Answer(200, body, headers=headers)

    def with_prompt(self, payload: dict[str, Any], prompt: TierPrompt | None) -> dict[str, Any]:
        """The request with a route's per-tier prompt before the client's input (a copy; the same
        dict when there is nothing to add). Endpoints without a prompt to lead with send it as is."""
        return payload

    def student_request(self, payload: dict[str, Any], view: View, student: str,
                        cap: int | None) -> tuple[dict[str, Any], bool]:
        """(the student's request, whether the client itself asked for logprobs). The student is
        asked for the logprobs the cascade decides on; `cap` bounds its output when buffered."""
        raise NotImplementedError(f"{self.path} has no cascade")

    def judged(self, payload: dict[str, Any], body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the request, the answer) as the cascade policy reads them: chat's names and choices."""
        return payload, body

    def strip_logprobs(self, body: dict[str, Any]) -> None:
        """Remove the logprobs the gateway asked for only to decide."""

    def prefix_decidable(self, view: View) -> bool:
        """Whether the streamed cascade may decide on the student's first tokens."""
        return False

    # ---- streams ---------------------------------------------------------------------------------
    def stream_request(self, payload: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the request to send, whether the usage the gateway added must be stripped again)."""
        return payload, False

    def tap(self, charge: Charge, keep: Keep | None, strip_usage: bool, prompt_tokens: int) -> StreamTap:
        return PassThrough()
