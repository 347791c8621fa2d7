"""The attributed economics (serve/students/attribution.py) and the report that feeds it
(serve/students/report.py: one-off costs, the out-of-sample marking, goals), the latter against a
real gateway app on the fake engine."""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx
import pytest

from serve.students.attribution import OneOff, Traffic, attribute, by_model, goals, holding_back, terms
from serve.students.report import economics, label_key
from tests.unit.economics_support import CONFIG, PRICES, SureOfSome, cascade_app


def traffic(**kw) -> Traffic:
    base = dict(requests=1000, route_online_usd=0.5, tier_usd={"cache": 0.0, "student": 0.2, "teacher": 0.3},
                cache_share=0.8, escalation_rate=0.25, teacher_req=0.01, teacher_missed_req=0.012,
                student_req=0.0005, student_at_teacher_price_req=0.005)
    return Traffic(**{**base, **kw})


def test_three_baselines_each_with_its_own_one_off_costs():
    t = traffic()
    offs = [OneOff("cache fill", 0.2, "teacher", cache_fill=True), OneOff("teacher labels", 0.6, "teacher"),
            OneOff("training", 0.2, "cuda")]
    att = attribute(t, offs, horizon=2000)
    rows = att["per_1k_usd"]
    assert rows["teacher_only"] == {"online": 10.0, "one_off": 0.0, "total": 10.0}
    # 20% missed by the cache at the teacher's cost on that traffic; only the fills are its one-off cost
    assert rows["teacher_behind_cache"]["online"] == pytest.approx(0.2 * 12.0)
    assert rows["teacher_behind_cache"]["one_off"] == pytest.approx(1000 * 0.2 / 2000)
    assert rows["route"]["online"] == pytest.approx(0.5) and rows["route"]["one_off"] == pytest.approx(0.5)
    s = att["saving"]
    assert s["route_vs_teacher_only"] == pytest.approx(10.0 / 1.0)
    assert s["cache_vs_teacher_only"] == pytest.approx(10.0 / 2.5)
    assert s["student_vs_teacher_behind_cache"] == pytest.approx(2.5 / 1.0)
    assert s["route_vs_teacher_only_online"] == pytest.approx(20.0)
    assert att["one_off_usd"] == pytest.approx(1.0)
    assert attribute(t, offs, horizon=20_000)["saving"]["route_vs_teacher_only"] == pytest.approx(10 / 0.55)


def test_cache_fills_are_billed_at_the_batch_price_of_the_model_that_made_them():
    fills = [("teacher", 1000, 500), ("student", 1000, 500), ("student", 2000, 0)]
    got = by_model(fills, PRICES, 0.5)
    assert got["teacher"] == pytest.approx(0.5 * (1000 * 10 + 500 * 20) / 1e6)
    assert got["student"] == pytest.approx(0.5 * (3000 * 1 + 500 * 2) / 1e6)


def test_each_terms_needed_value_meets_the_goal_exactly_with_the_others_as_measured():
    t = traffic()
    tm = terms(t, one_off_usd=1.0, horizon=100_000, target=100)
    m, need = tm["measured"], tm["needed_alone"]
    assert (m["cache_share"], m["escalation_rate"]) == (0.8, 0.25)
    assert m["price_ratio"] == pytest.approx(0.1) and m["prompt_ratio"] == pytest.approx(0.5)
    o = m["one_off_per_request_over_teacher"]
    assert o == pytest.approx(1.0 / 100_000 / 0.01)

    def rho(c=0.8, e=0.25, r=0.1, q=0.5):
        return (1 - c) * (r * q + e) + o

    assert rho(c=need["cache_share"]) == pytest.approx(0.01)
    # 0.2 x (0.05 + e) + 0.001 <= 0.01 needs e < 0, and escalations alone (0.2 x 0.25) exceed the budget
    assert need["escalation_rate"] is None and need["price_ratio"] is None and need["prompt_ratio"] is None
    easy = terms(traffic(escalation_rate=0.01), 1.0, 100_000, 100)
    n2 = easy["needed_alone"]
    assert rho(e=0.01, r=n2["price_ratio"]) == pytest.approx(0.01)
    assert rho(e=0.01, q=n2["prompt_ratio"]) == pytest.approx(0.01)
    assert n2["escalation_rate"] is None  # the student's own cost (0.2 x 0.05) is over the budget already
    cheaper = terms(traffic(student_req=0.00005), 1.0, 100_000, 100)["needed_alone"]  # price ratio 0.01
    assert rho(r=0.01, e=cheaper["escalation_rate"]) == pytest.approx(0.01)
    # the horizon at which the one-off costs leave exactly 1/100 of teacher-only for the online cost
    cheap = terms(traffic(route_online_usd=0.05), 1.0, 1000, 100)
    assert cheap["needed_alone"]["horizon_requests"] == pytest.approx(1.0 / (0.01 / 100 - 0.05 / 1000))
    assert tm["needed_alone"]["horizon_requests"] is None  # online alone is 1/20 of teacher-only
    assert sum(tm["cost_shares"].values()) == pytest.approx(1.0)
    assert max(tm["cost_shares"], key=tm["cost_shares"].get) == "escalations"


