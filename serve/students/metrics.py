"""Deterministic agreement metrics between a student's answer and the teacher's (pure)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

_WS = re.compile(r"\s+")
_TOKEN = re.compile(r"\w+|[^\w\s]")
# What a byte-level tokenizer's decoder emits for bytes that are not valid UTF-8: random-weight
# models answer in little else, so two of them "agree" on it without saying anything.
REPLACEMENT = "\ufffd"


def normalize(text: str) -> str:
    return _WS.sub(" ", text).strip().lower()


def exact_match(student: str, teacher: str, schema: dict[str, Any] | None = None) -> float:
    return 1.0 if normalize(student) == normalize(teacher) else 0.0


def _words(text: str) -> list[str]:
    # U+FFFD is neither a word character nor whitespace, so _TOKEN always makes it a token of its
    # own (it never sits inside a word): dropping those tokens drops every U+FFFD, and the words on
    # either side stay the words they were.
    return [w for w in _TOKEN.findall(normalize(text)) if w != REPLACEMENT]


def token_overlap(student: str, teacher: str, schema: dict[str, Any] | None = None) -> float:
    """Token-level F1 (SQuAD style) after normalisation, U+FFFD not counted as a token."""
    s, t = _words(student), _words(teacher)
    if not s and not t:
        # Two empty answers agree; two made of nothing but U+FFFD do not.
        return 0.0 if REPLACEMENT in student or REPLACEMENT in teacher else 1.0
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


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Flattened JSON: each leaf's path (keys and list indices) -> its value."""
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _leaves(sub, f"{path}/{key}").items()}
    if isinstance(value, list) and value:
        return {k: v for i, sub in enumerate(value) for k, v in _leaves(sub, f"{path}/{i}").items()}
    return {path: value}


def json_field_match(student: str, teacher: str, schema: dict[str, Any] | None = None) -> float:
    """Share of the teacher's JSON leaf fields the student's JSON has, with the same value (strings
    compared normalised); an answer that is not JSON scores 0; a teacher answer that is not JSON
    falls back to exact match. Partial credit where exact match would give 0 for one wrong field."""
    try:
        want = json.loads(teacher)
    except ValueError:
        return exact_match(student, teacher)
    try:
        got = _leaves(json.loads(student))
    except ValueError:
        return 0.0

    def same(a: Any, b: Any) -> bool:
        return normalize(a) == normalize(b) if isinstance(a, str) and isinstance(b, str) else a == b

    fields = _leaves(want)
    return sum(1 for k, v in fields.items() if k in got and same(got[k], v)) / len(fields)


METRICS: dict[str, Callable[[str, str, dict[str, Any] | None], float]] = {
    "exact_match": exact_match,
    "token_overlap": token_overlap,
    "json_valid": json_valid,
    "json_field_match": json_field_match,
}


def score(pairs: list[tuple[str, str, dict[str, Any] | None]], metrics: list[str]) -> dict[str, float]:
    """Mean of each metric over (student, teacher, schema) pairs."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {sorted(METRICS)}")
    if not pairs:
        return {m: 0.0 for m in metrics}
    return {m: sum(METRICS[m](s, t, sc) for s, t, sc in pairs) / len(pairs) for m in metrics}
