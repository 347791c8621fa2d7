"""Pick the cascade threshold: the lowest teacher share that still meets an agreement target.

For each labelled query we know the student's mean token logprob and whether its answer agrees
with the teacher's. With threshold t, queries with mean logprob < t escalate (the teacher answers:
agreement 1 by definition), the rest keep the student's answer. Sweeping t gives the curve
teacher share -> agreement; the chosen t is the largest agreement-meeting point's lowest share.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    threshold: float
    teacher_share: float
    agreement: float


def curve(samples: list[tuple[float, float]]) -> list[Point]:
    """samples: (mean_logprob, agreement in [0, 1]). One point per distinct cut, from 'nothing
    escalates' to 'everything escalates'."""
    if not samples:
        return []
    n = len(samples)
    ordered = sorted(samples)  # lowest confidence first: these escalate first
    cuts = sorted({lp for lp, _ in ordered})
    points = [Point(cuts[0], 0.0, sum(a for _, a in ordered) / n)]  # t = min: nothing is below it
    for i, cut in enumerate(cuts):
        nxt = cuts[i + 1] if i + 1 < len(cuts) else cut + 1.0
        escalated = [s for s in ordered if s[0] < nxt]
        kept = [a for lp, a in ordered if lp >= nxt]
        points.append(Point(nxt, len(escalated) / n, (len(escalated) + sum(kept)) / n))
    return points


def choose(points: list[Point], target: float) -> Point | None:
    """The point meeting `target` agreement with the lowest teacher share (ties: lowest threshold)."""
    ok = [p for p in points if p.agreement >= target - 1e-12]
    return min(ok, key=lambda p: (p.teacher_share, p.threshold)) if ok else None


def table(points: list[Point]) -> str:
    rows = ["| threshold | teacher share | agreement |", "|---:|---:|---:|"]
    rows += [f"| {p.threshold:.4f} | {p.teacher_share:.3f} | {p.agreement:.3f} |" for p in points]
    return "\n".join(rows)


def plot(points: list[Point], chosen: Point | None, target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([p.teacher_share for p in points], [p.agreement for p in points], "o-", label="cascade")
    ax.axhline(target, color="tab:gray", ls="--", label=f"target {target:.2f}")
    if chosen is not None:
        ax.plot([chosen.teacher_share], [chosen.agreement], "r*", ms=14,
                label=f"chosen t={chosen.threshold:.3f}")
    ax.set(xlabel="teacher share (escalated requests)", ylabel="agreement with teacher",
           title="Cascade calibration", xlim=(-0.02, 1.02), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
