"""The replica router's pure scoring (serve/policies/routing.py) and the policies Backends offers."""

import random

from serve.gateway.backends import Backends
from serve.model.routing import RoutingSpec
from serve.policies.affinity import rendezvous
from serve.policies.routing import CacheAwareRouter, prefix_digest

IDS = ["a", "b"]


def router(**kw) -> CacheAwareRouter:
    return CacheAwareRouter(**{"block_chars": 8, "max_blocks": 16, "capacity_chars": 8 * 64, **kw})


def prompt_whose_rendezvous_is(replica: str, ids=IDS, seed: int = 0) -> str:
    """A prompt (four 8-char blocks and some) whose new-prefix replica is `replica`, with a suffix
    of up to four more blocks too: a new prefix's key is its first half of blocks (min_match)."""
    rng = random.Random(seed)
    while True:
        text = "".join(rng.choice("abcdefgh") for _ in range(36))
        if all(rendezvous(prefix_digest(text[:k]), ids) == replica for k in (8, 16, 24, 32)):
            return text


def test_a_held_prefix_beats_the_rendezvous_choice():
    r = router()
    system = prompt_whose_rendezvous_is("a")
    # The prefix's first request goes to b, because a is busy: b's cache now holds it.
    assert IDS[r.choose("m", IDS, [5, 0], system + "question one?")] == "b"
    # Loads equal again: the prefix's next request follows the cache, not the hash.
    assert IDS[r.choose("m", IDS, [0, 0], system + "and question two")] == "b"
    assert IDS[r.choose("m", IDS, [1, 0], system + "a third one, here")] == "b"


def test_load_skew_overrides_a_hit_beyond_load_weight():
    r = router(load_weight=0.25)
    system = prompt_whose_rendezvous_is("a")
    assert IDS[r.choose("m", IDS, [0, 0], system)] == "a"
    # A whole-prefix hit (score 1) is worth 4 requests in flight: 3 more keeps it, 5 more moves it.
    assert IDS[r.choose("m", IDS, [3, 0], system)] == "a"
    assert IDS[r.choose("m", IDS, [5, 0], system)] == "b"
    # Now both hold it: the less loaded one wins.
    assert IDS[r.choose("m", IDS, [2, 1], system)] == "b"
    assert IDS[r.choose("m", IDS, [1, 2], system)] == "a"


def test_a_longer_match_wins_over_a_shorter_one():
    r = router()
    base = prompt_whose_rendezvous_is("a")
    r.choose("m", IDS, [0, 9], base[:24] + "x" * 16)  # a holds the first three blocks only
    r.choose("m", IDS, [9, 0], base)  # b holds all four
    assert IDS[r.choose("m", IDS, [0, 0], base + "tail")] == "b"


def test_lru_eviction_forgets_what_the_replica_no_longer_holds():
    r = router(capacity_chars=8 * 8)  # 8 blocks a replica
    system = prompt_whose_rendezvous_is("a")
    assert IDS[r.choose("m", IDS, [9, 0], system)] == "b"  # b holds its 4 blocks
    assert IDS[r.choose("m", IDS, [0, 0], system)] == "b"
    others = [prompt_whose_rendezvous_is("b", seed=s) for s in range(1, 4)]
    for text in others:  # 12 more blocks through b: the capacity is 8
        assert IDS[r.choose("m", IDS, [9, 0], text)] == "b"
    assert r.held_blocks("m", "b") == 8
    # The prefix is gone from b's index: it is new again and goes to its rendezvous replica.
    assert IDS[r.choose("m", IDS, [0, 0], system)] == "a"


def test_a_reused_prefix_stays_while_others_are_evicted():
    r = router(capacity_chars=8 * 8)  # two prompts' worth
    system = prompt_whose_rendezvous_is("a")
    one, two = (prompt_whose_rendezvous_is("b", seed=s) for s in (1, 2))
    for text in (system, one, system, two):  # used again after `one`: `one` is the oldest now
        assert IDS[r.choose("m", IDS, [9, 0], text)] == "b"
    assert IDS[r.choose("m", IDS, [0, 0], system)] == "b"


def test_the_tail_of_a_prefix_is_evicted_before_its_head():
    r = router(capacity_chars=8 * 4)
    system = prompt_whose_rendezvous_is("a")
    r.choose("m", IDS, [9, 0], system)  # b: 4 blocks, full
    r.choose("m", IDS, [9, 0], "zzzzzzzz")  # one more block: one of the prefix's goes
    # Its first three blocks still match (a partial hit), so b still wins on equal load.
    assert IDS[r.choose("m", IDS, [0, 0], system)] == "b"
    assert r.held_blocks("m", "b") == 4


def test_a_replica_that_reports_a_smaller_cache_is_trimmed():
    r = router()
    r.choose("m", IDS, [9, 0], prompt_whose_rendezvous_is("a"))
    r.set_capacity("m", "b", 8 * 2)
    assert r.held_blocks("m", "b") == 2


