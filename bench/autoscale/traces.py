"""Arrival traces, one value per second, in replica units: 1.0 is the request rate one replica
sustains at its batch cap (Profile.max_rate), so the same trace spans the same replica counts on
any profile. ``arrivals`` turns a trace into seeded per-second request counts for one profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Peak load in replica units: ~52 replicas at 85% of their batch cap, under the 64 the simulation
# allows, so a policy that keeps headroom still has room to add it.
PEAK_UNITS = 44.0


@dataclass(frozen=True)
class Trace:
    name: str
    summary: str
    units: np.ndarray  # load per second, in replicas at their batch cap

    @property
    def duration_s(self) -> int:
        return len(self.units)


def _modulate(rng: np.random.Generator, n: int, period_s: int, cv: float) -> np.ndarray:
    """Per-second multiplier with mean 1: gamma-distributed levels held for `period_s` and blended
    linearly, the minute-scale burstiness production traces show over a smooth rate."""
    if cv <= 0:
        return np.ones(n)
    k = 1 / cv**2
    levels = rng.gamma(k, 1 / k, n // period_s + 2)
    x = np.arange(n) / period_s
    return np.interp(x, np.arange(len(levels)), levels)


def diurnal(seed: int = 1, days: float = 1.0) -> Trace:
    """A day with a 100x peak-to-trough ratio: log-sinusoidal, trough at 03:00, peak at 15:00,
    10% minute-scale noise (5-minute levels)."""
    rng = np.random.default_rng(seed)
    n = int(86_400 * days)
    t = np.arange(n)
    phase = np.cos(2 * math.pi * (t - 15 * 3600) / 86_400)  # 1 at the peak, -1 at the trough
    smooth = PEAK_UNITS * 100 ** ((phase - 1) / 2)
    return Trace("diurnal", "24 h, 100x peak-to-trough (log-sinusoid), 10% noise",
                 smooth * _modulate(rng, n, 300, 0.10))


def bursts(seed: int = 2, hours: float = 4.0, base: float = PEAK_UNITS / 10, count: int = 4) -> Trace:
    """A steady base with `count` bursts that reach 10x the base within 60 s, hold 10-20 min and
    fade over 2-5 min, at seeded times at least 30 min apart."""
    rng = np.random.default_rng(seed)
    n = int(hours * 3600)
    level = np.full(n, base)
    slot = n // count
    for i in range(count):
        start = i * slot + int(rng.uniform(0.15, 0.45) * slot)
        hold, fade = int(rng.uniform(600, 1200)), int(rng.uniform(120, 300))
        ramp = np.clip((np.arange(n) - start) / 60, 0, 1)  # 0 -> 1 in the first minute
        down = np.clip(1 - (np.arange(n) - start - 60 - hold) / fade, 0, 1)
        level += 9 * base * np.minimum(ramp, down)
    return Trace("bursts", f"{hours:g} h, base {base:g} units, {count} bursts of 10x within 60 s",
                 level * _modulate(rng, n, 60, 0.05))


# Azure LLM inference trace 2023, conversation (AzureLLMInferenceTrace_conv.csv, 2023-11-16
# 18:15:46-19:14:08, ~19.7k requests, 5.6 req/s on average): mean rates by quarter of the file
# 5.0, 6.5, 6.8 and 4.8 req/s; local rates 3.8 req/s in the first two minutes, 7.4 req/s at minute
# 29 (the busiest sampled), 2.2 req/s in the last minute. Within a minute the counts look Poisson
# (eight consecutive seconds at minute 29: 11, 9, 5, 8, 9, 6, 10, 9 requests); the rate moves
# from minute to minute.
_AZURE_POINTS_MIN = (0.0, 2.0, 16.5, 29.0, 41.0, 55.0, 58.4)
_AZURE_POINTS_RPS = (3.8, 4.6, 5.1, 7.4, 6.0, 4.2, 2.2)


def azure_conv(seed: int = 3) -> Trace:
    """One hour shaped like the Azure 2023 conversation trace: its rate curve (above), minute-scale
    swings (gamma levels, CV 0.15, one a minute), scaled so its busiest minute is PEAK_UNITS."""
    rng = np.random.default_rng(seed)
    n = int(_AZURE_POINTS_MIN[-1] * 60)
    rps = np.interp(np.arange(n) / 60, _AZURE_POINTS_MIN, _AZURE_POINTS_RPS)
    units = rps * (PEAK_UNITS / max(_AZURE_POINTS_RPS))
    return Trace("azure_conv", "1 h shaped like Azure's 2023 conversation trace (rate curve, minute swings)",
                 units * _modulate(rng, n, 60, 0.15))


def arrivals(trace: Trace, rate_per_unit: float, seed: int) -> np.ndarray:
    """Seeded Poisson request counts per second for a replica whose batch-cap rate is rate_per_unit."""
    rng = np.random.default_rng(seed)
    return rng.poisson(trace.units * rate_per_unit).astype(np.float64)


def all_traces() -> list[Trace]:
    return [diurnal(), bursts(), azure_conv()]
