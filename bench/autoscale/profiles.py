"""Replica service models and start delays: what one engine replica can do, and how long a new one
takes before it serves. Every number is either cited or derived from a cited one, so a reader can
check it and replace it with a measurement of their own model (docs/operations.md, "Autoscaling").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Lengths:
    """Token lengths drawn from a log-normal (median, sigma), clipped to [1, max]."""

    median: float
    sigma: float
    max: int

    def mean(self) -> float:
        """Exact mean of the clipped log-normal: E[X; X < m] + m P(X >= m)."""
        mu, s, m = math.log(self.median), self.sigma, float(self.max)
        phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
        z = (math.log(m) - mu) / s
        return math.exp(mu + s * s / 2) * phi(z - s) + m * (1 - phi(z))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = rng.lognormal(math.log(self.median), self.sigma, n)
        return np.clip(x, 1.0, float(self.max))


@dataclass(frozen=True)
class Profile:
    """One replica of one model on one accelerator, and the path a new replica takes to serve.

    Decode: one engine step (every running sequence gets one token) takes
    ``decode_base_s + decode_per_seq_s * b + decode_per_kv_token_s * (KV tokens held)`` for a batch
    of ``b`` sequences: weights read once per step, per-sequence compute, attention reading the KV
    cache. Prefill costs ``prefill_s_per_token`` of replica time per prompt token (chunked prefill
    shares steps with decode, so it slows everybody's decode by the time it takes).
    """

    name: str
    summary: str
    prefill_s_per_token: float
    decode_base_s: float
    decode_per_seq_s: float
    decode_per_kv_token_s: float
    max_num_seqs: int
    kv_capacity_tokens: float
    # TTFT a request pays even on an idle replica without using replica time: gateway hop,
    # tokenization, HTTP and scheduling.
    ttft_fixed_s: float
    prompt: Lengths
    output: Lengths
    ttft_target_s: float
    # The path of a new replica: the Ray autoscaler notices the pending replica, the cloud adds a
    # node, the node pulls the image, the replica loads the model. A replica placed on an idle node
    # (kept by the autoscaler's idle timeout) pays only the model load.
    autoscaler_delay_s: float
    node_provision_s: float
    image_pull_s: float
    model_load_s: float
    sources: tuple[str, ...]
    # Most prefill share of a replica's time: vLLM always schedules running decodes in each step,
    # so prefill never takes the whole step.
    max_prefill_share: float = 0.9

    @property
    def cold_start_s(self) -> float:
        return self.autoscaler_delay_s + self.node_provision_s + self.image_pull_s + self.model_load_s

    @property
    def warm_start_s(self) -> float:
        return self.model_load_s

    @property
    def ctx_tokens(self) -> float:
        """KV tokens a decoding sequence holds on average: its prompt and half its output."""
        return self.prompt.mean() + self.output.mean() / 2

    def step_s(self, b: float) -> float:
        return self.decode_base_s + b * (self.decode_per_seq_s + self.decode_per_kv_token_s * self.ctx_tokens)

    def batch_cap(self) -> float:
        """Most sequences a replica decodes at once: max_num_seqs or what the KV cache holds."""
        return min(float(self.max_num_seqs), self.kv_capacity_tokens / self.ctx_tokens)

    def max_rate(self) -> float:
        """Requests/s one replica sustains at its batch cap (beyond it, requests queue).

        Steady state: a sequence decodes at (1 - prefill share) / step tokens per second, so the
        batch holds b = rate * output * step / (1 - rate * prompt * prefill_s); solved for b = cap.
        """
        b, out, pre = self.batch_cap(), self.output.mean(), self.prompt.mean() * self.prefill_s_per_token
        rate = b / (out * self.step_s(b) + b * pre)
        return min(rate, self.max_prefill_share / pre)

    def steady_batch(self, rate: float) -> float:
        """Sequences decoding at once per replica at `rate` req/s (fixed point of the steady state)."""
        out, pre = self.output.mean(), self.prompt.mean() * self.prefill_s_per_token
        free = 1 - rate * pre
        e = self.decode_per_seq_s + self.decode_per_kv_token_s * self.ctx_tokens
        denom = free - rate * out * e
        return math.inf if denom <= 0 else rate * out * self.decode_base_s / denom


# Azure LLM inference trace 2023, conversation (Patel et al., "Splitwise", ISCA 2024, and
# github.com/Azure/AzurePublicDataset AzureLLMInferenceTrace_conv.csv): median prompt 1020 tokens,
# median output 129 tokens; prompts reach ~4-8k, outputs ~650. Sigmas chosen so p90 lands near the
# trace's upper clusters (~4k prompt, ~420 output).
AZURE_CONV_PROMPT = Lengths(median=1020, sigma=1.0, max=8192)
AZURE_CONV_OUTPUT = Lengths(median=129, sigma=0.8, max=1024)

H100_LLAMA_8B = Profile(
    name="h100-llama-8b",
    summary="Llama 3.1 8B, bf16, vLLM, one H100 80GB; Azure-conversation lengths",
    # H100 SXM: 989 TFLOPS dense bf16; 8B params = 16 GFLOP/token; at ~40% MFU that is ~25k
    # prompt tokens/s. A short prompt then costs a few ms, consistent with TTFT ~14 ms at
    # concurrency 1 in a published vLLM sweep on one H100 (InferenceBench, Llama-3.1-8B, vLLM 0.21).
    prefill_s_per_token=40e-6,
    # vLLM's own performance benchmark (buildkite vllm/performance-benchmark, latency_llama8B_tp1
    # on H100): 32 prompt + 128 output tokens at batch 8 in 997.5 ms -> 7.8 ms per step at b=8.
    # The same sweep: TPOT 6.5 ms at concurrency 1. 16 GB of weights over 3.35 TB/s is 4.8 ms.
    decode_base_s=6.5e-3,
    # Per-sequence compute (~16 GFLOP/token at high batch) plus sampling: 0.05 ms/seq puts b=8 at
    # 6.9 ms (7.8 measured, which includes the 32-token prefills) and saturation near 11k output
    # tok/s (AIMultiple's H100 ShareGPT run: vLLM 12.5k tok/s offline).
    decode_per_seq_s=0.05e-3,
    # Attention reads 128 KiB of KV per context token (32 layers x 8 KV heads x 128 dim x 2 x bf16)
    # at 3.35 TB/s: 0.039 ms per 1000 tokens held.
    decode_per_kv_token_s=0.039e-6,
    max_num_seqs=256,  # helm/llmserve/values-production.yaml engine.max_num_seqs
    # 80 GB x 0.90 (gpu_memory_utilization in values-production) - 16 GB weights - ~4 GB
    # activations and CUDA graphs = ~52 GB of KV at 128 KiB/token.
    kv_capacity_tokens=390_000,
    ttft_fixed_s=0.010,  # gateway (bench target: <= 5 ms added) + tokenization and HTTP
    prompt=AZURE_CONV_PROMPT,
    output=AZURE_CONV_OUTPUT,
    ttft_target_s=1.0,
    # Ray's autoscaler loop (AUTOSCALER_UPDATE_INTERVAL_S = 5) plus KubeRay's reconcile.
    autoscaler_delay_s=10,
    # GPU node on a managed cloud: GKE cluster autoscaler adds GPU nodes in 3-8 min (easecloud
    # "Auto-Scale GPU Workloads on GKE"); AKS reports 5-10 min for A100 nodes (Microsoft Q&A).
    # 240 s is the optimistic end: VM boot plus GPU driver and device plugin.
    node_provision_s=240,
    # vLLM + PyTorch + CUDA images are 10-20 GB ("The GPU Cold Starts Nobody Warns You About",
    # dev.to); ~10 GB at ~110 MB/s.
    image_pull_s=90,
    # 16 GB of weights from the shared model cache plus engine start (CUDA graphs, compile):
    # vLLM cold start ~62 s for Llama 3.3 70B FP8 on one H100 (Spheron, "vLLM vs TensorRT-LLM vs
    # SGLang: H100 Benchmarks", 2026).
    model_load_s=75,
    sources=(
        "vLLM performance benchmark (buildkite.com/vllm/performance-benchmark): latency_llama8B_tp1 H100",
        "InferenceBench concurrency sweep, Llama-3.1-8B-Instruct on H100-80GB, vLLM 0.21",
        "AIMultiple inference engines benchmark: vLLM 12,553 tok/s, Llama 3.1 8B bf16, H100",
        "Splitwise (ISCA 2024) / Azure LLM inference trace 2023: conversation token lengths",
        "GKE GPU node autoscaling 3-8 min (easecloud); AKS A100 5-10 min (Microsoft Q&A)",
    ),
)

# This machine (2 CPU cores), tiny built-in model, `make bench` (bench/README.md): 32 streamed
# output tokens; llmserve at 1/4/16/64 streams: 8.9/22.1/50.6/82.8 req/s, TTFT p50
# 13.7/27.6/73.4/147.5 ms. Per-request time minus TTFT over 31 steps gives the step time:
# 3.2/4.9/7.8/20.2 ms at ~1/3.4/12/52 sequences -> 2.9 ms + 0.33 ms per sequence. TTFT at one
# stream (13.7 ms) is mostly fixed cost (3.2 ms added by the gateway).
CPU_TINY = Profile(
    name="cpu-tiny",
    summary="tiny built-in model, vLLM CPU, 2 cores (make bench on this machine)",
    prefill_s_per_token=20e-6,
    decode_base_s=2.9e-3,
    decode_per_seq_s=0.33e-3,
    decode_per_kv_token_s=0.0,  # folded into the per-sequence cost at these short contexts
    max_num_seqs=64,  # bench/config.yaml
    kv_capacity_tokens=64 * 1024,  # VLLM_CPU_KVCACHE_SPACE=1 GiB holds far more than 64 x 1024
    ttft_fixed_s=0.010,
    # bench/loadgen.py: 24 words plus a chat template (~70 byte-level BPE tokens); 32 output tokens.
    prompt=Lengths(median=70, sigma=0.2, max=256),
    output=Lengths(median=32, sigma=0.01, max=32),
    ttft_target_s=0.5,
    autoscaler_delay_s=10,
    node_provision_s=90,  # a CPU VM: ~1-2 min on GKE/EKS
    image_pull_s=30,  # the CPU image is a few GB
    # vLLM CPU engine start for the tiny model on this box: the integration session starts four
    # engines in ~5-8 min on 2 shared cores (COMMON.md), so ~60 s each.
    model_load_s=60,
    sources=("bench/README.md, figures from this machine (make bench, 2026-11-26)",),
)

PROFILES = {p.name: p for p in (H100_LLAMA_8B, CPU_TINY)}
