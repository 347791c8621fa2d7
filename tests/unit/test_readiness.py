"""serve/gateway/readiness.py: when a gateway is Ready (issue 28: a new cluster's gateways only
once every model there is, models scaled to zero aside)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from serve.config import Config
from serve.gateway.readiness import READY_HOLD_ENV, Readiness, decide, ready_hold_s, required_models, until_ready


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


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_until_ready_waits_for_the_first_ready_answer_then_the_probes_hold() -> None:
    """A gateway replica's __init__ (Serve's RUNNING, which KubeRay switches an upgrade's Service
    on) ends only once /health has left "starting" and the pod's probes have had time to see it."""
    clock = FakeClock()
    answers = iter(["starting", "starting", "starting", "ok"])
    waited = asyncio.run(until_ready(lambda: next(answers), 9.0, poll_s=0.5, sleep=clock.sleep, clock=clock))
    assert clock.slept == [0.5, 0.5, 0.5, 9.0]
    assert waited == 10.5


def test_until_ready_without_a_hold_returns_once_ready() -> None:
    clock = FakeClock()
    assert asyncio.run(until_ready(lambda: "degraded", 0.0, sleep=clock.sleep, clock=clock)) == 0.0
    assert clock.slept == []


def test_the_hold_is_the_charts_and_none_elsewhere() -> None:
    assert ready_hold_s({READY_HOLD_ENV: "9"}) == 9.0
    assert ready_hold_s({}) == 0.0  # llmserve run, a head gateway: nothing probes /health


def test_the_gateway_replica_is_running_only_after_its_hold(monkeypatch) -> None:
    """serve/launch/gateway_replica.py: GatewayServer.__init__ (what Serve waits for before RUNNING)
    listens first (the probes must reach /health), then waits for the gateway's own readiness and
    the chart's hold. Registry, uvicorn and discovery are stand-ins; the readiness is the real one."""
    from serve.gateway.service import Gateway
    from serve.launch import gateway_replica

    cfg = config({})
    answers = iter([0, 0, 1])  # m0's ready replicas, each time readiness is asked
    gateway = SimpleNamespace(config=cfg, readiness=Readiness(cfg.models),
                              backends=SimpleNamespace(ready_count=lambda name: next(answers)))
    gateway.health = lambda: Gateway.health(gateway)  # the real read of /health's status, on the stand-ins
    app = gateway_replica.ByPort.__new__(gateway_replica.ByPort)
    app.state = SimpleNamespace(gateway=gateway)
    listening: list[float] = []

    async def start_in_loop(config, sock):
        listening.append(time.monotonic())
        return SimpleNamespace(), asyncio.get_running_loop().create_future()

    monkeypatch.setattr(gateway_replica, "pod_config", lambda c: cfg)
    monkeypatch.setattr(gateway_replica, "get_registry", lambda ns: None)
    monkeypatch.setattr(gateway_replica, "build_gateway", lambda c, source: app)
    monkeypatch.setattr(gateway_replica, "listen", lambda a, c: None)
    monkeypatch.setattr(gateway_replica, "start_in_loop", start_in_loop)
    monkeypatch.setenv(READY_HOLD_ENV, "0.4")
    class Replica(gateway_replica.GatewayServer):
        def __del__(self) -> None:  # the real one stops uvicorn: there is none
            pass

    asyncio.run(Replica.__init__(Replica.__new__(Replica), {}))
    done = time.monotonic()
    assert gateway.readiness.complete
    # Two polls while m0 had no replica (0.5 s each), then the hold.
    assert done - listening[0] >= 2 * 0.5 + 0.4
