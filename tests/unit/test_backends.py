import random

from serve.contract.registry import EndpointTable
from serve.gateway.backends import Backends


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_picks_least_in_flight_and_excludes():
    b = Backends(rng=random.Random(0))
    b.update({"m": [("r1", "http://a"), ("r2", "http://b")]})
    first = b.pick("m")
    first.in_flight += 1
    second = b.pick("m")
    assert second.replica_id != first.replica_id
    assert b.pick("m", exclude={"r1", "r2"}) is None
    assert b.pick("unknown") is None


def test_mark_down_expires():
    clock = Clock()
    b = Backends(down_s=5, clock=clock)
    b.update({"m": [("r1", "http://a")]})
    b.mark_down(b.pick("m"))
    assert b.pick("m") is None and b.ready_count("m") == 0
    clock.t = 6
    assert b.pick("m").replica_id == "r1"


def test_update_keeps_counts_of_known_replicas_and_drops_gone():
    b = Backends()
    b.update({"m": [("r1", "http://a"), ("r2", "http://b")]})
    b.endpoints("m")[0].in_flight = 3
    b.update({"m": [("r1", "http://a")]})
    (ep,) = b.endpoints("m")
    assert ep.replica_id == "r1" and ep.in_flight == 3
    b.update({"m": [("r1", "http://moved")]})
    assert b.endpoints("m")[0].in_flight == 0  # a new address is a new replica


def test_registry_table_expires_entries():
    t = EndpointTable()
    t.register("m", "r1", "http://a", ttl_s=5, now=0)
    t.register("m", "r2", "http://b", ttl_s=5, now=3)
    assert t.snapshot(now=4) == {"m": [("r1", "http://a"), ("r2", "http://b")]}
    assert t.snapshot(now=6) == {"m": [("r2", "http://b")]}
    t.unregister("r2")
    assert t.snapshot(now=6) == {}


def test_a_restarted_registry_answers_nothing_known_until_the_engines_beat_again():
    """A registry started while engines serve (a new head after the old one was lost) knows none of
    them yet: it answers None until their heartbeats are in, so gateways keep the replicas they knew
    rather than drop live ones (issue 28: a lost head survived)."""
    from serve.contract.registry import RESTART_WARMUP_S, WARMUP_S, EndpointRegistry

    for restarted, warmup in ((False, WARMUP_S), (True, RESTART_WARMUP_S)):
        now = [100.0]
        reg = EndpointRegistry(clock=lambda now=now: now[0], restarted=restarted)
        assert reg.snapshot() is None
        now[0] += 1
        reg.register("m", "r1", "http://a", ttl_s=8)
        now[0] = 100.0 + warmup - 0.1
        reg.register("m", "r1", "http://a", ttl_s=8)
        assert reg.snapshot() is None, restarted
        now[0] = 100.0 + warmup
        assert reg.snapshot() == {"m": [("r1", "http://a")]}
    # After a lost head the engines' heartbeats reached the restarted registry 13-30 s late.
    assert RESTART_WARMUP_S > 30 and WARMUP_S < 10


def test_the_registry_knows_whether_ray_restarted_it(monkeypatch):
    """Outside Ray (or in an actor's first life) the short warm-up; in a restarted actor the long one."""
    import ray

    from serve.contract import registry

    assert registry._restarted() is False  # no Ray here
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    ctx = type("Ctx", (), {"was_current_actor_reconstructed": True})()
    monkeypatch.setattr(ray, "get_runtime_context", lambda: ctx)
    assert registry.EndpointRegistry(clock=lambda: 0.0)._warmup_s == registry.RESTART_WARMUP_S
    ctx.was_current_actor_reconstructed = False
    assert registry.EndpointRegistry(clock=lambda: 0.0)._warmup_s == registry.WARMUP_S

