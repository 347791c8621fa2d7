"""`GET /version` answers as vLLM's server does: vLLM's version, plus the gateway's own (issue 25)."""

from __future__ import annotations

from importlib import metadata

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from serve.gateway.version import version


def test_version_is_the_installed_vllms_as_vllm_reports_it():
    from vllm.version import __version__ as vllm_version

    body = TestClient(Starlette(routes=[Route("/version", version)])).get("/version").json()
    assert body == {"version": vllm_version, "llmserve_version": metadata.version("llmserve")}
