"""The batch store's contract, on both backends: SQLite (the embedded default) and a real
PostgreSQL (several gateways and a batch worker on different pods). Each test opens two or more
store objects on one database, as separate gateway processes would, and races them where the
contract says exactly one may win."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.testclient import TestClient

from serve.batch.backends import open_store
from serve.batch.files import CHUNK, EmptyFile, FileTooLarge
from serve.batch.sql import SqliteStore
from serve.batch.store import BatchStore, allowed
from serve.batch.worker import BatchRunner, new_batch
from serve.config import load_config
from serve.gateway.batch_api import BatchAPI
from serve.gateway.errors import APIError
from tests.unit.test_batch import Reads

EP = "/v1/chat/completions"
ROUNDS = 20  # races per test: enough that a non-atomic step loses at least once (each break was seen to)


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request, tmp_path) -> Any:
    """Opens store objects on one fresh database and one file directory, like gateways on pods."""
    opened: list[BatchStore] = []
    if request.param == "sqlite":
        def make() -> BatchStore:
            return SqliteStore(tmp_path / "batch.db", tmp_path / "files")
    else:
        from serve.batch.pg import PostgresStore

        url = request.getfixturevalue("postgres").new_database(f"t_{uuid.uuid4().hex[:12]}")

        def make() -> BatchStore:
            return PostgresStore(url, tmp_path / "files")

    def open_() -> BatchStore:
        opened.append(make())
        return opened[-1]

    open_.backend = request.param  # type: ignore[attr-defined]
    yield open_
    for s in opened:
        s.close()


def race(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls on threads released together; their results in order."""
    gate = threading.Barrier(len(calls))

    def go(fn: Callable[[], Any]) -> Any:
        gate.wait()
        return fn()

    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(go, fn) for fn in calls]]


def batch(store: BatchStore, owner: str = "ann", status: str = "validating") -> str:
    fid = store.put_file(b'{"x": 1}', "in.jsonl", "batch", owner=owner)["id"]
    b = new_batch(f"batch-{uuid.uuid4().hex[:12]}", fid, EP, "24h", None)
    store.put_batch({**b, "status": status}, owner=owner)
    return b["id"]


# ---- files -------------------------------------------------------------------------------------
def test_files_written_by_one_store_are_read_and_deleted_by_another(stores, tmp_path):
    a, b = stores(), stores()
    f = a.put_file(b"hello", "in.jsonl", "batch", owner="ann")
    assert b.get_file(f["id"], owner="ann") == f and f["bytes"] == 5 and f["filename"] == "in.jsonl"
    assert b.file_content(f["id"], owner="ann") == b"hello"
    path = b.file_path(f["id"], owner="ann")
    assert path is not None and path.read_bytes() == b"hello"
    assert [x["id"] for x in b.list_files(owner="ann", purpose="batch")] == [f["id"]]
    assert b.list_files(owner="ann", purpose="batch_output") == []
    assert b.get_file(f["id"], owner="bob") is None and b.open_file(f["id"], owner="bob") is None
    assert b.file_path(f["id"], owner="bob") is None and not b.delete_file(f["id"], owner="bob")
    won = race(lambda: a.delete_file(f["id"], owner="ann"), lambda: b.delete_file(f["id"], owner=None))
    assert won.count(True) == 1
    assert a.get_file(f["id"], owner="ann") is None and b.file_content(f["id"], owner=None) is None
    assert list((tmp_path / "files").iterdir()) == []  # the bytes went with the row


def test_a_file_is_deleted_by_exactly_one_of_racing_deletes(stores):
    a, b = stores(), stores()
    fids = [a.put_file(b"x", f"{i}.jsonl", "batch", owner="ann")["id"] for i in range(ROUNDS)]
    for fid in fids:
        won = race(*[(lambda s=s, fid=fid: s.delete_file(fid, owner="ann")) for s in (a, b, a, b)])
        assert won.count(True) == 1, won


def test_uploads_stream_in_chunks_and_a_failed_one_leaves_nothing(stores, tmp_path):
    a, b = stores(), stores()

    src = Reads(b"x" * (CHUNK * 2 + 5))
    f = a.put_file_stream(src, "big", "batch", owner="ann", max_bytes=CHUNK * 3)
    assert b.file_content(f["id"], owner="ann") == src.getvalue() and set(src.sizes) == {CHUNK}
    with pytest.raises(FileTooLarge):
        a.put_file_stream(io.BytesIO(b"x" * (CHUNK * 3 + 1)), "too-big", "batch", owner="ann", max_bytes=CHUNK * 3)
    with pytest.raises(EmptyFile):
        a.put_file_stream(io.BytesIO(b""), "empty", "batch", owner="ann")
    assert [x["id"] for x in b.list_files(owner=None)] == [f["id"]]
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [f["id"]]