def test_lora_requests_prefer_the_replica_their_adapter_was_sent_to():
    r = router()
    new = prompt_whose_rendezvous_is("a")
    r.choose("m", IDS, [9, 0], "adapter warm-up text", adapter="lora-x")  # lora-x active on b
    assert IDS[r.choose("m", IDS, [0, 0], new, adapter="lora-x")] == "b"
    assert IDS[r.choose("m", IDS, [0, 0], new + "!", adapter=None)] == "a"  # the base model: no preference
    # An adapter's cached blocks are not the base model's (vLLM keys blocks by adapter).
    assert r.blocks(new, "lora-x")[0] != r.blocks(new)[0]


def test_the_adapter_bonus_decides_between_equal_hits():
    r = router(lora_slots=1)
    text = prompt_whose_rendezvous_is("a")
    r.choose("m", IDS, [0, 9], text, adapter="lora-x")
    r.choose("m", IDS, [0, 9], "another text here", adapter="lora-y")  # a's one slot: lora-y
    r.choose("m", IDS, [9, 0], text, adapter="lora-x")  # b holds the prefix and lora-x
    assert IDS[r.choose("m", IDS, [0, 0], text, adapter="lora-x")] == "b"


def test_one_lora_slot_keeps_only_the_newest_adapter():
    r = router(lora_slots=1)
    r.choose("m", IDS, [9, 0], "adapter warm-up text", adapter="lora-x")
    r.choose("m", IDS, [9, 0], "adapter warm-up text", adapter="lora-y")  # replaces lora-x on b
    assert IDS[r.choose("m", IDS, [0, 0], prompt_whose_rendezvous_is("a"), adapter="lora-x")] == "a"


def test_new_prefixes_agree_across_independent_routers():
    """Two gateways, each with its own index and history, place a new prefix on the same replica."""
    ids = [f"r{i}" for i in range(8)]
    one, two = router(), router()
    rng = random.Random(3)
    for i in range(50):  # different histories
        one.choose("m", ids, [rng.randrange(3) for _ in ids], f"history of gateway one, item {i}")
    chosen = []
    for i in range(40):
        text = f"a new prefix number {i} " * 3
        loads = [0] * 8
        a, b = one.choose("m", ids, loads, text), two.choose("m", ids, loads, text)
        assert a == b
        chosen.append(a)
    assert len(set(chosen)) >= 5  # and they spread over the replicas


def test_equal_scores_go_to_the_rendezvous_replica_on_every_gateway():
    ids = [f"r{i}" for i in range(4)]
    for text in (f"a shared system prompt, tenant {t}, " * 2 for t in range(8)):
        one, two = router(), router()
        for r in (one, two):  # every replica holds the prefix, in another order on each gateway
            for i in (range(4) if r is one else reversed(range(4))):
                r.choose("m", ids, [0 if j == i else 9 for j in range(4)], text)
        assert one.choose("m", ids, [1] * 4, text) == two.choose("m", ids, [1] * 4, text) \
            == ids.index(rendezvous(one.new_prefix_key(text), ids))


def test_a_new_prefix_skips_a_rendezvous_replica_beyond_the_slack():
    r = router(slack=2)
    text = prompt_whose_rendezvous_is("a")
    assert IDS[r.choose("m", IDS, [2, 0], text + "1")] == "a"
    assert IDS[CacheAwareRouter(block_chars=8, slack=2).choose("m", IDS, [3, 0], text + "2")] == "b"


def test_blocks_are_capped_and_chained():
    r = router(max_blocks=16)
    assert len(r.blocks("x" * 10_000)) == 16
    assert len(r.blocks("x" * 15)) == 1  # only whole blocks
    # Same block text at another position (after another prefix) is another block.
    assert r.blocks("aaaaaaaabbbbbbbb")[1] != r.blocks("ccccccccbbbbbbbb")[1]


def test_gone_replicas_are_forgotten():
    r = router()
    r.choose("m", IDS, [9, 0], prompt_whose_rendezvous_is("a"))
    r.retain({"m": {"a"}})
    assert r.held_blocks("m", "b") == 0


# ---- the policies as Backends runs them ----------------------------------------------------------
def backends(policy: str, n: int = 3) -> Backends:
    b = Backends(rng=random.Random(0), routing=RoutingSpec(policy=policy, block_chars=8))
    b.update({"m": [(f"r{i}", f"http://r{i}") for i in range(n)]})
    return b


def test_round_robin_cycles_over_live_replicas():
    b = backends("round_robin")
    assert [b.pick("m", affinity="same prompt").replica_id for _ in range(6)] == ["r0", "r1", "r2"] * 2
    assert b.pick("m", exclude={"r1"}).replica_id in {"r0", "r2"}


def test_least_loaded_ignores_the_prompt():
    b = backends("least_loaded")
    for ep in b.endpoints("m"):
        ep.in_flight = 0 if ep.replica_id == "r2" else 3
    assert {b.pick("m", affinity=f"prompt {i}").replica_id for i in range(10)} == {"r2"}


