"""Student lifecycle on fixed data: metrics, calibration, adapter digests, the gate, and the
promotion stack in a real (local) Redis."""

import asyncio
import json
import shutil

import pytest
import yaml

from serve.cli import main
from serve.config import GateSpec
from serve.students.calibrate import at, calibrate, choose, curve, plot, split, table
from serve.students.gate import eval_refusal, lower_bound, promote_refusal
from serve.students.metrics import exact_match, json_valid, score, token_overlap
from serve.students.registry import THRESHOLD, AdapterError, LifecycleStore, adapter_digest

SAMPLES = [(-3.0, 0.0), (-2.5, 0.0), (-2.0, 1.0), (-1.5, 0.0), (-1.0, 1.0), (-0.5, 1.0), (-0.2, 1.0), (-0.1, 1.0)]


# ---- calibration ------------------------------------------------------------------------------
def test_curve_measures_the_students_own_answers():
    pts = curve(SAMPLES)
    assert [(p.threshold, p.teacher_share, p.kept) for p in pts[:3]] == [(-3.0, 0.0, 8), (-2.5, 0.125, 7),
                                                                         (-2.0, 0.25, 6)]
    assert [p.agreement for p in pts[:4]] == pytest.approx([5 / 8, 5 / 7, 5 / 6, 4 / 5])
    assert (pts[-1].teacher_share, pts[-1].agreement, pts[-1].kept) == (7 / 8, 1.0, 1)
    assert all(p.kept > 0 for p in pts)  # 'everything escalates' keeps nothing: not a point


def test_escalations_are_teacher_answers_not_agreement():
    # 6 wrong answers and 2 right ones; escalating the 4 least confident (all wrong) leaves 2 of 4.
    samples = [(-4.0, 0.0), (-3.0, 0.0), (-2.0, 0.0), (-1.5, 0.0), (-1.0, 1.0), (-0.8, 0.0), (-0.5, 1.0),
               (-0.4, 0.0)]
    assert at(samples, -1.0).agreement == pytest.approx(0.5)  # would be 6/8 if escalations agreed
    assert at(samples, -1.0).teacher_share == pytest.approx(0.5)


@pytest.mark.parametrize("target,threshold,share", [
    (0.6, -3.0, 0.0),     # the student alone already agrees 5/8 of the time
    (0.7, -2.5, 0.125),   # escalating the least confident (wrong) answer: 5/7
    (0.8, -2.0, 0.25),    # ... and the next one: 5/6 (-1.5 would give 4/5 at a higher share)
    (0.9, -1.0, 0.5),     # the wrong answer at -1.5 must escalate too
    (1.0, -1.0, 0.5),
])
def test_choose_predicted_threshold(target, threshold, share):
    chosen = choose(curve(SAMPLES), target)
    assert chosen is not None
    assert chosen.threshold == pytest.approx(threshold) and chosen.teacher_share == pytest.approx(share)
    assert chosen.agreement >= target


def test_a_student_that_never_agrees_gets_no_threshold():
    never = [(-float(i), 0.0) for i in range(1, 9)]
    assert choose(curve(never), 0.5) is None
    result = calibrate([(f"id{i}", lp, a) for i, (lp, a) in enumerate(never)], 0.5, 0.5)
    assert result.chosen is None and result.problem is not None and "no threshold" in result.problem
    assert choose(curve(SAMPLES), 1.01) is None and curve([]) == []


def test_split_is_deterministic_by_id():
    ids = [f"label-{i}" for i in range(1000)]
    sweep, held = split(ids, 0.5)
    assert (sweep, held) == split(ids, 0.5) and sorted(sweep + held) == list(range(1000))
    assert 450 <= len(held) <= 550
    _, rev_held = split(ids[::-1], 0.5)  # a label's side follows its id, not its position
    assert {ids[::-1][i] for i in rev_held} == {ids[i] for i in held}
    assert split(ids, 0.0)[1] == [] and split(ids, 1.0)[0] == []


