"""Per-tier prompts on a route (issue 29): the teacher gets long instructions and examples, the
student the client's short input; applied wherever the route sends (cascade, prefix-decided stream,
chain, fallback, shadow; chat, completions, Responses), part of the head-cache key, and applied by
the offline cache build exactly as online, which bills a student's fill at the student's price."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import pytest
from pydantic import ValidationError

from serve.cache.pipeline import batch_entries, batch_lines, select_head
from serve.cache.store import HeadCache
from serve.config import Config, ShadowSpec
from serve.gateway.backends import Backends
from serve.gateway.service import Gateway
from serve.policies.cache_key import cache_key
from serve.policies.cost import Price
from serve.policies.tier_prompt import (
    apply_chat,
    apply_completion,
    apply_responses,
    as_served,
    digest,
    prompt_for,
    tier_of,
)
from tests.fakes import FakeUpstream

CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
TEACHER_SYSTEM = "You are the support desk of Example Co. Answer in one sentence, politely, citing the policy."
PROMPTS = {"teacher": {"system": TEACHER_SYSTEM,
                       "examples": [{"role": "user", "content": "Can I return shoes?"},
                                    {"role": "assistant", "content": "Yes, within 30 days (policy 4.2)."}]},
           "student": {"system": "Support."}}
USER = [{"role": "user", "content": "Where is my parcel?"}]


def config(prompts: dict[str, Any] | None = PROMPTS, **cascade: Any) -> Config:
    return Config.model_validate({
        "models": [{"name": "student", "source": "x", "price": {"input_per_million": 0.3, "output_per_million": 1.2}},
                   {"name": "teacher", "source": "y", "price": {"input_per_million": 2.5, "output_per_million": 10}},
                   {"name": "backup", "source": "z"}],
        "routes": [{"name": "assistant", "cache": {"ttl_s": 60}, "fallback": ["backup"], "prompts": prompts,
                    "cascade": {"student": "student", "teacher": "teacher", "min_mean_logprob": -1.0, **cascade}},
                   {"name": "plain", "target": "teacher", "prompts": prompts}],
        "auth": {"keys": [{"name": "ops", "sha256": hashlib.sha256(b"ops").hexdigest(), "admin": True}]},
    })


def gateway(cfg: Config, engine: FakeUpstream, cache: HeadCache | None = None) -> Gateway:
    backends = Backends()
    backends.update({m: [(f"{m}#1", f"http://{m}")] for m in ("student", "teacher", "backup")})
    return Gateway(cfg, backends, engine, cache=cache or HeadCache(None))


def sent(engine: FakeUpstream, model: str) -> list[dict[str, Any]]:
    return [p for _, _, p in engine.calls if p.get("model") == model]


async def ask(gw: Gateway, path: str = CHAT, route: str = "assistant", **kw: Any) -> Any:
    body: dict[str, Any] = {"model": route, "temperature": 0, **kw}
    if path == CHAT:
        body.setdefault("messages", USER)
    answer = await gw.handle(gw.config.auth.keys[0], path, body)
    for _ in range(5):  # the cache write runs off the request path
        await asyncio.sleep(0)
    return answer


TEACHER_LED = [{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": "Can I return shoes?"},
               {"role": "assistant", "content": "Yes, within 30 days (policy 4.2)."}, *USER]
STUDENT_LED = [{"role": "system", "content": "Support."}, *USER]


# ---- the pure part ------------------------------------------------------------------------------
def test_the_route_spec_refuses_unknown_fields_and_roles():
    with pytest.raises(ValidationError):
        config({"teacher": {"system": "x", "shots": []}})
    with pytest.raises(ValidationError):
        config({"teacher": {"examples": [{"role": "tool", "content": "x"}]}})


def test_only_the_cascades_student_gets_the_student_prompt():
    route = config().routes[0]
    assert (tier_of(route, "student"), tier_of(route, "teacher"), tier_of(route, "backup")) == \
        ("student", "teacher", "teacher")
    assert prompt_for(route, "backup") is route.prompts.teacher  # type: ignore[union-attr]
    # A promotion moves the student: the promoted adapter gets the student's prompt, the old base not.
    promoted = as_served(route, {"student": "student-v2"})
    assert tier_of(promoted, "student-v2") == "student" and tier_of(promoted, "student") == "teacher"
    assert prompt_for(config(None).routes[0], "teacher") is None
    # A candidate shadowing a cascade's student is asked as the student; on a plain target, as the teacher.
    shadowed = route.model_copy(update={"shadow": ShadowSpec(model="student-v3")})
    assert tier_of(shadowed, "student-v3") == "student"
    plain = config().routes[1].model_copy(update={"shadow": ShadowSpec(model="student-v3")})
    assert tier_of(plain, "student-v3") == "teacher"


def test_each_api_gets_the_prompt_before_the_clients_input_and_the_client_body_is_left_alone():
    route = config().routes[0]
    body = {"messages": list(USER), "temperature": 0}
    assert apply_chat(body, prompt_for(route, "teacher"))["messages"] == TEACHER_LED
    assert body["messages"] == USER  # a copy: the cache keys the client's own request
    done = apply_completion({"prompt": ["Where?", "When?"]}, prompt_for(route, "teacher"))
    assert done["prompt"][1] == f"{TEACHER_SYSTEM}\n\nCan I return shoes?\n\nYes, within 30 days (policy 4.2).\n\nWhen?"
    assert apply_completion({"prompt": [1, 2, 3]}, prompt_for(route, "teacher")) == {"prompt": [1, 2, 3]}
    r = apply_responses({"input": "Where?", "instructions": "Be brief."}, prompt_for(route, "teacher"))
    assert r["instructions"] == f"{TEACHER_SYSTEM}\n\nBe brief."
    assert [i.get("content") for i in r["input"]] == ["Can I return shoes?", "Yes, within 30 days (policy 4.2).",
                                                     "Where?"]


def test_the_cache_key_changes_with_either_prompt_and_is_unchanged_without_prompts():
    base = config().routes[0]
    other_teacher = config({**PROMPTS, "teacher": {"system": TEACHER_SYSTEM + " Always."}}).routes[0]
    other_student = config({**PROMPTS, "student": {"system": "Help."}}).routes[0]
    keys = {cache_key("assistant", CHAT, {"messages": USER}, prompts=digest(r))
            for r in (base, other_teacher, other_student)}
    assert len(keys) == 3
    # Routes without prompts keep the keys their cache already holds.
    assert digest(config(None).routes[0]) is None
    assert cache_key("assistant", CHAT, {"messages": USER}, prompts=None) == cache_key("assistant", CHAT,
                                                                                       {"messages": USER})


# ---- the gateway: who gets which prompt --------------------------------------------------------
async def test_an_accepted_student_gets_its_short_prompt_and_the_teacher_is_not_asked():
    engine = FakeUpstream(logprob=-0.1)
    answer = await ask(gateway(config(), engine))
    assert answer.headers["x-llmserve-served-by"] == "student"
    assert [p["messages"] for p in sent(engine, "student")] == [STUDENT_LED]
    assert sent(engine, "teacher") == []


async def test_an_escalation_sends_the_teacher_the_clients_input_led_by_the_teachers_prompt():
    engine = FakeUpstream(logprob=-5.0)  # the student is unsure: the teacher answers
    answer = await ask(gateway(config(), engine), stream=True)
    assert answer.headers["x-llmserve-served-by"] == "teacher" and answer.headers["x-llmserve-escalated"]
    assert [p["messages"] for p in sent(engine, "student")] == [STUDENT_LED]
    # Not the student's request (its system prompt, logprobs, capped max_tokens): the client's, led.
    [teacher] = sent(engine, "teacher")
    assert teacher["messages"] == TEACHER_LED and "logprobs" not in teacher and teacher["stream"] is True


async def test_a_prefix_decided_stream_asks_the_student_with_its_prompt():
    engine = FakeUpstream(logprob=-0.1, text="one two three four")
    answer = await ask(gateway(config(decide_after_tokens=2), engine), stream=True)
    assert answer.chunks is not None
    async for _ in answer.chunks:
        pass
    assert [p["messages"] for p in sent(engine, "student")] == [STUDENT_LED]


async def test_fallbacks_and_targets_get_the_teachers_prompt_and_so_do_completions_and_responses():
    engine = FakeUpstream(logprob=-5.0, down_models={"teacher"})
    answer = await ask(gateway(config(), engine))
    assert answer.headers["x-llmserve-served-by"] == "backup"
    assert [p["messages"] for p in sent(engine, "backup")] == [TEACHER_LED]
    engine = FakeUpstream()
    gw = gateway(config(), engine)
    await ask(gw, COMPLETIONS, route="plain", prompt="Where is my parcel?")
    await ask(gw, RESPONSES, route="plain", input="Where is my parcel?")
    completion, response = sent(engine, "teacher")
    assert completion["prompt"].startswith(TEACHER_SYSTEM) and completion["prompt"].endswith("Where is my parcel?")
    assert response["instructions"] == TEACHER_SYSTEM


async def test_a_changed_teacher_prompt_never_serves_answers_cached_under_the_old_one():
    cache, engine = HeadCache(None), FakeUpstream(logprob=-5.0)
    first = await ask(gateway(config(), engine, cache))
    again = await ask(gateway(config(), engine, cache))  # another gateway, the same prompts: a hit
    assert (first.headers["x-llmserve-cache"], again.headers["x-llmserve-cache"]) == ("miss", "hit")
    changed = config({**PROMPTS, "teacher": {"system": "You are terse."}})
    after = await ask(gateway(changed, engine, cache))
    assert after.headers["x-llmserve-cache"] == "miss"
    assert sent(engine, "teacher")[-1]["messages"][0] == {"role": "system", "content": "You are terse."}


# ---- the offline build: the same prompts, the same keys, the filler's own price -----------------
def test_a_student_build_asks_with_the_student_prompt_under_the_gateways_key_at_the_students_price():
    cfg = config()
    route = cfg.routes[0]
    log = [{"model": "assistant", "messages": USER, "temperature": 0}] * 3 + \
        [{"model": "assistant", "messages": [{"role": "user", "content": "Refund?"}], "temperature": 0}]
    head, _ = select_head(log, "assistant", 1, prompts=digest(route), skip=1)  # the teacher filled rank 1
    [q] = head
    assert q.request["messages"][0]["content"] == "Refund?"
    # The key the build stores under is the one the gateway computes for the client's request.
    assert q.key == cache_key("assistant", CHAT, {"messages": [{"role": "user", "content": "Refund?"}],
                                                  "temperature": 0}, prompts=digest(route))
    [line] = [json.loads(x) for x in batch_lines(head, "student", prompt_for(route, "student"))]
    assert line["body"]["messages"] == [{"role": "system", "content": "Support."},
                                        {"role": "user", "content": "Refund?"}]
    out = json.dumps({"custom_id": q.key, "response": {"status_code": 200, "body": {
        "choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": 1000, "completion_tokens": 500}}}})
    [(_, entry)] = batch_entries([out], "assistant", "student", None, "batch-1", 5.0, Price(0.3, 1.2), 0.5)
    assert entry.price == {"input_per_million": 0.3, "output_per_million": 1.2, "batch_factor": 0.5}
    assert entry.cost_usd == pytest.approx((1000 * 0.3 + 500 * 1.2) / 1e6 * 0.5)


async def test_a_hit_on_a_student_filled_entry_shows_admins_who_filled_it_and_at_what_price():
    from serve.cache.store import CacheEntry

    cfg = config()
    cache, engine = HeadCache(None), FakeUpstream()
    key = cache_key("assistant", CHAT, {"messages": USER, "temperature": 0}, prompts=digest(cfg.routes[0]))
    await cache.put("assistant", key, CacheEntry(
        response={"id": "x", "object": "chat.completion", "created": 1, "model": "student",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "Tomorrow."},
                               "finish_reason": "stop"}]},
        model="student", created_at=7.0, batch_id="batch-s", price={"input_per_million": 0.3}, cost_usd=1e-6), 60)
    answer = await ask(gateway(cfg, engine, cache))
    assert answer.headers["x-llmserve-served-by"] == "cache:student" and engine.calls == []
    assert answer.body["llmserve_provenance"] == {"model": "student", "created_at": 7.0, "batch_id": "batch-s",
                                                  "digest": None, "price": {"input_per_million": 0.3},
                                                  "cost_usd": 1e-6}


# ---- the economics report: teacher-only is the teacher with its prompt; fills at their recorded cost ---
class WordCounting(FakeUpstream):
    """Bills one prompt token per word of every message, so a longer prompt costs more."""

    async def post(self, base_url: str, path: str, body: bytes, *, stream: bool, timeout_s: float) -> Any:
        resp = await super().post(base_url, path, body, stream=stream, timeout_s=timeout_s)
        payload = json.loads(body)
        if resp.body and "messages" in payload:
            out = json.loads(resp.body)
            out["usage"]["prompt_tokens"] = sum(len(m["content"].split()) for m in payload["messages"])
            resp.body = json.dumps(out).encode()
        return resp


def test_the_reports_teacher_only_baseline_is_the_teacher_led_by_its_route_prompt():
    import argparse

    import httpx

    from serve.gateway.app import create_app
    from serve.students.report import economics

    cfg = config()
    backends = Backends()
    backends.update({m: [(f"{m}#1", f"http://{m}")] for m in ("student", "teacher", "backup")})
    engine = WordCounting(logprob=-0.1, text="ok")
    app = create_app(cfg, backends, engine, cache=HeadCache(None))
    log = [{"messages": USER, "temperature": 0, "max_tokens": 4}]
    args = argparse.Namespace(route="assistant", redis_url=None, url="http://gw/v1", api_key="ops", concurrency=1,
                              timeout=30, seed=0, sample=10, log="log", labels=None, base=None, manifest=None,
                              train_labels=None, eval_record=None, calibration_record=None, batch_price_factor=0.5,
                              train_hour_usd=0.0, horizon=None, target_saving=100.0, note=None)
    report, _ = asyncio.run(economics(args, cfg, log, transport=httpx.ASGITransport(app=app)))
    teacher_words = sum(len(m["content"].split()) for m in TEACHER_LED)
    student_words = sum(len(m["content"].split()) for m in STUDENT_LED)
    # Teacher-only: the teacher's words (its instructions, example and the client's input) and one out.
    assert report["traffic"]["teacher_req"] == pytest.approx((teacher_words * 2.5 + 10) / 1e6)
    asked = [p for p in sent(engine, "teacher")]
    assert asked and all(p["messages"] == TEACHER_LED for p in asked)  # every direct teacher call, led
    student_direct = [p for p in sent(engine, "student") if p.get("logprobs") is None]
    assert student_direct and all(p["messages"] == STUDENT_LED for p in student_direct)
    assert report["teacher_prompt"]["digest"] == digest(cfg.routes[0])
    # The prompt ratio the closing note names: the student's short input against the teacher's long one.
    assert report["terms"]["measured"]["prompt_ratio"] == pytest.approx(
        (student_words * 2.5 + 10) / (teacher_words * 2.5 + 10))


def test_a_fill_is_billed_at_the_cost_its_build_recorded_else_at_its_models_batch_price():
    import argparse

    from serve.students.report import one_off_costs

    args = argparse.Namespace(batch_price_factor=0.5, eval_record=None, calibration_record=None, manifest=None)
    prices = {"student": Price(0.3, 1.2), "teacher": Price(2.5, 10.0)}
    fills = [("student", 1000, 100, 0.000123), ("teacher", 1000, 100, None)]
    offs = {o.model: o.usd for o in one_off_costs(args, prices, fills, [], "student")}
    assert offs == {"student": pytest.approx(0.000123), "teacher": pytest.approx((1000 * 2.5 + 100 * 10) / 1e6 * 0.5)}


def test_labels_ask_the_teacher_with_its_prompt_and_keep_the_students_request_to_train_on(tmp_path, monkeypatch):
    import types

    import yaml

    import serve.cli.students as students_cli
    from serve.cli import main

    (tmp_path / "log.jsonl").write_text(json.dumps({"model": "assistant", "messages": USER, "temperature": 0}) + "\n")
    cfg = tmp_path / "llmserve.yaml"
    cfg.write_text(yaml.safe_dump(config().model_dump(mode="json", exclude_none=True)))
    sent_lines: list[dict[str, Any]] = []

    def run_batch(client: Any, lines: list[str], timeout_s: float) -> tuple[str, dict[str, Any]]:
        sent_lines.extend(json.loads(x)["body"] for x in lines)
        lp = {"content": [{"token": "a", "logprob": -0.5}, {"token": "b", "logprob": -1.5}]}
        return "b1", {json.loads(x)["custom_id"]: {"choices": [{"message": {"content": "Tomorrow."}, "logprobs": lp,
                                                                "finish_reason": "stop"}]} for x in lines}

    files = types.SimpleNamespace(create=lambda **kw: types.SimpleNamespace(id="f1"))
    monkeypatch.setattr(students_cli, "run_batch", run_batch)
    monkeypatch.setattr(students_cli, "openai_client", lambda args, **_: types.SimpleNamespace(files=files))
    assert main(["students", "label", "--log", str(tmp_path / "log.jsonl"), "--teacher", "teacher", "--route",
                 "assistant", "-o", str(tmp_path / "labels.jsonl"), "--config", str(cfg)]) == 0
    [body] = sent_lines
    assert body["messages"] == TEACHER_LED and body["logprobs"] is True and body["model"] == "teacher"
    [label] = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert label["request"]["messages"] == STUDENT_LED and label["input"]["messages"] == USER
    assert label["teacher_mean_logprob"] == pytest.approx(-1.0)
    assert label["teacher_prompt"] == digest(config().routes[0])


def test_the_demos_teacher_prompt_is_long_fits_the_context_and_is_what_the_teacher_is_taught_with():
    from pathlib import Path

    from serve.cli.demo import DEFAULT_CONFIG
    from serve.cli.demo_parts import MAX_TOKENS, faq_labels
    from serve.config import load_config
    from serve.model.tiny import train_tokenizer

    cfg = load_config(str(DEFAULT_CONFIG))
    route = cfg.route("assistant")
    assert route is not None and route.cascade is not None and Path(DEFAULT_CONFIG).is_file()
    teacher, student = prompt_for(route, route.cascade.teacher), prompt_for(route, route.cascade.student)
    assert teacher is not None and teacher.examples and student is None  # the student: the client's input alone
    tok = train_tokenizer()
    [row] = faq_labels(1, prompt=teacher)
    led = row["request"]["messages"]
    assert led[:-1] == [{"role": m.role, "content": m.content} for m in [*([] if not teacher.system else [
        type(teacher.examples[0])(role="system", content=teacher.system)]), *teacher.examples]]
    n_teacher = sum(len(tok.encode(m["content"]).ids) for m in led)
    n_student = len(tok.encode(led[-1]["content"]).ids)
    assert n_teacher >= 10 * n_student  # the prompt ratio the student's short input buys
    # Room for the chat template's markers and the answer in the tiny models' context.
    teacher_model = next(m for m in cfg.models if any(a.name == route.cascade.teacher for a in m.adapters))
    assert n_teacher + 4 * len(led) + MAX_TOKENS < teacher_model.engine.max_model_len


def test_an_entry_with_fields_a_newer_writer_added_still_loads():
    from serve.cache.store import CacheEntry

    raw = json.dumps({"response": {}, "model": "student", "created_at": 1.0, "cost_usd": 2e-6, "filled_by_v9": 1})
    entry = CacheEntry.loads(raw)
    assert (entry.model, entry.cost_usd) == ("student", 2e-6)


def test_the_teacher_behind_the_cache_pays_the_teachers_price_for_fills_the_student_made():
    import argparse

    from serve.students.attribution import Traffic, attribute
    from serve.students.report import one_off_costs

    args = argparse.Namespace(batch_price_factor=0.5, eval_record=None, calibration_record=None, manifest=None)
    prices = {"student": Price(0.3, 1.2), "teacher": Price(2.5, 10.0)}
    fills = [("student", 100, 10, 0.00001), ("student", 100, 10, 0.00001), ("teacher", 1000, 10, 0.002)]
    offs = one_off_costs(args, prices, fills, [], "student", "teacher", teacher_req=0.003)
    by = {o.model: o for o in offs}
    assert by["student"].usd == pytest.approx(0.00002) and by["student"].teacher_usd == pytest.approx(2 * 0.003 * 0.5)
    assert by["teacher"].teacher_usd is None  # the teacher's own fill costs that baseline what it cost the route
    t = Traffic(requests=1000, route_online_usd=1.0, tier_usd={"cache": 0.0}, cache_share=0.5, escalation_rate=0.1,
                teacher_req=0.003, teacher_missed_req=0.003, student_req=0.0001, student_at_teacher_price_req=0.001)
    att = attribute(t, offs, horizon=1000)
    assert att["per_1k_usd"]["teacher_behind_cache"]["one_off"] == pytest.approx(0.003 + 0.002)
    assert att["per_1k_usd"]["route"]["one_off"] == pytest.approx(0.00002 + 0.002)


async def test_fields_that_would_show_the_tiers_prompt_are_refused_on_a_route_with_prompts():
    engine = FakeUpstream()
    gw = gateway(config(), engine)
    for path, extra in ((COMPLETIONS, {"prompt": "Where?", "echo": True}), (CHAT, {"prompt_logprobs": 1}),
                        (CHAT, {"return_token_ids": True})):
        answer = await ask(gw, path, route="plain", **extra)
        field = next(k for k in extra if k != "prompt")
        assert answer.status == 400 and answer.body["error"]["param"] == field, answer.body
    assert engine.calls == []
    # Without prompts, and for chat's `echo` (it repeats the client's own last message), nothing is refused.
    answer = await ask(gateway(config(None), FakeUpstream()), COMPLETIONS, route="plain", prompt="Where?", echo=True)
    assert answer.status == 200
    assert (await ask(gw, CHAT, route="plain", echo=True)).status == 200


# ---- embeddings and scoring: refused at load --------------------------------------------------
def _embed_config(route: dict[str, Any]) -> dict[str, Any]:
    return {"models": [{"name": "chat", "source": "x"},
                       {"name": "embedder", "source": "e", "task": "embed",
                        "adapters": [{"name": "embedder-domain", "path": "/adapters/d"}]}],
            "routes": [route]}


@pytest.mark.parametrize(("route", "embedder"), [
    ({"name": "search", "target": "embedder"}, "embedder"),  # an embeddings and scoring route
    ({"name": "search", "target": "embedder-domain"}, "embedder-domain"),  # an embedding model's adapter
    ({"name": "search", "target": "chat", "fallback": ["embedder"]}, "embedder"),  # reached as a fallback
    ({"name": "search", "target": "chat", "shadow": {"model": "embedder"}}, "embedder"),
])
def test_a_route_with_prompts_that_reaches_an_embedding_model_is_refused_at_load(route, embedder):
    """An instruction before an embedding's (or a score's) input changes every vector it returns and
    no field of the answer shows it, and the gateway applies tier prompts to chat, completions and
    Responses only: prompts on such a route are a configuration error, said at load."""
    with pytest.raises(ValidationError) as e:
        Config.model_validate(_embed_config({**route, "prompts": PROMPTS}))
    msg = str(e.value)
    assert (f"route 'search' has per-tier `prompts`, but '{embedder}' is an embedding model (task: embed)"
            in msg and "remove `prompts` from this route" in msg)
    # The same route without prompts loads, and so does a route with prompts on generate models only.
    assert Config.model_validate(_embed_config(route)).route("search") is not None
    assert Config.model_validate(_embed_config({"name": "search", "target": "chat", "prompts": PROMPTS})).route(
        "search").prompts is not None
