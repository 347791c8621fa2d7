"""Benchmark results: ratios, the JSON file and a plot a person can read."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else float("nan")


def summarize(rounds: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[int, dict[str, Any]]:
    """Per concurrency: medians over rounds of each system's figures, and llmserve/bare ratios."""
    def med(xs: list[float]) -> float:
        xs = [x for x in xs if not math.isnan(x)]
        return statistics.median(xs) if xs else float("nan")

    out: dict[int, dict[str, Any]] = {}
    for conc in sorted(rounds["bare"]):
        row: dict[str, Any] = {}
        for system in ("bare", "llmserve"):
            rs = rounds[system][conc]
            row[system] = {
                "req_per_s": med([r["req_per_s"] for r in rs]),
                "out_tok_per_s": med([r["out_tok_per_s"] for r in rs]),
                **{f"ttft_{p}_ms": med([r["ttft_ms"][p] for r in rs]) for p in ("p50", "p95", "p99")},
                **{f"e2e_{p}_ms": med([r["e2e_ms"][p] for r in rs]) for p in ("p50", "p95", "p99")},
                "errors": sum(r["errors"] for r in rs),
                # CPU ms per completed request by process role (bench/procs.py), median over rounds.
                "cpu_ms_per_request": {k: med([r["cpu_ms_per_request"].get(k, 0.0) for r in rs])
                                       for k in sorted({k for r in rs for k in r.get("cpu_ms_per_request", {})})},
            }
        b, g = row["bare"], row["llmserve"]
        row["ratio"] = {k: ratio(g[k], b[k]) for k in b if k not in ("errors", "cpu_ms_per_request")}
        # Each round's own ratio (the two systems ran back to back): the spread is part of the result.
        row["ratio_per_round"] = [ratio(gr["req_per_s"], br["req_per_s"])
                                  for br, gr in zip(rounds["bare"][conc], rounds["llmserve"][conc], strict=True)]
        row["added_ttft_p50_ms"] = g["ttft_p50_ms"] - b["ttft_p50_ms"]
        out[conc] = row
    return out


def cpu_table(summary: dict[int, dict[str, Any]]) -> str:
    """CPU ms per completed request, by role, for each system at each concurrency (medians)."""
    lines = []
    for conc, row in summary.items():
        for system in ("bare", "llmserve"):
            cpu = row[system]["cpu_ms_per_request"]
            if not cpu:
                continue
            roles = sorted((k for k in cpu if k not in ("total", "machine", "load generator")), key=lambda k: -cpu[k])
            parts = ", ".join(f"{k} {cpu[k]:.2f}" for k in roles if cpu[k] >= 0.01)
            lines.append(f"c={conc:>3} {system:>8}: total {cpu['total']:.2f} ms (machine {cpu['machine']:.2f}, "
                         f"load generator {cpu['load generator']:.2f}): {parts}")
    return "\n".join(lines)


def write(results: dict[str, Any], out_dir: Path, stamp: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath = out_dir / f"{stamp}.json"
    jpath.write_text(json.dumps(results, indent=2, default=float))
    ppath = out_dir / f"{stamp}.png"
    plot(results, ppath)
    return jpath, ppath


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {int(k): v for k, v in results["summary"].items()}
    concs = sorted(summary)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for system, style in (("bare", "o-"), ("llmserve", "s-")):
        axes[0].plot(concs, [summary[c][system]["req_per_s"] for c in concs], style, label=system)
        axes[1].plot(concs, [summary[c][system]["ttft_p50_ms"] for c in concs], style, label=f"{system} p50")
        axes[1].plot(concs, [summary[c][system]["ttft_p95_ms"] for c in concs], style, alpha=0.4,
                     label=f"{system} p95")
    axes[0].set(title="Throughput", xlabel="concurrent streams", ylabel="requests/s", xscale="log")
    axes[1].set(title="Time to first token", xlabel="concurrent streams", ylabel="ms", xscale="log")
    axes[2].bar([str(c) for c in concs], [summary[c]["added_ttft_p50_ms"] for c in concs], color="tab:red")
    axes[2].set(title="Added TTFT p50 (llmserve - bare)", xlabel="concurrent streams", ylabel="ms")
    cache = results.get("cache")
    if cache:
        axes[2].text(0.02, 0.95, f"cache hit p50 {cache['hit_p50_ms']:.1f} ms\nmiss p50 {cache['miss_p50_ms']:.1f} ms",
                     transform=axes[2].transAxes, va="top")
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"llmserve vs bare vLLM — {results.get('model', '')}, {results.get('max_tokens')} output tokens, "
                 f"{results.get('machine', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
