"""Runtime adapters are copied into a content-addressed store before they are hashed and loaded,
and a symlink anywhere inside one is refused (issue 26): what the engines load is exactly what was
hashed, whatever happens to the tenant's directory afterwards."""

import os
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from serve.config import Config
from serve.contract.paths import STORE_DIR, UnsafeAdapter, snapshot_adapter
from serve.gateway.app import create_app
from serve.gateway.backends import Backends
from serve.students.registry import adapter_digest
from tests.fakes import FakeUpstream


def adapter(path, weights=b"w1"):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter_model.safetensors").write_bytes(weights)
    return str(path)


def config(root):
    return Config.model_validate({"auth": {"enabled": False}, "models": [{"name": "base", "source": "x"}],
                                  "gateway": {"adapter_roots": [str(root)]}})


def make(cfg):
    backends = Backends()
    backends.update({"base": [("b#1", "http://b1"), ("b#2", "http://b2")]})
    up = FakeUpstream()
    return TestClient(create_app(cfg, backends, up)), up


def load(client, **body):
    return client.post("/v1/llmserve/adapters", json={"base": "base", **body})


def engine_calls(up, path):
    return [(c[0], c[2]) for c in up.calls if c[1] == path]


def test_a_symlinked_file_inside_the_adapter_is_refused(tmp_path):
    root = tmp_path / "roots"
    secret = tmp_path / "elsewhere" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"another tenant's weights")
    v2 = adapter(root / "v2")
    os.symlink(secret, root / "v2" / "extra.safetensors")
    client, up = make(config(root))
    r = load(client, name="v2", path=v2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "path"
    assert "symbolic link" in r.json()["error"]["message"]
    assert engine_calls(up, "/v1/load_lora_adapter") == []


def test_a_symlinked_directory_inside_the_adapter_is_refused(tmp_path):
    root = tmp_path / "roots"
    outside = adapter(tmp_path / "elsewhere" / "w")
    v2 = adapter(root / "v2")
    os.symlink(outside, root / "v2" / "sub")
    client, up = make(config(root))
    r = load(client, name="v2", path=v2)
    assert r.status_code == 400 and "symbolic link" in r.json()["error"]["message"]
    assert engine_calls(up, "/v1/load_lora_adapter") == []


def test_engines_load_what_was_hashed_even_when_the_files_change_after(tmp_path):
    root = tmp_path / "roots"
    v2 = adapter(root / "v2", b"evaluated weights")
    client, up = make(config(root))
    r = load(client, name="v2", path=v2, digest=adapter_digest(v2))
    assert r.status_code == 200, r.text
    digest = r.json()["digest"]
    # The tenant swaps the weights right after the check (before or while the engines read them).
    (root / "v2" / "adapter_model.safetensors").write_bytes(b"other weights")
    loaded = {body["lora_path"] for _, body in engine_calls(up, "/v1/load_lora_adapter")}
    assert len(loaded) == 1
    (path,) = loaded
    assert adapter_digest(path) == digest != adapter_digest(v2)
    assert Path(path, "adapter_model.safetensors").read_bytes() == b"evaluated weights"
    assert path == str(root / STORE_DIR / digest)
    # The copy is read-only, and the same weights under another name share it.
    assert not os.stat(os.path.join(path, "adapter_model.safetensors")).st_mode & 0o222
    (root / "v2" / "adapter_model.safetensors").write_bytes(b"evaluated weights")
    assert load(client, name="v3", path=v2).json()["path"] == path


def test_a_store_that_is_a_link_or_writable_by_others_is_refused(tmp_path):
    src = adapter(tmp_path / "src")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / "store")
    with pytest.raises(UnsafeAdapter, match="not a directory"):
        snapshot_adapter(src, tmp_path / "store", adapter_digest)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(UnsafeAdapter, match="other users"):
        snapshot_adapter(src, shared, adapter_digest)
    assert os.listdir(elsewhere) == [] and os.listdir(shared) == []
    path, digest = snapshot_adapter(src, tmp_path / "ok", adapter_digest)
    assert digest == adapter_digest(src) and os.listdir(tmp_path / "ok") == [digest]
    assert path == str(tmp_path / "ok" / digest)
