"""Cascade: accept the small model's answer, or escalate to the large one.

The decision uses only what the student returned: its mean token logprob, whether it was cut
off, whether it satisfies the requested JSON schema, and whether it reads like a refusal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_REFUSALS = (
    r"\bI (?:can(?:no|')t|am unable to|won't) (?:help|answer|assist)",
    r"\bI(?:'m| am) (?:not sure|sorry)",
    r"\bAs an AI\b",
)


@dataclass(frozen=True)
class CascadePolicy:
    min_mean_logprob: float = -2.0  # escalate when the student's mean token logprob is below this
    escalate_on_length: bool = True  # escalate when the student ran out of max_tokens
    escalate_on_schema_failure: bool = True
    refusal_patterns: tuple[str, ...] = DEFAULT_REFUSALS
    _compiled: tuple[re.Pattern[str], ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple(re.compile(p, re.IGNORECASE) for p in self.refusal_patterns))


@dataclass(frozen=True)
class Decision:
    escalate: bool
    # "accepted", "low_confidence", "length", "schema", "schema_unchecked", "refusal", "malformed"
    reason: str
    mean_logprob: float | None = None


def choice_text(choice: dict[str, Any]) -> str:
    msg = choice.get("message")
    if isinstance(msg, dict):
        return msg.get("content") or ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def mean_logprob(choice: dict[str, Any]) -> float | None:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    if isinstance(lp.get("content"), list):  # chat
        values = [t.get("logprob") for t in lp["content"] if isinstance(t, dict)]
    else:  # completions
        values = lp.get("token_logprobs") or []
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(nums) / len(nums) if nums else None


def requested_schema(request: dict[str, Any]) -> dict[str, Any] | None:
    rf = request.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        js = rf.get("json_schema")
        if isinstance(js, dict) and isinstance(js.get("schema"), dict):
            return js["schema"]
    if isinstance(rf, dict) and rf.get("type") == "json_object":
        return {"type": "object"}
    return None


# Keywords that apply a subschema to the same instance (they descend into no part of it): a `$ref`
# reached only through these loops forever on any value.
_IN_PLACE = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else", "$ref")


def _loops_in_place(schema: Any, at: str = "#", path: frozenset[str] = frozenset(), depth: int = 0) -> bool:
    """Whether `schema` reaches a `$ref` back to itself (or to a schema that encloses it) without
    descending into the instance, such as `{"$ref": "#"}`: found by a walk, where validating it would
    recurse to the interpreter's limit (whose unwinding is not clean: finalizers fail there)."""
    if not isinstance(schema, dict) or depth > 64:
        return depth > 64
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#") and any(ref == p or p.startswith(ref + "/") or ref == "#"
                                                              for p in path | {at}):
        return True
    for key in _IN_PLACE[:-1]:
        sub = schema.get(key)
        subs = sub if isinstance(sub, list) else [sub]
        for i, s in enumerate(subs):
            where = f"{at}/{key}/{i}" if isinstance(sub, list) else f"{at}/{key}"
            if isinstance(s, dict) and _loops_in_place(s, where, path | {at}, depth + 1):
                return True
    return False


