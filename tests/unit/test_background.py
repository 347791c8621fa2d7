"""Background Responses through the service with a fake engine and the in-process store: queued at
once, run by the runner as its owner, polled, cancelled; owner-only; charged once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve.config import Config
from serve.gateway.auth import hash_key
from serve.gateway.backends import Backends
from serve.gateway.errors import APIError
from serve.gateway.service import Gateway
from tests.fakes import FakeUpstream

CONFIG = Config.model_validate({
    "auth": {"keys": [{"name": "alice", "sha256": hash_key("sk-a"), "requests_per_minute": 1000},
                      {"name": "bob", "sha256": hash_key("sk-b")},
                      {"name": "carol", "sha256": hash_key("sk-c"), "requests_per_minute": 1}]},
    "models": [{"name": "teacher", "source": "y", "price": {"input_per_million": 10, "output_per_million": 20}}],
})


def gateway(up: FakeUpstream) -> Gateway:
    backends = Backends()
    backends.update({"teacher": [("teacher#1", "http://teacher")]})
    return Gateway(CONFIG, backends, up)


async def poll(gw: Gateway, rid: str, owner: Any, until: tuple[str, ...], timeout_s: float = 5.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        body = await gw.get_response(owner, rid)
        if body["status"] in until or asyncio.get_running_loop().time() > deadline:
            return body
        await asyncio.sleep(0.02)


def test_background_is_queued_then_answered_by_the_runner_as_its_owner() -> None:
    async def main() -> None:
        up = FakeUpstream(text="a b c")
        gw = gateway(up)
        alice, bob = gw.keys.by_name("alice"), gw.keys.by_name("bob")
        answer = await gw.handle(alice, "/v1/responses", {"model": "teacher", "input": "hi", "background": True,
                                                          "request_id": "chosen-by-client"})
        assert answer.status == 200 and answer.body is not None
        queued = answer.body
        assert queued["status"] == "queued" and queued["background"] is True and queued["id"].startswith("resp_")
        assert queued["id"] != "resp_chosen-by-client" and up.calls == []  # nothing ran yet
        runner = asyncio.ensure_future(gw.background_runner(2).run_forever())
        try:
            done = await poll(gw, queued["id"], alice, ("completed", "failed"))
        finally:
            runner.cancel()
        assert done["status"] == "completed", done
        assert done["id"] == queued["id"] and done["output"][0]["content"][0]["text"] == "a b c"
        sent = up.calls[-1][2]
        assert sent["store"] is False and "background" not in sent and "request_id" not in sent
        # Billed to its owner, once; never visible to another key.
        assert gw.metrics.cost.labels("teacher", "teacher", "alice")._value.get() > 0
        with pytest.raises(APIError) as e:
            await gw.get_response(bob, queued["id"])
        assert e.value.status == 404
        # A follow-up turn continues the background response's conversation.
        follow = await gw.handle(alice, "/v1/responses", {"model": "teacher", "input": "more",
                                                          "previous_response_id": queued["id"]})
        assert follow.status == 200
        assert [i["content"] for i in up.calls[-1][2]["input"]] == ["hi", "a b c", "more"]

    asyncio.run(main())


class Hanging(FakeUpstream):
    """An engine that never answers; records whether the gateway gave up on the call (which, over
    HTTP, closes the connection and makes vLLM abort the request)."""

    aborted = False

    async def post(self, base_url: str, path: str, body: bytes, *, stream: bool, timeout_s: float) -> Any:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.aborted = True
            raise


def test_cancel_stops_a_running_background_response_and_is_owner_only() -> None:
    async def main() -> None:
        up = Hanging()
        gw = gateway(up)
        alice, bob = gw.keys.by_name("alice"), gw.keys.by_name("bob")
        answer = await gw.handle(alice, "/v1/responses", {"model": "teacher", "input": "hi", "background": True})
        assert answer.body is not None
        rid = answer.body["id"]
        runner = asyncio.ensure_future(gw.background_runner(1).run_forever())
        try:
            assert (await poll(gw, rid, alice, ("in_progress",)))["status"] == "in_progress"
            with pytest.raises(APIError) as e:
                await gw.cancel_response(bob, rid)
            assert e.value.status == 404
            assert (await gw.cancel_response(alice, rid))["status"] == "cancelled"
            await asyncio.sleep(1.0)  # the runner sees the cancel within its poll interval and stops
            assert (await gw.get_response(alice, rid))["status"] == "cancelled"
            assert up.aborted and not runner.done()
        finally:
            runner.cancel()

    asyncio.run(main())


@pytest.mark.parametrize("body, param", [
    ({"background": True, "store": False}, "background"),
    ({"background": True, "stream": True}, "stream"),
    ({"background": "maybe"}, "background"),  # (vLLM coerces "yes" and "true"; not this)
])
def test_background_requests_vllm_refuses_are_400(body: dict[str, Any], param: str) -> None:
    gw = gateway(FakeUpstream())
    answer = asyncio.run(gw.handle(gw.keys.by_name("alice"), "/v1/responses", {"model": "teacher", "input": "hi",
                                                                             **body}))
    assert answer.status == 400 and answer.body is not None and answer.body["error"]["param"] == param


def test_a_synchronous_response_cannot_be_cancelled() -> None:
    async def main() -> None:
        gw = gateway(FakeUpstream())
        alice = gw.keys.by_name("alice")
        answer = await gw.handle(alice, "/v1/responses", {"model": "teacher", "input": "hi"})
        assert answer.body is not None
        with pytest.raises(APIError) as e:
            await gw.cancel_response(alice, answer.body["id"])
        assert e.value.status == 400

    asyncio.run(main())


def test_a_background_response_is_charged_once_at_submit() -> None:
    """carol may make one request a minute: submitting it spends that; running it must not again."""
    async def main() -> None:
        gw = gateway(FakeUpstream(text="ok"))
        carol = gw.keys.by_name("carol")
        answer = await gw.handle(carol, "/v1/responses", {"model": "teacher", "input": "hi", "background": True})
        assert answer.status == 200 and answer.body is not None
        runner = asyncio.ensure_future(gw.background_runner(1).run_forever())
        try:
            done = await poll(gw, answer.body["id"], carol, ("completed", "failed"))
        finally:
            runner.cancel()
        assert done["status"] == "completed", done
        again = await gw.handle(carol, "/v1/responses", {"model": "teacher", "input": "hi", "background": True})
        assert again.status == 429  # the minute's one request is spent

    asyncio.run(main())
