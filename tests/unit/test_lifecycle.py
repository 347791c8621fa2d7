"""Runtime adapters and route overrides applied to a running gateway (fake engine)."""

from starlette.testclient import TestClient

from serve.config import Config
from serve.gateway.app import create_app
from serve.gateway.auth import hash_key
from serve.gateway.backends import Backends
from serve.gateway.lifecycle import apply
from tests.fakes import FakeUpstream

CONFIG = Config.model_validate({
    "models": [{"name": "base", "source": "x", "adapters": [{"name": "v1", "path": "/a/v1"}]},
               {"name": "teacher", "source": "y"}],
    "routes": [{"name": "r", "cascade": {"student": "v1", "teacher": "teacher", "min_mean_logprob": -100}}],
    "auth": {"keys": [{"name": "ops", "sha256": hash_key("sk-ops"), "admin": True}]},
})
H = {"Authorization": "Bearer sk-ops"}


def make():
    backends = Backends()
    backends.update({"base": [("b#1", "http://b1"), ("b#2", "http://b2")], "teacher": [("t#1", "http://t")]})
    up = FakeUpstream(logprob=-0.1)
    return TestClient(create_app(CONFIG, backends, up)), up


def ask(client, model="r"):
    return client.post("/v1/chat/completions", headers=H, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "temperature": 0})


def test_load_adapter_on_every_replica_then_serve_it():
    client, up = make()
    assert ask(client, "v2").status_code == 404
    r = client.post("/v1/llmserve/adapters", headers=H, json={"name": "v2", "path": "/a/v2", "base": "base"})
    assert r.status_code == 200 and r.json()["replicas"] == 2
    loads = [c for c in up.calls if c[1] == "/v1/load_lora_adapter"]
    assert {c[0] for c in loads} == {"http://b1", "http://b2"} and loads[0][2]["lora_path"] == "/a/v2"
    assert ask(client, "v2").headers["x-llmserve-served-by"] == "v2"
    bad = client.post("/v1/llmserve/adapters", headers=H, json={"name": "v3", "path": "/p", "base": "v1"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "base"


def test_route_override_swaps_the_student_and_back():
    client, _ = make()
    gw = client.app.state.gateway
    assert ask(client).headers["x-llmserve-served-by"] == "v1"
    apply(gw, {"v2": {"base": "base", "path": "/a/v2"}}, {"r": {"student": "v2"}})
    assert ask(client).headers["x-llmserve-served-by"] == "v2"
    apply(gw, {}, {"r": {"student": "unknown-model"}})  # ignored: nothing serves it
    assert ask(client).headers["x-llmserve-served-by"] == "v2"
    apply(gw, {}, {"r": {"student": "v1"}})
    assert ask(client).headers["x-llmserve-served-by"] == "v1"
