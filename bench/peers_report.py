"""`make bench-peers`' pure half: medians over rounds, issue 27's goals, the table and the plot.

Every function here takes the raw runs (one dict per load: system, replicas, concurrency, round,
req_per_s, ttft_ms, errors, routing_cpu_ms, routing_rss_mb) and computes; nothing starts or times.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

# The systems, in the order of the table: the ceiling first, ours, then the peers.
SYSTEMS = ("bare", "llmserve", "litellm", "vllm-router round_robin", "vllm-router cache_aware")
ROUTERS = ("vllm-router round_robin", "vllm-router cache_aware")
# Issue 27 section 1's goals, the numbers in one place.
MAX_CPU_VS_ROUTER = 1.5
MAX_CPU_VS_LITELLM = 0.1
MAX_TTFT_P99_OVER_ROUTER_MS = 5.0


def med(xs: list[float | None]) -> float:
    vals = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    return statistics.median(vals) if vals else float("nan")


def summarize(runs: list[dict[str, Any]]) -> dict[int, dict[str, dict[int, dict[str, Any]]]]:
    """{replicas: {system: {concurrency: medians over rounds}}}, with the TTFT each system adds to
    bare vLLM's at the same replicas and concurrency where bare ran (nan where it did not), and
    each round's req/s (the spread is part of the result)."""
    out: dict[int, dict[str, dict[int, dict[str, Any]]]] = {}
    keys = sorted({(r["replicas"], r["system"], r["concurrency"]) for r in runs})
    for replicas, system, conc in keys:
        rs = sorted((r for r in runs if (r["replicas"], r["system"], r["concurrency"]) == (replicas, system, conc)),
                    key=lambda r: r["round"])
        out.setdefault(replicas, {}).setdefault(system, {})[conc] = {
            "req_per_s": med([r["req_per_s"] for r in rs]),
            "req_per_s_per_round": [round(r["req_per_s"], 2) for r in rs],
            "ttft_p50_ms": med([r["ttft_ms"]["p50"] for r in rs]),
            "ttft_p99_ms": med([r["ttft_ms"]["p99"] for r in rs]),
            "routing_cpu_ms_per_request": med([r.get("routing_cpu_ms") for r in rs]),
            "routing_rss_mb": med([r.get("routing_rss_mb") for r in rs]),
            "errors": sum(r["errors"] for r in rs),
            "rounds": len(rs),
        }
    for systems in out.values():
        bare = systems.get("bare", {})
        for rows in systems.values():
            for conc, row in rows.items():
                b = bare.get(conc)
                for p in ("p50", "p99"):
                    row[f"added_ttft_{p}_ms"] = row[f"ttft_{p}_ms"] - b[f"ttft_{p}_ms"] if b else float("nan")
    return out


def _best_router(systems: dict[str, dict[int, dict[str, Any]]], conc: int, key: str, lowest: bool) -> float:
    """The stricter of vllm-router's two policies on one figure (the one llmserve must beat)."""
    vals = [systems[r][conc][key] for r in ROUTERS if conc in systems.get(r, {})]
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return float("nan")
    return min(vals) if lowest else max(vals)


def _goal(name: str, target: str, per_conc: dict[int, float], worst: float, met: bool) -> dict[str, Any]:
    return {"name": name, "target": target, "measured": None if math.isnan(worst) else round(worst, 3),
            "per_concurrency": {str(c): (None if math.isnan(v) else round(v, 3)) for c, v in per_conc.items()},
            "met": bool(met)}