def _by_side(n: int, holdout: float = 0.5) -> tuple[list[str], list[str]]:
    ids = [f"q{i}" for i in range(n)]
    sweep, held = split(ids, holdout)
    return [ids[i] for i in sweep], [ids[i] for i in held]


def test_calibrate_chooses_on_the_sweep_part_and_checks_the_held_out_part():
    sweep, held = _by_side(40)
    # Every sweep label agrees, every held-out one does not: chosen on the sweep, caught held out.
    samples = [(i, -1.0 - k / 10, 1.0) for k, i in enumerate(sweep)] + [(i, -0.5, 0.0) for i in held]
    result = calibrate(samples, 0.9, 0.5)
    assert result.chosen is not None and result.chosen.teacher_share == 0.0
    assert result.chosen.threshold == pytest.approx(-1.0 - (len(sweep) - 1) / 10)
    assert result.held is not None and result.held.agreement == 0.0 and result.held.kept == len(held)
    assert result.problem is not None and "held-out" in result.problem
    assert (result.n_sweep, result.n_held) == (len(sweep), len(held))
    # All agree: the lowest sweep logprob is the threshold, no teacher share anywhere.
    good = [(i, lp, 1.0) for i, lp, _ in samples]
    ok = calibrate(good, 0.9, 0.5)
    assert ok.problem is None and ok.chosen == result.chosen
    assert ok.held is not None and (ok.held.teacher_share, ok.held.agreement) == (0.0, 1.0)


def test_calibrate_refuses_a_threshold_nothing_held_out_confirms():
    sweep, held = _by_side(40)
    # The held-out labels are all less confident than any sweep label, so the chosen cut escalates them all.
    samples = [(i, -1.0, 1.0) for i in sweep] + [(i, -9.0, 1.0) for i in held]
    result = calibrate(samples, 0.9, 0.5)
    assert result.held is not None and result.held.kept == 0 and result.held.teacher_share == 1.0
    assert result.problem is not None and "escalates every held-out" in result.problem


