"""What one route is: a virtual model whose requests run through the gateway's policy chain
(head cache, cascade, fallback, shadow traffic, the student gate). Part of the one typed
configuration (serve/config.py exports every name here too)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field, model_validator

from serve.model.spec import StrictModel


class CacheSpec(StrictModel):
    enabled: bool = Field(True, description="Look requests up in the head cache.")
    cacheable: bool = Field(
        False, description="Cache even non-deterministic requests (temperature > 0) on this route."
    )
    ttl_s: float = Field(86_400, gt=0, description="How long an entry lives.")
    normalize_whitespace: bool = Field(True, description="Collapse whitespace in messages for the key.")
    normalize_case: bool = Field(False, description="Lower-case messages for the key.")
    store_online: bool = Field(
        True, description="Store deterministic online answers too (not only batch-filled ones)."
    )
    scope: Literal["route", "key"] = Field(
        "route", description="Who shares an entry: `route`, every key of the route; `key`, only the API key "
                             "that made it (a tenant's cached answers stay its own).",
    )


class CascadeSpec(StrictModel):
    student: str = Field(description="Model or adapter that answers first.")
    teacher: str = Field(description="Model that answers when the student is unsure.")
    min_mean_logprob: float = Field(
        -2.0, description="Escalate when the student's mean token logprob is below this."
    )
    escalate_on_length: bool = Field(True, description="Escalate when the student hit max_tokens.")
    escalate_on_schema_failure: bool = Field(
        True, description="Escalate when the student's output fails the requested json_schema."
    )
    refusal_patterns: list[str] | None = Field(
        None, description="Regexes that mark a refusal (escalate); default: a built-in English set."
    )
    max_student_tokens: int = Field(
        512, gt=0, description="Bound on the student's buffered answer (its max_tokens is capped to it)."
    )
    decide_after_tokens: int | None = Field(
        None, gt=0,
        description="Streamed chat/completions requests: decide on the student's first this-many tokens, "
        "then stream its answer (or the teacher's); time to first byte is the student's time to these "
        "tokens. None: decide on the whole answer, buffered (a requested json schema always does).",
    )


class ShadowSpec(StrictModel):
    model: str = Field(description="Candidate model or adapter that gets a copy of live requests.")
    fraction: float = Field(0.1, ge=0, le=1, description="Share of the route's requests mirrored to it.")


class GateSpec(StrictModel):
    metric: Literal["exact_match", "token_overlap", "json_valid", "json_field_match", "embedding_similarity",
                    "judge"] = Field(
        "token_overlap", description="Evaluation metric a candidate student is judged on (embedding_similarity and "
                                     "judge: `students eval --embedding-model / --judge`)."
    )
    min_score: float = Field(
        0.5, ge=0, le=1,
        description="What the lower bound of the score's confidence interval (one-sided Wilson) must reach to promote.")
    min_samples: int = Field(30, ge=1, description="Fewest evaluated labels a promotion may rest on.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence of the interval's lower bound.")
    require_training_split: bool = Field(
        True, description="Refuse an evaluation whose labels were not checked against the weights' training split "
                          "(the manifest `students train` writes beside the adapter).")


class Message(StrictModel):
    role: Literal["system", "user", "assistant"] = Field(description="Chat role of this example message.")
    content: str = Field(description="Its text.")


class TierPrompt(StrictModel):
    """What one tier is told before the client's own input: instructions and worked examples."""

    system: str | None = Field(None, description="Instructions, sent as the first (system) message.")
    examples: list[Message] = Field(
        default_factory=list, description="Few-shot messages sent after the instructions, before the client's.")


class PromptsSpec(StrictModel):
    """Per-tier prompts: the teacher needs long instructions and examples, a student trained on the
    teacher's answers only the client's short input. Applied by the gateway where the route sends to
    each tier (serve/policies/tier_prompt.py); part of the head-cache key."""

    teacher: TierPrompt | None = Field(
        None, description="Sent to the teacher, the route's target and its fallbacks (any model but the student).")
    student: TierPrompt | None = Field(
        None, description="Sent to the cascade's student and its shadow candidate (None: the client's input alone).")


class RouteSpec(StrictModel):
    name: str = Field(description="Virtual model name clients put in `model`.", min_length=1)
    target: str | None = Field(None, description="Model that serves the route (when there is no cascade).")
    cascade: CascadeSpec | None = Field(None, description="Student/teacher cascade instead of one target.")
    fallback: list[str] = Field(
        default_factory=list, description="Models tried in order when the primary fails or is overloaded."
    )
    max_attempts: int = Field(3, ge=1, description="Most models tried for one request.")
    cache: CacheSpec | None = Field(None, description="Head cache in front of the route; none disables it.")
    shadow: ShadowSpec | None = Field(None, description="Mirror live traffic to a candidate (answers unaffected).")
    gate: GateSpec | None = Field(None, description="What a student must score to be promoted on this route.")
    prompts: PromptsSpec | None = Field(
        None, description="Per-tier prompts: what the teacher and the student are each told before the client's "
                          "input (chat and Responses requests; completions get it as leading text).")

    @model_validator(mode="after")
    def _one_target(self) -> RouteSpec:
        if (self.target is None) == (self.cascade is None):
            raise ValueError("a route needs exactly one of `target` or `cascade`")
        return self


def models_of(route: RouteSpec) -> list[str]:
    """Every model or adapter the route may send to: its target or cascade, fallbacks and shadow."""
    return [*([route.target] if route.target else []),
            *([route.cascade.student, route.cascade.teacher] if route.cascade else []),
            *route.fallback, *([route.shadow.model] if route.shadow else [])]


def prompts_refusal(route: RouteSpec, tasks: Mapping[str, str]) -> str | None:
    """Why the route's per-tier prompts cannot be configured (None: they can). `tasks`: model or
    adapter name -> its model's task.

    An embedding (or score, or rerank) request's answer is a function of its input alone: an
    instruction put before that input would change every vector and score it returns, silently
    (no field of the answer shows it), and the gateway applies tier prompts to chat, completions and
    Responses only. So a route with prompts that can reach an embedding model is refused at load,
    where its operator reads why, rather than served with prompts that either do nothing or move
    every vector. (An instruction-tuned embedder's query prefix is part of the client's input.)"""
    if route.prompts is None:
        return None
    embed = [m for m in dict.fromkeys(models_of(route)) if tasks.get(m) == "embed"]
    if not embed:
        return None
    return (f"route {route.name!r} has per-tier `prompts`, but {', '.join(repr(m) for m in embed)} "
            f"{'is an embedding model' if len(embed) == 1 else 'are embedding models'} (task: embed): embeddings "
            f"and scores are computed on the client's input alone, and a prompt before it would change every "
            f"vector silently; remove `prompts` from this route, or give the embedding model a route of its own")
