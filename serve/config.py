"""The one typed configuration of a deployment: models, their engines and replicas, and the gateway.

Loaded from one YAML file, then overridden from the environment with ``LLMSERVE__`` variables whose
``__``-separated parts name the field path (``LLMSERVE__GATEWAY__PORT=9000``,
``LLMSERVE__MODELS__0__DEPLOYMENT__REPLICAS=2``). The same schema is what the Helm chart's
``serve:`` values hold, so a cluster and a laptop read one format.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from serve.model.route import (  # noqa: F401 (the configuration's route entries, imported from here too)
    CacheSpec,
    CascadeSpec,
    GateSpec,
    PromptsSpec,
    RouteSpec,
    ShadowSpec,
    TierPrompt,
    models_of,
    prompts_refusal,
)
from serve.model.routing import RoutingSpec
from serve.model.spec import (  # noqa: F401 (the configuration's model entries, imported from here too)
    Autoscaling,
    DeploymentSpec,
    EngineArgs,
    LoraAdapter,
    ModelSpec,
    Price,
    StrictModel,
)
from serve.model.tiny import BUILTIN_TINY

ENV_PREFIX = "LLMSERVE__"
# The Redis URL (with its password) reaches every process from its environment, never from the
# configuration Serve is given or a runtime_env (Serve logs both and its dashboard shows them): the
# chart sets it from a Secret, `llmserve run` exports it before it starts Ray (serve/engine/cluster.py).
REDIS_URL_ENV = f"{ENV_PREFIX}CACHE__REDIS_URL"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the field."""


class GatewayAutoscaling(Autoscaling):
    """The gateway replicas' autoscaling: the same policy, on the gateway's requests in flight."""

    # At least one: the Service must have a gateway to send clients to.
    min_replicas: int = Field(1, ge=1, description="Fewest gateway replicas kept running.")
    # A gateway holds a stream open while an engine generates (seconds each) and spends little CPU
    # per relayed chunk: one CPU relays hundreds of streams, so 16 (the engines') would be far early.
    target_ongoing_requests: float = Field(256, gt=0, description="Open requests per gateway replica aimed for.")
    replica_start_s: float = Field(60, ge=0, description="Seconds a gateway pod takes to serve (CPU, no weights).")
    # Serve's default policy counts requests through Serve's handles; clients reach gateways around them.
    policy: Literal["slo"] = Field("slo", exclude=True, description="slo: on the gateway's own counts.")


class GatewaySpec(StrictModel):
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port the gateway listens on (0: any free port).")
    metrics_port: int = Field(
        9464, ge=0, le=65535,
        description="Port of the separate /metrics listener for Prometheus (key names and per-key spend "
                    "are not served on the public port); 0: any free port.",
    )
    metrics_host: str | None = Field(None, description="Address of the metrics listener; default: `host`.")
    responses_ttl_s: float = Field(
        30 * 86_400, gt=0,
        description="How long a stored Responses API response (`store: true`) can be retrieved or continued "
                    "with `previous_response_id` (kept in Redis, or in-process without one); a key's "
                    "`responses_ttl_s` may shorten it.",
    )
    responses_max_bytes: int = Field(
        1 << 20, gt=0,
        description="Largest stored Responses conversation (its input items and answer, as JSON): a turn "
                    "that would store more is answered but not stored (`store: false` in its body), and a "
                    "turn continuing more is refused (400).",
    )
    responses_max_turns: int = Field(
        64, gt=0, description="Most turns one `previous_response_id` chain may have; a longer one is refused (400).")
    responses_max_local: int = Field(
        10_000, gt=0, description="Without Redis: most responses this gateway keeps (oldest dropped first).")
    request_timeout_s: float = Field(
        300, gt=0, description="Longest a request may wait for an engine before it gets a 504."
    )
    connect_timeout_s: float = Field(5, gt=0, description="Longest to wait for an engine connection.")
    max_body_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="Largest accepted request body; larger gets 413."
    )
    discovery_interval_s: float = Field(
        1.0, gt=0, description="How often the gateway refreshes the list of engine replicas."
    )
    max_messages: int = Field(2048, gt=0, description="Most chat messages one request may carry.")
    default_model: str | None = Field(
        None, description="Model, adapter or route that serves a request sent without `model`, as a vLLM server "
                          "serves its one model. Unset: the one configured model when there is exactly one and "
                          "no routes; otherwise `model` is required.",
    )
    drain_timeout_s: float = Field(
        30, ge=0, description="On SIGTERM, how long in-flight requests and streams may take to finish."
    )
    autoscaling: GatewayAutoscaling | None = Field(
        None, description="Serve autoscaling of the gateway replicas (RayService); none: a fixed count."
    )
    reuse_port: bool = Field(
        False, description="Bind with SO_REUSEPORT so several gateway processes on one host share the ports "
                           "(the kernel spreads connections); also lifts one-replica-per-node on Ray."
    )
    adapter_roots: list[str] = Field(
        default_factory=list,
        description="Directories runtime adapter loading (POST /v1/llmserve/adapters) may load from; "
        "shared with the engines. Empty: only configured adapters' own paths.",
    )
    routing: RoutingSpec = Field(
        default_factory=lambda: RoutingSpec(), description="How a request's replica is chosen among a model's.")


