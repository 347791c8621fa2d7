"""A tenant's JSON Schema on a cascade route: never fetched from elsewhere, never recursing without
end, never run on the gateway's event loop, and cut off when it takes too long (issue 26)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from starlette.testclient import TestClient

from serve.config import Config
from serve.gateway.app import create_app
from serve.gateway.backends import Backends
from serve.gateway.schema_check import SchemaChecker
from serve.policies.cascade import CascadePolicy, decide, schema_verdict
from tests.fakes import FakeUpstream

CATASTROPHIC = {"type": "string", "pattern": "^(a+)+$"}  # exponential backtracking in `re`
HOSTILE_TEXT = '"' + "a" * 40 + '!"'  # 2**40 ways to fail: hours of `re`


def schema_request(schema):
    return {"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}


def answer(text):
    return {"choices": [{"message": {"content": text}, "finish_reason": "stop",
                         "logprobs": {"content": [{"logprob": -0.1}]}}]}


def test_a_self_reference_is_unchecked_not_a_crash(monkeypatch):
    """Found by a walk, never validated: validating it recursed to the interpreter's limit, whose
    unwinding left failing finalizers behind (seen in a CI run as unraisable-exception errors)."""
    import jsonschema

    validated = []
    real = jsonschema.validators.validator_for
    monkeypatch.setattr(jsonschema.validators, "validator_for", lambda *a, **k: validated.append(a) or real(*a, **k))
    assert schema_verdict("5", {"$ref": "#"}) is None and validated == []
    assert schema_verdict("5", {"allOf": [{"type": "integer"}, {"$ref": "#"}]}) is None
    assert decide(CascadePolicy(), schema_request({"$ref": "#"}), answer("5")).reason == "schema_unchecked"


def test_a_recursive_schema_that_descends_into_the_value_is_still_checked():
    """A `$ref` under `properties` consumes part of the value at each step (a tree): it ends, and is
    validated, not refused as a cycle."""
    tree = {"type": "object", "properties": {"child": {"$ref": "#"}}, "additionalProperties": False}
    assert schema_verdict('{"child": {"child": {}}}', tree) is True
    assert schema_verdict('{"child": {"other": 1}}', tree) is False


def test_a_remote_reference_is_never_fetched():
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = json.dumps({"type": "integer"}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        schema = {"$ref": f"http://127.0.0.1:{server.server_port}/int.json"}
        assert schema_verdict("5", schema) is None
        assert decide(CascadePolicy(), schema_request(schema), answer("5")).reason == "schema_unchecked"
    finally:
        server.shutdown()
    assert hits == []


def test_schema_verdicts():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert schema_verdict('{"a": 1}', schema) is True
    assert schema_verdict('{"a": "x"}', schema) is False
    assert schema_verdict("not json", schema) is False
    assert schema_verdict("[" * 100_000, schema) is False  # JSON nested past the parser's limit
    assert schema_verdict("1", {"type": 12}) is None  # not a schema: the teacher's engine answers for it
    # Verdicts from the caller's worker decide; no verdict (None) escalates unchecked.
    req = schema_request(schema)
    assert decide(CascadePolicy(), req, answer('{"a": 1}'), [None]).reason == "schema_unchecked"
    assert decide(CascadePolicy(), req, answer('{"a": 1}'), [False]).reason == "schema"
    assert not decide(CascadePolicy(), req, answer('{"a": "x"}'), [True]).escalate


async def test_the_checker_kills_a_catastrophic_pattern_and_goes_on():
    checker = SchemaChecker(workers=1, timeout_s=0.5)
    try:
        t0 = time.monotonic()
        assert await checker.check([(HOSTILE_TEXT, CATASTROPHIC)]) == [None]
        assert time.monotonic() - t0 < 30  # the timeout plus a worker restart, never the backtracking
        # The next check gets a fresh worker and an honest answer.
        assert await checker.check([('"aaa"', CATASTROPHIC), ('"ab"', CATASTROPHIC)]) == [True, False]
    finally:
        checker.close()


CONFIG = Config.model_validate({
    "auth": {"enabled": False},
    "models": [{"name": "student", "source": "x"}, {"name": "teacher", "source": "y"}],
    "routes": [{"name": "assistant", "cascade": {"student": "student", "teacher": "teacher",
                                                 "min_mean_logprob": -1.0}}],
})


@pytest.mark.timeout(60)
def test_a_hostile_schema_escalates_without_stalling_the_gateway():
    """The student answers text that makes the schema's pattern backtrack for hours: the check is
    cut off, the answer escalates to the teacher, and the gateway keeps answering meanwhile."""
    up = FakeUpstream(text_by_model={"student": HOSTILE_TEXT, "teacher": '"aaa"'}, logprob=-0.1)
    backends = Backends()
    backends.update({m: [(f"{m}#1", f"http://{m}")] for m in ("student", "teacher")})
    client = TestClient(create_app(CONFIG, backends, up))
    body = {"model": "assistant", **schema_request(CATASTROPHIC)}
    with client:
        results = {}
        worker = threading.Thread(target=lambda: results.update(r=client.post("/v1/chat/completions", json=body)))
        worker.start()
        time.sleep(0.2)
        # While the schema is being checked, the event loop still serves others.
        t0 = time.monotonic()
        assert client.get("/health").status_code == 200
        assert time.monotonic() - t0 < 0.5
        worker.join(50)
        r = results["r"]
    assert r.status_code == 200
    assert r.headers["x-llmserve-escalated"] == "schema_unchecked" and r.headers["x-llmserve-served-by"] == "teacher"
