"""Who saves what: the route against the teacher alone and against the teacher behind the same
cache, with one-off costs counted and amortised, and the terms that hold a goal back (pure).

Three ways to serve the same (replayed, later) traffic, per 1,000 requests:
- teacher-only: the teacher answers every request, with the prompt the route gives the teacher;
- teacher behind the same cache: the cache answers what it answered in the replay, the teacher the
  rest; its one-off cost is the cache fills;
- the route: what the gateway billed during the replay; its one-off costs are the cache fills, the
  teacher's labels, the student's evaluation and calibration, and the training run.
One-off costs are spread over a stated horizon (requests): a cost paid once for the traffic it serves.
The student's own contribution is teacher-behind-cache / route: what the cache alone does not save.

Why a goal is not met, as a model of the route's cost per request over the teacher-only one:
    rho = (1 - c) * (r * q + e) + o
with c the cache share, r the price ratio (the student's price over the teacher's, for the student's
tokens), q the prompt ratio (the student's tokens at the teacher's price over the teacher's cost: a
short student input makes it small), e the escalation rate (requests the teacher answered after the
student, over those the cascade saw) and o the one-off costs per request over the teacher-only cost.
For each term the report gives the value that alone would meet the goal, the others as measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from serve.policies.cost import Price, cost_usd

TARGET_SAVING = 100.0  # the seed's production figure against teacher-only


@dataclass(frozen=True)
class OneOff:
    """A cost paid once: what it was, the model that did the work, and what it cost."""

    name: str
    usd: float
    model: str | None = None
    detail: str = ""
    cache_fill: bool = False  # the teacher behind the same cache pays it too
    # What the teacher behind the same cache would pay for this fill instead (None: the same): a
    # fill the student made is, for that baseline, the teacher's work at the teacher's price.
    teacher_usd: float | None = None


def tokens_cost(usages: Sequence[tuple[int, int]], price: Price, factor: float = 1.0) -> float:
    return sum(cost_usd(p, c, price) for p, c in usages) * factor


def by_model(items: Sequence[tuple[str, int, int]], prices: Mapping[str, Price], factor: float) -> dict[str, float]:
    """USD per model of (model, prompt, completion) items at `factor` x each model's own price: a
    cache entry is billed at the price of the model that made it, not the teacher's."""
    out: dict[str, float] = {}
    for model, p, c in items:
        out[model] = out.get(model, 0.0) + cost_usd(p, c, prices.get(model, Price())) * factor
    return out


@dataclass(frozen=True)
class Traffic:
    """The replay, measured: per-request means in USD and the shares that drive the route's cost."""

    requests: int
    route_online_usd: float  # billed by the gateway over the replay
    tier_usd: Mapping[str, float]  # of that, per tier
    cache_share: float
    escalation_rate: float | None  # teacher / (student + teacher) of the replayed requests
    teacher_req: float  # the teacher, with its route prompt, per request (uniform sample)
    teacher_missed_req: float  # the teacher per request on what the cache did not answer
    student_req: float | None  # the student per request (uniform sample), at its price
    student_at_teacher_price_req: float | None  # the same tokens at the teacher's price


def _per_1k(usd: float, n: int) -> float:
    return 1000 * usd / n if n else 0.0


