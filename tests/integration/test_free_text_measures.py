"""The free-text quality measures against the real gateway (issue 29): the embedding similarity
through the gateway's own /v1/embeddings (the session's tiny-embed), and the LLM judge (teacher
tiny-b through the Batch API, answering the json_schema verdict). Both run on the session stack;
no engine is started for them.

What is known, whatever the tiny models' random weights say: a text and itself embed to the same
vector (similarity 1.0); two different texts do not; and a random model can only answer a
schema-valid verdict when the json_schema reached its engine, so a parsed verdict from every line
is the proof the judge's request went through the Batch API as built."""

from __future__ import annotations

import json

import jsonschema
import pytest

from serve.cli.common import run_batch
from serve.students.judges import VERDICT_SCHEMA, cosine, embedding_similarity, judge_lines, judge_score, verdict

pytestmark = pytest.mark.integration

REFUND = "A refund is paid back within three days."
RESET = "Open the settings page and follow the reset link."


def test_embedding_similarity_through_the_gateway(client):
    sims = embedding_similarity(client, "tiny-embed", [(REFUND, REFUND), (REFUND, RESET), ("", "")])
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[2] == 1.0  # both empty: agreed without asking
    # Different texts: the cosine of the two vectors the gateway returns for them (clamped at 0; with
    # tiny-embed's random weights it was negative), and below 1.
    a, b = (d.embedding for d in client.embeddings.create(model="tiny-embed", input=[REFUND, RESET]).data)
    assert sims[1] == pytest.approx(max(0.0, cosine(a, b)), abs=1e-6)
    assert sims[1] < 1.0 - 1e-4


def test_the_judge_answers_a_schema_valid_verdict_through_the_batch_api(client):
    request = {"messages": [{"role": "user", "content": "How long does a refund take?"}]}
    items = [("same", request, REFUND, REFUND), ("other", request, RESET, REFUND)]
    batch_id, answers = run_batch(client, judge_lines(items, "tiny-b"), 300)
    assert batch_id.startswith("batch-") and sorted(answers) == ["other", "same"]
    said = []
    for label_id in ("same", "other"):
        body = answers[label_id]
        assert body["model"] == "tiny-b"
        assert body["choices"][0]["finish_reason"] == "stop", body["choices"][0]["message"]["content"]
        value = json.loads(body["choices"][0]["message"]["content"], strict=False)  # as verdict() reads it
        jsonschema.validate(value, VERDICT_SCHEMA)
        assert verdict(body) == (1.0 if value["same_meaning"] else 0.0)
        said.append(verdict(body))
    # The mean of the two verdicts, none unreadable.
    assert judge_score(["same", "other"], answers) == (sum(said) / 2, 0)
