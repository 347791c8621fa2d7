"""What the demo (serve/cli/demo.py) teaches its tiny teacher, and how it shows a cache entry's
provenance: the pure and small parts of the loop, kept apart from the loop itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve.config import Config, TierPrompt

MAX_TOKENS = 24  # every FAQ answer fits, with its end of turn
# What the demo's teacher is taught to answer: one answer per topic of `cache synth-log`'s queries.
FAQ = {
    "order": "Open your orders page and choose the order.",
    "refund": "A refund is paid back within three days.",
    "password": "Open the settings page and follow the reset link.",
    "delivery": "Your order is on its way and should arrive soon.",
    "invoice": "Open the billing page to download the invoice.",
    "warranty": "The warranty covers two years.",
    "address": "Open the settings page and change the address there.",
    "payment": "Open the billing page and add a new card.",
    "login": "Use the reset link on the login page.",
    "account": "Open the settings page and choose account.",
    "shipping": "Shipping is free and takes three days.",
    "return": "Send it back within thirty days.",
    "subscription": "Open the billing page to change your plan.",
    "coupon": "Enter the coupon code when you pay.",
    "store hours": "We are open Monday to Friday, nine to five.",
}


def faq_labels(n: int, seed: int = 7, prompt: TierPrompt | None = None) -> list[dict[str, Any]]:
    """What the teacher is taught: `n` FAQ questions, phrased as the query log phrases them (case
    numbers it does not use, doubled spaces in some), each with its topic's answer, in the label
    format `students train` reads, led by `prompt` (the route's teacher prompt: the teacher is taught
    to answer as the route will ask it). Pure."""
    import random

    from serve.cache.pipeline import TOPICS
    from serve.policies.tier_prompt import apply_chat

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        text = f"How do I change my {topic} (case {rng.randrange(10_000, 100_000)})?"
        if rng.random() < 0.3:  # as synth_log varies whitespace: the teacher learns it does not matter
            text = "  " + text.replace(" ", "  ") + " "
        request = {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": MAX_TOKENS}
        rows.append({"id": f"faq-{i}", "request": apply_chat(request, prompt),
                     "teacher": FAQ[topic], "finish_reason": "stop"})
    return rows


def show_provenance(url: str, key: str, config: Config, route: str, log: Path, skip: int) -> str:
    """Ask the route for the first query the student filled, as an admin (who sees provenance), and
    say who answered it and what its fill cost."""
    import httpx

    from serve.cache.pipeline import read_log, route_normalization, route_prompts, select_head

    with log.open("rb") as f:
        head, _ = select_head(read_log(f), route, 1, route_normalization(config, route), route_prompts(config, route),
                              skip=skip)
    if not head:
        return "the student filled no cache entry (the log has no query past the teacher's head)"
    body = {**head[0].request, "model": route}
    r = httpx.post(f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    prov = (r.json() if r.status_code == 200 else {}).get("llmserve_provenance") or {}
    return (f"a student-filled query answered from the cache: x-llmserve-cache {r.headers.get('x-llmserve-cache')}, "
            f"served by {r.headers.get('x-llmserve-served-by')}; provenance: model {prov.get('model')}, batch "
            f"{prov.get('batch_id')}, price {prov.get('price')}, fill cost {prov.get('cost_usd')} USD")
