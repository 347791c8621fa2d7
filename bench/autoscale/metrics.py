"""From a simulated run to the reported figures: per-request TTFT samples, SLO attainment, p99, GPU-hours."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.autoscale.profiles import Profile
from bench.autoscale.simulator import REQUEST_TIMEOUT_S, Outcome

SAMPLES_PER_CHUNK = 8


@dataclass(frozen=True)
class Figures:
    slo_attainment: float
    ttft_p99_s: float
    gpu_hours: float


def ttft_samples(out: Outcome, profile: Profile, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(TTFT seconds, weight in requests) for every admitted request, SAMPLES_PER_CHUNK per chunk.

    A chunk holds quantiles q0..q1 of the cohort that arrived during second `a`, admitted over
    fractions x0..x1 of second `t`'s admission capacity. FIFO maps quantile q to admission time
    t + x0 + (q - q0) / (q1 - q0) * (x1 - x0); it arrived at a + q. Its first token comes after its
    own prompt's prefill, stretched by the other prefills sharing the replica that second, one decode
    step, and the fixed costs.
    """
    if not out.chunks:
        return np.zeros(0), np.zeros(0)
    k = SAMPLES_PER_CHUNK
    count, a, t, q0, q1, x0, x1, step, share = np.asarray(out.chunks).T
    n = len(count)
    # Stratified quantiles within each chunk, jittered: k evenly spread requests per chunk.
    u = (np.arange(k)[None, :] + rng.random((n, k))) / k
    q = q0[:, None] + u * (q1 - q0)[:, None]
    admitted_at = t[:, None] + x0[:, None] + u * (x1 - x0)[:, None]
    wait = np.maximum(0.0, admitted_at - (a[:, None] + q))
    prompt = profile.prompt.sample(rng, n * k).reshape(n, k)
    stretch = 1 / np.maximum(0.05, 1 - share)[:, None]
    ttft = wait + profile.ttft_fixed_s + (prompt * profile.prefill_s_per_token + step[:, None]) * stretch
    weight = np.repeat((count / k)[:, None], k, axis=1)
    return ttft.ravel(), weight.ravel()


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    idx = int(np.searchsorted(cum, q * cum[-1]))
    return float(values[order][min(idx, len(values) - 1)])


def figures(out: Outcome, profile: Profile, seed: int = 0) -> Figures:
    """Attainment: share of all arrivals whose first token came within the target. A request that
    failed (503 at the gateway, timed out, still queued when the run ended) is a miss and counts
    in the p99 at the gateway's request timeout: as one that never got a first token."""
    ttft, weight = ttft_samples(out, profile, np.random.default_rng(seed))
    failed = out.timed_out + out.left_queued + out.rejected
    met = float(weight[ttft <= profile.ttft_target_s].sum())
    values = np.append(ttft, REQUEST_TIMEOUT_S)
    weights = np.append(weight, failed)
    p99 = weighted_quantile(values, weights, 0.99) if weights.sum() > 0 else 0.0
    return Figures(slo_attainment=met / out.arrivals if out.arrivals else 1.0, ttft_p99_s=p99,
                   gpu_hours=out.gpu_seconds / 3600)
