"""What one served model is: its weights, vLLM engine arguments, Serve deployment (replicas,
autoscaling), price and LoRA adapters. One entry of the configuration's `models` (serve/config.py
holds the rest: the gateway, routes, cache, auth, batch, Ray)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.model.tiny import BUILTIN_TINY, TinySource, parse_tiny_source


class StrictModel(BaseModel):
    # Unknown keys are typos far more often than intent: reject them so a wrong name fails at start.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class EngineArgs(BaseModel):
    """vLLM engine arguments. The named fields are the common ones; any other vLLM engine argument
    may be given too and is passed through unchanged."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    dtype: str = Field("auto", description="Weight/activation dtype: auto, float16, bfloat16, float32.")
    max_model_len: int | None = Field(
        None, gt=0, description="Context length in tokens (prompt + output); default: the model's."
    )
    quantization: str | None = Field(None, description="Quantization method, e.g. awq, gptq, fp8.")
    enable_prefix_caching: bool | None = Field(
        None, description="Reuse KV cache blocks of shared prompt prefixes."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica shards the model over.")
    enforce_eager: bool | None = Field(
        None, description="Disable CUDA graphs / torch.compile (repeatable output, faster start)."
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of GPU memory vLLM may take for weights and KV cache."
    )
    max_num_seqs: int | None = Field(None, gt=0, description="Most sequences batched at once.")
    enable_lora: bool | None = Field(None, description="Serve LoRA adapters on this model.")
    max_lora_rank: int | None = Field(None, gt=0, description="Largest LoRA rank accepted.")

    def to_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class Autoscaling(StrictModel):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running.")
    max_replicas: int = Field(1, ge=1, description="Most replicas the autoscaler may start.")
    target_ongoing_requests: float = Field(
        16, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    # Defaults from bench/autoscale (docs/operations.md, Autoscaling): policy slo asks at once and
    # holds replicas for replica_start_s itself. For ray_default, Serve's own are 30 and 600.
    upscale_delay_s: float = Field(
        0, ge=0, description="Seconds a higher decision must hold before Serve adds replicas."
    )
    downscale_delay_s: float = Field(
        30, ge=0, description="Seconds a lower decision must hold before Serve removes replicas."
    )
    look_back_period_s: float = Field(
        30, gt=0, description="Window over which Serve averages the replicas' reported load."
    )
    # Excluded from model_dump(): Serve's autoscaling_config takes a policy as an import path
    # (serve_autoscaling_config() builds it), and would refuse this name.
    policy: Literal["ray_default", "slo"] = Field(
        "slo", exclude=True,
        description="ray_default: Serve's ongoing-requests policy; slo: serve.policies.autoscaling "
                    "(engine queue, KV cache, TTFT and the replica start time; bench/autoscale).",
    )
    target_requests_per_s: float | None = Field(
        None, gt=0, description="Policy slo: requests/s one replica serves within the TTFT target "
                                "(measure it: docs/operations.md, Autoscaling); none: scale on "
                                "target_ongoing_requests.",
    )
    ttft_target_s: float = Field(
        1.0, gt=0, description="Policy slo: time to first token above which replicas count as saturated."
    )
    replica_start_s: float = Field(
        420, ge=0, description="Policy slo: seconds from asking for a replica to its serving (node, "
                               "image pull, model load); a replica is given back only when the load "
                               "has not needed it for this long."
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self

    def serve_autoscaling_config(self, max_ongoing_requests: int | None = None) -> dict[str, Any]:
        """Ray Serve's ``autoscaling_config`` for this model, policy included. The policy is told
        the deployment's max_ongoing_requests: replicas at it get no more from the gateway."""
        slo = {"target_requests_per_s", "ttft_target_s", "replica_start_s"}
        out: dict[str, Any] = self.model_dump(exclude=slo)
        if self.policy == "slo":
            kwargs = {**self.model_dump(include=slo), "max_ongoing_requests": max_ongoing_requests}
            out["policy"] = {"policy_function": "serve.policies.autoscaling:SLOPolicy", "policy_kwargs": kwargs}
        return out


class DeploymentSpec(StrictModel):
    replicas: int = Field(1, ge=1, description="Fixed replica count (ignored when autoscaling is set).")
    autoscaling: Autoscaling | None = Field(None, description="Serve autoscaling; replaces replicas.")
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests one replica holds at once before Serve queues or rejects."
    )
    num_cpus: float = Field(1, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (per tensor-parallel worker).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. L4, A100, H100.")


class Price(StrictModel):
    input_per_million: float = Field(0.0, ge=0, description="USD per million prompt tokens.")
    output_per_million: float = Field(0.0, ge=0, description="USD per million completion tokens.")


class LoraAdapter(StrictModel):
    name: str = Field(description="Name clients put in `model` to reach this adapter.")
    path: str = Field(description="Local directory of a PEFT LoRA adapter.")
    price: Price | None = Field(None, description="Token prices; default: the base model's.")


class ModelSpec(StrictModel):
    name: str = Field(description="Model name clients put in `model`.", min_length=1)
    source: str = Field(
        description=(
            "Where the weights are: a local directory, a hub id (production), or "
            f"'{BUILTIN_TINY}?seed=N' for the tiny model the project builds itself, optionally with "
            "shape parameters as in its config.json: '&num_hidden_layers=4&hidden_size=256'."
        )
    )
    tokenizer: str | None = Field(None, description="Tokenizer source when it differs from `source`.")
    task: Literal["generate", "embed"] = Field("generate", description="generate (chat/completions) or embed.")
    accelerator: Literal["cpu", "gpu"] = Field("gpu", description="Where the engine runs.")
    engine: EngineArgs = Field(default_factory=lambda: EngineArgs(), description="vLLM engine arguments.")
    deployment: DeploymentSpec = Field(default_factory=lambda: DeploymentSpec(), description="Replicas and resources.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables for the engine replicas."
    )
    adapters: list[LoraAdapter] = Field(default_factory=list, description="LoRA adapters served on it.")
    price: Price = Field(default_factory=lambda: Price(), description="Token prices for cost accounting.")

    @field_validator("name")
    @classmethod
    def _name_chars(cls, v: str) -> str:
        if any(c.isspace() for c in v):
            raise ValueError("model names must not contain whitespace")
        return v

    @field_validator("source")
    @classmethod
    def _builtin_source(cls, v: str) -> str:
        if v.startswith("builtin://"):
            parse_tiny_source(v)  # an unknown parameter or bad value fails here, not in the engine
        return v

    @property
    def is_builtin_tiny(self) -> bool:
        return self.source.startswith(BUILTIN_TINY)

    @property
    def tiny(self) -> TinySource:
        return parse_tiny_source(self.source)

    @property
    def tiny_seed(self) -> int:
        return self.tiny.seed