def goals(summary: dict[int, dict[str, dict[int, dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Issue 27 section 1's goals at each replica count, each against the stricter vllm-router
    policy: llmserve's req/s at least vllm-router's at every concurrency; its gateway's CPU per
    request at most 1.5x vllm-router's and under a tenth of LiteLLM's; its TTFT p99 within 5 ms
    of vllm-router's (bare vLLM's TTFT cancels out of 'added TTFT p99 within 5 ms of the router's
    added TTFT p99', so this holds where no bare ceiling ran). `measured` is the worst
    concurrency's figure; a goal with a figure missing at any concurrency is not met."""
    out = []
    for replicas, systems in sorted(summary.items()):
        ours = systems.get("llmserve", {})
        concs = sorted(ours)
        tag = f"({replicas} replica{'s' if replicas > 1 else ''})"
        ratios = {c: _ratio(ours[c]["req_per_s"], _best_router(systems, c, "req_per_s", lowest=False)) for c in concs}
        worst = min(ratios.values(), default=float("nan"), key=_nan_low)
        out.append(_goal(f"throughput vs vllm-router {tag}", "llmserve req/s / vllm-router's best >= 1.0",
                         ratios, worst, _all(ratios, lambda v: v >= 1.0)))
        key = "routing_cpu_ms_per_request"
        cpu_r = {c: _ratio(ours[c][key], _best_router(systems, c, key, lowest=True)) for c in concs}
        worst = max(cpu_r.values(), default=float("nan"), key=_nan_high)
        out.append(_goal(f"gateway CPU/request vs vllm-router {tag}",
                         f"llmserve gateway / vllm-router's lower <= {MAX_CPU_VS_ROUTER}", cpu_r, worst,
                         _all(cpu_r, lambda v: v <= MAX_CPU_VS_ROUTER)))
        lite = systems.get("litellm", {})
        cpu_l = {c: _ratio(ours[c][key], lite[c][key]) if c in lite else float("nan") for c in concs}
        worst = max(cpu_l.values(), default=float("nan"), key=_nan_high)
        out.append(_goal(f"gateway CPU/request vs LiteLLM {tag}",
                         f"llmserve gateway / LiteLLM's < {MAX_CPU_VS_LITELLM}", cpu_l, worst,
                         _all(cpu_l, lambda v: v < MAX_CPU_VS_LITELLM)))
        over = {c: ours[c]["ttft_p99_ms"] - _best_router(systems, c, "ttft_p99_ms", lowest=True) for c in concs}
        worst = max(over.values(), default=float("nan"), key=_nan_high)
        out.append(_goal(f"TTFT p99 over vllm-router {tag}",
                         f"llmserve TTFT p99 - vllm-router's lower <= {MAX_TTFT_P99_OVER_ROUTER_MS} ms",
                         over, worst, _all(over, lambda v: v <= MAX_TTFT_P99_OVER_ROUTER_MS)))
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and not math.isnan(a) else float("nan")


def _all(values: dict[int, float], ok: Any) -> bool:
    return bool(values) and all(not math.isnan(v) and ok(v) for v in values.values())


def _nan_low(v: float) -> float:  # a missing figure is the worst one
    return -math.inf if math.isnan(v) else v


def _nan_high(v: float) -> float:
    return math.inf if math.isnan(v) else v


def _fmt(v: float | None, spec: str = ".1f", sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+{spec}}" if sign else f"{v:{spec}}"


def table(summary: dict[int, dict[str, dict[int, dict[str, Any]]]]) -> str:
    """One row per replica count, system and concurrency (medians over rounds; each round's req/s)."""
    head = ("| replicas | system | streams | req/s | per round | TTFT p50 | TTFT p99 | added p50 | added p99 | "
            "routing CPU ms/req | routing RSS MB | errors |")
    lines = [head, "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for replicas, systems in sorted(summary.items()):
        for system in [s for s in SYSTEMS if s in systems]:
            for conc, row in sorted(systems[system].items()):
                lines.append(
                    f"| {replicas} | {system} | {conc} | {_fmt(row['req_per_s'])} | "
                    f"{' / '.join(f'{x:.1f}' for x in row['req_per_s_per_round'])} | "
                    f"{_fmt(row['ttft_p50_ms'])} | {_fmt(row['ttft_p99_ms'])} | "
                    f"{_fmt(row['added_ttft_p50_ms'], sign=True)} | {_fmt(row['added_ttft_p99_ms'], sign=True)} | "
                    f"{_fmt(row['routing_cpu_ms_per_request'], '.2f')} | {_fmt(row['routing_rss_mb'], '.0f')} | "
                    f"{row['errors']} |")
    return "\n".join(lines)


def goals_table(gs: list[dict[str, Any]]) -> str:
    lines = ["| goal | target | worst | per concurrency | met |", "|---|---|---:|---|---|"]
    for g in gs:
        per = ", ".join(f"{c}: {'-' if v is None else v}" for c, v in g["per_concurrency"].items())
        lines.append(f"| {g['name']} | {g['target']} | {'-' if g['measured'] is None else g['measured']} | {per} | "
                     f"{'yes' if g['met'] else 'NO'} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """One row per replica count: req/s, TTFT p99 and routing CPU per request against streams."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {int(k): v for k, v in results["summary"].items()}
    fig, axes = plt.subplots(len(summary), 3, figsize=(16, 4.5 * len(summary)), squeeze=False)
    panels = (("req_per_s", "requests/s"), ("ttft_p99_ms", "TTFT p99 (ms)"),
              ("routing_cpu_ms_per_request", "routing CPU ms / request"))
    for row, (replicas, systems) in zip(axes, sorted(summary.items()), strict=True):
        for ax, (key, label) in zip(row, panels, strict=True):
            concs: list[int] = []
            for i, system in enumerate(SYSTEMS):  # one colour per system in every panel
                if system not in systems:
                    continue
                rows = {int(c): v for c, v in systems[system].items()}
                concs = sorted(rows)
                ax.plot(concs, [rows[c][key] for c in concs], "o-", color=f"C{i}", label=system)
            ax.set(title=f"{label}, {replicas} replica{'s' if replicas > 1 else ''}", xlabel="concurrent streams",
                   ylabel=label, xscale="log", xticks=concs, xticklabels=[str(c) for c in concs])
            ax.minorticks_off()
            if key != "req_per_s":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle(f"llmserve vs LiteLLM proxy and vllm-router, same tiny engines — {results.get('machine', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
