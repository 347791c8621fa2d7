"""The Batch API through the `openai` SDK on real engines, a killed worker, and the head-cache build."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration
EP = "/v1/chat/completions"


def line(cid, model="tiny-a", max_tokens=6, text=None):
    return json.dumps({"custom_id": cid, "method": "POST", "url": EP, "body": {
        "model": model, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": text or f"question {cid}"}]}})


def wait(client, batch_id, timeout_s=240, until=("completed", "failed", "expired", "cancelled"), **kw):
    deadline = time.monotonic() + timeout_s
    while True:
        b = client.batches.retrieve(batch_id, **kw)
        if b.status in until:
            return b
        assert time.monotonic() < deadline, f"batch still {b.status}: {b.request_counts}"
        time.sleep(0.5)


def submit(client, lines):
    f = client.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint=EP, completion_window="24h")


def test_batch_lifecycle_with_a_broken_line(stack):
    client = stack.client()
    good = [line(f"ok-{i}") for i in range(6)]
    lines = [*good[:3], "{this is not json", line("bad-model", model="no-such-model"), *good[3:]]
    b = submit(client, lines)
    assert b.status == "validating" and b.endpoint == EP
    b = wait(client, b.id)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (8, 6, 2)
    out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
    err = [json.loads(x) for x in client.files.content(b.error_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(f"ok-{i}" for i in range(6))
    assert all(o["response"]["status_code"] == 200 and o["response"]["body"]["choices"] for o in out)
    assert {e["custom_id"] for e in err} == {"line-3", "bad-model"}
    assert any(e["error"]["code"] == "model_not_found" for e in err)
    assert b.id in [x.id for x in client.batches.list()]
    assert client.files.retrieve(b.output_file_id).purpose == "batch_output"


def test_each_key_sees_only_its_own_files_and_batches(stack):
    """Three keys on one gateway: the owner's batch completes; another key (an admin that does not
    ask) sees none of it and gets for every id what an unknown id gets; an admin that asks sees
    it all; an ordinary key may not ask."""
    import openai

    owner, admin, other = stack.client("other"), stack.client("test"), stack.client("limited")
    b = submit(owner, [line("t-0"), line("t-1"), "{not json"])
    fid = b.input_file_id
    b = wait(owner, b.id)
    assert b.status == "completed" and (b.request_counts.completed, b.request_counts.failed) == (2, 1)
    mine = {fid, b.output_file_id, b.error_file_id}
    assert mine <= {f.id for f in owner.files.list()} and b.id in [x.id for x in owner.batches.list()]

    assert not mine & {f.id for f in admin.files.list()}
    assert b.id not in [x.id for x in admin.batches.list()]
    for oid in mine:
        for call in (admin.files.retrieve, admin.files.content, admin.files.delete):
            with pytest.raises(openai.NotFoundError) as e:
                call(oid)
            assert e.value.body["message"] == f"No such file: '{oid}'"
    for call in (admin.batches.retrieve, admin.batches.cancel):
        with pytest.raises(openai.NotFoundError) as e:
            call(b.id)
        assert e.value.body["message"] == f"No such batch: '{b.id}'"
    with pytest.raises(openai.BadRequestError) as theirs:
        admin.batches.create(input_file_id=fid, endpoint=EP, completion_window="24h")
    with pytest.raises(openai.BadRequestError) as unknown:
        admin.batches.create(input_file_id="file-nope", endpoint=EP, completion_window="24h")
    assert theirs.value.body == json.loads(json.dumps(unknown.value.body).replace("file-nope", fid))

    every = {"all_owners": "true"}
    assert mine <= {f.id for f in admin.files.list(extra_query=every)}
    assert admin.batches.retrieve(b.id, extra_query=every).status == "completed"
    assert admin.files.content(b.output_file_id, extra_query=every).text == \
        owner.files.content(b.output_file_id).text
    with pytest.raises(openai.PermissionDeniedError):
        other.files.list(extra_query=every)
    assert b.id not in [x.id for x in other.batches.list()]
    assert owner.files.retrieve(fid).id == fid  # nothing above touched the owner's objects


def test_batch_lines_are_admitted_with_the_owners_key(stack):
    """A key allowed only tiny-a cannot reach tiny-b by batch; its lines spend its own request
    budget (2 a minute, shared with its online requests through Redis) and are billed at its
    model's price in their answers."""
    import openai
    import redis

    from tests.integration.conftest import PRICE_A

    limited, admin, every = stack.client("limited"), stack.client("test"), {"all_owners": "true"}
    bucket = "llmserve:rl:requests:limited"
    redis.Redis.from_url(stack.redis.url).delete(bucket)
    b = submit(limited, [line("a-0"), line("a-1"), line("b-0", model="tiny-b")])  # two requests of its own
    redis.Redis.from_url(stack.redis.url).delete(bucket)  # a full budget again, for the lines: 2 requests
    b = wait(admin, b.id, extra_query=every)  # the admin looks, so only the lines spend limited's budget
    assert b.status == "completed" and (b.request_counts.completed, b.request_counts.failed) == (2, 1), b
    err = [json.loads(x) for x in admin.files.content(b.error_file_id, extra_query=every).text.splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in err] == [("b-0", "model_not_found")]
    out = [json.loads(x) for x in admin.files.content(b.output_file_id, extra_query=every).text.splitlines()]
    for o in out:
        usage = o["response"]["body"]["usage"]
        price = usage["prompt_tokens"] * PRICE_A["input_per_million"] + \
            usage["completion_tokens"] * PRICE_A["output_per_million"]
        assert usage["cost_usd"] == round(price / 1e6, 10) > 0
    # The two lines spent the key's budget: its next online request waits (429), like any other.
    with pytest.raises(openai.RateLimitError):
        limited.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    redis.Redis.from_url(stack.redis.url).delete(bucket)  # leave the budget as later tests expect it


