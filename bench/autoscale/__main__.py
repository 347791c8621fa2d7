"""python -m bench.autoscale --out DIR: every policy on every trace, for each profile."""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.autoscale import report
from bench.autoscale import traces as tr
from bench.autoscale.profiles import PROFILES
from bench.autoscale.runner import (
    Run,
    arrivals_for,
    gateway_limit,
    ray_default_settings,
    run_oracle,
    run_serve,
    run_static,
    slo_settings,
)

# The chart's values file whose settings each profile runs with.
VALUES = {"h100-llama-8b": "values-production.yaml", "cpu-tiny": "values-cpu-dev.yaml"}
DEFAULT_PROFILES = ("h100-llama-8b", "cpu-tiny")
PLOT_POINTS = 1500


def burst_exposure(trace: tr.Trace, arrivals: np.ndarray, start_s: float) -> float:
    """Share of the trace's requests that arrive within `start_s` of a load jump (the load tripling
    within a minute): what no policy without foresight can have capacity for, unless it keeps it."""
    units = trace.units
    jumps = np.flatnonzero(units[60:] > 3 * units[:-60]) + 60
    exposed = np.zeros(len(units), bool)
    onset = -np.inf
    for j in jumps:
        if j - onset > start_s:
            onset = j
            exposed[j - 60: j + int(start_s)] = True
    return float(arrivals[exposed].sum() / arrivals.sum())


def run_case(profile_name: str, trace_name: str, seed: int) -> dict[str, Any]:
    """All four policies on one trace and profile; returns figures, plot series and details."""
    profile = PROFILES[profile_name]
    trace = next(t for t in tr.all_traces() if t.name == trace_name)
    arrivals = arrivals_for(trace, profile, seed)
    ray_scaling, ray_idle = ray_default_settings(VALUES[profile_name])
    slo_scaling, slo_idle = slo_settings(profile, VALUES[profile_name])
    limit, gateways = gateway_limit(VALUES[profile_name])
    oracle, need = run_oracle(arrivals, profile, limit)
    initial = int(need[0])
    runs: dict[str, Run] = {
        "static": run_static(arrivals, profile, need, limit),
        "ray_default": run_serve("ray_default", arrivals, profile, ray_scaling, ray_idle, initial,
                                 max_in_flight=limit, gateways=gateways),
        "slo": run_serve("slo", arrivals, profile, slo_scaling, slo_idle, initial, max_in_flight=limit,
                         gateways=gateways),
        "oracle": oracle,
    }
    step = max(1, len(arrivals) // PLOT_POINTS)
    o = {p: r.outcome for p, r in runs.items()}
    return {
        "entries": {p: report.entry(r, oracle) for p, r in runs.items()},
        "series": {"step_s": step, "load": report.binned(need.astype(float), step),
                   "gpus": {p: report.binned(out.nodes.astype(float), step) for p, out in o.items()}},
        "detail": {
            "summary": trace.summary, "duration_s": trace.duration_s, "requests": int(arrivals.sum()),
            "oracle": oracle.note, "static": runs["static"].note, "gateway_max_in_flight_per_replica": limit,
            "burst_exposure": round(burst_exposure(trace, arrivals, profile.cold_start_s), 4),
            "ray_default": {"autoscaling": ray_scaling, "idle_timeout_s": ray_idle},
            "slo": {"autoscaling": slo_scaling, "idle_timeout_s": slo_idle},
            "conservation": {p: {"arrivals": round(out.arrivals, 3), "completed": round(out.completed, 3),
                                 "timed_out": round(out.timed_out, 3), "rejected": round(out.rejected, 3),
                                 "left_queued": round(out.left_queued, 3),
                                 "left_running": round(out.left_running, 6)} for p, out in o.items()},
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, type=Path, help="directory for autoscale.json and autoscale.png")
    p.add_argument("--profiles", default=",".join(DEFAULT_PROFILES), help=f"comma-separated, of: {', '.join(PROFILES)}")
    p.add_argument("--traces", default="diurnal,bursts,azure_conv", help="comma-separated trace names")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="cases run side by side")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cases = [(prof, trace, a.seed + i) for prof in a.profiles.split(",") for i, trace in enumerate(a.traces.split(","))]
    if a.jobs > 1:
        with ProcessPoolExecutor(max_workers=a.jobs) as pool:
            done = list(pool.map(run_case, *zip(*cases, strict=True)))
    else:
        done = [run_case(*case) for case in cases]
    results: dict[str, Any] = {}
    details: dict[str, Any] = {}
    series: dict[str, Any] = {}
    for (prof, trace, _), case in zip(cases, done, strict=True):
        profile = PROFILES[prof]
        results.setdefault(prof, {})[trace] = case["entries"]
        series.setdefault(prof, {})[trace] = case["series"]
        details.setdefault(prof, {"profile": profile.summary, "max_rate_per_replica": round(profile.max_rate(), 3),
                                  "cold_start_s": profile.cold_start_s, "ttft_target_s": profile.ttft_target_s,
                                  "sources": list(profile.sources), "traces": {}})["traces"][trace] = case["detail"]
    report.write_json(a.out, results, details)
    png = report.plot(a.out, series, results)
    print(report.table(results))
    print(f"\nwrote {a.out / 'autoscale.json'}, {a.out / 'autoscale_detail.json'}, {png} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
