"""Batch API: line parsing, the durable store, and the runner's resume-without-duplicates."""

import asyncio
import json

import pytest
from starlette.testclient import TestClient

from serve.batch.lines import BadLine, Line, parse
from serve.batch.store import BatchStore
from serve.batch.worker import BatchRunner, new_batch
from serve.config import Config
from serve.gateway.app import create_app
from serve.gateway.backends import Backends
from tests.fakes import FakeUpstream

EP = "/v1/chat/completions"


def line(cid, **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": EP,
                       "body": {"model": "m", "messages": [{"role": "user", "content": cid}], **body}})


def test_parse_keeps_going_past_bad_lines():
    content = "\n".join([line("a"), "{broken", "[1]", json.dumps({"method": "POST"}), line("a"),
                         json.dumps({"custom_id": "u", "url": "/v1/embeddings", "body": {}}),
                         json.dumps({"custom_id": "b2", "url": EP, "body": "x"}), "", line("c")]).encode()
    items = parse(content, EP)
    assert [type(i).__name__ for i in items] == ["Line", "BadLine", "BadLine", "BadLine", "BadLine", "BadLine",
                                                 "BadLine", "Line"]
    assert isinstance(items[-1], Line) and items[-1].custom_id == "c" and items[-1].line_no == 8
    assert isinstance(items[4], BadLine) and "twice" in items[4].message


def test_store_survives_reopen(tmp_path):
    s = BatchStore(tmp_path / "b.db", tmp_path / "files")
    f = s.put_file(b"hello", "in.jsonl", "batch")
    s.put_batch(new_batch("batch-1", f["id"], EP, "24h", None))
    assert s.put_result("batch-1", 0, "a", True, {"x": 1})
    assert not s.put_result("batch-1", 0, "a", True, {"x": 2})  # never twice
    s2 = BatchStore(tmp_path / "b.db", tmp_path / "files")
    assert s2.file_content(f["id"]) == b"hello" and s2.get_batch("batch-1")["status"] == "validating"
    assert s2.results("batch-1", True) == [{"x": 1}]
    assert s2.delete_file(f["id"]) and s2.get_file(f["id"]) is None


def run_batch(store, lines_, call, concurrency=2):
    f = store.put_file("\n".join(lines_).encode(), "in.jsonl", "batch")
    store.put_batch(new_batch("batch-x", f["id"], EP, "24h", None))
    runner = BatchRunner(store, call, concurrency=concurrency, progress_every=1)
    return runner


def test_runner_completes_with_errors_in_error_file(tmp_path):
    store = BatchStore(tmp_path / "b.db", tmp_path / "f")

    async def call(path, body):
        if body["messages"][0]["content"] == "boom":
            return 500, {"error": {"message": "engine died", "code": "engine_error"}}
        return 200, {"choices": [{"message": {"content": "ok " + body["messages"][0]["content"]}}]}

    runner = run_batch(store, [line("a"), "nope", line("boom"), line("b")], call)
    asyncio.run(runner.run_once())
    b = store.get_batch("batch-x")
    assert b["status"] == "completed" and b["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    out = [json.loads(x) for x in store.file_content(b["output_file_id"]).splitlines()]
    err = [json.loads(x) for x in store.file_content(b["error_file_id"]).splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["a", "b"]
    assert out[0]["response"]["status_code"] == 200
    assert {e["custom_id"] for e in err} == {"line-1", "boom"}


def test_killed_runner_resumes_without_loss_or_duplicates(tmp_path):
    store = BatchStore(tmp_path / "b.db", tmp_path / "f")
    calls = []

    async def slow(path, body):
        calls.append(body["messages"][0]["content"])
        await asyncio.sleep(0.01)
        return 200, {"ok": body["messages"][0]["content"]}

    ids = [f"r{i}" for i in range(30)]
    runner = run_batch(store, [line(c) for c in ids], slow)

    async def kill_midway():
        task = asyncio.ensure_future(runner.run_once())
        while len(store.done_lines("batch-x")) < 10:
            await asyncio.sleep(0.005)
        task.cancel()  # the worker dies mid-batch
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(kill_midway())
    assert store.get_batch("batch-x")["status"] == "in_progress"
    asyncio.run(BatchRunner(store, slow, concurrency=3).run_once())  # a new worker picks it up
    b = store.get_batch("batch-x")
    out = [json.loads(x)["custom_id"] for x in store.file_content(b["output_file_id"]).splitlines()]
    assert sorted(out) == sorted(ids) and b["request_counts"]["completed"] == 30


def test_cancel_stops_and_keeps_finished(tmp_path):
    store = BatchStore(tmp_path / "b.db", tmp_path / "f")

    async def call(path, body):
        if body["messages"][0]["content"] == "r5":
            store.update_batch("batch-x", status="cancelling")
        return 200, {"ok": 1}

    runner = run_batch(store, [line(f"r{i}") for i in range(50)], call, concurrency=1)
    asyncio.run(runner.run_once())
    b = store.get_batch("batch-x")
    assert b["status"] == "cancelled" and b["cancelled_at"] and 1 <= b["request_counts"]["completed"] < 50


def test_files_and_batches_http_api(tmp_path):
    cfg = Config.model_validate({"models": [{"name": "m", "source": "x"}], "auth": {"enabled": False}})
    client = TestClient(create_app(cfg, Backends(), FakeUpstream(),
                                   batch_store=BatchStore(tmp_path / "b.db", tmp_path / "f")))
    r = client.post("/v1/files", files={"file": ("in.jsonl", line("a").encode())}, data={"purpose": "batch"})
    assert r.status_code == 200 and r.json()["object"] == "file"
    fid = r.json()["id"]
    assert client.get(f"/v1/files/{fid}/content").content == line("a").encode()
    assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [fid]
    b = client.post("/v1/batches", json={"input_file_id": fid, "endpoint": EP, "completion_window": "24h"}).json()
    assert b["status"] == "validating" and b["object"] == "batch"
    assert client.get(f"/v1/batches/{b['id']}").json()["id"] == b["id"]
    assert client.post(f"/v1/batches/{b['id']}/cancel").json()["status"] == "cancelling"
    assert client.get("/v1/batches").json()["data"][0]["id"] == b["id"]
    for bad in [{"input_file_id": "file-x", "endpoint": EP}, {"input_file_id": fid, "endpoint": "/v1/x"},
                {"input_file_id": fid, "endpoint": EP, "completion_window": "soon"}]:
        r = client.post("/v1/batches", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"]
    assert client.get("/v1/batches/batch-nope").status_code == 404
    assert client.post("/v1/files", files={"file": ("x", b"x")}, data={"purpose": "nope"}).status_code == 400
    assert client.delete(f"/v1/files/{fid}").json()["deleted"] is True
    assert client.get(f"/v1/files/{fid}").json()["error"]["code"] == "file_not_found"


def test_busy_engines_are_waited_for_not_failed(tmp_path):
    store = BatchStore(tmp_path / "b.db", tmp_path / "f")
    attempts = []

    async def call(path, body):
        attempts.append(1)
        if len(attempts) <= 3:
            return 503, {"error": {"message": "no ready replica", "code": "model_not_ready"}}
        return 200, {"ok": 1}

    runner = run_batch(store, [line("a")], call, concurrency=1)
    runner.retry_s = 0.01
    asyncio.run(runner.run_once())
    assert store.get_batch("batch-x")["request_counts"]["completed"] == 1 and len(attempts) == 4
