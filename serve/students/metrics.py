"""Deterministic agreement metrics between a student's answer and the teacher's (pure)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

_WS = re.compile(r"\s+")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def normalize(text: str) -> str:
    return _WS.sub(" ", text).strip().lower()


def exact_match(student: str, teacher: str, schema: dict[str, Any] | None = None) -> float:
    return 1.0 if normalize(student) == normalize(teacher) else 0.0


def token_overlap(student: str, teacher: str, schema: dict[str, Any] | None = None) -> float:
    """Token-level F1 (SQuAD style) after normalisation."""
    s, t = _TOKEN.findall(normalize(student)), _TOKEN.findall(normalize(teacher))
    if not s and not t:
        return 1.0
    common = sum((Counter(s) & Counter(t)).values())
    if common == 0:
        return 0.0
    p, r = common / len(s), common / len(t)
    return 2 * p * r / (p + r)


def json_valid(student: str, teacher: str, schema: dict[str, Any] | None = None) -> float:
    """1 when the student's answer parses (and validates, when a schema is given)."""
    try:
        value = json.loads(student)
    except ValueError:
        return 0.0
    if schema is None:
        return 1.0
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except (jsonschema.ValidationError, jsonschema.SchemaError):
        return 0.0
    return 1.0


METRICS: dict[str, Callable[[str, str, dict[str, Any] | None], float]] = {
    "exact_match": exact_match,
    "token_overlap": token_overlap,
    "json_valid": json_valid,
}


def score(pairs: list[tuple[str, str, dict[str, Any] | None]], metrics: list[str]) -> dict[str, float]:
    """Mean of each metric over (student, teacher, schema) pairs."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {sorted(METRICS)}")
    if not pairs:
        return {m: 0.0 for m in metrics}
    return {m: sum(METRICS[m](s, t, sc) for s, t, sc in pairs) / len(pairs) for m in metrics}
