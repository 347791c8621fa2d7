"""Agreement measures for free text that token overlap misjudges: an embedding similarity through
the gateway's own /v1/embeddings, and an LLM judge (the teacher, through the Batch API, answering a
json_schema verdict). Both go through the gateway like any client, so they are billed, rate
limited and logged as the traffic they stand for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

# The reason is bounded so that the whole verdict always fits the judge's max_tokens: a judge that
# rambles (a small or random-weight one under a grammar does: its string ends only at maxLength)
# would otherwise be cut mid-string, and a cut verdict is unreadable, which counts as a disagreement.
# 120 characters are at most ~170 tokens of a byte-level vocabulary, with the JSON around them < 200.
REASON_CHARS = 120
JUDGE_MAX_TOKENS = 200
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"same_meaning": {"type": "boolean"}, "reason": {"type": "string", "maxLength": REASON_CHARS}},
    "required": ["same_meaning", "reason"],
    "additionalProperties": False,
}
JUDGE_INSTRUCTIONS = (
    "You compare a candidate answer with a reference answer to the same request. Say whether the "
    "candidate gives the user the same information and instructions as the reference (wording, "
    "length and politeness do not matter; a missing or contradicting fact does). Answer only with "
    "the JSON object the schema asks for."
)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def embedding_similarity(client: Any, model: str, pairs: Sequence[tuple[str, str]], batch: int = 64) -> list[float]:
    """Cosine similarity of each (student, teacher) pair's embeddings, clamped to [0, 1] (opposed
    directions agree no less than unrelated ones), from `model` through the client's /embeddings.
    An empty answer has no embedding worth comparing: 1.0 when both are empty, else 0.0."""
    out: list[float] = [0.0] * len(pairs)
    todo = [i for i, (s, t) in enumerate(pairs) if s.strip() and t.strip()]
    for i, (s, t) in enumerate(pairs):
        if not s.strip() and not t.strip():
            out[i] = 1.0
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        texts = [pairs[i][0] for i in chunk] + [pairs[i][1] for i in chunk]
        data = sorted(client.embeddings.create(model=model, input=texts).data, key=lambda d: d.index)
        vectors = [d.embedding for d in data]
        for k, i in enumerate(chunk):
            out[i] = max(0.0, cosine(vectors[k], vectors[len(chunk) + k]))
    return out


def judge_lines(items: Sequence[tuple[str, dict[str, Any], str, str]], judge: str) -> list[str]:
    """Batch API input lines asking `judge` for a verdict on each (id, request, student, teacher)."""
    lines = []
    for label_id, request, student, teacher in items:
        asked = json.dumps(request.get("messages") or request.get("prompt"), ensure_ascii=False)
        body = {"model": judge, "temperature": 0, "max_tokens": JUDGE_MAX_TOKENS,
                "messages": [{"role": "system", "content": JUDGE_INSTRUCTIONS},
                             {"role": "user", "content": f"Request: {asked}\n\nReference answer: {teacher}\n\n"
                                                         f"Candidate answer: {student}"}],
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": "verdict", "schema": VERDICT_SCHEMA, "strict": True}}}
        lines.append(json.dumps({"custom_id": label_id, "method": "POST", "url": "/v1/chat/completions",
                                 "body": body}))
    return lines


def verdict(body: dict[str, Any] | None) -> float | None:
    """1.0 (same meaning), 0.0 (not), or None when the judge's answer is not a schema-valid verdict."""
    try:
        text = body["choices"][0]["message"]["content"] if body else None
        # strict=False: control characters inside the reason are read. xgrammar (0.2.8) builds a
        # maxLength-bounded string from [^"\\\r\n], so a grammar-valid verdict can carry a raw
        # control character that strict JSON refuses (seen from the integration stack's tiny teacher);
        # the verdict is the boolean, whatever the reason's bytes.
        value = json.loads(text or "", strict=False)
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("same_meaning"), bool):
        return None
    return 1.0 if value["same_meaning"] else 0.0


def judge_score(ids: Sequence[str], answers: dict[str, dict[str, Any]]) -> tuple[float, int]:
    """(mean verdict, verdicts that could not be read); an unreadable or missing verdict counts as
    a disagreement, so a judge that fails cannot pass a student."""
    got = [verdict(answers.get(i)) for i in ids]
    return (sum(v or 0.0 for v in got) / len(got) if got else 0.0), sum(1 for v in got if v is None)


def tier_quality(items: Sequence[tuple[str, dict[str, Any], str, str]], embed: Any = None, judge: Any = None
                 ) -> tuple[dict[str, float | None], dict[str, Any]]:
    """The free-text measures of one tier's sample of (id, request, answer, teacher's answer):
    ({"embedding_similarity": mean, "judge": mean verdict}, what the judge spent and could not read).
    embed(pairs) -> similarities (`embedding_similarity` bound to a client and model); judge(items)
    -> (batch id, custom_id -> answer body) (the Batch API run of `judge_lines`). A measure not
    asked for, or with nothing to measure, is absent."""
    from serve.policies.cost import usage_tokens

    scores: dict[str, float | None] = {}
    spent: dict[str, Any] = {}
    if not items:
        return scores, spent
    if embed is not None:
        sims = embed([(answer, teacher) for _, _, answer, teacher in items])
        scores["embedding_similarity"] = sum(sims) / len(sims)
    if judge is not None:
        batch_id, answers = judge(items)
        scores["judge"], unreadable = judge_score([i for i, *_ in items], answers)
        usage = [usage_tokens(a.get("usage")) for a in answers.values()]
        spent = {"batch_id": batch_id, "unreadable": unreadable, "prompt_tokens": sum(p for p, _ in usage),
                 "completion_tokens": sum(c for _, c in usage)}
    return scores, spent
