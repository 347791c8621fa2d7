"""Per-tier prompts and a student-filled cache on the real stack (issue 29), through the openai SDK:
the student tier is sent the client's short input with its own short prompt, the teacher the long
instructions and example (seen in the prompt tokens each engine counted), and a cache built offline
by the student answers as the student's, billed at the student's batch price."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from serve.policies.tier_prompt import apply_chat, prompt_for
from tests.integration.conftest import PRICE_A

pytestmark = pytest.mark.integration


def _msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _prompt_tokens(client: Any, model: str, messages: list[dict[str, str]]) -> int:
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=0)
    return r.usage.prompt_tokens


def test_the_student_gets_the_short_input_and_the_teacher_the_long_prompt(stack, client):
    route = stack.config.route("tiered")
    user = _msgs(f"Where is my parcel {uuid.uuid4().hex[:6]}?")  # unique: never a cache hit
    as_student = apply_chat({"messages": user}, prompt_for(route, "tiny-a"))["messages"]
    as_teacher = apply_chat({"messages": user}, prompt_for(route, "tiny-b"))["messages"]
    student_tokens = _prompt_tokens(client, "tiny-a", as_student)
    teacher_tokens = _prompt_tokens(client, "tiny-b", as_teacher)
    assert teacher_tokens > student_tokens + 40  # the instructions and the example are the bulk

    accepted = client.chat.completions.with_raw_response.create(model="tiered", messages=user, max_tokens=2,
                                                                temperature=0)
    assert accepted.headers["x-llmserve-served-by"] == "tiny-a"
    assert accepted.parse().usage.prompt_tokens == student_tokens

    escalated = client.chat.completions.with_raw_response.create(model="tiered-escalate", messages=user,
                                                                 max_tokens=2, temperature=0)
    assert escalated.headers["x-llmserve-served-by"] == "tiny-b" and escalated.headers["x-llmserve-escalated"]
    assert escalated.parse().usage.prompt_tokens == teacher_tokens


def test_a_cache_the_student_filled_answers_as_the_students_at_its_batch_price(stack, client, tmp_path):
    from serve.cli import main

    config = stack.config_file(tmp_path)
    tag = uuid.uuid4().hex[:6]
    queries = [f"Refund for order {tag}-{i}?" for i in range(3)]
    log = tmp_path / "log.jsonl"
    # Query 0 three times, query 1 twice, query 2 once: `--skip 1 --top 1` is query 1 alone.
    rows = [queries[0]] * 3 + [queries[1]] * 2 + [queries[2]]
    log.write_text("".join(json.dumps({"model": "tiered", "messages": _msgs(q), "temperature": 0,
                                       "max_tokens": 4}) + "\n" for q in rows))
    rc = main(["cache", "build", "--log", str(log), "--top", "1", "--skip", "1", "--model", "tiny-a",
               "--route", "tiered", "--config", config, "--url", stack.base_url, "--api-key", "test",
               "--redis-url", stack.redis.url, "--timeout", "120"])
    assert rc == 0

    hit = client.chat.completions.with_raw_response.create(model="tiered", messages=_msgs(queries[1]),
                                                           max_tokens=4, temperature=0)
    assert (hit.headers["x-llmserve-cache"], hit.headers["x-llmserve-served-by"]) == ("hit", "cache:tiny-a")
    prov = hit.parse().model_extra["llmserve_provenance"]
    assert prov["model"] == "tiny-a" and prov["batch_id"].startswith("batch-")
    assert prov["price"] == {**PRICE_A, "batch_factor": 0.5}
    # What the fill cost: the student's own tokens for this request (its short prompt) at half its price.
    direct = client.chat.completions.create(model="tiny-a", messages=apply_chat(
        {"messages": _msgs(queries[1])}, prompt_for(stack.config.route("tiered"), "tiny-a"))["messages"],
        max_tokens=4, temperature=0).usage
    want = (direct.prompt_tokens * PRICE_A["input_per_million"]
            + direct.completion_tokens * PRICE_A["output_per_million"]) / 1e6 * 0.5
    assert prov["cost_usd"] == pytest.approx(want, rel=1e-6)
    # The skipped, more frequent query was not filled: the route answers it online.
    miss = client.chat.completions.with_raw_response.create(model="tiered", messages=_msgs(queries[0]),
                                                            max_tokens=4, temperature=0)
    assert miss.headers["x-llmserve-cache"] == "miss"