class CacheStoreSpec(StrictModel):
    redis_url: str | None = Field(
        None, description="Redis holding the shared head cache (redis://host:6379/0); none: in-process only."
    )
    lru_size: int = Field(10_000, ge=0, description="Entries kept in each gateway's in-process LRU.")
    lru_max_bytes: int = Field(
        256 * 1024 * 1024, ge=0,
        description="Bytes of answers (as stored) each gateway's in-process LRU holds at most; the least "
                    "recently used go first.",
    )
    op_timeout_s: float = Field(0.2, gt=0, description="Longest a Redis call may take before it counts as down.")


class ApiKey(StrictModel):
    name: str = Field(description="Who the key belongs to; used in metrics and logs (never the key itself).")
    sha256: str = Field(
        description="Hex SHA-256 of the key (`llmserve hash-key`); keys are never stored in clear.",
        pattern=r"^[0-9a-f]{64}$",
    )
    models: list[str] = Field(
        default_factory=lambda: ["*"], description="Models and routes the key may use; '*' for all."
    )
    requests_per_minute: int | None = Field(None, gt=0, description="Request rate limit; none: the default.")
    tokens_per_minute: int | None = Field(None, gt=0, description="Token rate limit; none: the default.")
    max_concurrent_requests: int | None = Field(
        None, gt=0, description="Requests (streams included) the key may have in flight at once, across "
                                "gateways; none: the default.")
    max_stream_s: float | None = Field(
        None, gt=0, description="Longest a stream of this key may run before the gateway ends it; none: the default.")
    responses_ttl_s: float | None = Field(
        None, gt=0, description="How long this key's stored responses are kept, at most gateway.responses_ttl_s.")
    admin: bool = Field(False, description="May load adapters at runtime (student promotion).")
    cache_salt: str | None = Field(
        None, min_length=1, max_length=128, pattern=r"^[^@/\\\x00]+$",
        description="Sent to vLLM as each generate request's `cache_salt` (replacing the client's), so its "
                    "prefix cache shares no blocks, and no timing, with other keys; also keeps the key's "
                    "head-cache entries apart. vLLM's rule: at most 128 characters, no `@`, `/`, `\\` or NUL.",
    )
    storage_bytes: int | None = Field(
        None, gt=0, description="Bytes of batch files and batch results the key may hold at once; none: "
                                "batch.storage_bytes_per_key.",
    )


