"""autoscale.json, autoscale_detail.json and autoscale.png: the figures and a plot a person reads at a glance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.autoscale.runner import Run

POLICIES = ("static", "ray_default", "slo", "oracle")
COLORS = {"static": "#999999", "ray_default": "#d62728", "slo": "#1f77b4", "oracle": "#2ca02c"}
LABELS = {"static": "static peak", "ray_default": "Ray default (chart)", "slo": "ours (slo)", "oracle": "oracle"}


def entry(run: Run, oracle: Run) -> dict[str, float]:
    f = run.figures
    return {
        "slo_attainment": round(f.slo_attainment, 5),
        "ttft_p99_s": round(f.ttft_p99_s, 3),
        "gpu_hours": round(f.gpu_hours, 2),
        "gpu_hours_vs_oracle": round(f.gpu_hours / oracle.figures.gpu_hours, 3),
    }


def table(results: dict[str, dict[str, dict[str, dict[str, float]]]]) -> str:
    """Markdown table of every profile, trace and policy (bench/README.md)."""
    lines = ["| profile | trace | policy | SLO attainment | TTFT p99 (s) | GPU-hours | vs oracle |",
             "|---|---|---|---:|---:|---:|---:|"]
    for profile, traces in results.items():
        for trace, policies in traces.items():
            for policy, e in policies.items():
                lines.append(f"| {profile} | {trace} | {LABELS[policy]} | {e['slo_attainment']:.4f} | "
                             f"{e['ttft_p99_s']:.2f} | {e['gpu_hours']:.1f} | {e['gpu_hours_vs_oracle']:.2f}x |")
    return "\n".join(lines)


def write_json(out_dir: Path, results: dict[str, Any], detail: dict[str, Any]) -> None:
    (out_dir / "autoscale.json").write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    (out_dir / "autoscale_detail.json").write_text(json.dumps(detail, indent=1) + "\n")


def plot(out_dir: Path, series: dict[str, dict[str, dict[str, Any]]], results: dict[str, Any]) -> Path:
    """Per profile, one panel per trace: load and GPUs held over time; then attainment and GPU-hours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = list(series)
    trace_names = list(next(iter(series.values())))
    rows = len(trace_names) + 1
    fig, axes = plt.subplots(rows, len(profiles), figsize=(8 * len(profiles), 3.2 * rows), squeeze=False)
    for col, profile in enumerate(profiles):
        for row, trace in enumerate(trace_names):
            ax = axes[row][col]
            s = series[profile][trace]
            minutes = np.arange(len(s["load"])) * s["step_s"] / 60
            ax.fill_between(minutes, 0, s["load"], color="#f0e0c0", label="load (replicas the oracle runs)")
            for policy in POLICIES:
                ax.plot(minutes, s["gpus"][policy], color=COLORS[policy], lw=1.2, label=f"{LABELS[policy]}: GPUs held")
            ax.set_title(f"{profile} / {trace}", fontsize=10)
            ax.set_xlabel("minutes")
            ax.set_ylabel("replicas / GPUs")
            if row == 0:
                ax.legend(fontsize=7, loc="upper left")
        ax = axes[-1][col]
        x = np.arange(len(trace_names))
        width = 0.2
        twin = ax.twinx()
        for i, policy in enumerate(POLICIES):
            att = [results[profile][t][policy]["slo_attainment"] for t in trace_names]
            ratio = [results[profile][t][policy]["gpu_hours_vs_oracle"] for t in trace_names]
            ax.bar(x + (i - 1.5) * width, att, width, color=COLORS[policy], label=LABELS[policy])
            twin.plot(x + (i - 1.5) * width, ratio, "k^", ms=5)
        ax.axhline(0.99, color="k", ls="--", lw=0.8)
        ax.set_xticks(x, trace_names)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("SLO attainment (bars; dashed: 0.99)")
        twin.set_ylabel("GPU-hours vs oracle (triangles)")
        twin.set_ylim(0, max(4.0, max(results[profile][t][p]["gpu_hours_vs_oracle"]
                                      for t in trace_names for p in POLICIES) * 1.1))
        ax.set_title(f"{profile}: attainment (bars) and GPU-hours vs oracle (triangles)", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = out_dir / "autoscale.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def binned(values: np.ndarray, step: int) -> np.ndarray:
    """Means over `step` consecutive values (the last bin may be shorter)."""
    n = len(values) // step * step
    head = values[:n].reshape(-1, step).mean(axis=1)
    return np.append(head, values[n:].mean()) if n < len(values) else head
