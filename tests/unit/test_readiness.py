"""serve/gateway/readiness.py: when a gateway is Ready (issue 28: a new cluster's gateways only
once every model there is, models scaled to zero aside)."""

from __future__ import annotations

import pytest

from serve.config import Config
from serve.gateway.readiness import Readiness, decide, required_models


def config(*deployments: dict) -> Config:
    return Config.model_validate({"auth": {"enabled": False}, "models": [
        {"name": f"m{i}", "source": "x", **({"deployment": d} if d else {})} for i, d in enumerate(deployments)]})


def test_required_models_are_those_kept_at_one_replica_or_more() -> None:
    cfg = config({}, {"replicas": 2}, {"autoscaling": {"min_replicas": 1, "max_replicas": 3}},
                 {"autoscaling": {"min_replicas": 0, "max_replicas": 2}})
    assert required_models(cfg.models) == {"m0", "m1", "m2"}


@pytest.mark.parametrize("ready, was, expected", [
    ({"a": 1, "b": 0, "z": 0}, False, ("starting", False)),  # b still loading: not Ready
    ({"a": 0, "b": 0, "z": 0}, False, ("starting", False)),
    ({"a": 1, "b": 2, "z": 0}, False, ("ok", True)),  # z is scaled to zero: it does not hold readiness
    ({"a": 1, "b": 1, "z": 1}, False, ("ok", True)),
    ({"a": 1, "b": 0, "z": 0}, True, ("degraded", True)),  # after complete: one model's outage keeps it Ready
    ({"a": 0, "b": 0, "z": 1}, True, ("degraded", True)),
    ({"a": 0, "b": 0, "z": 0}, True, ("starting", True)),  # nothing at all can be served
])
def test_decide(ready: dict[str, int], was: bool, expected: tuple[str, bool]) -> None:
    assert decide(ready, {"a", "b"}, was) == expected


def test_only_scaled_to_zero_models_is_ready_at_once() -> None:
    """Every model at min_replicas 0: nothing to wait for, or the gateway would never be Ready
    (and no request would ever reach it to start a replica)."""
    assert decide({"z": 0}, set(), False) == ("ok", True)


def test_the_latch_holds_across_calls() -> None:
    r = Readiness(config({}, {}).models)
    assert r({"m0": 1, "m1": 0}) == "starting"
    assert r({"m0": 1, "m1": 1}) == "ok"
    assert r({"m0": 1, "m1": 0}) == "degraded"
