"""Free-text agreement: an embedding similarity through the gateway's /v1/embeddings and an LLM
judge through the Batch API with a json_schema verdict (serve/students/judges.py), and `students
eval` recording both (serve/cli/students_eval.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import yaml

from serve.cli import main
from serve.students.judges import VERDICT_SCHEMA, embedding_similarity, judge_lines, judge_score, verdict
from serve.students.registry import LifecycleStore, adapter_digest

VECTORS = {"open the page": [1.0, 0.0], "go to the page": [0.8, 0.6], "refund": [0.0, 1.0], "no": [-1.0, 0.0]}


def embeddings_client(calls: list[dict]):
    from openai import OpenAI

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append({"path": request.url.path, **body})
        data = [{"object": "embedding", "index": i, "embedding": VECTORS[t]} for i, t in enumerate(body["input"])]
        return httpx.Response(200, json={"object": "list", "data": data[::-1], "model": body["model"],
                                         "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    return OpenAI(base_url="http://gw/v1", api_key="k", http_client=httpx.Client(transport=httpx.MockTransport(handle)))


def test_embedding_similarity_is_the_cosine_of_the_gateways_embeddings():
    calls: list[dict] = []
    pairs = [("open the page", "go to the page"), ("open the page", "refund"), ("no", "open the page"),
             ("", ""), ("", "refund")]
    sims = embedding_similarity(embeddings_client(calls), "embedder", pairs, batch=2)
    assert sims == [pytest.approx(0.8), 0.0, 0.0, 1.0, 0.0]  # opposed is clamped to 0; empty pairs: no call
    assert [c["path"] for c in calls] == ["/v1/embeddings", "/v1/embeddings"]  # 3 scored pairs, 2 at a time
    assert calls[0]["model"] == "embedder" and calls[0]["input"] == ["open the page", "open the page",
                                                                     "go to the page", "refund"]


def test_judge_lines_ask_for_a_json_schema_verdict_and_unreadable_verdicts_count_against():
    lines = [json.loads(x) for x in judge_lines([("a", {"messages": [{"role": "user", "content": "q?"}]},
                                                  "cand", "ref")], "teacher")]
    body = lines[0]["body"]
    assert (lines[0]["custom_id"], lines[0]["url"], body["model"], body["temperature"]) == (
        "a", "/v1/chat/completions", "teacher", 0)
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "verdict", "schema": VERDICT_SCHEMA, "strict": True}}
    assert "Reference answer: ref" in body["messages"][1]["content"]
    assert "Candidate answer: cand" in body["messages"][1]["content"]

    def said(content):
        return {"choices": [{"message": {"content": content}}]}

    assert verdict(said('{"same_meaning": true, "reason": "x"}')) == 1.0
    assert verdict(said('{"same_meaning": false, "reason": "x"}')) == 0.0
    # A raw control character in the reason, as xgrammar's maxLength-bounded string lets through: read.
    assert verdict(said('{"same_meaning":false,"reason":"gatew~\x18\x14dT"}')) == 0.0
    assert verdict(said('{"same_meaning": "yes"}')) is None and verdict(said("yes")) is None
    answers = {"a": said('{"same_meaning": true, "reason": ""}'), "b": said("garbled")}
    assert judge_score(["a", "b", "c"], answers) == (pytest.approx(1 / 3), 2)


def test_eval_records_the_judge_and_the_embedding_similarity(redis_url, tmp_path, monkeypatch, capsys):
    import serve.cli.students_eval as ev

    path = tmp_path / "v1"
    path.mkdir()
    (path / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter_model.safetensors").write_bytes(b"w")
    (tmp_path / "v1.manifest.json").write_text(json.dumps({"digest": adapter_digest(path),
                                                           "split": {"train": ["t0"], "held_out": ["a", "b"]}}))
    cfg = tmp_path / "llmserve.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "base", "source": "x", "adapters": [
        {"name": "v1", "path": str(path)}]}, {"name": "teacher", "source": "y"}, {"name": "embedder", "source": "z"}],
        "routes": [{"name": "r", "cascade": {"student": "base", "teacher": "teacher"},
                    "gate": {"metric": "judge", "min_score": 0.1, "min_samples": 2}}]}))
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": i, "request": {"messages": [{"role": "user", "content": "q"}]},
                                          "teacher": t}) + "\n" for i, t in (("a", "go to the page"), ("b", "refund"))))
    student = {"a": "open the page", "b": "open the page"}

    def run_batch(client, lines, timeout_s):
        rows = [json.loads(x) for x in lines]
        if rows[0]["body"]["model"] == "teacher":  # the judge: the same meaning for a only
            same = {"a": True, "b": False}
            return "judge-batch", {r["custom_id"]: {"choices": [{"message": {"content": json.dumps(
                {"same_meaning": same[r["custom_id"]], "reason": "-"})}}], "usage": {
                "prompt_tokens": 50, "completion_tokens": 9}} for r in rows}
        return "eval-batch", {r["custom_id"]: {"choices": [{"message": {"content": student[r["custom_id"]]}}],
                                               "usage": {"prompt_tokens": 3, "completion_tokens": 3}} for r in rows}

    calls: list[dict] = []
    monkeypatch.setattr(ev, "run_batch", run_batch)
    monkeypatch.setattr(ev, "openai_client", lambda args, **_: embeddings_client(calls))
    remote = ["--redis-url", redis_url, "--config", str(cfg), "--url", "http://gw/v1"]
    assert main(["students", "eval", "--adapter", "v1", "--labels", str(labels), "--path", str(path),
                 "--judge", "teacher", "--embedding-model", "embedder", *remote]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["scores"]["judge"] == 0.5 and record["scores"]["embedding_similarity"] == pytest.approx(0.4)
    assert record["judge"] == {"model": "teacher", "batch_id": "judge-batch", "unreadable": 0,
                               "usage": {"prompt_tokens": 100, "completion_tokens": 18}}
    assert record["training_split"] == {"checked": True, "manifest": str(tmp_path / "v1.manifest.json"),
                                        "train": 1, "overlap": 0}

    async def latest():
        store = LifecycleStore(redis_url)
        try:
            return await store.latest_eval("v1")
        finally:
            await store.close()

    assert asyncio.run(latest())["scores"]["judge"] == 0.5  # what the gate will read