class AuthSpec(StrictModel):
    enabled: bool = Field(True, description="Require `Authorization: Bearer <key>` on /v1/*.")
    keys: list[ApiKey] = Field(default_factory=list, description="Keys given inline.")
    keys_file: str | None = Field(
        None, description="YAML/JSON list of keys (a mounted Kubernetes Secret); read at start."
    )
    default_requests_per_minute: int | None = Field(
        None, gt=0, description="Request limit for keys without their own; none: unlimited."
    )
    default_tokens_per_minute: int | None = Field(
        None, gt=0, description="Token limit for keys without their own; none: unlimited."
    )
    default_max_concurrent_requests: int | None = Field(
        None, gt=0, description="Requests in flight at once for keys without their own limit; none: unlimited."
    )
    default_max_stream_s: float | None = Field(
        None, gt=0, description="Longest stream for keys without their own limit; none: only "
                                "gateway.request_timeout_s between chunks applies."
    )
    assumed_context_tokens: int = Field(
        8192, gt=0, description="A model's context when its engine.max_model_len is not set: a request "
                                "without a max tokens field reserves the rest of it against the key's "
                                "token budget (the most vLLM would generate).")


class BatchSpec(StrictModel):
    enabled: bool = Field(True, description="Serve /v1/files and /v1/batches and run a batch worker.")
    db_path: str | None = Field(
        None, description="SQLite file for file and batch metadata; default: <cache dir>/batch/batch.db. "
                          "Ignored when database_url is set."
    )
    database_url: str | None = Field(
        None, pattern=r"^postgres(ql)?://",
        description="PostgreSQL for file and batch metadata (postgresql://user:password@host:port/db), "
                    "needed when more than one gateway runs: SQLite's locks do not hold across pods. "
                    "Unset: SQLite at db_path.",
    )
    storage_dir: str | None = Field(
        None, description="Directory for uploaded and result files; default: <cache dir>/batch/files. "
                          "With several gateways, a volume they and the batch worker all mount."
    )
    concurrency: int = Field(
        4, ge=1, description="Batch lines in flight at once (kept low so online requests keep priority)."
    )
    max_upload_bytes: int = Field(
        200 * 1024 * 1024, gt=0,
        description="Largest POST /v1/files request body (the file plus a few hundred bytes of form); "
                    "larger gets 413 as the bytes arrive and nothing is stored.",
    )
    storage_bytes_per_key: int = Field(
        10 * 1024**3, gt=0,
        description="Bytes of files (uploads, outputs) and unfinished batch results one key may hold; an "
                    "upload past it gets 400 storage_quota_exceeded, a batch 400 while the key is over it. "
                    "A key's own storage_bytes overrides it.",
    )
    retention_s: int = Field(
        30 * 86400, gt=0,
        description="Files and finished batches older than this are deleted by the batch worker (rows and "
                    "bytes), the input of a running batch only once it has finished.",
    )
    max_lines: int = Field(
        50_000, gt=0, description="Most requests in one batch input file (OpenAI's limit); more fails the batch.",
    )


class RaySpec(StrictModel):
    address: str | None = Field(
        None, description="Ray cluster to join ('auto' in a cluster); none starts a local one."
    )
    num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of a local Ray (more than cores lets engines and ingress fit)."
    )
    namespace: str = Field("llmserve", description="Ray namespace of the Serve apps and the registry.")
    observability: bool = Field(
        False,
        description="A local Ray (no `address`) collects metrics (its own and the engines' ray_vllm_* on its "
        "metrics export port) and task events (`ray list tasks`). Off: nothing reads them in a local run, and "
        "on a small host they take cycles from the engines (bench/README.md). A joined cluster keeps its own.",
    )


