"""Head selection from a query log, coverage, and the synthetic Zipf log."""

import json
from collections import Counter

from serve.cache.pipeline import batch_lines, coverage, read_log, select_head, synth_log
from serve.policies.cache_key import CHAT_PATH, cache_key


def q(text, **kw):
    return {"model": "assistant", "messages": [{"role": "user", "content": text}], "temperature": 0, **kw}


def test_select_head_counts_normalised_queries():
    log = [q("a"), q(" a "), q("a"), q("b"), q("b"), q("c"), q("a", max_tokens=5)]
    head, total = select_head(log, "assistant", 2)
    assert total == 7 and [h.count for h in head] == [3, 2]
    assert head[0].key == cache_key("assistant", CHAT_PATH, q("a"))
    assert head[1].request["messages"][0]["content"] == "b"


def test_coverage_and_batch_lines():
    log = [q("a"), q("a"), q("b"), q("c")]
    head, _ = select_head(log, "r", 1)
    assert coverage(log, "r", {h.key for h in head}) == 0.5
    (line,) = [json.loads(x) for x in batch_lines(head, "teacher")]
    assert line["custom_id"] == head[0].key and line["body"]["model"] == "teacher"
    assert line["url"] == "/v1/chat/completions" and line["body"]["temperature"] == 0


def test_read_log_skips_junk():
    assert len(read_log([json.dumps(q("a")), "nope", "[1]", json.dumps({"x": 1}), json.dumps({"prompt": "p"})])) == 2


def test_synth_log_is_zipf_and_seeded():
    log = synth_log(2000, 100, s=1.1, seed=3)
    assert log == synth_log(2000, 100, s=1.1, seed=3)
    counts = Counter(cache_key("assistant", CHAT_PATH, r) for r in log)
    top = [n for _, n in counts.most_common()]
    assert len(counts) <= 100 and top[0] > 5 * top[len(top) // 2]  # head-heavy
    head, _ = select_head(log, "assistant", 10)
    assert sum(h.count for h in head) / len(log) > 0.35