def test_goals_and_the_note_say_which_term_holds_the_saving_back():
    t = traffic()
    att = attribute(t, [OneOff("teacher labels", 1.0, "teacher")], 100_000)
    gl = goals(att, t.cache_share, 100)
    assert [(g["target"], g["met"]) for g in gl] == [(100, False), (1.0, True), (0.6, True)]
    assert gl[0]["measured"] == pytest.approx(att["saving"]["route_vs_teacher_only"])
    tm = terms(t, att["one_off_usd"], 100_000, 100)
    lines = holding_back(tm, gl[0]["measured"])
    assert lines[0].startswith("the 100x goal is not met (") and "escalations (" in lines[0]
    assert any(x.startswith("cache share (measured 0.800) would have to be at least 0.9") for x in lines)
    assert "escalation rate (measured 0.250): no value alone reaches 100x" in lines
    assert "the online cost alone is 5.0% of teacher-only, above 1.0%: no horizon reaches 100x without a lower " \
           "online cost" in lines  # 0.5 USD over 1,000 requests against 0.01 a request
    assert not any(x.startswith("the one-off costs alone") for x in lines)  # 0.1% of teacher-only
    assert holding_back(tm, 150.0) == []


# ---- the report on a real gateway app: out-of-sample marking, one-off costs, goals -------------------
def test_report_marks_training_prompts_counts_one_off_costs_and_lists_goals(tmp_path):
    # The teacher says more about hard prompts: its cost on the cache's misses is not its mean.
    app = cascade_app(SureOfSome(text_by_model={"student": "s1 s2", "teacher": "t1 t2"},
                                 teacher_on_hard="t1 t2 t3 t4 t5 t6"))
    log = [{"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 8}
           for q in ("easy one", "hard one", "easy two", "easy one", "easy three")]
    labels = tmp_path / "labels.jsonl"
    trained = {"id": label_key(log[0]), "request": log[0], "teacher": "t", "teacher_model": "teacher",
               "usage": {"prompt_tokens": 100, "completion_tokens": 10}}
    held = {**trained, "id": label_key(log[2]), "request": log[2]}
    labels.write_text(json.dumps(trained) + "\n" + json.dumps(held) + "\n")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"train_seconds": 1800, "device": "cuda",
                                    "split": {"train": [trained["id"]], "held_out": [held["id"]]},
                                    "agreement": {"held_out": {"before": {}, "after": {}}}}))
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"adapter": "student", "n": 1, "usage": {"prompt_tokens": 50, "completion_tokens": 5}}))
    args = argparse.Namespace(route="assistant", redis_url=None, url="http://gw/v1", api_key="none", concurrency=1,
                              timeout=30, seed=0, sample=10, log="log", labels=None, base=None,
                              manifest=str(manifest), train_labels=str(labels), eval_record=str(ev),
                              calibration_record=None, batch_price_factor=0.5, train_hour_usd=4.0, horizon=10_000,
                              target_saving=100.0, note=None)
    report, records = asyncio.run(economics(args, CONFIG, log, transport=httpx.ASGITransport(app=app)))
    assert [r.seen for r in records] == [True, False, False, True, False]  # held-out labels are not training
    assert report["out_of_sample"]["replayed_in_training"] == 2
    assert report["tiers"]["student"]["in_training"] == 1  # the first "easy one"; its repeat is a cache hit
    offs = {o["name"]: o for o in report["attribution"]["one_off"]}
    assert offs["teacher labels"]["usd"] == pytest.approx(2 * 0.5 * (100 * 10 + 10 * 20) / 1e6)
    assert offs["evaluation"]["usd"] == pytest.approx(0.5 * (50 * 1 + 5 * 2) / 1e6)
    assert offs["training"]["usd"] == pytest.approx(2.0)
    assert report["attribution"]["horizon_requests"] == 10_000
    assert report["goals"][0]["name"].startswith("route vs teacher-only, every one-off cost")
    assert report["goals"][0]["met"] is False and any("100x goal is not met" in n for n in report["notes"])
    per_req = {"easy": (3 * 10 + 2 * 20) / 1e6, "hard": (3 * 10 + 6 * 20) / 1e6}  # 3 prompt tokens, a word each
    assert report["traffic"]["teacher_req"] == pytest.approx((4 * per_req["easy"] + per_req["hard"]) / 5)
    # the misses: easy one, hard one, easy two, easy three (the second "easy one" was a cache hit)
    assert report["traffic"]["teacher_missed_req"] == pytest.approx((3 * per_req["easy"] + per_req["hard"]) / 4)
        # the student's sample never holds the answer to a prompt it was trained on
    assert report["tiers"]["student"]["agreement"]["sample"] == 2


def test_the_demos_time_split_replays_only_requests_after_the_ones_it_learnt_from(tmp_path):
    from serve.students.data import time_split

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(10)) + "\n")
    early, late = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert time_split(log, early, late, 0.6) == (6, 4)
    read = [[json.loads(x)["i"] for x in p.read_text().splitlines()] for p in (early, late)]
    assert read == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]


def test_the_demos_default_configuration_is_the_repositorys_example():
    from serve.cli.demo import DEFAULT_CONFIG

    assert DEFAULT_CONFIG.is_file() and DEFAULT_CONFIG.parent.name == "examples"
