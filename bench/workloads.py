"""Seeded traffic for `make bench-routing` (bench/routing.py): pure generators, no I/O, no router in
mind. Each returns the requests of one workload in order; the replayer (bench/routing_load.py)
sends a request at `at` seconds after the start, or, when it names `after`, `at` seconds after that
request has finished (a conversation's next turn).

Text is drawn from the tiny model's own corpus words (serve/model/corpus.py), ~1.35 of its tokens
a word; bench/routing.py counts the real tokens with the model's tokenizer before a run.

    tenants        (i)   tenants with long system prompts, short questions, Poisson arrivals
    conversations  (ii)  multi-turn chats, each turn resending the whole history
    zipf           (iii) Zipf(s) repeats over a fixed set of distinct queries
    uniform        (iv)  prompts of one length with no reuse at all
    with_adapters  (v)   any of the above with a share of the requests on LoRA adapters
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from serve.model.corpus import CORPUS

# The corpus's words in a fixed order (sorted), so a seed means the same text on every machine.
WORDS = tuple(sorted({w.strip(".,;:!?\"'()").lower() for w in CORPUS.split()} - {""}))
BASE_MODEL = "tiny"


@dataclass(frozen=True)
class Request:
    """One chat completion of a workload. `group` names the unit of reuse (a tenant, a conversation,
    a distinct query; unique for no reuse): the analysis counts distinct prefixes by it."""

    id: int
    messages: tuple[tuple[str, str], ...]  # (role, content), as sent
    at: float  # seconds after the start, or after `after` finished
    group: str
    model: str = BASE_MODEL
    after: int | None = None
    max_tokens: int = 16

    def body(self, salt: str = "") -> dict:
        """The request body; `salt` is put before the first message's text, so a run of the same
        workload on the same engines never finds the previous run's blocks in their caches."""
        msgs = [{"role": r, "content": c} for r, c in self.messages]
        if salt:
            msgs[0] = {**msgs[0], "content": f"{salt} {msgs[0]['content']}"}
        return {"model": self.model, "messages": msgs, "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def poisson_times(rng: random.Random, n: int, rate: float) -> list[float]:
    """Arrival times of a Poisson process of `rate` per second: exponential gaps, the first at 0."""
    t, out = 0.0, []
    for _ in range(n):
        out.append(round(t, 4))
        t += rng.expovariate(rate)
    return out


def tenants(requests: int, seed: int = 0, tenants: int = 16, system_words: int = 1480,
            question_words: tuple[int, int] = (8, 24), rate: float = 1.0, max_tokens: int = 16) -> list[Request]:
    """(i) `tenants` apps, each with its own system prompt (~2,000 tokens at the default), asking
    short questions; the tenant of each request uniform at random, arrivals Poisson at `rate`."""
    rng = random.Random(seed)
    systems = [f"tenant {t}: " + text(rng, system_words) for t in range(tenants)]
    times = poisson_times(rng, requests, rate)
    out = []
    for i, at in enumerate(times):
        t = rng.randrange(tenants)
        q = text(rng, rng.randint(*question_words)) + "?"
        out.append(Request(i, (("system", systems[t]), ("user", q)), at, f"tenant-{t}", max_tokens=max_tokens))
    return out


def conversations(conversations: int = 32, turns: int = 6, seed: int = 0, system_words: int = 150,
                  opening_words: int = 380, user_words: int = 40, reply_words: int = 60,
                  start_rate: float = 1.0, think_s: float = 2.0, max_tokens: int = 16) -> list[Request]:
    """(ii) chats of `turns` turns: an app's system prompt shared by every chat, an opening message
    carrying the chat's own material, then questions; each turn resends the whole history, the
    earlier answers included (fixed text standing for them, so the workload stays pure and the
    history of turn k+1 extends turn k's prompt token for token). Chats start Poisson at
    `start_rate`; each later turn is sent a random think time (mean `think_s`) after the previous
    one finished."""
    rng = random.Random(seed)
    system = "assistant rules: " + text(rng, system_words)
    starts = poisson_times(rng, conversations, start_rate)
    out: list[Request] = []
    for c, start in enumerate(starts):
        history: list[tuple[str, str]] = [("system", system)]
        prev: int | None = None
        for k in range(turns):
            user = (f"chat {c}: " + text(rng, opening_words)) if k == 0 else text(rng, user_words) + "?"
            history.append(("user", user))
            at = start if prev is None else round(rng.expovariate(1 / think_s), 4)
            req = Request(len(out), tuple(history), at, f"chat-{c}", after=prev, max_tokens=max_tokens)
            out.append(req)
            history.append(("assistant", text(rng, reply_words)))
            prev = req.id
    # In order of their first possible send: chats interleave as they start.
    return out


def zipf_weights(n: int, s: float) -> list[float]:
    return [1 / (k ** s) for k in range(1, n + 1)]


def zipf(requests: int, seed: int = 0, distinct: int = 1000, s: float = 1.1, query_words: int = 400,
         rate: float = 2.0, max_tokens: int = 16) -> list[Request]:
    """(iii) `requests` draws, Zipf(`s`) over `distinct` queries of ~`query_words` words (rank 1
    most frequent), Poisson arrivals at `rate`."""
    rng = random.Random(seed)
    queries = [f"query {q}: " + text(rng, query_words) for q in range(distinct)]
    ranks = rng.choices(range(distinct), weights=zipf_weights(distinct, s), k=requests)
    times = poisson_times(rng, requests, rate)
    return [Request(i, (("user", queries[q]),), at, f"query-{q}", max_tokens=max_tokens)
            for i, (q, at) in enumerate(zip(ranks, times, strict=True))]


def uniform(requests: int, seed: int = 0, prompt_words: int = 700, rate: float = 4.0,
            max_tokens: int = 16) -> list[Request]:
    """(iv) prompts of `prompt_words` random words, each its own: nothing to reuse, only load to
    spread. Arrivals Poisson at `rate` (the default saturates two tiny CPU replicas, so the run
    measures throughput, where an uneven spread shows)."""
    rng = random.Random(seed)
    times = poisson_times(rng, requests, rate)
    return [Request(i, (("user", f"prompt {i}: " + text(rng, prompt_words)),), at, f"unique-{i}",
                    max_tokens=max_tokens) for i, at in enumerate(times)]


def with_adapters(reqs: Sequence[Request], adapters: Sequence[str], share: float = 0.5) -> list[Request]:
    """(v) the same requests with about `share` of them on the LoRA `adapters`: by group, so a
    tenant (or chat) keeps one model, as an app does; the groups, in order of first appearance,
    alternate base / adapters (share 0.5 with two adapters: base, a, base, b, ...). A prefix cached
    for one model is never a hit for another (vLLM keys blocks by adapter), so the distinct prefixes
    are as many as without adapters."""
    if not adapters:
        return list(reqs)
    groups = list(dict.fromkeys(r.group for r in reqs))
    every = max(1, round(1 / share)) if share > 0 else 0
    model_of: dict[str, str] = {}
    k = 0
    for i, g in enumerate(groups):
        if every and i % every == every - 1:
            model_of[g] = adapters[k % len(adapters)]
            k += 1
        else:
            model_of[g] = BASE_MODEL
    return [replace(r, model=model_of[r.group]) for r in reqs]


def prefix_words(reqs: Sequence[Request]) -> dict[str, int]:
    """Words of each group's longest prompt: the distinct prefix material it puts in a cache (a
    conversation's last turn holds every earlier one)."""
    out: dict[str, int] = {}
    for r in reqs:
        n = sum(len(c.split()) for _, c in r.messages)
        out[r.group] = max(out.get(r.group, 0), n)
    return out