def test_table_and_plot(tmp_path):
    pts = curve(SAMPLES)
    assert table(pts).count("\n") == len(pts) + 1
    plot(pts, choose(pts, 0.75), 0.75, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_metrics():
    assert exact_match(" Paris. ", "paris.") == 1.0 and exact_match("Paris", "Lyon") == 0.0
    assert token_overlap("the capital is Paris", "Paris is the capital") == 1.0
    assert 0 < token_overlap("Paris", "It is Paris") < 1 and token_overlap("a", "b") == 0.0
    assert json_valid('{"a": 1}', "", {"type": "object", "required": ["a"]}) == 1.0
    assert json_valid('{"b": 1}', "", {"type": "object", "required": ["a"]}) == 0.0
    assert json_valid("nope", "") == 0.0
    s = score([("a b", "a b", None), ("a", "b", None)], ["exact_match", "token_overlap"])
    assert s == {"exact_match": 0.5, "token_overlap": 0.5}
    with pytest.raises(ValueError):
        score([], ["bleu"])


def test_token_overlap_does_not_count_replacement_characters():
    """U+FFFD, what byte-level decoding of a random-weight model emits, is not agreement."""
    assert token_overlap("\ufffd\ufffd", "\ufffd") == 0.0
    assert token_overlap("\ufffd", "\ufffd") == 0.0
    assert token_overlap("foo \ufffd\ufffd", "bar \ufffd") == 0.0  # 0.5 when U+FFFD counted
    # Real words count as if the U+FFFD were not there: 2 of 2 and 2 of 4 -> F1 2/3.
    assert token_overlap("Paris\ufffd is \ufffd", "Paris is the capital") == pytest.approx(2 / 3)
    assert token_overlap("ab\ufffdcd", "ab cd") == 1.0  # U+FFFD splits words, as before; it is not one
    assert token_overlap("", " ") == 1.0  # two empty answers still agree


def test_label_can_leave_out_the_head_the_cache_serves(tmp_path, monkeypatch, capsys):
    """`students label --exclude-head N --route R` labels only the tail: the N queries `cache build
    --top N --route R` caches are counted with R's normalisation (here case-folded) and left out."""
    import types

    import serve.cli.students as students_cli

    def q(text):
        return {"model": "teacher", "messages": [{"role": "user", "content": text}], "max_tokens": 8}

    # Case-folded, "hello there" is the most frequent query (5); case-sensitive, "pricing" (4) would be.
    log = [q("hello there")] * 3 + [q("HELLO there")] * 2 + [q("pricing")] * 4 + [q("tail one"), q("tail two")]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    cfg = tmp_path / "llmserve.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "teacher", "source": "x"}],
                                   "routes": [{"name": "r", "target": "teacher", "cache": {"normalize_case": True}}]}))
    sent: list[str] = []

    def run_batch(client, lines, timeout_s):
        sent.extend(json.loads(x)["body"]["messages"][0]["content"] for x in lines)
        return "b1", {json.loads(x)["custom_id"]: {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}
                      for x in lines}

    files = types.SimpleNamespace(create=lambda **kw: types.SimpleNamespace(id="f1"))
    monkeypatch.setattr(students_cli, "run_batch", run_batch)
    monkeypatch.setattr(students_cli, "openai_client", lambda args, **_: types.SimpleNamespace(files=files))
    label = ["students", "label", "--log", str(tmp_path / "log.jsonl"), "--teacher", "teacher", "--sample", "10",
             "-o", str(tmp_path / "labels.jsonl"), "--config", str(cfg)]
    assert main([*label, "--exclude-head", "2", "--route", "r"]) == 0
    assert sorted(sent) == ["tail one", "tail two"]
    written = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert sorted(x["request"]["messages"][0]["content"] for x in written) == ["tail one", "tail two"]
    sent.clear()
    assert main(label) == 0  # without it, every distinct query may be sampled, as before
    assert sorted(sent) == ["HELLO there", "hello there", "pricing", "tail one", "tail two"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main([*label, "--exclude-head", "2"])
    # The usage and the error are `students label`'s own, not those of the subcommand added last.
    assert err.value.code == 2 and "llmserve students label: error: --exclude-head takes N >= 0 and needs --route" \
        in capsys.readouterr().err


# ---- adapter digests --------------------------------------------------------------------------
def adapter(path, weights: bytes = b"w1", config: str = '{"r": 8}'):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(config)
    (path / "adapter_model.safetensors").write_bytes(weights)
    return str(path)


def test_digest_follows_the_content_not_the_place(tmp_path):
    a = adapter(tmp_path / "a")
    d = adapter_digest(a)
    assert len(d) == 64 and d == adapter_digest(a)
    shutil.copytree(a, tmp_path / "copy")
    assert adapter_digest(tmp_path / "copy") == d
    assert adapter_digest(adapter(tmp_path / "w", weights=b"w2")) != d
    assert adapter_digest(adapter(tmp_path / "c", config='{"r": 4}')) != d
    renamed = adapter(tmp_path / "r")
    (tmp_path / "r" / "adapter_model.safetensors").rename(tmp_path / "r" / "adapter_model.bin")
    assert adapter_digest(renamed) != d
    extra = adapter(tmp_path / "e")
    (tmp_path / "e" / "tokenizer.json").write_text("{}")
    assert adapter_digest(extra) != d


def test_digest_refuses_what_is_not_an_adapter(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=r"adapter_config\.json"):
        adapter_digest(tmp_path / "empty")
    with pytest.raises(AdapterError, match="not a directory"):
        adapter_digest(tmp_path / "missing")


# ---- the gate ---------------------------------------------------------------------------------
GATE = GateSpec(metric="token_overlap", min_score=0.5)


def test_eval_is_refused_unless_the_name_serves_these_weights():
    assert "not a loaded adapter" in eval_refusal("v2", "/p", "d1", None)
    assert "not those at /p" in eval_refusal("v2", "/p", "d1", {"path": "/q", "digest": "d0"})
    assert eval_refusal("v2", "/p", "d1", {"path": "/p", "digest": "d1"}) is None


def test_promote_needs_an_evaluation_of_these_very_weights():
    good = {"digest": "d1", "path": "/p", "scores": {"token_overlap": 0.8}, "n": 100,
            "training_split": {"checked": True, "overlap": 0}}
    assert "no evaluation" in promote_refusal("v2", "/p", "d1", None, GATE, None)
    assert "evaluated on the weights at /p" in promote_refusal("v2", "/q", "d2", good, GATE, None)
    low = {**good, "scores": {"token_overlap": 0.4}}
    assert "scored 0.400 on token_overlap over 100 labels" in promote_refusal("v2", "/p", "d1", low, GATE, None)
    assert "now serves other weights" in promote_refusal("v2", "/p", "d1", good, GATE, {"path": "/x", "digest": "d9"})
    assert promote_refusal("v2", "/p", "d1", good, GATE, None) is None
    assert promote_refusal("v2", "/p", "d1", good, GATE, {"path": "/p", "digest": "d1"}) is None


# ---- the promotion stack (a real redis-server) ------------------------------------------------


async def test_rollback_walks_back_through_promotions(redis_url):
    store = LifecycleStore(redis_url)
    try:
        await store.promote("walk", "student", "v2", "v1", "first", "d2")
        await store.promote("walk", "student", "v3", "v2", "second", "d3")
        assert (await store.overrides())["walk"] == {"student": "v3"}
        undone = await store.rollback("walk")
        assert undone is not None and undone["to"] == "v3"
        assert (await store.overrides())["walk"] == {"student": "v2"}
        undone = await store.rollback("walk")
        assert undone is not None and undone["to"] == "v2"
        assert "walk" not in await store.overrides()  # back to the configured student, not re-promoted
        assert await store.rollback("walk") is None
        assert [h["action"] for h in await store.history("walk")] == ["rollback", "rollback", "promote", "promote"]
        assert [h["to"] for h in await store.history("walk")] == ["v1", "v2", "v3", "v2"]
    finally:
        await store.close()


async def test_a_promotions_threshold_is_in_force_until_it_is_rolled_back(redis_url):
    store = LifecycleStore(redis_url)
    try:
        await store.promote("thr", "student", "v2", "v1", "first", "d2", {THRESHOLD: -1.25})
        await store.promote("thr", "student", "v3", "v2", "second", "d3")  # calibrated for nobody: none
        assert (await store.overrides())["thr"] == {"student": "v3"}
        await store.rollback("thr")
        assert (await store.overrides())["thr"] == {"student": "v2", THRESHOLD: -1.25}
        assert (await store.history("thr"))[-1]["settings"] == {THRESHOLD: -1.25}
        await store.rollback("thr")
        assert "thr" not in await store.overrides()
    finally:
        await store.close()


async def test_adapters_are_registered_with_their_digest(redis_url):
    store = LifecycleStore(redis_url)
    try:
        await store.register_adapter("reg", "base", "/roots/reg", "d1")
        assert await store.adapter("reg") == {"base": "base", "path": "/roots/reg", "digest": "d1"}
        assert (await store.adapters())["reg"]["digest"] == "d1"
        assert await store.adapter("nobody") is None
    finally:
        await store.close()


def test_cli_promotes_only_the_evaluated_weights_and_rolls_back_twice(redis_url, tmp_path, capsys):
    """A configured adapter (every replica loaded it at start) needs no gateway: the CLI's gate,
    the digest tie and the rollback stack run against Redis alone."""
    evaluated = adapter(tmp_path / "v1")
    other = adapter(tmp_path / "v1-other", weights=b"other")
    v0 = adapter(tmp_path / "v0", weights=b"v0")
    cfg = tmp_path / "llmserve.yaml"
    cfg.write_text(yaml.safe_dump({
        "models": [{"name": "base", "source": "x", "adapters": [{"name": "v1", "path": evaluated},
                                                               {"name": "v0", "path": v0}]},
                   {"name": "teacher", "source": "y"}],
        "routes": [{"name": "cli-route", "cascade": {"student": "base", "teacher": "teacher"},
                    "gate": {"metric": "token_overlap", "min_score": 0.5}}],
    }))
    common = ["--route", "cli-route", "--base", "base", "--redis-url", redis_url, "--config", str(cfg)]

    async def record(name, path, overlap, threshold=None):
        store = LifecycleStore(redis_url)
        await store.record_eval(name, {"digest": adapter_digest(path), "path": path, "n": 200,
                                       "training_split": {"checked": True, "overlap": 0},
                                       "scores": {"token_overlap": overlap}})
        if threshold is not None:
            await store.record_calibration(name, {"digest": adapter_digest(path), "threshold": threshold,
                                                  "met": True})
        await store.close()

    remote = ["--redis-url", redis_url, "--config", str(cfg), "--url", "http://127.0.0.1:9/v1"]  # never reached
    labels = tmp_path / "labels.jsonl"
    labels.write_text("")
    for name, path in (("v1", other), ("v9", evaluated)):  # other weights than served; a name nothing serves
        assert main(["students", "eval", "--adapter", name, "--labels", str(labels), "--path", path, *remote]) == 1
        assert "not evaluated" in capsys.readouterr().err
    asyncio.run(record("v1", evaluated, 0.9, threshold=-0.75))
    asyncio.run(record("v0", v0, 0.7))
    assert main(["students", "promote", "v1", "--path", other, *common]) == 1
    assert "evaluated on the weights at" in capsys.readouterr().err
    assert main(["students", "promote", "v0", "--path", v0, "--threshold", "-0.75", *common]) == 1
    assert "v0 has no calibration" in capsys.readouterr().err
    assert main(["students", "promote", "v0", "--path", v0, *common]) == 0
    assert main(["students", "promote", "v1", "--path", evaluated, "--threshold", "-0.5", *common]) == 1
    assert "-0.5 is not the threshold calibrated for these weights (-0.75)" in capsys.readouterr().err
    assert main(["students", "promote", "v1", "--path", evaluated, "--threshold", "-0.75", *common]) == 0
    assert "cascade threshold -0.7500" in capsys.readouterr().out

    async def overrides():
        store = LifecycleStore(redis_url)
        try:
            return await store.overrides()
        finally:
            await store.close()

    assert asyncio.run(overrides())["cli-route"] == {"student": "v1", THRESHOLD: -0.75}
    rollback = ["students", "rollback", "--route", "cli-route", "--redis-url", redis_url, "--config", str(cfg)]
    assert main(rollback) == 0 and "student back to v0" in capsys.readouterr().out
    assert main(rollback) == 0 and "student back to base" in capsys.readouterr().out
    assert main(rollback) == 1 and "nothing to roll back" in capsys.readouterr().err
    assert main(["students", "history", "--route", "cli-route", "--redis-url", redis_url]) == 0
    history = json.loads(capsys.readouterr().out)
    assert [(h["action"], h["to"]) for h in history] == [("rollback", "base"), ("rollback", "v0"),
                                                         ("promote", "v1"), ("promote", "v0")]
    evidence = history[2]["evidence"]  # the promotion records what it rested on
    assert evidence["gate"]["n"] == 200 and evidence["gate"]["passed"] is True
    assert evidence["gate"]["interval"] == "one-sided Wilson score interval"
    assert evidence["gate"]["lower_bound"] == pytest.approx(lower_bound(0.9, 200, 0.95))
    assert evidence["calibration"]["threshold"] == -0.75 and evidence["threshold_uncalibrated"] is False


def test_a_threshold_is_refused_on_a_route_without_a_cascade(tmp_path):
    cfg = tmp_path / "llmserve.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "base", "source": "x"}],
                                   "routes": [{"name": "plain", "target": "base"}]}))
    with pytest.raises(SystemExit, match="has no cascade"):
        main(["students", "promote", "v1", "--route", "plain", "--base", "base", "--path", str(tmp_path),
              "--threshold", "-1", "--config", str(cfg), "--redis-url", "redis://127.0.0.1:9"])
