"""Batch API: line parsing, the durable store with owners, the runner's resume-without-duplicates
and its waiting, and the HTTP API's tenant isolation."""

import asyncio
import hashlib
import io
import json
import sqlite3

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.testclient import TestClient

from serve.batch.lines import BadLine, Line, parse
from serve.batch.sql import SqliteStore
from serve.batch.store import CHUNK, EmptyFile, FileTooLarge
from serve.batch.worker import BatchRunner, new_batch
from serve.config import ApiKey, AuthSpec, BatchSpec, Config
from serve.gateway.app import create_app
from serve.gateway.auth import KeyStore
from serve.gateway.backends import Backends
from serve.gateway.batch_api import BatchAPI
from serve.gateway.errors import APIError
from serve.gateway.limits import BodyLimit
from tests.fakes import FakeUpstream

EP = "/v1/chat/completions"


def line(cid, **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": EP,
                       "body": {"model": "m", "messages": [{"role": "user", "content": cid}], **body}})


def text(body):
    return body["messages"][0]["content"]


def test_parse_keeps_going_past_bad_lines():
    content = "\n".join([line("a"), "{broken", "[1]", json.dumps({"method": "POST"}), line("a"),
                         json.dumps({"custom_id": "u", "url": "/v1/embeddings", "body": {}}),
                         json.dumps({"custom_id": "b2", "url": EP, "body": "x"}), "", line("c")]).encode()
    items = parse(content, EP)
    assert [type(i).__name__ for i in items] == ["Line", "BadLine", "BadLine", "BadLine", "BadLine", "BadLine",
                                                 "BadLine", "Line"]
    assert isinstance(items[-1], Line) and items[-1].custom_id == "c" and items[-1].line_no == 8
    assert isinstance(items[4], BadLine) and "twice" in items[4].message


# ---- store -------------------------------------------------------------------------------------
def test_store_survives_reopen(tmp_path):
    s = SqliteStore(tmp_path / "b.db", tmp_path / "files")
    f = s.put_file(b"hello", "in.jsonl", "batch", owner="ann")
    s.put_batch(new_batch("batch-1", f["id"], EP, "24h", None), owner="ann")
    assert s.put_result("batch-1", 0, "a", True, {"x": 1})
    assert not s.put_result("batch-1", 0, "a", True, {"x": 2})  # never twice
    s2 = SqliteStore(tmp_path / "b.db", tmp_path / "files")
    assert s2.file_content(f["id"], owner="ann") == b"hello"
    assert s2.get_batch("batch-1", owner="ann")["status"] == "validating" and s2.batch_owner("batch-1") == "ann"
    assert s2.results("batch-1", True) == [{"x": 1}]
    assert s2.delete_file(f["id"], owner="ann") and s2.get_file(f["id"], owner="ann") is None


def test_store_shows_each_owner_only_its_own(tmp_path):
    s = SqliteStore(tmp_path / "b.db", tmp_path / "files")
    fa = s.put_file(b"a", "a.jsonl", "batch", owner="ann")["id"]
    fb = s.put_file(b"b", "b.jsonl", "batch", owner="bob")["id"]
    s.put_batch(new_batch("batch-a", fa, EP, "24h", None), owner="ann")
    s.put_batch(new_batch("batch-b", fb, EP, "24h", None), owner="bob")
    assert [f["id"] for f in s.list_files(owner="ann")] == [fa]
    assert sorted(f["id"] for f in s.list_files(owner=None)) == sorted([fa, fb])
    assert s.list_files(owner="bob", after=fa) == []  # someone else's id is no cursor
    assert s.get_file(fa, owner="bob") is None and s.file_content(fa, owner="bob") is None
    assert s.file_path(fa, owner="bob") is None and not s.delete_file(fa, owner="bob")
    assert s.file_content(fa, owner="ann") == b"a"  # bob's delete left it alone
    assert [b["id"] for b in s.list_batches(owner="bob")] == ["batch-b"]
    assert sorted(b["id"] for b in s.list_batches(owner=None)) == ["batch-a", "batch-b"]
    assert s.list_batches(owner="bob", after="batch-a") == []
    assert s.get_batch("batch-a", owner="bob") is None
    assert s.update_batch("batch-a", owner="bob", status="cancelling") is None
    assert s.get_batch("batch-a", owner="ann")["status"] == "validating"
    assert s.update_batch("batch-a", owner=None, status="cancelling")["status"] == "cancelling"
    assert s.batch_owner("batch-b") == "bob" and s.batch_owner("batch-nope") is None