def attribute(t: Traffic, one_offs: Sequence[OneOff], horizon: int) -> dict[str, Any]:
    """The three baselines per 1,000 requests (online, one-off amortised over `horizon`, total)."""
    fills = sum(o.usd if o.teacher_usd is None else o.teacher_usd for o in one_offs if o.cache_fill)
    every = sum(o.usd for o in one_offs)
    cache_hits_req = t.tier_usd.get("cache", 0.0) / t.requests if t.requests else 0.0
    behind = (1 - t.cache_share) * t.teacher_missed_req + t.cache_share * cache_hits_req
    rows = {
        "teacher_only": {"online": 1000 * t.teacher_req, "one_off": 0.0},
        "teacher_behind_cache": {"online": 1000 * behind, "one_off": 1000 * fills / horizon},
        "route": {"online": _per_1k(t.route_online_usd, t.requests), "one_off": 1000 * every / horizon},
    }
    for r in rows.values():
        r["total"] = r["online"] + r["one_off"]
    total = {k: r["total"] for k, r in rows.items()}

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    return {"per_1k_usd": rows, "horizon_requests": horizon,
            "one_off": [{"name": o.name, "usd": o.usd, "model": o.model, "detail": o.detail,
                         "cache_fill": o.cache_fill, "teacher_usd": o.teacher_usd} for o in one_offs],
            "one_off_usd": every,
            "saving": {"route_vs_teacher_only": ratio(total["teacher_only"], total["route"]),
                       "cache_vs_teacher_only": ratio(total["teacher_only"], total["teacher_behind_cache"]),
                       "student_vs_teacher_behind_cache": ratio(total["teacher_behind_cache"], total["route"]),
                       "route_vs_teacher_only_online": ratio(total["teacher_only"], rows["route"]["online"])}}


def terms(t: Traffic, one_off_usd: float, horizon: int, target: float = TARGET_SAVING) -> dict[str, Any]:
    """The model's terms as measured, each term's share of the route's cost, and the value each term
    alone would need for the route to be `target` x cheaper than teacher-only (None: no value does)."""
    if not t.teacher_req:
        return {}
    c, e = t.cache_share, t.escalation_rate or 0.0
    r = (t.student_req / t.student_at_teacher_price_req) if t.student_req is not None and \
        t.student_at_teacher_price_req else None
    q = (t.student_at_teacher_price_req / t.teacher_req) if t.student_at_teacher_price_req is not None else None
    o = one_off_usd / horizon / t.teacher_req
    rq = (r or 0.0) * (q or 0.0)
    budget = 1 / target - o  # what the online cost may be, as a share of teacher-only
    online = (t.route_online_usd / t.requests) / t.teacher_req if t.requests else 0.0
    needed: dict[str, float | None] = {}
    slack = budget / (1 - c) if c < 1 else None
    needed["cache_share"] = (1 - budget / (rq + e)) if budget > 0 and rq + e > 0 else None
    needed["escalation_rate"] = (slack - rq) if slack is not None and slack - rq >= 0 else None
    needed["price_ratio"] = ((slack - e) / q) if slack is not None and q and slack - e > 0 else None
    needed["prompt_ratio"] = ((slack - e) / r) if slack is not None and r and slack - e > 0 else None
    gap = t.teacher_req / target - t.route_online_usd / t.requests if t.requests else 0.0
    needed["horizon_requests"] = (one_off_usd / gap) if gap > 0 else None
    parts = {"cache hits": t.tier_usd.get("cache", 0.0), "student answers": t.tier_usd.get("student", 0.0),
             "escalations": t.tier_usd.get("teacher", 0.0), "fallback": t.tier_usd.get("fallback", 0.0),
             "one-off costs": one_off_usd / horizon * t.requests}
    whole = sum(parts.values())
    return {"measured": {"cache_share": c, "escalation_rate": t.escalation_rate, "price_ratio": r,
                         "prompt_ratio": q, "one_off_per_request_over_teacher": o, "horizon_requests": horizon},
            "model_rho": (1 - c) * (rq + e) + o, "measured_rho": online + o,
            "cost_shares": {k: (v / whole if whole else 0.0) for k, v in parts.items()},
            "needed_alone": needed, "target": target}


def goals(att: Mapping[str, Any], cache_share: float, target: float = TARGET_SAVING,
          min_cache: float = 0.6) -> list[dict[str, Any]]:
    s = att["saving"]
    h = att["horizon_requests"]

    def goal(name: str, tgt: float, measured: float | None) -> dict[str, Any]:
        return {"name": name, "target": tgt, "measured": measured, "met": measured is not None and measured >= tgt}

    return [goal(f"route vs teacher-only, every one-off cost amortised over {h:,} requests", target,
                 s["route_vs_teacher_only"]),
            goal(f"route vs the teacher behind the same cache (the student pays for itself over {h:,})", 1.0,
                 s["student_vs_teacher_behind_cache"]),
            goal("cache share of the replayed traffic", min_cache, cache_share)]