def schema_verdict(text: str, schema: dict[str, Any]) -> bool | None:
    """Whether `text` is JSON that satisfies `schema`: True, False, or None when the schema cannot
    be checked safely (it refers outside itself, recurses without end, or is not a valid schema).
    No reference is ever fetched: the registry holds only the JSON Schema specifications, so a
    remote `$ref` is unresolvable here. Pure, but unbounded in time on a hostile schema (a
    catastrophic `pattern`): the gateway runs it in a worker process it can kill
    (serve/gateway/schema_check.py), never on its event loop."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return False
    try:
        import jsonschema
        from referencing import Registry
    except ImportError:  # without the validator, parsing is the check
        return True
    if _loops_in_place(schema):
        return None  # a `$ref` cycle that consumes no input: it could never be decided
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        return cls(schema, registry=Registry()).is_valid(value)
    except jsonschema.SchemaError:
        return None  # not a schema: the teacher's engine answers for it (vLLM refuses what it cannot compile)
    except (RecursionError, MemoryError):
        return None  # a `$ref` cycle that consumes no input, or nesting past the interpreter's limit
    except Exception:  # an unresolvable `$ref` (remote or missing), a pattern `re` cannot compile, ...
        return None


def schema_checks(policy: CascadePolicy, request: dict[str, Any], response: Any) -> list[tuple[str, dict[str, Any]]]:
    """The (text, schema) pairs `decide` needs a verdict on, one per choice, in choice order: empty
    when no schema was requested (or schema failures do not escalate), so the common path pays
    nothing."""
    schema = requested_schema(request)
    choices = response.get("choices") if isinstance(response, dict) else None
    if schema is None or not policy.escalate_on_schema_failure or not isinstance(choices, list):
        return []
    return [(choice_text(c), schema) for c in choices if isinstance(c, dict)]


def decide(policy: CascadePolicy, request: dict[str, Any], response: Any,
           schema_ok: Sequence[bool | None] | None = None) -> Decision:
    """Accept or escalate, from the student's full (non-streamed) response. Every choice must pass.
    `schema_ok` holds the verdicts on `schema_checks(policy, request, response)`, computed by the
    caller (the gateway, in a worker process); without them the schema is checked here, in-process
    (offline tools and tests). A verdict of None (could not be checked) escalates as "schema_unchecked"."""
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        return Decision(True, "malformed")
    checks = schema_checks(policy, request, response)
    verdicts = list(schema_ok) if schema_ok is not None else [schema_verdict(t, s) for t, s in checks]
    if len(verdicts) != len(checks):
        return Decision(True, "schema_unchecked")
    worst: float | None = None
    for i, c in enumerate(choices):
        if policy.escalate_on_length and c.get("finish_reason") == "length":
            return Decision(True, "length")
        text = choice_text(c)
        if checks and verdicts[i] is None:
            return Decision(True, "schema_unchecked")
        if checks and verdicts[i] is False:
            return Decision(True, "schema")
        if any(p.search(text) for p in policy._compiled):
            return Decision(True, "refusal")
        m = mean_logprob(c)
        if m is not None:
            worst = m if worst is None else min(worst, m)
    if worst is None:
        return Decision(True, "malformed")  # no confidence signal: the safe side is the teacher
    if worst < policy.min_mean_logprob:
        return Decision(True, "low_confidence", worst)
    return Decision(False, "accepted", worst)


def prefix_decidable(policy: CascadePolicy, request: dict[str, Any]) -> bool:
    """Whether a decision on the first tokens can run the same checks as on the whole answer: a
    requested schema can only be checked on the whole text, so such requests stay buffered."""
    return not (policy.escalate_on_schema_failure and requested_schema(request) is not None)


def decide_prefix(policy: CascadePolicy, request: dict[str, Any], text: str, logprobs: list[float],
                  finish_reason: str | None) -> Decision:
    """Accept or escalate from the first tokens of a streamed student answer (all of it, when it
    finished within them): `decide` on what the prefix shows, i.e. the prefix's mean logprob, a
    refusal in its text, and length (and schema) only when it finished. The caller passes exactly
    the tokens the decision is meant to see; later tokens never count."""
    choice = {"text": text, "logprobs": {"token_logprobs": list(logprobs)}, "finish_reason": finish_reason}
    if finish_reason is None:  # unfinished text is not yet JSON: only prefix_decidable requests get here
        request = {k: v for k, v in request.items() if k != "response_format"}
    # The schema, if any, is checked in-process here: the gateway never brings a schema this way
    # (prefix_decidable keeps such requests buffered, and their check goes to a worker).
    return decide(policy, request, {"choices": [choice]})