def test_store_from_before_owners_gains_the_column(tmp_path):
    db = sqlite3.connect(tmp_path / "b.db")
    db.executescript("""
        CREATE TABLE files (id TEXT PRIMARY KEY, purpose TEXT NOT NULL, filename TEXT NOT NULL,
          bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, path TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE batches (id TEXT PRIMARY KEY, data TEXT NOT NULL, status TEXT NOT NULL,
          created_at INTEGER NOT NULL);
        INSERT INTO files VALUES ('file-old', 'batch', 'old.jsonl', 3, 1, 'x', 0);
        INSERT INTO batches VALUES ('batch-old', '{"id": "batch-old"}', 'completed', 1);""")
    db.commit()
    db.close()
    s = SqliteStore(tmp_path / "b.db", tmp_path / "files")
    assert s.get_file("file-old", owner="anonymous")["filename"] == "old.jsonl"
    assert s.get_file("file-old", owner="ann") is None and s.batch_owner("batch-old") == "anonymous"
    new = s.put_file(b"new", "n.jsonl", "batch", owner="ann")["id"]  # the old table takes new rows
    assert [f["id"] for f in s.list_files(owner="ann")] == [new]


class Reads(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.sizes: list[int] = []

    def read(self, size=-1):
        self.sizes.append(size)
        return super().read(size)


def test_put_file_stream_copies_in_chunks_and_stores_nothing_over_the_cap(tmp_path):
    s = SqliteStore(tmp_path / "b.db", tmp_path / "files")
    src = Reads(b"x" * (CHUNK * 2 + 5))
    f = s.put_file_stream(src, "big", "batch", owner="ann", max_bytes=CHUNK * 3)
    assert f["bytes"] == CHUNK * 2 + 5 and s.file_content(f["id"], owner="ann") == src.getvalue()
    assert set(src.sizes) == {CHUNK}  # never one whole read
    with pytest.raises(FileTooLarge):
        s.put_file_stream(Reads(b"x" * (CHUNK * 3 + 1)), "too-big", "batch", owner="ann", max_bytes=CHUNK * 3)
    with pytest.raises(EmptyFile):
        s.put_file_stream(io.BytesIO(b""), "empty", "batch", owner="ann")
    assert [x["id"] for x in s.list_files(owner=None)] == [f["id"]]
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [f["id"]]  # no temp file left


# ---- runner ------------------------------------------------------------------------------------
def run_batch(store, lines_, call, concurrency=2, owner="ann", batch_id="batch-x", **kw):
    f = store.put_file("\n".join(lines_).encode(), "in.jsonl", "batch", owner=owner)
    store.put_batch(new_batch(batch_id, f["id"], EP, "24h", None), owner=owner)
    return BatchRunner(store, call, concurrency=concurrency, progress_every=1, **kw)


def test_runner_completes_with_errors_in_error_file_owned_by_the_batch_owner(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    owners = []

    async def call(owner, path, body):
        owners.append(owner)
        if text(body) == "boom":
            return 500, {"error": {"message": "engine died", "code": "engine_error"}}
        return 200, {"choices": [{"message": {"content": "ok " + text(body)}}]}

    runner = run_batch(store, [line("a"), "nope", line("boom"), line("b")], call, owner="ann")
    asyncio.run(runner.run_once())
    b = store.get_batch("batch-x", owner="ann")
    assert b["status"] == "completed" and b["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    assert owners == ["ann", "ann", "ann"]  # every line is sent as its owner
    out = [json.loads(x) for x in store.file_content(b["output_file_id"], owner="ann").splitlines()]
    err = [json.loads(x) for x in store.file_content(b["error_file_id"], owner="ann").splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["a", "b"]
    assert out[0]["response"]["status_code"] == 200
    assert {e["custom_id"] for e in err} == {"line-1", "boom"}
    for fid in (b["output_file_id"], b["error_file_id"]):
        assert store.get_file(fid, owner="bob") is None and store.get_file(fid, owner="ann")["purpose"] == \
            "batch_output"


def test_runner_reads_only_the_owners_input_file(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    theirs = store.put_file(line("secret").encode(), "in.jsonl", "batch", owner="bob")["id"]
    store.put_batch(new_batch("batch-x", theirs, EP, "24h", None), owner="ann")  # as if the API had not checked
    calls = []

    async def call(owner, path, body):
        calls.append(body)
        return 200, {}

    asyncio.run(BatchRunner(store, call).run_once())
    b = store.get_batch("batch-x", owner="ann")
    assert b["status"] == "failed" and b["errors"]["data"][0]["code"] == "file_not_found" and calls == []


def test_killed_runner_resumes_without_loss_or_duplicates(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    calls = []

    async def slow(owner, path, body):
        calls.append(text(body))
        await asyncio.sleep(0.01)
        return 200, {"ok": text(body)}

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
    assert store.get_batch("batch-x", owner=None)["status"] == "in_progress"
    asyncio.run(BatchRunner(store, slow, concurrency=3).run_once())  # a new worker picks it up
    b = store.get_batch("batch-x", owner=None)
    out = [json.loads(x)["custom_id"] for x in store.file_content(b["output_file_id"], owner="ann").splitlines()]
    assert sorted(out) == sorted(ids) and b["request_counts"]["completed"] == 30


def test_cancel_stops_and_keeps_finished(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")

    async def call(owner, path, body):
        if text(body) == "r5":
            store.update_batch("batch-x", owner=None, status="cancelling")
        return 200, {"ok": 1}

    runner = run_batch(store, [line(f"r{i}") for i in range(50)], call, concurrency=1)
    asyncio.run(runner.run_once())
    b = store.get_batch("batch-x", owner=None)
    assert b["status"] == "cancelled" and b["cancelled_at"] and 1 <= b["request_counts"]["completed"] < 50


def test_busy_engines_are_waited_for_not_failed(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    attempts = []

    async def call(owner, path, body):
        attempts.append(1)
        if len(attempts) <= 3:
            return 503, {"error": {"message": "no ready replica", "code": "model_not_ready"}}
        return 200, {"ok": 1}

    runner = run_batch(store, [line("a")], call, concurrency=1, retry_s=0.01)
    asyncio.run(runner.run_once())
    assert store.get_batch("batch-x", owner=None)["request_counts"]["completed"] == 1 and len(attempts) == 4


def test_engines_down_for_good_fail_the_line_after_max_retries(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")

    async def call(owner, path, body):
        return 503, {"error": {"message": "no ready replica", "code": "model_not_ready"}}

    runner = run_batch(store, [line("a")], call, concurrency=1, retry_s=0.001, max_retries=3)
    asyncio.run(asyncio.wait_for(runner.run_once(), 5))
    assert store.get_batch("batch-x", owner=None)["request_counts"] == {"total": 1, "completed": 0, "failed": 1}


def test_rate_limited_lines_wait_past_max_retries_and_honour_the_hint(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    attempts = []

    async def call(owner, path, body):
        attempts.append(owner)
        if len(attempts) <= 10:  # more 429s than max_retries: the owner's budget, not a failure
            return 429, {"error": {"message": "slow down", "code": "rate_limit_exceeded"}, "retry_after_s": 0.01}
        return 200, {"ok": 1}

    # retry_s of an hour: only the hint in the body can make this finish in time.
    runner = run_batch(store, [line("a")], call, concurrency=1, retry_s=3600, max_retries=2)
    asyncio.run(asyncio.wait_for(runner.run_once(), 5))
    b = store.get_batch("batch-x", owner=None)
    assert b["status"] == "completed" and b["request_counts"]["completed"] == 1 and len(attempts) == 11


def test_a_line_waiting_for_budget_stops_at_cancel_and_at_expiry(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    clock = [1000.0]
    calls = []

    async def call(owner, path, body):
        calls.append(text(body))
        if text(body) == "a":
            return 200, {"ok": 1}
        if len(calls) == 4:
            clock[0] += 25 * 3600  # the day is over while "b" waits
        return 429, {"error": {"message": "slow down"}}

    runner = run_batch(store, [line("a"), line("b"), line("c")], call, concurrency=1, retry_s=0.001,
                       clock=lambda: clock[0])
    store.update_batch("batch-x", owner=None, expires_at=clock[0] + 24 * 3600)
    asyncio.run(asyncio.wait_for(runner.run_once(), 5))
    b = store.get_batch("batch-x", owner=None)
    assert b["status"] == "expired" and b["request_counts"] == {"total": 3, "completed": 1, "failed": 0}
    assert b["error_file_id"] is None and "c" not in calls  # "b" was not failed, "c" never sent
    assert [json.loads(x)["custom_id"] for x in store.file_content(b["output_file_id"], owner="ann").splitlines()] \
        == ["a"]

    store2 = SqliteStore(tmp_path / "b2.db", tmp_path / "f2")

    async def cancelled_while_waiting(owner, path, body):
        store2.update_batch("batch-x", owner=None, status="cancelling")
        return 429, {"error": {"message": "slow down"}}

    runner = run_batch(store2, [line("a")], cancelled_while_waiting, concurrency=1, retry_s=0.001)
    asyncio.run(asyncio.wait_for(runner.run_once(), 5))
    b = store2.get_batch("batch-x", owner=None)
    assert b["status"] == "cancelled" and b["output_file_id"] is None and b["error_file_id"] is None


def test_a_throttled_batch_does_not_hold_up_another_owners(tmp_path):
    """With one slot, a line waiting for its owner's budget must not keep it, and a batch that
    waits must not keep a later one from starting: the other owner's batch, submitted while the
    throttled one waits, finishes first."""
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    log = []

    async def call(owner, path, body):
        if owner == "slow":
            fast = store.get_batch("batch-fast", owner=None)
            if fast is None:  # another owner submits while this batch waits for its budget
                f = store.put_file("\n".join(line(f"f{i}") for i in range(3)).encode(), "in", "batch", owner="fast")
                store.put_batch(new_batch("batch-fast", f["id"], EP, "24h", None), owner="fast")
            if fast is None or fast["status"] != "completed":
                return 429, {"error": {"message": "slow down"}}
        log.append(owner)
        return 200, {"ok": 1}

    runner = run_batch(store, [line(f"s{i}") for i in range(3)], call, concurrency=1, owner="slow",
                       batch_id="batch-slow", retry_s=0.005, poll_s=0.01)

    async def until_slow_is_done():
        worker = asyncio.create_task(runner.run_forever())
        try:
            while store.get_batch("batch-slow", owner=None)["status"] != "completed":
                await asyncio.sleep(0.01)
        finally:
            worker.cancel()

    asyncio.run(asyncio.wait_for(until_slow_is_done(), 10))
    assert log == ["fast"] * 3 + ["slow"] * 3


# ---- HTTP --------------------------------------------------------------------------------------
def test_files_and_batches_http_api(tmp_path):
    cfg = Config.model_validate({"models": [{"name": "m", "source": "x"}], "auth": {"enabled": False}})
    client = TestClient(create_app(cfg, Backends(), FakeUpstream(),
                                   batch_store=SqliteStore(tmp_path / "b.db", tmp_path / "f")))
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
    r = client.post("/v1/files", files={"file": ("x", b"")}, data={"purpose": "batch"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "The uploaded file is empty."
    assert client.delete(f"/v1/files/{fid}").json()["deleted"] is True
    assert client.get(f"/v1/files/{fid}").json()["error"]["code"] == "file_not_found"


def key(name, admin=False):
    return ApiKey(name=name, sha256=hashlib.sha256(name.encode()).hexdigest(), admin=admin)


def tenant_app(store, body_limit=None, **api):
    keys = KeyStore(AuthSpec(keys=[key("ann"), key("bob"), key("root", admin=True)]))

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    batch_api = BatchAPI(store, lambda r: keys.authenticate(r.headers.get("authorization")), **api)
    app = Starlette(routes=batch_api.routes(), exception_handlers={APIError: api_error})
    return BodyLimit(app, lambda path: body_limit) if body_limit else app


def as_(name):
    return {"authorization": f"Bearer {name}"}


def test_another_key_sees_nothing_and_gets_what_an_unknown_id_gets(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    c = TestClient(tenant_app(store))
    fid = c.post("/v1/files", files={"file": ("in.jsonl", line("a").encode())}, data={"purpose": "batch"},
                 headers=as_("ann")).json()["id"]
    bid = c.post("/v1/batches", json={"input_file_id": fid, "endpoint": EP}, headers=as_("ann")).json()["id"]
    out = store.put_file(b"{}", "out.jsonl", "batch_output", owner="ann")["id"]  # as the worker writes it
    assert c.get("/v1/files", headers=as_("bob")).json()["data"] == []
    assert c.get("/v1/batches", headers=as_("bob")).json()["data"] == []
    assert c.get("/v1/files", headers=as_("root")).json()["data"] == []  # an admin too, unless it asks

    def same_as_unknown(method, path_of):
        mine, unknown = c.request(method, path_of(fid, bid), headers=as_("bob")), \
            c.request(method, path_of("file-nope", "batch-nope"), headers=as_("bob"))
        assert mine.status_code == unknown.status_code == 404
        assert mine.json() == json.loads(json.dumps(unknown.json()).replace("file-nope", fid)
                                         .replace("batch-nope", bid))

    for method, path_of in [("GET", lambda f, b: f"/v1/files/{f}"), ("GET", lambda f, b: f"/v1/files/{f}/content"),
                            ("DELETE", lambda f, b: f"/v1/files/{f}"), ("GET", lambda f, b: f"/v1/batches/{b}"),
                            ("POST", lambda f, b: f"/v1/batches/{b}/cancel")]:
        same_as_unknown(method, path_of)
    assert c.get(f"/v1/files/{out}/content", headers=as_("bob")).status_code == 404
    theirs = c.post("/v1/batches", json={"input_file_id": fid, "endpoint": EP}, headers=as_("bob"))
    unknown = c.post("/v1/batches", json={"input_file_id": "file-nope", "endpoint": EP}, headers=as_("bob"))
    assert theirs.status_code == unknown.status_code == 400
    assert theirs.json()["error"]["message"] == unknown.json()["error"]["message"].replace("file-nope", fid)
    # ann's objects are untouched by all of it, and still hers
    assert c.get(f"/v1/files/{fid}/content", headers=as_("ann")).content == line("a").encode()
    assert c.get(f"/v1/batches/{bid}", headers=as_("ann")).json()["status"] == "validating"
    assert sorted(f["id"] for f in c.get("/v1/files", headers=as_("ann")).json()["data"]) == sorted([out, fid])


def test_admin_sees_all_only_when_asking(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    c = TestClient(tenant_app(store))
    fid = c.post("/v1/files", files={"file": ("in.jsonl", line("a").encode())}, data={"purpose": "batch"},
                 headers=as_("ann")).json()["id"]
    bid = c.post("/v1/batches", json={"input_file_id": fid, "endpoint": EP}, headers=as_("ann")).json()["id"]
    every = {"all_owners": "true"}
    assert [f["id"] for f in c.get("/v1/files", params=every, headers=as_("root")).json()["data"]] == [fid]
    assert [b["id"] for b in c.get("/v1/batches", params=every, headers=as_("root")).json()["data"]] == [bid]
    assert c.get(f"/v1/files/{fid}/content", params=every, headers=as_("root")).content == line("a").encode()
    assert c.post(f"/v1/batches/{bid}/cancel", params=every, headers=as_("root")).json()["status"] == "cancelling"
    assert c.get(f"/v1/batches/{bid}", headers=as_("root")).status_code == 404  # not without asking
    r = c.get("/v1/files", params=every, headers=as_("bob"))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert c.get("/v1/files", params={"all_owners": "maybe"}, headers=as_("root")).status_code == 400
    assert c.get("/v1/files", headers={"authorization": "Bearer nobody"}).status_code == 401
    assert c.delete(f"/v1/files/{fid}", params=every, headers=as_("root")).json()["deleted"] is True
    assert store.get_file(fid, owner=None) is None


def test_upload_over_the_cap_gets_413_and_stores_nothing(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    # the store's own check, behind the middleware
    c = TestClient(tenant_app(store, batch=BatchSpec(max_upload_bytes=100)))
    r = c.post("/v1/files", files={"file": ("in.jsonl", b"x" * 101)}, data={"purpose": "batch"}, headers=as_("ann"))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert c.post("/v1/files", files={"file": ("in.jsonl", b"x" * 100)}, data={"purpose": "batch"},
                  headers=as_("ann")).status_code == 200

    # The middleware, on a chunked upload: cut off as the bytes arrive.
    store = SqliteStore(tmp_path / "b2.db", tmp_path / "f2")
    app = tenant_app(store, body_limit=64 * 1024)
    pulled = []

    async def body():
        yield (b"--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
               b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n")
        for _ in range(1000):
            pulled.append(1)
            yield b"x" * 1024

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            r = await client.post("/v1/files", content=body(), headers={
                **as_("ann"), "content-type": "multipart/form-data; boundary=B"})
            return r, (await client.get("/v1/files", headers=as_("ann"))).json()

    r, listed = asyncio.run(go())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert len(pulled) <= 66 and listed["data"] == []
    assert list((tmp_path / "f2").iterdir()) == []