def test_files_and_batches_spend_the_keys_rate_limit_and_stop_at_its_storage_quota(stack):
    """`limited` may make 2 requests a minute and hold 64 KiB: an upload past its quota is a 400
    that stores nothing, and its file and batch requests spend the bucket its online requests use."""
    import openai
    import redis

    limited, r = stack.client("limited"), redis.Redis.from_url(stack.redis.url)
    bucket = "llmserve:rl:requests:limited"
    r.delete(bucket)  # a full budget: 2 requests
    with pytest.raises(openai.BadRequestError) as big:
        limited.files.create(file=("big.jsonl", io.BytesIO(b"x" * (64 * 1024 + 1))), purpose="batch")
    assert (big.value.code, big.value.param) == ("storage_quota_exceeded", "file")
    f = limited.files.create(file=("small.jsonl", io.BytesIO(line("q-0").encode())), purpose="batch")
    with pytest.raises(openai.RateLimitError) as limited_out:
        limited.batches.create(input_file_id=f.id, endpoint=EP, completion_window="24h")
    assert limited_out.value.code == "rate_limit_exceeded"
    assert 1 <= int(limited_out.value.response.headers["retry-after"]) <= 60
    with pytest.raises(openai.RateLimitError):  # the files spent what online requests spend
        limited.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    r.delete(bucket)
    names = [x.filename for x in limited.files.list()]
    assert "small.jsonl" in names and "big.jsonl" not in names
    assert limited.files.delete(f.id).deleted
    r.delete(bucket)  # leave the budget as later tests expect it


def test_cancel_keeps_finished_results(stack):
    client = stack.client()
    b = submit(client, [line(f"c-{i}", max_tokens=24) for i in range(60)])
    wait(client, b.id, until=("in_progress",))
    client.batches.cancel(b.id)
    b = wait(client, b.id)
    assert b.status == "cancelled" and b.request_counts.completed < 60


def test_killed_worker_resumes_with_one_result_per_custom_id(stack):
    import ray

    from serve.launch.batch_worker import WORKER_NAME

    client = stack.client()
    ids = [f"k-{i}" for i in range(40)]
    b = submit(client, [line(c, max_tokens=16) for c in ids])
    deadline = time.monotonic() + 120
    while client.batches.retrieve(b.id).request_counts.completed < 10:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    worker = ray.get_actor(WORKER_NAME, namespace=stack.config.ray.namespace)
    ray.kill(worker, no_restart=False)  # the process dies; Ray starts a new one
    b = wait(client, b.id, timeout_s=300)
    assert b.status == "completed"
    out = [json.loads(x)["custom_id"] for x in client.files.content(b.output_file_id).text.splitlines()]
    assert sorted(out) == sorted(ids) and b.request_counts.completed == 40


def test_cache_build_makes_head_query_a_hit(stack, tmp_path):
    log = tmp_path / "log.jsonl"
    cli = [sys.executable, "-m", "serve.cli"]
    subprocess.run([*cli, "cache", "synth-log", "-o", str(log), "--requests", "300", "--distinct", "40",
                    "--seed", "5", "--max-tokens", "6", "--model", "head"], check=True, timeout=60)
    env_args = ["--url", stack.base_url, "--api-key", "test", "--redis-url", stack.redis.url, "--timeout", "300"]
    built = subprocess.run([*cli, "cache", "build", "--log", str(log), "--top", "5", "--model", "tiny-b",
                            "--route", "head", "--config", stack.config_file(tmp_path), *env_args],
                           capture_output=True, text=True, timeout=400)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "loaded 5 answers" in built.stdout
    top = json.loads(log.read_text().splitlines()[0])  # the log's first line; check it is in the head
    from serve.cache.pipeline import read_log, select_head

    head, _ = select_head(read_log(log.read_text().splitlines()), "head", 5)
    query = head[0].request
    raw = stack.client().chat.completions.with_raw_response.create(
        model="head", messages=query["messages"], max_tokens=query["max_tokens"], temperature=0)
    assert raw.headers["x-llmserve-cache"] == "hit" and raw.headers["x-llmserve-served-by"] == "cache:tiny-b"
    assert raw.parse().model_extra["llmserve_provenance"]["batch_id"].startswith("batch-")
    stats = subprocess.run([*cli, "cache", "stats", "--route", "head", "--log", str(log), "--redis-url",
                            stack.redis.url], capture_output=True, text=True, timeout=60, check=True)
    s = json.loads(stats.stdout)
    assert s["entries"] >= 5 and s["log_coverage"] > 0.3 and s["hits"] >= 1
    assert top["model"] == "head"
