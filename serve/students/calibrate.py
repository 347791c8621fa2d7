"""Pick the cascade threshold: the lowest teacher share at which the student's own answers still
meet an agreement target (pure; `plot` only writes the figure it is asked for).

For each labelled query we know the student's mean token logprob and how well its answer agrees
with the teacher's. With threshold t the route escalates queries whose mean logprob is below t:
the teacher answers those, which is the cost (teacher share), not agreement. What the target
constrains is the agreement of the answers the student keeps (the precision of accepting it), so a
threshold that escalates everything keeps nothing, measures nothing and is never chosen.

The threshold is chosen on one part of the labels and checked on the rest (held out, split by a
hash of each label's id), so a cut that only fits the labels it was picked on shows up as a miss.

What is simulated is the route's cascade, not the logprob rule alone (`cascade_sample`): an answer
that `decide()` escalates for another reason (cut off at max_tokens, failing the requested schema, a
refusal, no logprobs) escalates at every threshold, and on a route that decides on the first k
tokens of a stream (`decide_after_tokens`) the logprob compared is that of those k tokens, and the
rules are `decide_prefix`'s. Such samples carry no logprob (None): they are teacher answers at any
threshold, counted in the teacher share, never in the kept agreement.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

from serve.policies.cascade import CascadePolicy, choice_text, decide, decide_prefix, prefix_decidable


@dataclass(frozen=True)
class Point:
    threshold: float
    teacher_share: float  # escalated / all
    agreement: float  # mean agreement of the queries the student keeps
    kept: int  # how many queries the student answers


def split(ids: list[str], holdout: float) -> tuple[list[int], list[int]]:
    """Indices of (sweep, held-out) labels. A label's side depends only on its id (sha256), so it
    does not move when labels are added, removed or reordered."""
    sweep: list[int] = []
    held: list[int] = []
    for i, label_id in enumerate(ids):
        u = int.from_bytes(hashlib.sha256(label_id.encode()).digest()[:8], "big") / 2**64
        (held if u < holdout else sweep).append(i)
    return sweep, held


def cascade_sample(policy: CascadePolicy, request: dict[str, Any], response: dict[str, Any],
                   first_k: int | None = None) -> tuple[float | None, str]:
    """(the mean logprob the route's threshold is compared with, or None when another rule of the
    cascade escalates this answer whatever the threshold; the rule: "threshold" or decide()'s reason).
    `first_k`: the route decides on a stream's first k tokens (decide_after_tokens)."""
    free = replace(policy, min_mean_logprob=float("-inf"))  # every rule but the threshold
    choices = response.get("choices") if isinstance(response, dict) else None
    if first_k is not None and prefix_decidable(policy, request) and isinstance(choices, list) and choices:
        c = choices[0]
        entries = [e for e in ((c.get("logprobs") or {}).get("content") or []) if isinstance(e, dict)]
        lps = [float(e["logprob"]) for e in entries if isinstance(e.get("logprob"), (int, float))]
        if len(entries) > first_k:  # the stream was decided before its end: only the prefix counts
            text, finish = "".join(str(e.get("token", "")) for e in entries[:first_k]), None
        else:
            text, finish = choice_text(c), c.get("finish_reason")
        d = decide_prefix(free, request, text, lps[:first_k], finish)
    else:
        d = decide(free, request, response)
    return (None, d.reason) if d.escalate else (d.mean_logprob, "threshold")


def at(samples: list[tuple[float | None, float]], threshold: float) -> Point:
    """What the route does with `threshold` on these (mean_logprob, agreement) samples; a None
    logprob escalates at every threshold. With nothing kept, agreement is 0.0: there is no student
    answer to agree."""
    kept = [a for lp, a in samples if lp is not None and lp >= threshold]
    n = len(samples)
    return Point(threshold, (n - len(kept)) / n if n else 0.0, sum(kept) / len(kept) if kept else 0.0, len(kept))


def curve(samples: list[tuple[float | None, float]]) -> list[Point]:
    """samples: (mean_logprob, agreement in [0, 1]). One point per distinct logprob t (escalate
    below t), from 'nothing escalates' to 'only the most confident stay'; 'everything escalates'
    is left out because the student answers nothing there."""
    return [at(samples, t) for t in sorted({lp for lp, _ in samples if lp is not None})]


def choose(points: list[Point], target: float) -> Point | None:
    """The point whose kept answers meet `target` with the lowest teacher share (ties: lowest
    threshold). None when no threshold gets there."""
    ok = [p for p in points if p.kept > 0 and p.agreement >= target - 1e-12]
    return min(ok, key=lambda p: (p.teacher_share, p.threshold)) if ok else None


@dataclass(frozen=True)
class Calibration:
    points: list[Point]  # the sweep curve
    chosen: Point | None  # picked on the sweep labels
    held: Point | None  # the chosen threshold on the held-out labels (None: no check asked)
    problem: str | None  # why the target is not met; None when it is
    n_sweep: int = 0
    n_held: int = 0


def calibrate(samples: list[tuple[str, float | None, float]], target: float, holdout: float) -> Calibration:
    """samples: (label id, mean_logprob, agreement). Choose on the sweep part, check on the
    held-out part (`holdout`: its expected share; 0 skips the check)."""
    sweep_i, held_i = split([s[0] for s in samples], holdout)
    sweep = [(samples[i][1], samples[i][2]) for i in sweep_i]
    points = curve(sweep)
    chosen = choose(points, target)
    n = {"n_sweep": len(sweep_i), "n_held": len(held_i)}
    if chosen is None:
        best = max((p.agreement for p in points), default=0.0)
        return Calibration(points, None, None, f"no threshold reaches agreement {target:g} on the student's own "
                           f"answers ({len(sweep)} sweep labels; best {best:.3f}): escalating more cannot fix a "
                           "student that does not agree with the teacher", **n)
    if holdout <= 0:
        return Calibration(points, chosen, None, None, **n)
    if not held_i:
        return Calibration(points, chosen, None, f"no label fell in the held-out part ({len(samples)} labels, "
                           f"holdout {holdout:g}): label more queries", **n)
    held = at([(samples[i][1], samples[i][2]) for i in held_i], chosen.threshold)
    if held.kept == 0:
        return Calibration(points, chosen, held, f"threshold {chosen.threshold:.4f} escalates every held-out "
                           "label: nothing confirms the student's agreement", **n)
    if held.agreement < target - 1e-12:
        return Calibration(points, chosen, held, f"threshold {chosen.threshold:.4f} meets the target on the sweep "
                           f"labels ({chosen.agreement:.3f}) but not on the held-out ones ({held.agreement:.3f})", **n)
    return Calibration(points, chosen, held, None, **n)


def table(points: list[Point]) -> str:
    rows = ["| threshold | teacher share | student agreement | kept |", "|---:|---:|---:|---:|"]
    rows += [f"| {p.threshold:.4f} | {p.teacher_share:.3f} | {p.agreement:.3f} | {p.kept} |" for p in points]
    return "\n".join(rows)


def plot(points: list[Point], chosen: Point | None, target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([p.teacher_share for p in points], [p.agreement for p in points], "o-", label="sweep labels")
    ax.axhline(target, color="tab:gray", ls="--", label=f"target {target:.2f}")
    if chosen is not None:
        ax.plot([chosen.teacher_share], [chosen.agreement], "r*", ms=14,
                label=f"chosen t={chosen.threshold:.3f}")
    ax.set(xlabel="teacher share (escalated requests)", ylabel="agreement of the student's own answers",
           title="Cascade calibration", xlim=(-0.02, 1.02), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
