"""Whether an evaluation or a promotion may go ahead (pure: every input is passed in).

Weights are named by their content digest (registry.adapter_digest). An evaluation scores what the
gateway serves under a name, so it is only recorded when that is the artefact it names; a
promotion only loads the artefact its evaluation scored, and never swaps the weights behind a name
that already serves others (that would change a route without an evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from statistics import NormalDist
from typing import Any

from serve.config import GateSpec

INTERVAL = "one-sided Wilson score interval"


def lower_bound(mean: float, n: int, confidence: float) -> float:
    """One-sided Wilson lower bound of a mean score in [0, 1] over n labels.

    Why Wilson: the normal (Wald) interval collapses to zero width at a score of 1.0 or 0.0 and
    undercovers with tens of labels, which is where a gate decides; Wilson keeps its coverage there.
    For a binary score (exact match, a judge's verdict) it is the interval for a proportion; for a
    score anywhere in [0, 1] (token overlap, field match, similarity) the variance is at most
    mean x (1 - mean), the binary case's, so the same bound is conservative."""
    if n <= 0:
        return 0.0
    p = min(1.0, max(0.0, mean))
    z = NormalDist().inv_cdf(confidence)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half)


def split_check(label_ids: Iterable[str], manifest: dict[str, Any] | None, digest: str,
                manifest_path: str | None) -> tuple[dict[str, Any], str | None]:
    """(what the evaluation records about its labels and the weights' training split, why it must
    not be recorded or None). The manifest `students train` wrote must describe these weights."""
    if manifest is None:
        return {"checked": False, "manifest": None}, None
    if manifest.get("digest") != digest:
        return ({"checked": False, "manifest": manifest_path},
                f"the manifest {manifest_path} describes weights {short(manifest.get('digest'))}, not these "
                f"({short(digest)}): it cannot tell what they were trained on")
    trained = set((manifest.get("split") or {}).get("train") or [])
    overlap = sorted(set(label_ids) & trained)
    record = {"checked": True, "manifest": manifest_path, "train": len(trained), "overlap": len(overlap)}
    if overlap:
        return record, (f"{len(overlap)} of these labels are in the training split of these weights (e.g. "
                        f"{overlap[0]}): a score on them says what the student memorised, not how it answers")
    return record, None


def gate_verdict(latest: dict[str, Any], gate: GateSpec) -> dict[str, Any]:
    """The evidence a promotion rests on (recorded with it): the metric, mean, sample, interval."""
    n = int(latest.get("n") or 0)
    got = (latest.get("scores") or {}).get(gate.metric)
    low = lower_bound(got, n, gate.confidence) if got is not None else None
    return {"metric": gate.metric, "mean": got, "n": n, "lower_bound": low, "confidence": gate.confidence,
            "interval": INTERVAL, "min_score": gate.min_score, "min_samples": gate.min_samples,
            "training_split": latest.get("training_split"), "labels": latest.get("labels"),
            "batch_id": latest.get("batch_id"), "all_scores": latest.get("scores"),
            "passed": low is not None and n >= gate.min_samples and low >= gate.min_score}


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
    v = gate_verdict(latest, gate)
    if v["mean"] is None:
        return f"{name} scored None on {gate.metric} (not measured); the route needs {gate.min_score}"
    split = latest.get("training_split") or {}
    if split.get("overlap"):
        return f"{name} was evaluated on {split['overlap']} labels it was trained on"
    if gate.require_training_split and not split.get("checked"):
        return (f"{name}'s evaluation was not checked against its training split (no manifest of these weights "
                "beside the adapter): evaluate with the manifest `students train` wrote")
    if v["n"] < gate.min_samples:
        return f"{name} was evaluated on {v['n']} labels; the route's gate needs at least {gate.min_samples}"
    if v["lower_bound"] < gate.min_score:
        return (f"{name} scored {v['mean']:.3f} on {gate.metric} over {v['n']} labels, {v['lower_bound']:.3f} at the "
                f"lower bound of its {gate.confidence:.0%} {INTERVAL}; the route needs {gate.min_score}")
    if served is not None and served.get("digest") != digest:
        return (f"{name} now serves other weights ({served.get('path')}, digest {short(served.get('digest'))}) "
                "than the ones evaluated: evaluate again, or promote these weights under a new name")
    return None


def threshold_refusal(name: str, threshold: float, digest: str, calibration: dict[str, Any] | None) -> str | None:
    """Why `promote --threshold` is refused: a threshold is calibrated for one set of weights, so it
    must be the one `students calibrate` chose, and recorded, for these (by digest)."""
    if calibration is None:
        return f"{name} has no calibration: run `llmserve students calibrate --student {name}` first"
    if calibration.get("digest") != digest:
        return (f"{name}'s latest calibration was of weights {short(calibration.get('digest'))}, not these "
                f"({short(digest)}): calibrate these weights")
    chosen = calibration.get("threshold")
    if not calibration.get("met") or chosen is None:
        return f"{name}'s calibration found no threshold that meets its target: no threshold to promote with"
    if abs(float(chosen) - threshold) > 1e-9:
        return f"{threshold} is not the threshold calibrated for these weights ({chosen})"
    return None
