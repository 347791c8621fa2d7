"""Cascade: accept the small model's answer, or escalate to the large one.

The decision uses only what the student returned: its mean token logprob, whether it was cut
off, whether it satisfies the requested JSON schema, and whether it reads like a refusal.
"""

from __future__ import annotations

import json
import re
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
    reason: str  # "accepted", "low_confidence", "length", "schema", "refusal", "malformed"
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


def _schema_ok(text: str, schema: dict[str, Any]) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    try:
        import jsonschema
    except ImportError:  # without the validator, parsing is the check
        return True
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    except jsonschema.SchemaError:
        return True  # a broken schema is the client's problem, not the student's
    return True


def decide(policy: CascadePolicy, request: dict[str, Any], response: Any) -> Decision:
    """Accept or escalate, from the student's full (non-streamed) response. Every choice must pass."""
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        return Decision(True, "malformed")
    schema = requested_schema(request)
    worst: float | None = None
    for c in choices:
        if policy.escalate_on_length and c.get("finish_reason") == "length":
            return Decision(True, "length")
        text = choice_text(c)
        if schema is not None and policy.escalate_on_schema_failure and not _schema_ok(text, schema):
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
    return decide(policy, request, {"choices": [choice]})
