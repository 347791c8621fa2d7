"""Batch API against a hostile tenant (issue 26): files and batches spend the key's request rate,
a key holds at most its storage quota, old files and batches are purged, the worker reads an input
file a line at a time and one batch per owner at a time, and odd input is a 400, never a 500."""

import asyncio
import hashlib
import io
import json
import time
import uuid
from typing import Any

import pytest
from starlette.testclient import TestClient

from serve.batch.sql import SqliteStore
from serve.batch.store import BatchStore, QuotaExceeded
from serve.batch.worker import BatchRunner, new_batch
from serve.config import Config
from serve.gateway.app import create_app
from serve.gateway.backends import Backends
from tests.fakes import FakeUpstream

EP = "/v1/chat/completions"


def line(cid: str, text: str | None = None) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": EP,
                       "body": {"model": "m", "messages": [{"role": "user", "content": text or cid}]}})


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def app_client(store: BatchStore, **batch: Any) -> TestClient:
    """The gateway's own app (create_app), so the wiring to its rate limiter is what is tested."""
    cfg = Config.model_validate({
        "models": [{"name": "m", "source": "x"}],
        "auth": {"keys": [{"name": "ann", "sha256": sha("ann"), "requests_per_minute": 3},
                          {"name": "bob", "sha256": sha("bob"), "storage_bytes": 1000},
                          {"name": "cat", "sha256": sha("cat")}]},
        "batch": batch,
    })
    return TestClient(create_app(cfg, Backends(), FakeUpstream(), batch_store=store), raise_server_exceptions=False)


def as_(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {name}"}


def upload(c: TestClient, who: str, content: bytes) -> Any:
    return c.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}, headers=as_(who))


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path) -> Any:
    if request.param == "sqlite":
        s: BatchStore = SqliteStore(tmp_path / "b.db", tmp_path / "files")
    else:
        from serve.batch.pg import PostgresStore

        s = PostgresStore(request.getfixturevalue("postgres").new_database(f"t_{uuid.uuid4().hex[:12]}"),
                          tmp_path / "files")
    yield s
    s.close()