def test_prefix_affinity_is_the_rendezvous_of_256_characters_with_slack():
    b = backends("prefix_affinity")
    text = "s" * 256
    want = rendezvous(text, ["r0", "r1", "r2"])
    assert {b.pick("m", affinity=text + f" tail {i}").replica_id for i in range(5)} == {want}
    eps = {e.replica_id: e for e in b.endpoints("m")}
    eps[want].in_flight = 4
    assert b.pick("m", affinity=text).replica_id == want
    eps[want].in_flight = 5
    assert b.pick("m", affinity=text).replica_id != want


def test_cache_aware_backends_follow_where_a_prefix_was_sent():
    b = backends("cache_aware")
    assert b.affinity_chars == 8 * 32
    eps = {e.replica_id: e for e in b.endpoints("m")}
    system = "you are a helpful shop assistant. " * 4
    first = b.pick("m", affinity=system + "where is my order?")
    first.in_flight += 1
    # Its prefix's next request goes there too, though it is now the busiest.
    assert b.pick("m", affinity=system + "can I return it?").replica_id == first.replica_id
    first.in_flight = 9
    assert b.pick("m", affinity=system + "and a refund?").replica_id != first.replica_id
    assert b.pick("m", affinity=None).replica_id != first.replica_id  # no prompt: least loaded
    eps[first.replica_id].in_flight = 0


def test_replicas_gone_from_discovery_leave_the_index():
    b = backends("cache_aware", n=2)
    ep = b.pick("m", affinity="y" * 64)
    assert b.router.held_blocks("m", ep.replica_id) == 8
    b.update({"m": [(e.replica_id, e.url) for e in b.endpoints("m") if e is not ep]})
    assert b.router.held_blocks("m", ep.replica_id) == 0


def test_one_replica_costs_no_index():
    b = backends("cache_aware", n=1)
    assert b.pick("m", affinity="x" * 200).replica_id == "r0"
    assert b.router.held_blocks("m", "r0") == 0


def test_an_engines_own_load_and_cache_size_count():
    b = backends("cache_aware", n=2)
    eps = {e.replica_id: e for e in b.endpoints("m")}
    system = "shared system prompt of some length " * 4
    home = b.pick("m", affinity=system + "one").replica_id
    away = ({"r0", "r1"} - {home}).pop()
    # Other gateways' requests on `home`, as its engine reports them: the prefix moves.
    b.engine_report(eps[home], unfinished=6, kv_cache_tokens=0)
    assert b.pick("m", affinity=system + "two").replica_id == away
    b.engine_report(eps[home], unfinished=0, kv_cache_tokens=0)
    b.engine_report(eps[away], unfinished=0, kv_cache_tokens=0)
    # A reported KV cache of 4 tokens holds 16 characters: the index forgets all but 2 blocks.
    b.engine_report(eps[away], unfinished=0, kv_cache_tokens=4)
    assert b.router.held_blocks("m", away) == 2


def test_chats_sharing_only_a_short_system_prompt_spread_and_a_long_shared_header_stays_together():
    """A new prefix is placed by its first min_match share of blocks, not by fixed first characters:
    chats whose shared app prompt is under half of their first turn are different prefixes and
    spread (by the first 256 characters all 40 went to one replica in bench-routing's
    conversations); a tenant's long system prompt with short questions is one prefix."""
    ids = [f"r{i}" for i in range(4)]
    r = CacheAwareRouter(block_chars=64, max_blocks=32)
    system = "assistant rules: " + "be brief and polite. " * 12  # ~270 characters, 4 blocks
    chats = [system + f"chat {c}: " + " ".join(f"word{c}x{w}" for w in range(90)) for c in range(40)]
    placed = [ids[r.choose("m", ids, [0] * 4, text)] for text in chats]
    assert min(placed.count(i) for i in ids) >= 5  # every replica takes a share (40 over 4)
    tenant = "tenant seven's instructions: " + "answer from the manual. " * 60  # ~1,450 characters
    fresh = CacheAwareRouter(block_chars=64, max_blocks=32)
    first = fresh.choose("m", ids, [0] * 4, tenant + "question one?")
    other = CacheAwareRouter(block_chars=64, max_blocks=32)  # another gateway, no history
    assert other.choose("m", ids, [0] * 4, tenant + "and a different question") == first


def test_a_new_prefix_goes_to_the_least_busy_replica_with_no_slack():
    """new_prefix_slack 0: a unique prompt goes to the least busy replica even where its rendezvous
    replica is busier by one request, and only a tie falls to the rendezvous (what every gateway
    computes alike); the default (4) keeps the rendezvous replica that much busier. The spec's
    field, not prefix_affinity's `slack`, reaches the router."""
    text = prompt_whose_rendezvous_is("a")
    assert IDS[router(slack=0).choose("m", IDS, [1, 0], text)] == "b"
    assert IDS[router(slack=0).choose("m", IDS, [0, 0], text)] == "a"
    assert IDS[router().choose("m", IDS, [1, 0], text)] == "a"
    backends = Backends(routing=RoutingSpec(new_prefix_slack=1, slack=0))
    assert backends.router.slack == 1  # the spec's field reaches the router; prefix_affinity's does not
    assert IDS[backends.router.choose("m", IDS, [1, 0], text)] == "a"
