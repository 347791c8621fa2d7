"""What `make bench-routing` computes from what it measured (pure; bench/routing.py does the I/O):
per router and workload TTFT percentiles, goodput against a TTFT SLO, the spread of requests over
replicas, each replica's prefix-cache hit rate from vLLM's own counters, issue 27 §3's goals, and
the TTFT CDF plot."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bench.loadgen import pct

# The router rows a run can have, in table order; GOAL_ROUTER is the one issue 27 §3's goals are about.
ROUND_ROBIN = "round_robin"
VR_CACHE, VR_KV = "vllm-router cache_aware", "vllm-router kv_aware"
GOAL_ROUTER = "llmserve cache_aware"
HITS, QUERIES, SUCCESS = "prefix_cache_hits", "prefix_cache_queries", "request_success"

_SAMPLE = re.compile(r'^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample of a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
            except ValueError:
                continue
    return out


def engine_counters(text: str, by_label: str | None = None) -> dict[str, dict[str, float]]:
    """vLLM's prefix-cache and finished-request counters in a scrape, summed per replica: one
    replica per scrape (a bare `vllm serve`, `by_label` None), or one per value of `by_label` (the
    `ReplicaId` Ray tags every engine metric of a Serve replica with). Matches vLLM's own names
    (`vllm:prefix_cache_hits_total`) and Ray's export of them (`ray_vllm_prefix_cache_hits_total`);
    `external_prefix_cache_*` (a KV connector's) are not the engine's own cache and are left out."""
    out: dict[str, dict[str, float]] = {}
    for name, labels, value in parse_prometheus(text):
        if "vllm" not in name or "external" in name:
            continue
        for counter in (HITS, QUERIES, SUCCESS):
            if re.search(rf"[:_]{counter}(_total)?$", name):
                key = labels.get(by_label, "") if by_label else ""
                row = out.setdefault(key, {HITS: 0.0, QUERIES: 0.0, SUCCESS: 0.0})
                row[counter] += value
    return out


def counter_delta(before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]]
                  ) -> dict[str, dict[str, float]]:
    """Per replica: each counter's increase, and the prefix-cache hit rate over it (hits / queried
    tokens; NaN when nothing was queried). A replica first seen after is counted from zero."""
    out = {}
    for rep, row in sorted(after.items()):
        prev = before.get(rep, {})
        d = {k: v - prev.get(k, 0.0) for k, v in row.items()}
        d["hit_rate"] = d[HITS] / d[QUERIES] if d.get(QUERIES) else float("nan")
        out[rep] = d
    return out


def spread(counts: Iterable[float]) -> float:
    """Load spread over replicas: the busiest one's share of requests (1/N is even, 1 all on one)."""
    xs = list(counts)
    total = sum(xs)
    return max(xs) / total if total else float("nan")


def summarize(rows: list[dict[str, Any]], wall_s: float, slo_s: float) -> dict[str, Any]:
    """One router on one workload: TTFT percentiles (ms) of the finished requests, throughput, and
    goodput: requests per second of wall time that finished with TTFT within `slo_s`."""
    ok = [r for r in rows if r.get("ok")]
    ttft = sorted(r["ttft_s"] * 1000 for r in ok)
    good = sum(1 for r in ok if r["ttft_s"] <= slo_s)
    by_replica: dict[str, int] = {}
    for r in ok:
        if r.get("replica"):
            by_replica[r["replica"]] = by_replica.get(r["replica"], 0) + 1
    return {"requests": len(rows), "ok": len(ok), "errors": len(rows) - len(ok), "wall_s": round(wall_s, 2),
            "req_per_s": len(ok) / wall_s if wall_s > 0 else float("nan"),
            "goodput_req_per_s": good / wall_s if wall_s > 0 else float("nan"),
            "within_slo": good / len(rows) if rows else float("nan"),
            "ttft_ms": {p: pct(ttft, q) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))},
            "ttft_sorted_ms": [round(x, 1) for x in ttft],
            "requests_by_replica_header": by_replica}


def _get(results: Mapping[str, Mapping[str, Any]], workload: str, router: str, *path: str) -> float | None:
    v: Any = results.get(workload, {}).get(router)
    for k in path:
        if not isinstance(v, Mapping):
            return None
        v = v.get(k)
    return float(v) if isinstance(v, (int, float)) and not math.isnan(v) else None


def _goal(name: str, target: str, measured: float | None, met: bool | None) -> dict[str, Any]:
    return {"name": name, "target": target, "measured": None if measured is None else round(measured, 4),
            "met": bool(met) if measured is not None else False,
            **({} if measured is not None else {"note": "not measured in this run"})}


def goals(results: Mapping[str, Mapping[str, Any]], ours: str = GOAL_ROUTER) -> list[dict[str, Any]]:
    """Issue 27 §3's goals for router `ours`, from {workload: {router: summary}}; a goal whose
    figures this run lacks is listed unmet with a note. Ratios are ours / the other's."""
    out = []

    def ratio(w: str, other: str, *path: str) -> float | None:
        a, b = _get(results, w, ours, *path), _get(results, w, other, *path)
        return a / b if a is not None and b else None

    for w in ("tenants", "conversations"):
        r = ratio(w, ROUND_ROBIN, "ttft_ms", "p90")
        out.append(_goal(f"{w}: TTFT p90 / round robin's", "<= 0.5", r, r is not None and r <= 0.5))
        r = ratio(w, VR_CACHE, "ttft_ms", "p90")
        out.append(_goal(f"{w}: TTFT p90 / vllm-router cache_aware's", "< 1", r, r is not None and r < 1))
        r = ratio(w, VR_KV, "ttft_ms", "p90")
        out.append(_goal(f"{w}: TTFT p90 / vllm-router kv_aware's", "<= 1", r, r is not None and r <= 1))
        r = ratio(w, ROUND_ROBIN, "goodput_req_per_s")
        out.append(_goal(f"{w}: goodput / round robin's", ">= 1.5", r, r is not None and r >= 1.5))
    r = ratio("uniform", ROUND_ROBIN, "req_per_s")
    out.append(_goal("uniform: throughput / round robin's", ">= 0.97", r, r is not None and r >= 0.97))
    # (v) against the same workload without adapters, as a ratio to round robin on each, so the
    # adapters' own compute (LoRA kernels cost the same whatever the router) is not counted.
    with_lora = ratio("tenants+lora", ROUND_ROBIN, "ttft_ms", "p90")
    without = ratio("tenants", ROUND_ROBIN, "ttft_ms", "p90")
    r = with_lora / without if with_lora is not None and without else None
    out.append(_goal("tenants+lora: (TTFT p90 / round robin's) over the same without adapters", "<= 1",
                     r, r is not None and r <= 1))
    return out


def plot_cdfs(results: Mapping[str, Mapping[str, Any]], slo_s: float, out_dir: Path, stamp: str) -> list[Path]:
    """One PNG per workload: the TTFT CDF of each router, the SLO marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for workload, routers in results.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for router, s in routers.items():
            xs = s["ttft_sorted_ms"]
            n = s["requests"]  # failed requests never reach 1: the curve stops at the share that finished
            if xs:
                ax.step(xs, [(i + 1) / n for i in range(len(xs))], where="post", label=f"{router} ({s['ok']}/{n})")
        ax.axvline(slo_s * 1000, color="grey", linestyle="--", label=f"SLO {slo_s * 1000:.0f} ms")
        ax.set(xscale="log", xlabel="TTFT (ms)", ylabel="share of requests", ylim=(0, 1.02),
               title=f"TTFT CDF, workload {workload}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"routing-{stamp}-{workload}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
