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
    from serve.contract.registry import WARMUP_S, EndpointRegistry

    now = [100.0]
    reg = EndpointRegistry(clock=lambda: now[0])
    assert reg.snapshot() is None
    now[0] += 1
    reg.register("m", "r1", "http://a", ttl_s=8)
    assert reg.snapshot() is None
    now[0] = 100.0 + WARMUP_S
    assert reg.snapshot() == {"m": [("r1", "http://a")]}