def test_owners_see_only_their_own(stores):
    a, b = stores(), stores()
    fa = a.put_file(b"a", "a.jsonl", "batch", owner="ann")["id"]
    fb = b.put_file(b"b", "b.jsonl", "batch", owner="bob")["id"]
    a.put_batch(new_batch("batch-a", fa, EP, "24h", None), owner="ann")
    b.put_batch(new_batch("batch-b", fb, EP, "24h", None), owner="bob")
    assert [f["id"] for f in b.list_files(owner="ann")] == [fa]
    assert sorted(f["id"] for f in b.list_files(owner=None)) == sorted([fa, fb])
    assert a.list_files(owner="bob", after=fa) == [] and a.list_batches(owner="bob", after="batch-a") == []
    assert [x["id"] for x in a.list_batches(owner="bob")] == ["batch-b"]
    assert sorted(x["id"] for x in a.list_batches(owner=None)) == ["batch-a", "batch-b"]
    assert a.get_batch("batch-a", owner="bob") is None and a.update_batch("batch-a", owner="bob", status="cancelling") \
        is None
    assert b.get_batch("batch-a", owner="ann")["status"] == "validating"
    assert a.batch_owner("batch-b") == "bob" and a.batch_owner("batch-nope") is None


# ---- batch status ------------------------------------------------------------------------------
@pytest.mark.parametrize(("current", "new", "ok"), [
    ("validating", "in_progress", True), ("in_progress", "finalizing", True), ("finalizing", "completed", True),
    ("in_progress", "completed", False), ("cancelling", "completed", False), ("cancelling", "cancelled", True),
    ("in_progress", "cancelled", False), ("finalizing", "cancelling", True), ("in_progress", "expired", True),
    ("finalizing", "expired", False), ("in_progress", "validating", False), ("in_progress", "in_progress", True),
    ("completed", "completed", False), ("expired", "cancelling", False), ("cancelled", "failed", False),
    ("in_progress", "bogus", False),
])
def test_status_moves_only_forward(current, new, ok):
    assert allowed(current, new) is ok


def test_a_refused_status_change_writes_nothing_and_returns_the_batch_as_it_is(stores):
    a, b = stores(), stores()
    bid = batch(a)
    assert a.update_batch(bid, owner=None, status="in_progress", in_progress_at=1)["status"] == "in_progress"
    back = b.update_batch(bid, owner=None, status="validating", request_counts={"total": 9})
    assert back["status"] == "in_progress" and back["request_counts"]["total"] == 0
    assert b.update_batch(bid, owner=None, request_counts={"completed": 2})["request_counts"] == \
        {"total": 0, "completed": 2, "failed": 0}
    assert a.update_batch(bid, owner=None, status="finalizing")["status"] == "finalizing"
    assert b.update_batch(bid, owner="ann", status="cancelling", cancelling_at=5)["status"] == "cancelling"
    assert a.update_batch(bid, owner=None, status="completed", output_file_id="f")["status"] == "cancelling"
    done = a.update_batch(bid, owner=None, status="cancelled", cancelled_at=6)
    assert done["status"] == "cancelled" and done["output_file_id"] is None
    # Final: not even counts change any more.
    assert b.update_batch(bid, owner=None, request_counts={"completed": 7}) == done == a.get_batch(bid, owner="ann")


def test_cancel_racing_completion_ends_in_one_consistent_state(stores):
    """The API cancels (store a) while the worker completes (store b): exactly one of them wins,
    the other's write changes nothing, and each caller is told what the batch really is."""
    a, b = stores(), stores()
    outcomes = set()
    for _ in range(ROUNDS):
        bid = batch(a, status="finalizing")
        cancel, complete = race(
            lambda bid=bid: a.update_batch(bid, owner="ann", status="cancelling", cancelling_at=1),
            lambda bid=bid: b.update_batch(bid, owner=None, status="completed", completed_at=2, output_file_id="f"))
        final = a.get_batch(bid, owner=None)
        assert cancel == complete == final, (cancel, complete)
        if final["status"] == "completed":
            assert final["cancelling_at"] is None and final["completed_at"] == 2 and final["output_file_id"] == "f"
        else:
            assert final["status"] == "cancelling" and final["cancelling_at"] == 1
            assert final["completed_at"] is None and final["output_file_id"] is None
        outcomes.add(final["status"])
    assert outcomes <= {"completed", "cancelling"}