# ---- rate limit --------------------------------------------------------------------------------
def test_files_and_batches_spend_the_keys_requests_per_minute(tmp_path):
    c = app_client(SqliteStore(tmp_path / "b.db", tmp_path / "f"))
    fid = upload(c, "ann", line("a").encode()).json()["id"]
    assert c.get("/v1/files", headers=as_("ann")).status_code == 200
    assert c.post("/v1/batches", json={"input_file_id": fid, "endpoint": EP}, headers=as_("ann")).status_code == 200
    for method, path in [("GET", "/v1/batches"), ("POST", "/v1/files"), ("GET", f"/v1/files/{fid}/content")]:
        r = c.request(method, path, headers=as_("ann"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(r.headers["retry-after"]) <= 20 and r.headers["x-ratelimit-limit-requests"] == "3"
    assert c.get("/v1/files", headers=as_("cat")).status_code == 200  # another key's bucket is its own


# ---- storage quota -----------------------------------------------------------------------------
def test_an_upload_past_the_keys_quota_is_400_and_stores_nothing(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    c = app_client(store, storage_bytes_per_key=300)
    first = upload(c, "bob", b"x" * 600)  # bob's own quota: 1000
    assert first.status_code == 200
    r = upload(c, "bob", b"y" * 500)
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "You have exceeded your file storage quota of 1000 bytes. Delete files you no longer need, "
                   "or upload a smaller file.", "type": "invalid_request_error", "param": "file",
        "code": "storage_quota_exceeded"}
    assert len(list((tmp_path / "f").iterdir())) == 1 and store.usage("bob") == 600
    assert c.delete(f"/v1/files/{first.json()['id']}", headers=as_("bob")).status_code == 200
    assert upload(c, "bob", b"y" * 500).status_code == 200  # room again once it deleted a file
    # cat has no quota of its own: batch.storage_bytes_per_key
    assert upload(c, "cat", b"z" * 301).json()["error"]["code"] == "storage_quota_exceeded"
    fid = upload(c, "cat", line("a").encode()).json()["id"]
    assert c.post("/v1/batches", json={"input_file_id": fid, "endpoint": EP}, headers=as_("cat")).status_code == 200
    store.put_file(b"o" * 400, "out.jsonl", "batch_output", owner="cat")  # a batch's output, over the quota
    r = c.post("/v1/batches", json={"input_file_id": fid, "endpoint": EP}, headers=as_("cat"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "storage_quota_exceeded"


def test_quota_counts_files_and_unfinished_results_and_holds_in_the_store(store):
    f = store.put_file(b"x" * 100, "in", "batch", owner="ann")
    store.put_batch(new_batch("batch-q", f["id"], EP, "24h", None), owner="ann")
    store.put_result("batch-q", 0, "a", True, {"pad": "r" * 50})
    assert store.usage("ann") == 100 + len(json.dumps({"pad": "r" * 50})) and store.usage("bob") == 0
    with pytest.raises(QuotaExceeded):
        store.put_file_stream(io.BytesIO(b"y" * 100), "in2", "batch", owner="ann", quota=250)
    room = 250 - store.usage("ann")
    assert store.put_file_stream(io.BytesIO(b"y" * room), "in2", "batch", owner="ann", quota=250)["bytes"] == room
    with pytest.raises(QuotaExceeded):
        store.put_file_stream(io.BytesIO(b"z"), "in3", "batch", owner="ann", quota=250)
    assert store.put_file_stream(io.BytesIO(b"z"), "in3", "batch", owner="bob", quota=250)["bytes"] == 1

    class Racing(io.BytesIO):
        """An upload during which another upload of the same owner lands."""

        def read(self, size: int | None = -1) -> bytes:
            if self.tell() == 0:
                store.put_file(b"w" * 200, "other", "batch", owner="cat")
            return super().read(size)

    with pytest.raises(QuotaExceeded):  # room for either when it began, not for both
        store.put_file_stream(Racing(b"v" * 100), "in4", "batch", owner="cat", quota=250)
    assert store.usage("cat") == 200 and len(store.list_files(owner="cat")) == 1


# ---- retention and purge -----------------------------------------------------------------------
def test_purge_deletes_old_files_batches_and_results_but_not_a_running_batchs_input(store):
    live = store.put_file(line("a").encode(), "in", "batch", owner="ann")
    old = store.put_file(b"old", "old", "batch", owner="ann")
    store.put_batch(new_batch("batch-run", live["id"], EP, "24h", None), owner="ann")
    store.put_batch(new_batch("batch-done", old["id"], EP, "24h", None), owner="ann")
    store.put_result("batch-done", 0, "a", True, {"x": 1})
    store.update_batch("batch-done", owner=None, status="cancelling")
    store.update_batch("batch-done", owner=None, status="cancelled")
    assert store.purge(int(time.time()) - 60) == (0, 0)  # nothing is that old yet
    assert store.purge(int(time.time()) + 60) == (1, 1)
    assert store.get_file(old["id"], owner=None) is None and store.open_file(old["id"], owner=None) is None
    assert store.get_batch("batch-done", owner=None) is None and store.done_lines("batch-done") == set()
    assert store.file_content(live["id"], owner="ann") == line("a").encode()  # batch-run still reads it
    assert store.get_batch("batch-run", owner="ann")["status"] == "validating"
    assert store.usage("ann") == len(line("a"))


def test_the_worker_purges_what_is_past_retention(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    fid = store.put_file(b"x", "in", "batch", owner="ann")["id"]

    async def call(owner, path, body):
        return 200, {}

    async def run(clock_offset: float) -> None:
        runner = BatchRunner(store, call, poll_s=0.01, retention_s=3600, clock=lambda: time.time() + clock_offset)
        task = asyncio.create_task(runner.run_forever())
        await asyncio.sleep(0.2)
        task.cancel()

    asyncio.run(run(0))
    assert store.get_file(fid, owner="ann") is not None
    asyncio.run(run(3600 + 60))
    assert store.get_file(fid, owner="ann") is None and list((tmp_path / "f").iterdir()) == []


def test_files_show_when_they_expire(tmp_path):
    c = app_client(SqliteStore(tmp_path / "b.db", tmp_path / "f"), retention_s=7200)
    f = upload(c, "cat", b"x").json()
    assert f["expires_at"] == f["created_at"] + 7200
    assert c.get(f"/v1/files/{f['id']}", headers=as_("cat")).json()["expires_at"] == f["created_at"] + 7200


# ---- the worker streams ------------------------------------------------------------------------
class Spy(io.BufferedReader):
    """The input file as the worker sees it: no read of the whole, and each read's size noted."""

    largest = 0

    def read(self, size: int | None = -1) -> bytes:
        assert size is not None and size >= 0, "the worker read the whole file"
        return self._note(super().read(size))

    def readline(self, size: int | None = -1) -> bytes:
        assert size is not None and size >= 0, "the worker read a line with no limit"
        return self._note(super().readline(size))

    def _note(self, b: bytes) -> bytes:
        Spy.largest = max(Spy.largest, len(b))
        return b


def test_the_worker_reads_the_input_a_line_at_a_time_and_skips_an_overlong_line(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    huge = line("huge", "h" * 5000)
    f = store.put_file("\n".join([line("a"), huge, line("b")]).encode(), "in", "batch", owner="ann")
    store.put_batch(new_batch("batch-s", f["id"], EP, "24h", None), owner="ann")
    opened = store.open_file
    store.open_file = lambda fid, owner: Spy(opened(fid, owner=owner))  # type: ignore[method-assign, arg-type]
    sent = []

    async def call(owner, path, body):
        sent.append(body["messages"][0]["content"])
        return 200, {"ok": 1}

    asyncio.run(BatchRunner(store, call, max_line_bytes=1000).run_once())
    store.open_file = opened  # type: ignore[method-assign]
    assert 0 < Spy.largest < len(huge)  # never the long line whole, let alone the file
    b = store.get_batch("batch-s", owner=None)
    assert b["status"] == "completed" and sorted(sent) == ["a", "b"]
    assert b["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    err = json.loads(store.file_content(b["error_file_id"], owner="ann"))
    assert err["error"]["message"] == "line 2 is longer than 1000 bytes" and err["error"]["line"] == 2


async def until_done(runner: BatchRunner, store: BatchStore, mode: str) -> None:
    if mode == "once":
        await runner.run_once()
        return
    task = asyncio.create_task(runner.run_forever())
    try:
        while store.active_batches():
            await asyncio.sleep(0.01)
    finally:
        task.cancel()


@pytest.mark.parametrize("mode", ["once", "forever"])
def test_one_batch_per_owner_at_a_time_and_too_many_lines_fail_the_batch(tmp_path, mode):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    for bid, lines in [("batch-1", ["1a", "1b", "1c"]), ("batch-2", ["2a", "2b", "2c"]),
                       ("batch-big", ["x", "y", "z", "w"])]:
        f = store.put_file("\n".join(line(c) for c in lines).encode(), "in", "batch", owner="ann")
        store.put_batch(new_batch(bid, f["id"], EP, "24h", None), owner="ann")
    sent = []

    async def call(owner, path, body):
        await asyncio.sleep(0.01)  # lines of batches run side by side would interleave
        sent.append(body["messages"][0]["content"])
        return 200, {"ok": 1}

    asyncio.run(asyncio.wait_for(until_done(BatchRunner(store, call, concurrency=2, max_lines=3, poll_s=0.01),
                                            store, mode), 10))
    assert [s[0] for s in sent] == ["1"] * 3 + ["2"] * 3
    big = store.get_batch("batch-big", owner="ann")
    assert big["status"] == "failed" and big["errors"]["data"][0]["code"] == "too_many_requests"


# ---- 400, not 500 ------------------------------------------------------------------------------
def test_odd_numbers_deep_json_and_big_metadata_are_400s(tmp_path):
    store = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    c = app_client(store)
    deep = "[" * 100_000 + "]" * 100_000
    fid = upload(c, "cat", "\n".join([line("a"), '{"custom_id": "d", "body": ' + deep + "}"]).encode()).json()["id"]
    for method, path, kw, param in [
        ("GET", "/v1/files", {"params": {"limit": "²"}}, "limit"),
        ("GET", "/v1/batches", {"params": {"limit": "٣"}}, "limit"),
        ("POST", "/v1/batches", {"json": {"input_file_id": fid, "endpoint": EP, "completion_window": "²h"}},
         "completion_window"),
        ("POST", "/v1/batches", {"content": '{"input_file_id": ' + deep + "}",
                                 "headers": {"content-type": "application/json"}}, None),
        ("POST", "/v1/batches", {"json": {"input_file_id": fid, "endpoint": EP,
                                          "metadata": {f"k{i}": "v" for i in range(17)}}}, "metadata"),
        ("POST", "/v1/batches", {"json": {"input_file_id": fid, "endpoint": EP, "metadata": {"k": {"a": 1}}}},
         "metadata"),
    ]:
        headers = {**as_("cat"), **kw.pop("headers", {})}
        r = c.request(method, path, headers=headers, **kw)
        assert r.status_code == 400, (path, kw, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["param"] == param
    # A line nested deeper than Python's parser goes is a bad line; the rest of the batch runs.
    bid = c.post("/v1/batches", json={"input_file_id": fid, "endpoint": EP}, headers=as_("cat")).json()["id"]

    async def call(owner, path, body):
        return 200, {"ok": 1}

    asyncio.run(BatchRunner(store, call).run_once())
    b = store.get_batch(bid, owner="cat")
    assert b["status"] == "completed" and b["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert "nested too deeply" in json.loads(store.file_content(b["error_file_id"], owner="cat"))["error"]["message"]
