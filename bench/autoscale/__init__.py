"""Trace-driven autoscaling simulation: `python -m bench.autoscale --out DIR` (seconds; no engines).

What it answers: with the chart's autoscaling settings, how many requests get their first token
within the target (SLO attainment, TTFT p99) and how many GPU-hours that costs, for four
policies on three traces, against an oracle that knows the trace.

The model, one simulated second at a time (simulator.py):
- Traces (traces.py) give the load per second in replica units; seeded Poisson arrivals follow.
  diurnal: 24 h, 100x peak-to-trough; bursts: 10x within a minute, held 10-20 min; azure_conv:
  one hour shaped like Azure's 2023 conversation trace (Splitwise, ISCA 2024).
- Replicas (profiles.py) are a fluid continuous-batching engine: a decode step costs
  base + per-sequence + per-KV-token time, prefill a cost per prompt token, the batch is capped by
  max_num_seqs and the KV cache; two calibrations: Llama 3.1 8B on one H100 from published
  figures, and the tiny model on this machine's 2 cores from `make bench`.
- Requests wait in one FIFO (gateway and engine queues); each admission is recorded, and per
  request TTFT is drawn from it (metrics.py): queue wait (FIFO, from the arrival and admission
  curves), own prefill at that second's load, one decode step, fixed costs. Requests that wait
  past the gateway's request timeout fail; every arrival ends admitted and finished, or failed.
- Nodes and replicas (cluster.py): a new replica waits for the Ray autoscaler, a new GPU node,
  the image pull and the model load (minutes), or only the model load on an idle node that the
  autoscaler's idle timeout kept; a node is billed from request to removal (GPU-hours).
- Policies: static (the oracle's peak, always on), Ray Serve's default policy with the chart's
  settings before this work, ours (serve/policies/autoscaling.py) with the chart's settings now,
  and the oracle (knows the trace and the start time; asks for each replica that long ahead).
  Ray's default and ours run through Serve's own code (serve_bridge.py): the policy the
  AutoscalingConfig names, resolved and wrapped by Serve's controller functions, called with real
  AutoscalingContext objects built from the metrics Serve would have (replica samples every
  look_back * 0.2 s, pushed every 10 s, averaged over look_back_period_s), on a simulated clock.

Written: DIR/autoscale.json ({profile: {trace: {policy: {slo_attainment, ttft_p99_s, gpu_hours,
gpu_hours_vs_oracle}}}}), DIR/autoscale_detail.json (settings, sources, request conservation,
the reactive bound), DIR/autoscale.png.
"""