def test_concurrent_updates_of_one_batch_lose_nothing(stores):
    """Every writer's change survives (each read-modify-write holds the row until it writes)."""
    a, b = stores(), stores()
    for _ in range(ROUNDS // 2):
        bid = batch(a, status="in_progress")
        race(*[(lambda s=s, i=i, bid=bid: s.update_batch(bid, owner=None, **{f"x{i}": i}))
               for i, s in enumerate([a, b] * 3)])
        got = a.get_batch(bid, owner=None)
        assert {k: got.get(k) for k in (f"x{i}" for i in range(6))} == {f"x{i}": i for i in range(6)}


# ---- claims and results ------------------------------------------------------------------------
def test_a_batch_is_claimed_by_one_worker_until_its_lease_ends_or_is_released(stores):
    a, b = stores(), stores()
    bid = batch(a)
    assert a.claim_batch(bid, "w1", 60) and not b.claim_batch(bid, "w2", 60)
    assert a.claim_batch(bid, "w1", 60)  # renewing its own
    b.release_batch(bid, "w2")  # not w2's to release
    assert not b.claim_batch(bid, "w2", 60)
    a.release_batch(bid, "w1")
    assert b.claim_batch(bid, "w2", 0.3) and not a.claim_batch(bid, "w1", 60)
    time.sleep(0.5)  # w2 did not renew
    assert a.claim_batch(bid, "w1", 60) and not b.claim_batch(bid, "w2", 60)
    a.update_batch(bid, owner=None, status="cancelling")
    a.update_batch(bid, owner=None, status="cancelled")
    a.release_batch(bid, "w1")
    assert not a.claim_batch(bid, "w1", 60)  # a finished batch is nobody's work
    assert not a.claim_batch("batch-nope", "w1", 60)


def test_racing_workers_claim_a_batch_exactly_once(stores):
    a, b = stores(), stores()
    for _ in range(ROUNDS):
        bid = batch(a)
        won = race(*[(lambda s=s, w=w, bid=bid: s.claim_batch(bid, f"w{w}", 60))
                     for w, s in enumerate([a, b, a, b])])
        assert won.count(True) == 1, won


def test_a_line_is_recorded_once_however_many_race_to_record_it(stores):
    a, b = stores(), stores()
    bid = batch(a, status="in_progress")
    for n in range(ROUNDS):
        won = race(*[(lambda s=s, w=w, n=n: s.put_result(bid, n, f"c{n}", True, {"by": w}))
                     for w, s in enumerate([a, b] * 2)])
        assert won.count(True) == 1, won
        assert b.results(bid, True)[n] == {"by": won.index(True)}  # the winner's answer, not a later one
    assert b.done_lines(bid) == set(range(ROUNDS)) and a.result_counts(bid) == (ROUNDS, 0)
    a.update_batch(bid, owner=None, status="expired")
    assert not a.put_result(bid, ROUNDS, "late", True, {}) and a.result_counts(bid) == (ROUNDS, 0)


def test_stores_starting_together_create_the_schema_once(stores):
    opened = race(*[stores for _ in range(6)])
    bid = batch(opened[0])
    assert all(s.get_batch(bid, owner=None)["id"] == bid for s in opened)


def test_sqlite_stores_starting_together_on_a_new_file_all_open(tmp_path):
    # Two connections switching a new file to WAL at once could deadlock, and SQLite answered
    # "database is locked" without waiting (about 1 race in 100 of six; a clean-clone CI lost one).
    # 400 fresh files make a return of that fail here nearly every run (~10 s).
    for n in range(400):
        d = tmp_path / str(n)
        opened = race(*[(lambda d=d: SqliteStore(d / "batch.db", d / "files")) for _ in range(6)])
        for s in opened:
            s.close()


def test_old_sqlite_database_gains_owner_and_lease_columns(tmp_path):
    db = sqlite3.connect(tmp_path / "b.db")
    db.executescript("""
        CREATE TABLE files (id TEXT PRIMARY KEY, purpose TEXT NOT NULL, filename TEXT NOT NULL,
          bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, path TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE batches (id TEXT PRIMARY KEY, data TEXT NOT NULL, status TEXT NOT NULL,
          created_at INTEGER NOT NULL);
        INSERT INTO batches VALUES ('batch-old', '{"id": "batch-old", "status": "in_progress"}', 'in_progress', 1);""")
    db.commit()
    db.close()
    s = SqliteStore(tmp_path / "b.db", tmp_path / "f")
    assert s.batch_owner("batch-old") == "anonymous" and s.claim_batch("batch-old", "w", 60)
    assert not SqliteStore(tmp_path / "b.db", tmp_path / "f").claim_batch("batch-old", "w2", 60)


# ---- the store in use: configuration, worker, two gateways --------------------------------------
def test_database_url_from_the_environment_opens_postgres(postgres, tmp_path):
    from serve.batch.pg import PostgresStore

    env = {"LLMSERVE__BATCH__DB_PATH": str(tmp_path / "b.db"), "LLMSERVE__BATCH__STORAGE_DIR": str(tmp_path / "f")}
    local = open_store(load_config(environ=env))
    remote = open_store(load_config(environ={**env, "LLMSERVE__BATCH__DATABASE_URL": postgres.url}))
    try:
        assert type(local) is SqliteStore and type(remote) is PostgresStore
        fid = remote.put_file(b"x", "in.jsonl", "batch", owner="ann")["id"]
        assert local.get_file(fid, owner=None) is None and (tmp_path / "f" / fid).read_bytes() == b"x"
    finally:
        local.close()
        remote.close()


def test_a_worker_on_one_store_runs_a_batch_submitted_through_another(stores):
    api, worker = stores(), stores()
    lines = [json.dumps({"custom_id": c, "method": "POST", "url": EP, "body": {"model": "m", "messages": []}})
             for c in ("a", "b", "c")]
    fid = api.put_file("\n".join(lines).encode(), "in.jsonl", "batch", owner="ann")["id"]
    api.put_batch(new_batch("batch-x", fid, EP, "24h", None), owner="ann")

    async def call(owner, path, body):
        return 200, {"owner": owner}

    asyncio.run(BatchRunner(worker, call, concurrency=2, progress_every=1).run_once())
    b = api.get_batch("batch-x", owner="ann")
    assert b["status"] == "completed" and b["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    out = [json.loads(x) for x in api.file_content(b["output_file_id"], owner="ann").splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["a", "b", "c"] and api.get_file(b["output_file_id"], owner="bob") \
        is None


def test_two_gateways_serve_one_tenants_files_and_batches(stores):
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return JSONResponse(exc.body(), exc.status)

    def gateway(store: BatchStore) -> TestClient:
        api = BatchAPI(store, lambda r: None)  # auth off: everything is the anonymous owner's
        return TestClient(Starlette(routes=api.routes(), exception_handlers={APIError: api_error}))

    one, two = gateway(stores()), gateway(stores())
    fid = one.post("/v1/files", files={"file": ("in.jsonl", b'{"a": 1}')}, data={"purpose": "batch"}).json()["id"]
    assert two.get(f"/v1/files/{fid}/content").content == b'{"a": 1}'
    bid = two.post("/v1/batches", json={"input_file_id": fid, "endpoint": EP}).json()["id"]
    assert one.post(f"/v1/batches/{bid}/cancel").json()["status"] == "cancelling"
    assert two.get(f"/v1/batches/{bid}").json()["status"] == "cancelling"
    assert two.delete(f"/v1/files/{fid}").json()["deleted"] is True
    assert one.get(f"/v1/files/{fid}").status_code == 404


def test_postgres_server_leaves_no_process_or_directory(tmp_path):
    """The fixture's own promise: even with a client still connected (a smart shutdown would wait
    for it forever), stop() ends the postmaster and every backend, and removes the data."""
    import os

    import psycopg

    from tests.support import PostgresServer, postgres_bin

    if postgres_bin("postgres") is None:
        pytest.skip("PostgreSQL is not installed (make system-deps installs it)")
    with PostgresServer(tmp_path / "pg", host="127.0.0.2") as server:
        assert server.proc is not None and server.dir is not None
        group, data = server.proc.pid, server.dir
        client = psycopg.connect(server.url)
        assert client.execute("SELECT inet_server_addr()::text").fetchone() == ("127.0.0.2/32",)
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)
    assert not data.exists() and "database system is shut down" in (tmp_path / "pg" / "postgres.log").read_text()
    client.close()


def test_two_workers_over_one_batch_answer_each_line_once(stores):
    """Two runners (a replaced batch-worker replica and its successor, on two stores) over one
    20-line batch: the lease gives it to one of them, so each line is sent once."""
    a, b = stores(), stores()
    lines = "\n".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": EP,
                                  "body": {"model": "m", "messages": []}}) for i in range(20))
    fid = a.put_file(lines.encode(), "in.jsonl", "batch", owner="ann")["id"]
    bid = new_batch(f"batch-{uuid.uuid4().hex[:12]}", fid, EP, "24h", None)["id"]
    a.put_batch(new_batch(bid, fid, EP, "24h", None), owner="ann")
    calls: list[str] = []

    async def call(owner: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        calls.append(owner)
        await asyncio.sleep(0.01)
        return 200, {"ok": True}

    async def both() -> None:
        await asyncio.gather(BatchRunner(a, call, concurrency=4).run_once(),
                             BatchRunner(b, call, concurrency=4).run_once())

    asyncio.run(both())
    assert len(calls) == 20
    assert a.get_batch(bid, owner=None)["status"] == "completed"
