"""The economics report's arithmetic (serve/students/economics.py) and its replay's reading of the
gateway's headers (serve/students/report.py, against a real gateway app on the fake engine)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serve.config import Config
from serve.policies.cost import Price
from serve.students.economics import (
    Served,
    build,
    classify,
    mean_agreement,
    mean_cost_per_1k,
    notes,
    percentile,
    plot,
    sample_by_tier,
    shares,
    table,
)
from serve.students.report import Caller, prices, replay
from tests.unit.economics_support import PRICES, STUDENT, TEACHER, SureOfSome, cascade_app


def h(**kw: str) -> dict[str, str]:
    return {f"x-llmserve-{k.replace('_', '-')}": v for k, v in kw.items()}


@pytest.mark.parametrize(("status", "headers", "tier"), [
    (200, h(cache="hit", served_by="cache:teacher"), "cache"),
    (200, h(cache="miss", served_by="student"), "student"),
    (200, h(cache="miss", served_by="teacher", escalated="low_confidence"), "teacher"),
    (200, h(cache="miss", served_by="backup", escalated="low_confidence"), "fallback"),
    # The teacher failed and the fallback is the student's own model: escalated, so not the student.
    (200, h(cache="miss", served_by="student", escalated="student_overloaded"), "fallback"),
    (503, h(cache="miss", served_by=""), "error"),
])
def test_classify_reads_the_tier_from_the_headers(status, headers, tier):
    assert classify(status, headers, "student", "teacher") == tier


def test_classify_a_plain_target_route_is_the_teacher_tier():
    assert classify(200, h(cache="bypass", served_by="teacher"), None, "teacher") == "teacher"


@pytest.mark.parametrize("q", [0, 25, 50, 90, 95, 99, 100])
def test_percentile_interpolates_as_numpy_does(q):
    import numpy

    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 100.0]
    assert percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))


def test_percentile_of_one_and_of_none():
    assert percentile([4.0], 95) == 4.0
    assert percentile([], 50) is None


def served(tier: str, n: int, cost: float = 0.0, latency: float = 0.01, text: str = "a b") -> list[Served]:
    return [Served(i, tier, latency, cost, text) for i in range(n)]


def test_shares_name_every_tier_and_add_up():
    records = served("cache", 7) + served("student", 2) + served("teacher", 1)
    s = shares(records)
    assert s == {"cache": 0.7, "student": 0.2, "teacher": 0.1, "fallback": 0.0, "error": 0.0}


def test_cost_per_1k_from_prices_and_measured_tokens():
    # 1,000 requests of (10 prompt, 5 completion) tokens at $10/$20 per million: $0.2 per 1k.
    assert mean_cost_per_1k([(10, 5)] * 3, TEACHER) == pytest.approx(1000 * (10 * 10 + 5 * 20) / 1e6)
    assert mean_cost_per_1k([(10, 5), (30, 15)], STUDENT) == pytest.approx(1000 * (20 * 1 + 10 * 2) / 1e6)
    assert mean_cost_per_1k([], TEACHER) is None


def test_route_cost_adds_the_cache_build_at_its_batch_price_spread_over_the_log():
    records = served("cache", 900) + served("student", 80, cost=2e-5) + served("teacher", 20, cost=3e-4)
    report = build(records, tier_agreement={}, teacher_usage=[(10, 10)], student_usage=[(10, 10)],
                   prices=PRICES, teacher="teacher", student="student", build_usage=(1000, 2000), batch_factor=0.5)
    online = 80 * 2e-5 + 20 * 3e-4
    built = (1000 * 10 + 2000 * 20) / 1e6 * 0.5
    c = report["cost_per_1k_usd"]
    assert c["route_online"] == pytest.approx(online)  # 1,000 requests: per 1k is the total
    assert c["cache_build_amortised"] == pytest.approx(built)
    assert c["route"] == pytest.approx(online + built)
    assert c["teacher_only"] == pytest.approx(1000 * 300 / 1e6)
    assert c["student_only"] == pytest.approx(1000 * 30 / 1e6)
    assert report["saving"]["vs_teacher_only"] == pytest.approx(0.3 / (online + built))
    assert report["tiers"]["teacher"]["cost_usd"] == pytest.approx(20 * 3e-4)


def test_agreement_is_token_overlap_per_tier_and_traffic_weighted_for_the_route():
    assert mean_agreement([("a b c", "a b c"), ("x", "y")]) == pytest.approx(0.5)
    assert mean_agreement([]) is None
    records = served("cache", 8) + served("student", 2)
    report = build(records, tier_agreement={"cache": [("a b", "a b")], "student": [("a b", "a c"), ("q", "r")]},
                   teacher_usage=[], student_usage=[], prices=PRICES, teacher="teacher", student="student",
                   build_usage=None, batch_factor=0.5)
    assert report["tiers"]["cache"]["agreement"] == {"token_overlap": 1.0, "exact_match": 1.0, "sample": 1}
    assert report["tiers"]["student"]["agreement"] == {"token_overlap": 0.25, "exact_match": 0.0, "sample": 2}
    assert report["agreement"]["route"] == pytest.approx(0.8 * 1.0 + 0.2 * 0.25)
    assert report["cost_per_1k_usd"]["teacher_only"] is None and report["saving"]["vs_teacher_only"] is None


def test_latency_percentiles_per_tier_in_ms():
    records = [Served(i, "cache", 0.001 * (i + 1), 0.0, "x") for i in range(100)]
    records += [Served(100 + i, "student", 0.1, 0.0, "x") for i in range(3)]
    report = build(records, tier_agreement={}, teacher_usage=[], student_usage=[], prices=PRICES,
                   teacher="teacher", student="student", build_usage=None, batch_factor=0.5)
    assert report["tiers"]["cache"]["latency_ms"]["p50"] == pytest.approx(50.5)
    assert report["tiers"]["cache"]["latency_ms"]["p95"] == pytest.approx(95.05)
    assert report["tiers"]["student"]["latency_ms"]["p95"] == pytest.approx(100.0)
    assert report["tiers"]["teacher"]["latency_ms"] == {"p50": None, "p95": None}


def test_sample_by_tier_draws_within_each_tier_and_skips_failures_the_teacher_and_training_prompts():
    records = [Served(i, "cache" if i % 10 else "student", 0.0, 0.0, "t", seen=i % 20 == 0) for i in range(1000)]
    records += [Served(1000 + i, "fallback", 0.0, 0.0, None) for i in range(5)]  # no text: nothing to score
    records += [Served(2000 + i, "teacher", 0.0, 0.0, "t") for i in range(5)]  # the teacher against itself
    picked = sample_by_tier(records, 20, seed=3)
    assert {len(v) for v in picked.values()} == {20, 0}
    assert len(picked["fallback"]) == 0 and "error" not in picked and "teacher" not in picked
    assert not any(r.seen for rs in picked.values() for r in rs)  # in-sample answers are never scored
    assert len(sample_by_tier([r for r in records if r.tier == "student"], 1000)["student"]) == 50
    assert all(r.tier == "student" for r in picked["student"])
    assert [r.index for r in picked["cache"]] == sorted(r.index for r in picked["cache"])
    assert picked == sample_by_tier(records, 20, seed=3)
    assert picked != sample_by_tier(records, 20, seed=4)


def test_notes_say_whether_the_targets_are_met_and_by_how_much():
    def report(cache_share: float, saving: float | None) -> dict:
        return {"tiers": {"cache": {"share": cache_share}, "error": {"requests": 0}},
                "saving": {"vs_teacher_only": saving}, "agreement": {"route": 0.9}}

    met = notes(report(0.75, 25.0))
    assert met[0].startswith("cache served 75.0%") and "meets" in met[0]
    assert "25.0x less" in met[1] and "meets" in met[1]
    short = notes(report(0.5, 10.0))
    assert "below" in short[0] and "by a factor 2.00" in short[1]


def test_table_and_png(tmp_path):
    records = served("cache", 90) + served("student", 6, cost=1e-5) + served("teacher", 4, cost=1e-4)
    report = build(records, tier_agreement={"cache": [("a", "a")]}, teacher_usage=[(10, 10)],
                   student_usage=[(10, 10)], prices=PRICES, teacher="teacher", student="student",
                   build_usage=(100, 100), batch_factor=0.5, extra={"route": "assistant"})
    report["notes"] = notes(report)
    text = table(report)
    assert "cache           90   90.0%      1.000" in text
    assert f"teacher-only  {report['cost_per_1k_usd']['teacher_only']:.5f}" in text
    plot(report, str(tmp_path / "e.png"))
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prices_of_runtime_adapters_are_their_bases():
    config = Config.model_validate({"auth": {"enabled": False}, "models": [
        {"name": "teacher", "source": "x", "price": {"input_per_million": 2.5, "output_per_million": 10}},
        {"name": "student", "source": "y", "price": {"input_per_million": 0.3, "output_per_million": 1.2},
         "adapters": [{"name": "own", "path": "/a", "price": {"input_per_million": 9, "output_per_million": 9}}]}]})
    got = prices(config, {"student-v1": {"base": "student", "path": "/b"}, "own": {"base": "student"}})
    assert got["student-v1"] == Price(0.3, 1.2)
    assert got["own"] == Price(9, 9)  # a configured adapter keeps its own price
    assert got["teacher"] == Price(2.5, 10)


# ---- the replay, against a real gateway app (cache, cascade, cost) on the fake engine -------------
def test_replay_reads_tier_cost_and_answer_of_every_request():
    app = cascade_app(SureOfSome(text_by_model={"student": "s1 s2", "teacher": "t1 t2 t3"}))
    log = [{"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 8}
           for q in ("easy one", "hard one", "easy one", "hard one", "hard one")]

    async def go() -> list[Served]:
        caller = Caller("http://gw/v1", "none", 1, 30, transport=httpx.ASGITransport(app=app))
        try:
            return await replay(caller, log, "assistant", "student", "teacher")
        finally:
            await caller.close()

    records = asyncio.run(go())
    assert [(r.index, r.tier, r.text, r.provenance) for r in records] == [
        (0, "student", "s1 s2", None), (1, "teacher", "t1 t2 t3", None), (2, "cache", "s1 s2", "online"),
        (3, "cache", "t1 t2 t3", "online"), (4, "cache", "t1 t2 t3", "online")]
    student_cost = (3 * 1 + 2 * 2) / 1e6  # the fake engine: 3 prompt tokens, one per word out
    assert records[0].cost_usd == pytest.approx(student_cost)
    assert records[1].cost_usd == pytest.approx(student_cost + (3 * 10 + 3 * 20) / 1e6)  # both billed
    assert [r.cost_usd for r in records[2:]] == [0.0, 0.0, 0.0]
    assert all(r.latency_s > 0 for r in records)


# ---- what the demo teaches its tiny teacher (serve/cli/demo.py), on which the report's figures rest --
def test_demo_faq_answers_every_topic_of_the_log_within_the_token_budget():
    from serve.cache.pipeline import TOPICS, synth_log
    from serve.cli.demo import FAQ, MAX_TOKENS, faq_labels
    from serve.model.tiny import train_tokenizer

    assert set(FAQ) == set(TOPICS)  # a log topic without an answer would leave the teacher guessing
    tok = train_tokenizer()
    assert max(len(tok.encode(a).ids) for a in FAQ.values()) < MAX_TOKENS  # room for the end of turn
    rows = faq_labels(60)
    assert {r["teacher"] for r in rows} == set(FAQ.values())
    assert {r["request"]["max_tokens"] for r in rows} == {MAX_TOKENS}
    asked = {r["request"]["messages"][0]["content"] for r in rows}
    logged = {r["messages"][0]["content"] for r in synth_log(10_000, 1000, max_tokens=MAX_TOKENS)}
    assert not asked & logged  # taught on other case numbers than the log's: the log is not memorised
    assert any(q.startswith("  ") for q in asked)  # taught that doubled spaces do not change the answer
