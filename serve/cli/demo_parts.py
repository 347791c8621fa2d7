"""What the demo (serve/cli/demo.py) teaches its tiny teacher, and how it shows a cache entry's
provenance: the pure and small parts of the loop, kept apart from the loop itself."""

from __future__ import annotations

from collections.abc import Callable
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


def topic_of(text: str) -> str | None:
    """The FAQ topic a query log question asks about ("How do I change my <topic> (case N)?", spaced
    in any way), or None."""
    import re

    m = re.search(r"change my (.+?) \(case", " ".join(text.split()))
    return m.group(1) if m and m.group(1) in FAQ else None


def label_topic(label: dict[str, Any]) -> str | None:
    """The FAQ topic of a label's question: its last user message (an export row's `input`, a
    label's `request`), or None."""
    asked = label.get("input") or label.get("request") or {}
    text = next((m.get("content") for m in reversed(asked.get("messages") or []) if m.get("role") == "user"), "")
    return topic_of(str(text or ""))


def faq_review(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """What stands in for the reviewer in the demo, where no person reads the export: the FAQ the
    teacher was taught (the demo's ground truth, what a support agent reading the labels knows).
    Each exported label is confirmed when it is its topic's answer, corrected to that answer when it
    is not, dropped when its question has no FAQ topic. Returns the reviewed lines (the review file
    format `students curate import` reads) and the counts. Pure."""
    from serve.students.metrics import normalize

    out, counts = [], {"confirmed": 0, "corrected": 0, "dropped": 0}
    for row in rows:
        topic = label_topic(row)
        if topic is None:
            out.append({**row, "drop": True})
            counts["dropped"] += 1
        elif normalize(row["teacher"]) == normalize(FAQ[topic]):
            out.append({**row, "correction": None})
            counts["confirmed"] += 1
        else:
            out.append({**row, "correction": FAQ[topic]})
            counts["corrected"] += 1
    return out, counts


def wrong_share(labels: list[dict[str, Any]]) -> float | None:
    """Share of labels that are not their FAQ topic's answer (the demo's ground truth); None for none."""
    from serve.students.metrics import normalize

    judged = [(lab, t) for lab in labels if (t := label_topic(lab)) is not None]
    if not judged:
        return None
    return sum(1 for lab, t in judged if normalize(lab["teacher"]) != normalize(FAQ[str(t)])) / len(judged)


def curate(llmserve: Callable[..., tuple[int, str]], labels: Path, golden: Path, out: Path, share: float) -> str:
    """`students curate export` of the least confident `share` of the labels, the review (in the
    demo: the FAQ the teacher was taught stands in for the person who reads them), `students curate
    import` into `golden`. llmserve(*argv) runs one command (the demo's, printed); returns the note."""
    import json
    import statistics

    rows = [json.loads(x) for x in labels.read_text().splitlines() if x.strip()]
    lps = sorted(r["teacher_mean_logprob"] for r in rows if isinstance(r.get("teacher_mean_logprob"), (int, float)))
    # The review budget: labels whose teacher confidence is in the lowest --review share, plus any cut off.
    bound = lps[int(len(lps) * share)] if lps else 0.0
    review, reviewed = out / "review.jsonl", out / "reviewed.jsonl"
    llmserve("students", "curate", "export", "--labels", str(labels), "-o", str(review), "--min-logprob",
             repr(bound))
    suspects = [json.loads(x) for x in review.read_text().splitlines() if x.strip()]
    done, counts = faq_review(suspects)
    reviewed.write_text("".join(json.dumps(r) + "\n" for r in done))
    flagged = {r["id"] for r in suspects}
    wrong_in, wrong_out = (wrong_share([r for r in rows if (r["id"] in flagged) == side]) for side in (True, False))
    print(f"no person reviews in the demo: the FAQ the teacher was taught (its ground truth) stands in for the "
          f"reviewer: of {len(suspects)} exported labels {counts['confirmed']} confirmed, {counts['corrected']} "
          f"corrected to their topic's answer, {counts['dropped']} dropped (no FAQ topic) -> {reviewed}")
    print(f"how well the export points at wrong labels (the FAQ as the truth): {_pct(wrong_in)} of the exported ones "
          f"were wrong, {_pct(wrong_out)} of those not exported (teacher mean logprob: median "
          f"{statistics.median(lps) if lps else float('nan'):.3f}, exported below {bound:.3f})")
    _, stdout = llmserve("students", "curate", "import", "--labels", str(labels), "--reviews", str(reviewed),
                         "-o", str(golden))
    version = json.loads(stdout.strip().splitlines()[-1]).get("golden_version")
    return (f"golden set {version}: {counts['corrected']} of {len(rows)} teacher labels corrected and "
            f"{counts['dropped']} dropped by the review's stand-in (the FAQ the teacher was taught); "
            f"{_pct(wrong_in)} of the exported labels were wrong against {_pct(wrong_out)} of the rest")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"
