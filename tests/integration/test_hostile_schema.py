"""A tenant's JSON Schema on a cascade route, on the real engines (issue 26): the schema's `pattern`
backtracks for seconds on the very string the engines are constrained to answer, and the gateway's
check of the student's answer runs in a worker it cuts off, not on the event loop that serves every
other request meanwhile."""

from __future__ import annotations

import threading
import time

import pytest

from serve.gateway.schema_check import DEFAULT_TIMEOUT_S

pytestmark = pytest.mark.integration

# The engines' grammar (from `enum`) makes both models answer exactly this JSON string; `re`
# needs about 2**28 steps to find that the pattern does not match it: seconds, on the gateway's
# event loop before the fix (and hours at 40 a's).
ANSWER = "a" * 28 + "!"
SCHEMA = {"type": "string", "enum": [ANSWER], "pattern": "^(a+)+$"}


def test_a_catastrophic_pattern_escalates_unchecked_and_never_stalls_the_gateway(stack):
    client = stack.client()
    results: dict[str, object] = {}

    def hostile() -> None:
        t0 = time.monotonic()
        results["raw"] = client.chat.completions.with_raw_response.create(
            model="cascade-accept", messages=[{"role": "user", "content": "Say it."}], max_tokens=64,
            temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
        results["s"] = time.monotonic() - t0

    worker = threading.Thread(target=hostile)
    worker.start()
    # While the student's answer is being checked, the gateway answers others at once.
    slowest = 0.0
    while worker.is_alive():
        t0 = time.monotonic()
        assert client.models.list().data
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.05)
    worker.join()
    raw = results["raw"]
    body = raw.parse()  # type: ignore[attr-defined]
    assert body.choices[0].message.content.strip() == f'"{ANSWER}"', body.choices[0].message.content
    # The student answered exactly the enum, but its check could not finish in time: the teacher answers.
    assert raw.headers["x-llmserve-escalated"] == "schema_unchecked"  # type: ignore[attr-defined]
    assert raw.headers["x-llmserve-served-by"] == "tiny-b"  # type: ignore[attr-defined]
    # A check on the event loop stalls it for the check's whole time limit (and a worker's restart):
    # the limit itself is the bound (1.5 s let such a stall through).
    print(f"slowest gateway answer while the schema was checked: {slowest:.3f} s")  # -rP shows it
    assert slowest < DEFAULT_TIMEOUT_S, f"the gateway stalled for {slowest:.2f} s while checking the schema"
