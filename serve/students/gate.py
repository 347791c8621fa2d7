"""Whether an evaluation or a promotion may go ahead (pure: every input is passed in).

Weights are named by their content digest (registry.adapter_digest). An evaluation scores what the
gateway serves under a name, so it is only recorded when that is the artefact it names; a
promotion only loads the artefact its evaluation scored, and never swaps the weights behind a name
that already serves others (that would change a route without an evaluation).
"""

from __future__ import annotations

from typing import Any

from serve.config import GateSpec


def short(digest: str | None) -> str:
    return digest[:12] if digest else "unknown"


def eval_refusal(name: str, path: str, digest: str, served: dict[str, Any] | None) -> str | None:
    """Why `students eval NAME --path PATH` must not record a score; None when it may.
    served: {"path", "digest"} the gateway serves NAME from, or None if it serves no such adapter."""
    if served is None:
        return (f"{name} is not a loaded adapter: load {path} under that name first "
                "(POST /v1/llmserve/adapters), then evaluate it")
    if served.get("digest") != digest:
        return (f"{name} serves the weights at {served.get('path')} (digest {short(served.get('digest'))}), not "
                f"those at {path} (digest {short(digest)}): the score would not belong to {path}")
    return None


def promote_refusal(name: str, path: str, digest: str, latest: dict[str, Any] | None, gate: GateSpec,
                    served: dict[str, Any] | None) -> str | None:
    """Why `students promote NAME --path PATH` is refused; None when it passes the route's gate."""
    if latest is None:
        return f"{name} has no evaluation: run `llmserve students eval --adapter {name} --path {path}` first"
    if latest.get("digest") != digest:
        return (f"{name} was evaluated on the weights at {latest.get('path')} (digest "
                f"{short(latest.get('digest'))}), not those at {path} (digest {short(digest)}): evaluate "
                "these weights first")
    got = (latest.get("scores") or {}).get(gate.metric)
    if got is None or got < gate.min_score:
        return f"{name} scored {got} on {gate.metric}; the route needs {gate.min_score}"
    if served is not None and served.get("digest") != digest:
        return (f"{name} now serves other weights ({served.get('path')}, digest {short(served.get('digest'))}) "
                "than the ones evaluated: evaluate again, or promote these weights under a new name")
    return None