class Config(StrictModel):
    models: list[ModelSpec] = Field(description="Engines to serve, one Ray Serve deployment each.")
    gateway: GatewaySpec = Field(default_factory=lambda: GatewaySpec(), description="The OpenAI-compatible ingress.")
    ray: RaySpec = Field(default_factory=lambda: RaySpec(), description="Where engines run.")
    routes: list[RouteSpec] = Field(default_factory=list, description="Virtual models with policy chains.")
    cache: CacheStoreSpec = Field(default_factory=lambda: CacheStoreSpec(), description="Head-cache storage.")
    auth: AuthSpec = Field(default_factory=lambda: AuthSpec(), description="API keys and per-key rate limits.")
    batch: BatchSpec = Field(default_factory=lambda: BatchSpec(), description="The Batch API and its worker.")

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        for m in self.models:
            for name in [m.name, *(a.name for a in m.adapters)]:
                if name in seen:
                    raise ValueError(f"model name {name!r} is used twice")
                seen.add(name)
        if not self.models:
            raise ValueError("at least one model must be configured")
        for r in self.routes:
            if r.name in seen:
                raise ValueError(f"route name {r.name!r} is already a model or route name")
            seen.add(r.name)
        models = {n for m in self.models for n in [m.name, *(a.name for a in m.adapters)]}
        for r in self.routes:
            for ref in models_of(r):
                if ref not in models:
                    raise ValueError(f"route {r.name!r} names unknown model {ref!r}")
        tasks = {n: m.task for m in self.models for n in [m.name, *(a.name for a in m.adapters)]}
        refused = next((why for r in self.routes if (why := prompts_refusal(r, tasks))), None)
        if refused:
            raise ValueError(refused)
        return self

    @model_validator(mode="after")
    def _default_model_exists(self) -> Config:
        name = self.gateway.default_model
        names = {n for m in self.models for n in [m.name, *(a.name for a in m.adapters)]}
        if name is not None and name not in names | {r.name for r in self.routes}:
            raise ValueError(f"gateway.default_model {name!r} is not a configured model, adapter or route")
        return self

    def default_model(self) -> str | None:
        """What serves a request without `model`: gateway.default_model, else the only model when one
        model and no route are configured (vLLM serves its one model), else nothing."""
        if self.gateway.default_model is not None:
            return self.gateway.default_model
        return self.models[0].name if len(self.models) == 1 and not self.routes else None

    def route(self, name: str) -> RouteSpec | None:
        return next((r for r in self.routes if r.name == name), None)

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)


def default_config() -> Config:
    """The embedded default: the tiny built-in model on CPU, the gateway on 127.0.0.1:8000."""
    return Config.model_validate(
        {
            "models": [
                {
                    "name": "tiny",
                    "source": f"{BUILTIN_TINY}?seed=1",
                    "accelerator": "cpu",
                    "engine": {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True},
                    "deployment": {"max_ongoing_requests": 64},
                }
            ],
            "ray": {"num_cpus": 8},
            # Only the local default runs without keys; `llmserve run` says so loudly.
            "auth": {"enabled": False},
        }
    )


def _set_path(data: Any, parts: list[str], value: Any) -> None:
    """Set ``data[parts...] = value``, creating dicts as needed; numeric parts index lists."""
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = int(part)
            while len(node) <= idx:
                node.append({})
            if last:
                node[idx] = value
            else:
                node = node[idx]
        else:
            if last:
                node[part] = value
            else:
                nxt = node.get(part)
                if not isinstance(nxt, (dict, list)):
                    nxt = [] if parts[i + 1].isdigit() else {}
                    node[part] = nxt
                node = nxt


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return ``data`` with every ``LLMSERVE__A__B=value`` applied; values are parsed as YAML so
    numbers, booleans and lists keep their types."""
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if parts:
            _set_path(data, parts, yaml.safe_load(environ[key]))
    return data


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (or the embedded default) and apply environment overrides.

    Raises ConfigError naming the file and every offending field."""
    env = os.environ if environ is None else environ
    if path is None:
        data: dict[str, Any] = default_config().model_dump(mode="json")
        source = "the embedded default configuration"
    else:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"configuration file {source} does not exist") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"configuration file {source} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"configuration file {source} must hold a mapping at the top level")
        data = raw
    data = apply_env_overrides(data, env)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from e