LABELS = {"cache_share": ("cache share", "at least", ".3f"), "escalation_rate": ("escalation rate", "at most", ".3f"),
          "price_ratio": ("price ratio", "at most", ".4f"), "prompt_ratio": ("prompt ratio", "at most", ".3f"),
          "horizon_requests": ("horizon", "at least", ",.0f")}


def holding_back(tm: Mapping[str, Any], saving: float | None) -> list[str]:
    """Sentences for the closing note: why the goal is not met, term by term."""
    if not tm or saving is None or saving >= tm["target"]:
        return []
    m, need = tm["measured"], tm["needed_alone"]
    top = max(tm["cost_shares"].items(), key=lambda kv: kv[1])
    out = [f"the {tm['target']:g}x goal is not met ({saving:.1f}x); the largest share of the route's cost is "
           f"{top[0]} ({top[1]:.0%})"]
    budget, o, online = 1 / tm["target"], m["one_off_per_request_over_teacher"], tm["measured_rho"] - \
        m["one_off_per_request_over_teacher"]
    if o >= budget:
        out.append(f"the one-off costs alone are {o:.1%} of teacher-only per request over {m['horizon_requests']:,} "
                   f"requests, above the {budget:.1%} a {tm['target']:g}x saving allows")
    if online >= budget:
        out.append(f"the online cost alone is {online:.1%} of teacher-only, above {budget:.1%}: no horizon reaches "
                   f"{tm['target']:g}x without a lower online cost")
    for key, (label, way, spec) in LABELS.items():
        have = m.get(key)
        have_s = format(have, spec) if have is not None else "unmeasured"
        if need.get(key) is None:
            out.append(f"{label} (measured {have_s}): no value alone reaches {tm['target']:g}x")
        else:
            out.append(f"{label} (measured {have_s}) would have to be {way} {format(need[key], spec)} alone")
    return out


def table(att: Mapping[str, Any], tm: Mapping[str, Any], goal_list: Sequence[Mapping[str, Any]]) -> str:
    rows = att["per_1k_usd"]
    names = {"teacher_only": "teacher-only", "teacher_behind_cache": "teacher + same cache", "route": "route"}
    ref = rows["teacher_only"]["total"]
    lines = [f"attribution, per 1,000 replayed requests (USD; one-off costs over "
             f"{att['horizon_requests']:,} requests):",
             f"  {'':<22}{'online':>11}{'one-off':>11}{'total':>11}{'vs teacher-only':>17}"]
    for k, label in names.items():
        r = rows[k]
        x = f"{ref / r['total']:.1f}x" if r["total"] else "-"
        lines.append(f"  {label:<22}{r['online']:>11.5f}{r['one_off']:>11.5f}{r['total']:>11.5f}{x:>17}")
    s = att["saving"]["student_vs_teacher_behind_cache"]
    lines.append(f"  the student's own part: teacher + same cache / route = {s:.2f}x" if s is not None else "")
    lines += ["", f"one-off costs (USD, {att['one_off_usd']:.6f} in all):"]
    lines += [f"  {o['name']:<26}{o['usd']:>12.6f}  {o['model'] or ''} {o['detail']}".rstrip() for o in att["one_off"]]
    if tm:
        lines += ["", "terms: " + ", ".join(
            f"{LABELS[k][0]} {format(v, LABELS[k][2])}" for k, v in tm["measured"].items()
            if k in LABELS and v is not None)]
    lines += ["", "goals:"] + [f"  [{'x' if g['met'] else ' '}] {g['name']}: target {g['target']:g}, measured "
                               f"{'-' if g['measured'] is None else format(g['measured'], '.3g')}" for g in goal_list]
    return "\n".join(lines)
