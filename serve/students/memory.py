"""Will `students train` fit? An estimate of peak training memory, checked before the first step.

An OOM half an hour into a run on a shared GPU is the expensive way to learn a batch was too big;
the terms below are computed from the model's shape and the batch, and `train` refuses, with the
numbers and a shape that would fit, before it takes a step. The figure is an estimate, not a
measurement: it counts what a decoder-only transformer keeps alive for the backward pass (Korthikanti
et al., "Reducing Activation Recomputation in Large Transformer Models", 2022, with the attention
scores left out because SDPA/flash attention does not store them), plus a margin.

Terms, for one micro-batch of `micro_batch` rows padded to `seq_len` tokens (tokens = their product):
- weights: every parameter in the training precision;
- trainable state: the LoRA parameters in float32 (peft keeps adapters in float32), their gradients
  and AdamW's two moments: 16 bytes each;
- activations: per layer per token, ~12 hidden-size and 4 intermediate-size tensors in the
  training precision (norms, q/k/v/o, the SwiGLU's gate, up, activation and product) plus two
  float32 norm upcasts; with gradient checkpointing only each layer's input is kept, and one
  layer's full set is rebuilt at a time;
- logits: tokens x vocabulary in the training precision, their float32 copy for the loss, its
  log-softmax and gradient (14 bytes per entry at bf16): for a 150k vocabulary this, not the
  layers, is what a 16 x 2,048 micro-batch runs out of memory on;
- attention scores, only where attention is materialised (the CPU, where SDPA with a padding mask
  takes its math path, or `eager` attention): rows x heads x length^2 scores, probabilities and
  their gradient in float32, per layer kept (one layer with checkpointing). On a GPU, SDPA's
  memory-efficient and flash kernels keep none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
MARGIN = 1.2  # allocator fragmentation, temporaries the terms do not name
CUDA_OVERHEAD = 1 * GIB  # the CUDA context and cuBLAS workspaces


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: its size and the tensors' widths."""

    params: int
    trainable: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int = 0


@dataclass(frozen=True)
class Estimate:
    weights: int
    trainable_state: int
    activations: int
    logits: int
    overhead: int
    micro_batch: int
    seq_len: int
    checkpointing: bool
    attention: int = 0

    @property
    def total(self) -> int:
        return int((self.weights + self.trainable_state + self.activations + self.logits + self.attention) * MARGIN) \
            + self.overhead

    def as_dict(self) -> dict[str, Any]:
        return {"total_gib": round(self.total / GIB, 3), "weights_gib": round(self.weights / GIB, 3),
                "trainable_state_gib": round(self.trainable_state / GIB, 3),
                "activations_gib": round(self.activations / GIB, 3), "logits_gib": round(self.logits / GIB, 3),
                "attention_scores_gib": round(self.attention / GIB, 3),
                "overhead_gib": round(self.overhead / GIB, 3), "margin": MARGIN, "micro_batch": self.micro_batch,
                "seq_len": self.seq_len, "gradient_checkpointing": self.checkpointing}

    def describe(self) -> str:
        return (f"~{self.total / GIB:.2f} GiB (weights {self.weights / GIB:.2f}, LoRA state "
                f"{self.trainable_state / GIB:.2f}, activations {self.activations / GIB:.2f}, logits "
                f"{self.logits / GIB:.2f}, attention scores {self.attention / GIB:.2f}, x{MARGIN} margin, "
                f"+{self.overhead / GIB:.2f} overhead) for "
                f"{self.micro_batch} x {self.seq_len} tokens, gradient checkpointing "
                f"{'on' if self.checkpointing else 'off'}")


def estimate(shape: Shape, dtype_bytes: int, micro_batch: int, seq_len: int, checkpointing: bool,
             overhead: int = 0, materialised_attention: bool = False) -> Estimate:
    tokens = micro_batch * seq_len
    per_layer_token = dtype_bytes * (12 * shape.hidden + 4 * shape.intermediate) + 2 * 4 * shape.hidden
    if checkpointing:
        activations = tokens * (shape.layers * shape.hidden * dtype_bytes + per_layer_token)
    else:
        activations = tokens * shape.layers * per_layer_token
    scores = micro_batch * shape.heads * seq_len * seq_len * 4 * 3 if materialised_attention else 0
    return Estimate(weights=shape.params * dtype_bytes, trainable_state=shape.trainable * 16,
                    activations=activations, logits=tokens * shape.vocab * (dtype_bytes + 12),
                    overhead=overhead, micro_batch=micro_batch, seq_len=seq_len, checkpointing=checkpointing,
                    attention=scores * (1 if checkpointing else shape.layers))


def lora_trainable(config: Mapping[str, Any], rank: int, targets: tuple[str, ...]) -> int:
    """LoRA parameters of a Llama-shaped config: rank x (in + out) per wrapped projection per layer."""
    h, i = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or h // heads)
    q, kv = heads * head_dim, int(config.get("num_key_value_heads") or heads) * head_dim
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return int(config["num_hidden_layers"]) * sum(rank * sum(dims[t]) for t in targets if t in dims)


def shape_of(model: Any) -> Shape:
    """The Shape of a loaded (peft-wrapped or not) transformers model, parameters counted exactly."""
    cfg = model.config
    return Shape(params=sum(p.numel() for p in model.parameters()),
                 trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                 hidden=int(cfg.hidden_size), intermediate=int(getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)),
                 layers=int(cfg.num_hidden_layers), vocab=int(cfg.vocab_size),
                 heads=int(getattr(cfg, "num_attention_heads", 0) or 0))


def available(device: Any, budget_gb: float | None = None) -> tuple[int, str]:
    """(bytes, where the figure comes from): the budget given, the GPU's free memory, or the host's
    MemAvailable."""
    if budget_gb is not None:
        return int(budget_gb * GIB), "--memory-budget-gb"
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "the host's MemAvailable"
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "the host's free pages"


def fitting_shape(shape: Shape, dtype_bytes: int, effective_batch: int, seq_len: int, have: int,
                  overhead: int = 0, materialised_attention: bool = False) -> tuple[int, int] | None:
    """The largest micro-batch (a divisor of the effective batch) that fits with checkpointing on,
    and the accumulation that keeps the effective batch; None when not even one row fits."""
    for micro in range(effective_batch, 0, -1):
        if effective_batch % micro == 0 and \
                estimate(shape, dtype_bytes, micro, seq_len, True, overhead, materialised_attention).total <= have:
            return micro, effective_batch // micro
    return None


def check(est: Estimate, have: int, source: str, shape: Shape, dtype_bytes: int, effective_batch: int) -> None:
    """SystemExit with the numbers, and a shape that fits if there is one, when `est` exceeds `have`."""
    if est.total <= have:
        return
    fits = fitting_shape(shape, dtype_bytes, effective_batch, est.seq_len, have, est.overhead, est.attention > 0)
    hint = (f"--batch-size {fits[0]} --grad-accum {fits[1]} --gradient-checkpointing (the same effective batch "
            f"of {effective_batch}) fits" if fits else
            f"not even one row of {est.seq_len} tokens fits with gradient checkpointing: lower --max-length")
    raise SystemExit(f"llmserve: training will not fit: it needs {est.describe()}, and {source} is "
                     f"{have / GIB:.2f} GiB. {hint}")
