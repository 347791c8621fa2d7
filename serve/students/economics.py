"""The economics of a route, from a replayed query log (pure: `plot` only writes the figure asked for).

Each replayed request is a `Served`: which tier answered it (read from the gateway's headers), what
the gateway billed for it, how long it took. From those, and from a labelled sample (the teacher's
own answers to some of the same requests), `build` computes what the route costs per 1,000 requests
against sending everything to the teacher or to the student, how much of the traffic each tier
carried, and how often each tier's answer agrees with the teacher's.

Costs are per 1,000 requests of the log. The route's is what the gateway billed during the replay
plus the offline cache build (the teacher's batch, at the batch price), spread over the log: the
build is paid once for the traffic the log stands for. Teacher-only and student-only are each
model's prices times the tokens it spent on a uniform sample of the log's requests.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from serve.policies.cost import Price, cost_usd
from serve.students.metrics import exact_match, token_overlap

TIERS = ("cache", "student", "teacher", "fallback", "error")
# What issue 16 asks the demo's route to reach; the closing note says how far a report is from it.
TARGET_CACHE_SHARE = 0.6
TARGET_SAVING = 20.0


@dataclass(frozen=True)
class Served:
    """One replayed request: its position in the log, the tier that answered, what it cost and took."""

    index: int
    tier: str
    latency_s: float
    cost_usd: float
    text: str | None = None  # the answer (None for errors)
    provenance: str | None = None  # cache hits: "batch" (filled offline) or "online" (stored by the route)
    seen: bool = False  # its prompt is one the student was trained on: left out of agreement figures


def classify(status: int, headers: Mapping[str, str], student: str | None, teacher: str | None) -> str:
    """The tier that answered, from the gateway's accounting headers. A cascade route's accepted
    student is `student`; an escalation the teacher answered is `teacher` (so is a plain target); any
    other model that answered (the route's fallback) is `fallback`."""
    if status != 200:
        return "error"
    if headers.get("x-llmserve-cache") == "hit":
        return "cache"
    served = headers.get("x-llmserve-served-by", "")
    if student is not None and served == student and not headers.get("x-llmserve-escalated"):
        return "student"
    if served and served == teacher:
        return "teacher"
    return "fallback"


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolated linearly between the two nearest ranks (numpy's
    default); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def shares(records: list[Served]) -> dict[str, float]:
    """Share of the requests each tier answered (every tier named, 0 when it answered none)."""
    n = len(records)
    return {t: (sum(1 for r in records if r.tier == t) / n if n else 0.0) for t in TIERS}


def per_1k(total_usd: float, requests: int) -> float:
    return 1000 * total_usd / requests if requests else 0.0


def mean_cost_per_1k(usages: list[tuple[int, int]], price: Price) -> float | None:
    """Cost per 1,000 requests at `price` from (prompt, completion) tokens measured on a sample."""
    if not usages:
        return None
    return 1000 * sum(cost_usd(p, c, price) for p, c in usages) / len(usages)


def mean_agreement(pairs: list[tuple[str, str]]) -> float | None:
    """Mean token overlap of (answer, teacher's answer) pairs: the metric `students eval` scores."""
    return sum(token_overlap(a, t) for a, t in pairs) / len(pairs) if pairs else None


def sample_by_tier(records: list[Served], k: int, seed: int = 0) -> dict[str, list[Served]]:
    """Up to k answered requests of each tier, drawn uniformly within the tier (so frequent queries
    weigh as they do in the traffic), in log order; none whose prompt the student was trained on,
    and none of the teacher's tier (the teacher scored against itself says nothing)."""
    rng = random.Random(seed)
    out: dict[str, list[Served]] = {}
    for t in TIERS:
        if t in ("error", "teacher"):
            continue
        pool = [r for r in records if r.tier == t and r.text is not None and not r.seen]
        out[t] = sorted(rng.sample(pool, min(k, len(pool))), key=lambda r: r.index)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def build(records: list[Served], *, tier_agreement: Mapping[str, list[tuple[str, str]]],
          teacher_usage: list[tuple[int, int]], student_usage: list[tuple[int, int]],
          prices: Mapping[str, Price], teacher: str, student: str | None, build_usage: tuple[int, int] | None,
          batch_factor: float, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report as a JSON-able dict.

    tier_agreement: per tier, (served answer, teacher's answer) pairs of its sample.
    teacher_usage / student_usage: (prompt, completion) tokens each model spent on a uniform sample
    of the log. build_usage: tokens of the teacher's offline cache build (None: unknown), billed at
    `batch_factor` times the teacher's price."""
    n = len(records)
    share = shares(records)
    tiers: dict[str, Any] = {}
    for t in TIERS:
        mine = [r for r in records if r.tier == t]
        lat = [r.latency_s * 1000 for r in mine]
        agree = tier_agreement.get(t) or []
        tiers[t] = {"requests": len(mine), "share": share[t], "cost_usd": sum(r.cost_usd for r in mine),
                    "in_training": sum(1 for r in mine if r.seen),
                    "latency_ms": {"p50": percentile(lat, 50), "p95": percentile(lat, 95)},
                    "agreement": {"token_overlap": mean_agreement(list(agree)),
                                  "exact_match": (sum(exact_match(a, b) for a, b in agree) / len(agree)
                                                  if agree else None),
                                  "sample": len(agree)}}
    cached = [r for r in records if r.tier == "cache"]
    tiers["cache"]["provenance"] = {p: sum(1 for r in cached if r.provenance == p) for p in ("batch", "online")}
    teacher_price = prices.get(teacher, Price())
    build_cost = None
    if build_usage is not None:
        build_cost = cost_usd(build_usage[0], build_usage[1], teacher_price) * batch_factor
    online = sum(r.cost_usd for r in records)
    route = per_1k(online + (build_cost or 0.0), n)
    teacher_only = mean_cost_per_1k(teacher_usage, teacher_price)
    student_only = mean_cost_per_1k(student_usage, prices.get(student, Price())) if student else None
    measured = [(t, tiers[t]["share"], tiers[t]["agreement"]["token_overlap"]) for t in TIERS if t != "error"]
    weight = sum(s for _, s, a in measured if a is not None)
    route_agreement = sum(s * a for _, s, a in measured if a is not None) / weight if weight else None
    return {
        "requests": n, "teacher": teacher, "student": student, "tiers": tiers,
        "cost_per_1k_usd": {"route": route, "route_online": per_1k(online, n),
                            "cache_build_amortised": per_1k(build_cost, n) if build_cost is not None else None,
                            "teacher_only": teacher_only, "student_only": student_only},
        "cache_build": {"prompt_tokens": build_usage[0] if build_usage else None,
                        "completion_tokens": build_usage[1] if build_usage else None,
                        "cost_usd": build_cost, "batch_price_factor": batch_factor},
        "saving": {"vs_teacher_only": _ratio(teacher_only, route), "vs_student_only": _ratio(student_only, route)},
        "agreement": {"route": route_agreement, "covers_share": weight},
        "prices": {name: {"input_per_million": p.input_per_million, "output_per_million": p.output_per_million}
                   for name, p in sorted(prices.items())},
        **(dict(extra) if extra else {}),
    }


def notes(report: Mapping[str, Any], min_cache: float = TARGET_CACHE_SHARE,
          min_saving: float = TARGET_SAVING) -> list[str]:
    """The closing note: each target met or not, and by how much."""
    out = []
    cache = report["tiers"]["cache"]["share"]
    saving = report["saving"]["vs_teacher_only"]
    out.append(f"cache served {cache:.1%} of requests ({'meets' if cache >= min_cache else 'below'} the "
               f"{min_cache:.0%} target)")
    att = report.get("attribution")
    if att is not None:
        sv = att["saving"]
        out.append(f"with every one-off cost over {att['horizon_requests']:,} requests teacher-only costs "
                   f"{_fmt(sv['route_vs_teacher_only'], '.2f')}x the route; the teacher behind the same "
                   f"cache {_fmt(sv['cache_vs_teacher_only'], '.1f')}x; the student's own part "
                   f"{_fmt(sv['student_vs_teacher_behind_cache'], '.2f')}x")
    elif saving is None:
        out.append("no teacher-only cost was measured: the saving is unknown")
    else:
        verdict = ("meets" if saving >= min_saving
                   else f"short of the {min_saving:g}x target by a factor {min_saving / saving:.2f}")
        out.append(f"the route costs {saving:.1f}x less per 1,000 requests than teacher-only ({verdict})")
    agree = report["agreement"]["route"]
    if agree is not None:
        out.append(f"its answers agree with the teacher's at {agree:.3f} token overlap (traffic-weighted)")
    errors = report["tiers"]["error"]["requests"]
    if errors:
        out.append(f"{errors} requests failed and count as served by no tier")
    return out


def _fmt(v: float | None, spec: str, none: str = "-") -> str:
    return format(v, spec) if v is not None else none


def table(report: Mapping[str, Any]) -> str:
    """The plain-text summary: one row per tier, then the costs, the training and the closing note."""
    qm = report.get("quality_measures") or {}
    # The free-text measures the report was asked for (`--embedding-model`, `--judge`), a column each.
    free = [m for m, asked in (("embedding_similarity", "embedding"), ("judge", "judge")) if asked in qm]
    heads = {"embedding_similarity": "embed", "judge": "judge"}
    lines = [f"{'tier':<9}{'requests':>9}{'share':>8}{'agreement':>11}{'exact':>7}"
             + "".join(f"{heads[m]:>7}" for m in free) + f"{'(sample)':>9}{'trained':>8}{'p50 ms':>9}{'p95 ms':>9}"]
    for t in TIERS:
        r = report["tiers"][t]
        if not r["requests"] and t in ("fallback", "error"):
            continue
        a, lat = r["agreement"], r["latency_ms"]
        lines.append(f"{t:<9}{r['requests']:>9}{r['share']:>8.1%}{_fmt(a['token_overlap'], '.3f'):>11}"
                     f"{_fmt(a.get('exact_match'), '.3f'):>7}" + "".join(f"{_fmt(a.get(m), '.3f'):>7}" for m in free)
                     + f"{a['sample']:>9}{r.get('in_training', 0):>8}{_fmt(lat['p50'], '.1f'):>9}"
                     f"{_fmt(lat['p95'], '.1f'):>9}")
    lines.append(f"{'route':<9}{report['requests']:>9}{1:>8.1%}{_fmt(report['agreement']['route'], '.3f'):>11}")
    lines.append("(agreement: token overlap and exact match of out-of-sample answers only, against the teacher "
                 "asked directly; the teacher's own tier is not scored; trained: replayed requests whose prompt "
                 "the student was trained on)")
    if free:
        lines.append(f"(embed: mean cosine similarity of the answer's and the teacher's embeddings from "
                     f"{(qm.get('embedding') or {}).get('model', '-')} through the gateway's /v1/embeddings; judge: "
                     f"share of 'same meaning' verdicts of {(qm.get('judge') or {}).get('model', '-')} through the "
                     f"Batch API with a json_schema, unreadable counted as not; both on the first "
                     f"{qm.get('sample_per_tier')} of each tier's sample)")
    if report.get("attribution"):
        from serve.students.attribution import table as attribution_table

        lines += ["", attribution_table(report["attribution"], report.get("terms") or {}, report.get("goals") or [])]
    c = report["cost_per_1k_usd"]
    s = report["saving"]
    if report.get("attribution"):  # the attribution table above has the route and teacher-only, with one-offs
        lines += ["", f"student-only, per 1,000 requests (USD): {_fmt(c['student_only'], '.5f')}"]
    else:
        lines += ["", "cost per 1,000 requests (USD):",
                  f"  route         {_fmt(c['route'], '.5f')}  (online {_fmt(c['route_online'], '.5f')} + cache "
                  f"build {_fmt(c['cache_build_amortised'], '.5f')})",
                  f"  teacher-only  {_fmt(c['teacher_only'], '.5f')}  ({_fmt(s['vs_teacher_only'], '.1f')}x the route)",
                  f"  student-only  {_fmt(c['student_only'], '.5f')}  ({_fmt(s['vs_student_only'], '.1f')}x the "
                  "route)"]
    held = report.get("held_out")
    if held:
        lines += ["", f"held-out agreement with the teacher ({held.get('n', '?')} labels, through the engines):"]
        lines += [f"  {name:<22} {_fmt(v, '.3f')}" for name, v in held.get("token_overlap", {}).items()]
    train = report.get("training")
    if train:
        lines.append(f"  students train (transformers): before {_fmt(train.get('before'), '.3f')} -> after "
                     f"{_fmt(train.get('after'), '.3f')}")
        if train.get("golden_version"):
            reviewed = train.get("reviewed") or {}
            lines.append(f"  trained on golden set {train['golden_version']} ({reviewed.get('corrected', 0)} labels "
                         f"corrected, {reviewed.get('confirmed', 0)} confirmed by review; the manifest records it)")
    lines += ["", "closing note:"] + [f"  - {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = [t for t in TIERS if report["tiers"][t]["requests"] or t in ("cache", "student", "teacher")]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7.5))
    ax[0][0].bar(tiers, [report["tiers"][t]["share"] * 100 for t in tiers], color="tab:blue")
    ax[0][0].set(title="share of requests (%)", ylim=(0, 100))
    c = report["cost_per_1k_usd"]
    names = ["route", "teacher-only", "student-only"]
    values = [c["route"], c["teacher_only"], c["student_only"]]
    ax[0][1].bar(names, [v or 0 for v in values], color=["tab:green", "tab:red", "tab:orange"])
    ax[0][1].set(title="cost per 1,000 requests (USD, log scale)", yscale="log")
    agree = [report["tiers"][t]["agreement"]["token_overlap"] for t in tiers]
    ax[1][0].bar(tiers, [a or 0 for a in agree], color="tab:purple")
    ax[1][0].set(title="agreement with the teacher (token overlap)", ylim=(0, 1.05))
    x = range(len(tiers))
    p50 = [report["tiers"][t]["latency_ms"]["p50"] or 0 for t in tiers]
    p95 = [report["tiers"][t]["latency_ms"]["p95"] or 0 for t in tiers]
    ax[1][1].bar([i - 0.2 for i in x], p50, width=0.4, label="p50")
    ax[1][1].bar([i + 0.2 for i in x], p95, width=0.4, label="p95")
    ax[1][1].set(title="latency per tier (ms)", xticks=list(x), xticklabels=tiers)
    ax[1][1].legend()
    for a in ax.flat:
        a.grid(alpha=0.3, axis="y")
    saving = report["saving"]["vs_teacher_only"]
    fig.suptitle(f"route {report.get('route', '')}: {report['requests']} requests, "
                 f"{_fmt(saving, '.1f')}x cheaper than teacher-only")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
