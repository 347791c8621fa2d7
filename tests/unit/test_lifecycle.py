"""Runtime adapters and route overrides applied to a running gateway (fake engine): who may load,
from where, and what happens to a name already loaded from other weights."""

import os

from starlette.testclient import TestClient

from serve.config import Config
from serve.gateway.app import create_app
from serve.gateway.auth import hash_key
from serve.gateway.backends import Backends
from serve.gateway.lifecycle import apply
from serve.students.registry import adapter_digest
from tests.fakes import FakeUpstream

H = {"Authorization": "Bearer sk-ops"}


def adapter(path, weights: bytes = b"w1"):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter_model.safetensors").write_bytes(weights)
    return str(path)


def config(root, configured_path="/a/v1", roots=True, auth=True):
    return Config.model_validate({
        "models": [{"name": "base", "source": "x", "adapters": [{"name": "v1", "path": configured_path}]},
                   {"name": "teacher", "source": "y"}],
        "routes": [{"name": "r", "cascade": {"student": "v1", "teacher": "teacher", "min_mean_logprob": -100}}],
        "auth": {"enabled": auth, "keys": [{"name": "ops", "sha256": hash_key("sk-ops"), "admin": True},
                                           {"name": "user", "sha256": hash_key("sk-user")}]},
        "gateway": {"adapter_roots": [str(root)] if roots else []},
    })


def make(cfg, up=None):
    backends = Backends()
    backends.update({"base": [("b#1", "http://b1"), ("b#2", "http://b2")], "teacher": [("t#1", "http://t")]})
    up = up or FakeUpstream(logprob=-0.1)
    return TestClient(create_app(cfg, backends, up)), up


def ask(client, model="r"):
    return client.post("/v1/chat/completions", headers=H, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "temperature": 0})


def load(client, headers=H, **body):
    return client.post("/v1/llmserve/adapters", headers=headers, json={"base": "base", **body})


def engine_calls(up, path):
    return [(c[0], c[2]) for c in up.calls if c[1] == path]


def test_load_adapter_on_every_replica_then_serve_it(tmp_path):
    v2 = adapter(tmp_path / "roots" / "v2")
    client, up = make(config(tmp_path / "roots"))
    assert ask(client, "v2").status_code == 404
    r = load(client, name="v2", path=v2)
    assert r.status_code == 200, r.text
    # Engines load the gateway's content-addressed copy, never the directory a tenant can still change.
    stored = str(tmp_path / "roots" / ".llmserve-adapters" / adapter_digest(v2))
    assert r.json() == {"name": "v2", "base": "base", "path": stored, "source": os.path.realpath(v2),
                        "digest": adapter_digest(v2),
                        "replicas": 2, "reloaded": 0}
    loads = engine_calls(up, "/v1/load_lora_adapter")
    assert {u for u, _ in loads} == {"http://b1", "http://b2"} and loads[0][1]["lora_path"] == stored
    assert ask(client, "v2").headers["x-llmserve-served-by"] == "v2"
    bad = load(client, name="v3", path=v2, base="v1")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "base"


def test_only_admin_keys_load_adapters(tmp_path):
    v2 = adapter(tmp_path / "roots" / "v2")
    client, up = make(config(tmp_path / "roots"))
    r = load(client, headers={"Authorization": "Bearer sk-user"}, name="v2", path=v2)
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_admin"
    assert load(client, headers={}, name="v2", path=v2).status_code == 401
    assert up.calls == []


def test_paths_outside_the_roots_are_refused(tmp_path, monkeypatch):
    root = tmp_path / "roots"
    inside = adapter(root / "v2")
    outside = adapter(tmp_path / "elsewhere" / "v2")
    os.symlink(outside, root / "link")  # a link inside the root to files outside it
    monkeypatch.chdir(root)  # "v2" is inside the root from here, but an engine's directory may differ
    client, up = make(config(root))
    for path in (outside, str(root / "link"), str(root / ".." / "elsewhere" / "v2"), "v2"):
        r = load(client, name="v2", path=path)
        assert r.status_code == 400 and r.json()["error"]["param"] == "path", (path, r.text)
    assert up.calls == []
    assert load(client, name="v2", path=inside).status_code == 200


def test_without_roots_only_configured_paths_load(tmp_path):
    v1 = adapter(tmp_path / "configured" / "v1")
    other = adapter(tmp_path / "other")
    # Auth off: no key to check, so the roots (none here) are the only guard.
    client, up = make(config(tmp_path / "unused", configured_path=v1, roots=False, auth=False))
    for name, path in (("v2", other), ("v2", v1)):  # v1's files, but under another name
        r = load(client, name=name, path=path)
        assert r.status_code == 403 and r.json()["error"]["code"] == "adapter_loading_disabled"
    assert up.calls == []
    assert load(client, name="v1", path=v1).status_code == 200  # the configured artefact itself


def test_digest_must_match_the_files(tmp_path):
    v2 = adapter(tmp_path / "roots" / "v2")
    client, up = make(config(tmp_path / "roots"))
    r = load(client, name="v2", path=v2, digest="0" * 64)
    assert r.status_code == 409 and r.json()["error"]["code"] == "digest_mismatch"
    assert up.calls == []
    not_an_adapter = tmp_path / "roots" / "empty"
    not_an_adapter.mkdir()
    r = load(client, name="v2", path=str(not_an_adapter))
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    assert load(client, name="v2", path=v2, digest=adapter_digest(v2)).status_code == 200


