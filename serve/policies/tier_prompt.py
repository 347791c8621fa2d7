"""Per-tier prompts (pure): what a route tells each tier before the client's own input.

A teacher needs long instructions and worked examples; a student trained on the teacher's answers
to the client's input needs only that input. The route configures both (`prompts:`), and the
gateway applies the one of the model it sends to, in one place (`RequestContext.sent_to`, through
the dialect's `with_prompt`): the cascade's student (and the candidate shadowing it) gets the
student's prompt, every other model (the teacher, a target, fallbacks) the teacher's, since only a
trained student can do without the instructions.

Both prompts are part of the head-cache key (`digest`): an answer cached under one prompt is never
served after the prompt changes. The offline paths (cache build, labels, the economics report's
teacher-only baseline) apply the same functions, so what they send is what the gateway sends.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from serve.config import RouteSpec, TierPrompt


def as_served(route: RouteSpec, override: dict[str, str] | None) -> RouteSpec:
    """The route with a promotion's override applied (its student or target moved), as the
    gateways serve it: offline paths ask the promoted student with the student's prompt too."""
    model = (override or {}).get("student") or (override or {}).get("target")
    if not model:
        return route
    if route.cascade is not None and (override or {}).get("student"):
        return route.model_copy(update={"cascade": route.cascade.model_copy(update={"student": model})})
    if route.target is not None:
        return route.model_copy(update={"target": model})
    return route


def tier_of(route: RouteSpec, model: str) -> str:
    """`student` for the route's cascade student and, on a cascade, its shadow (a candidate for the
    student's place, asked as the student is asked); `teacher` for any other model it sends to."""
    if route.cascade is None:
        return "teacher"
    candidate = route.shadow.model if route.shadow is not None else None
    return "student" if model in (route.cascade.student, candidate) else "teacher"


def prompt_for(route: RouteSpec | None, model: str) -> TierPrompt | None:
    if route is None or route.prompts is None:
        return None
    return route.prompts.student if tier_of(route, model) == "student" else route.prompts.teacher


def digest(route: RouteSpec | None) -> str | None:
    """The content digest of the route's per-tier prompts (None: it has none), for the cache key."""
    if route is None or route.prompts is None:
        return None
    blob = json.dumps(route.prompts.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


# Request fields whose answer would show the client the prompt its tier was sent: the prompt's text
# echoed back (completions' `echo`), its tokens' logprobs (`prompt_logprobs`) or ids
# (`return_token_ids`: vLLM's `prompt_token_ids`). A route's instructions are the operator's.
REVEALING = ("prompt_logprobs", "return_token_ids")


def revealing(route: RouteSpec, payload: dict[str, Any]) -> str | None:
    """The first field of `payload` that would show a tier's prompt to the client (None: none, or
    the route sends no prompt)."""
    if route.prompts is None or (route.prompts.teacher is None and route.prompts.student is None):
        return None
    if "prompt" in payload and payload.get("echo"):
        return "echo"
    return next((f for f in REVEALING if payload.get(f) not in (None, False)), None)


def messages(prompt: TierPrompt) -> list[dict[str, str]]:
    """The prompt as chat messages: the instructions as a system message, then the examples."""
    head = [{"role": "system", "content": prompt.system}] if prompt.system else []
    return head + [{"role": m.role, "content": m.content} for m in prompt.examples]


def text(prompt: TierPrompt) -> str:
    """The prompt as leading text (completions): instructions and examples, a blank line apart."""
    parts = [prompt.system] if prompt.system else []
    parts += [m.content for m in prompt.examples]
    return "\n\n".join(parts)


def apply_chat(payload: dict[str, Any], prompt: TierPrompt | None) -> dict[str, Any]:
    """A chat request with the tier's messages before the client's (a copy; unchanged without a prompt)."""
    if prompt is None or not isinstance(payload.get("messages"), list):
        return payload
    lead = messages(prompt)
    return {**payload, "messages": lead + payload["messages"]} if lead else payload


def apply_completion(payload: dict[str, Any], prompt: TierPrompt | None) -> dict[str, Any]:
    """A completions request with the tier's text before each text prompt (token-id prompts are
    sent as they are: the gateway does not tokenize)."""
    lead = text(prompt) if prompt is not None else ""
    if not lead:
        return payload
    p = payload.get("prompt")
    if isinstance(p, str):
        return {**payload, "prompt": f"{lead}\n\n{p}"}
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return {**payload, "prompt": [f"{lead}\n\n{x}" for x in p]}
    return payload


def apply_responses(payload: dict[str, Any], prompt: TierPrompt | None) -> dict[str, Any]:
    """A Responses request with the tier's instructions before the client's `instructions` and its
    examples as input messages before the client's input."""
    if prompt is None:
        return payload
    out = dict(payload)
    if prompt.system:
        own = payload.get("instructions")
        out["instructions"] = f"{prompt.system}\n\n{own}" if isinstance(own, str) and own else prompt.system
    if prompt.examples:
        given = payload.get("input")
        items = [{"role": "user", "content": given}] if isinstance(given, str) else list(given or [])
        out["input"] = [{"type": "message", "role": m.role, "content": m.content} for m in prompt.examples] + items
    return out


def apply_any(payload: dict[str, Any], prompt: TierPrompt | None) -> dict[str, Any]:
    """For callers that have only a logged body (cache build, labels, reports): chat or completions."""
    return apply_chat(payload, prompt) if "messages" in payload else apply_completion(payload, prompt)