def test_a_name_loaded_from_other_weights_is_reloaded(tmp_path):
    a = adapter(tmp_path / "roots" / "a", b"weights A")
    b = adapter(tmp_path / "roots" / "b", b"weights B")
    client, up = make(config(tmp_path / "roots"))
    assert load(client, name="v2", path=a).json()["reloaded"] == 0
    up.calls.clear()
    r = load(client, name="v2", path=b)
    assert r.status_code == 200 and r.json()["reloaded"] == 2 and r.json()["digest"] == adapter_digest(b)
    # Each replica: refused load ("already loaded"), unload, load again; and now holds B.
    for url in ("http://b1", "http://b2"):
        assert [c[1] for c in up.calls if c[0] == url] == [
            "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/load_lora_adapter"]
        assert up.loras[url]["v2"] == r.json()["path"] == str(tmp_path / "roots" / ".llmserve-adapters" /
                                                                adapter_digest(b))
    assert client.app.state.gateway.catalog.adapter_path("v2") == r.json()["path"]
    up.calls.clear()
    same = load(client, name="v2", path=b)  # the same weights again: nothing to unload
    assert same.status_code == 200 and same.json()["reloaded"] == 0
    assert engine_calls(up, "/v1/unload_lora_adapter") == []


def test_a_configured_adapter_is_reloaded_not_kept(tmp_path):
    """The engines loaded v1 from its configured path at start; its digest was never recorded, so
    even the configured path is reloaded: its files may have changed since."""
    v1 = adapter(tmp_path / "roots" / "v1")
    up = FakeUpstream(logprob=-0.1, loras={"http://b1": {"v1": v1}, "http://b2": {"v1": v1}})
    client, up = make(config(tmp_path / "roots", configured_path=v1), up)
    r = load(client, name="v1", path=v1)
    assert r.status_code == 200 and r.json()["reloaded"] == 2


def test_a_failed_reload_is_reported_and_forgets_the_digest(tmp_path):
    a = adapter(tmp_path / "roots" / "a", b"weights A")
    b = adapter(tmp_path / "roots" / "b", b"weights B")
    up = FakeUpstream(logprob=-0.1)
    client, up = make(config(tmp_path / "roots"), up)
    assert load(client, name="v2", path=a).status_code == 200
    up.lora_load_status = 500
    r = load(client, name="v2", path=b)
    assert r.status_code == 502 and r.json()["error"]["code"] == "adapter_load_failed"
    # What the replicas hold is unknown now: a later load of A must not trust "already loaded".
    assert client.app.state.gateway.catalog.adapter_digest("v2") is None
    up.lora_load_status = 200
    assert load(client, name="v2", path=a).json()["reloaded"] == 2


def test_a_model_name_cannot_become_an_adapter(tmp_path):
    v2 = adapter(tmp_path / "roots" / "v2")
    client, up = make(config(tmp_path / "roots"))
    r = load(client, name="teacher", path=v2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert up.calls == []


def test_route_override_swaps_the_student_and_back(tmp_path):
    client, _ = make(config(tmp_path))
    gw = client.app.state.gateway
    assert ask(client).headers["x-llmserve-served-by"] == "v1"
    apply(gw, {"v2": {"base": "base", "path": "/a/v2", "digest": "d2"}}, {"r": {"student": "v2"}})
    assert ask(client).headers["x-llmserve-served-by"] == "v2"
    apply(gw, {}, {"r": {"student": "unknown-model"}})  # ignored: nothing serves it
    assert ask(client).headers["x-llmserve-served-by"] == "v2"
    apply(gw, {}, {"r": {"student": "v1"}})
    assert ask(client).headers["x-llmserve-served-by"] == "v1"
    apply(gw, {}, {"r": {"student": "v2"}})
    apply(gw, {}, {})  # the override was rolled back to nothing: the route is as configured
    assert ask(client).headers["x-llmserve-served-by"] == "v1"


def test_a_promotion_carries_its_calibrated_threshold_and_a_rollback_takes_it_back(tmp_path):
    """The student answers at mean logprob -0.1; the configured threshold (-100) keeps every answer."""
    client, _ = make(config(tmp_path))
    gw = client.app.state.gateway
    runtime = {"v2": {"base": "base", "path": "/a/v2", "digest": "d2"}}
    apply(gw, runtime, {"r": {"student": "v2", "min_mean_logprob": 0.0}})  # calibrated: -0.1 is unsure
    assert ask(client).headers["x-llmserve-served-by"] == "teacher"
    apply(gw, runtime, {"r": {"student": "v2", "min_mean_logprob": -0.5}})  # a later calibration
    assert ask(client).headers["x-llmserve-served-by"] == "v2"
    apply(gw, runtime, {"r": {"student": "v2", "min_mean_logprob": 0.0}})
    apply(gw, runtime, {"r": {"student": "v2"}})  # rolled back to a promotion without one: the configured
    assert ask(client).headers["x-llmserve-served-by"] == "v2"
    apply(gw, runtime, {"r": {"student": "v1", "min_mean_logprob": 0.0}})
    apply(gw, runtime, {})  # and back to the configuration
    assert ask(client).headers["x-llmserve-served-by"] == "v1"


def test_apply_learns_weights_another_gateway_reloaded(tmp_path):
    client, _ = make(config(tmp_path))
    catalog = client.app.state.gateway.catalog
    apply(client.app.state.gateway, {"v1": {"base": "base", "path": "/a/v1-new", "digest": "d9"}}, {})
    assert (catalog.adapter_path("v1"), catalog.adapter_digest("v1")) == ("/a/v1-new", "d9")
