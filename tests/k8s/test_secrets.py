"""Secrets stay out of what Ray Serve logs and its dashboard shows (issue 26).

The Redis URL carries the Redis password. Serve logs every application's args and every deployment's
options (its runtime_env among them), and the Ray dashboard shows them to whoever reaches it; so the
URL must reach gateways, the batch worker and engines only through their pod's environment (the
chart's LLMSERVE__CACHE__REDIS_URL from a Secret), never through serveConfigV2 or a runtime_env.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.k8s.support import CASES, by_kind, helm_template, one, pod_templates

PASSWORD = "pw-Sentinel-5e1c7"
URL = f"redis://:{PASSWORD}@llm-llmserve-redis:6379/0"


def _engine_configs(serve_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The LLMConfig each engine application of serveConfigV2 builds, the way Serve's build task on
    a chart pod builds it: with the pod's environment holding the Redis URL."""
    from serve.engine import deployments
    from serve.launch import engine_replica

    monkeypatch.setenv("LLMSERVE__CACHE__REDIS_URL", URL)
    built: list[Any] = []

    def record(*args: Any, **kwargs: Any) -> None:  # build_engine_app, stopped before Ray Serve LLM
        built.append(deployments.llm_config_for(*args, **kwargs))

    monkeypatch.setattr(engine_replica, "build_engine_app", record)
    for app in serve_config["applications"]:
        if app["import_path"] == "serve.launch.engine_replica:build":
            engine_replica.build(app["args"])
    return built


@pytest.mark.parametrize("case", ["default", "production"])
def test_the_redis_password_is_in_no_serve_argument_or_runtime_env(case: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    objs = helm_template(*CASES[case])
    service = one(objs, "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    configs = _engine_configs(serve_config, monkeypatch)
    assert len(configs) == len(serve_config["applications"]) - 1  # every model's, the gateway aside
    for config in configs:
        shown = json.dumps(config.model_dump(mode="json"), default=str)
        assert PASSWORD not in shown, f"{config.model_loading_config}: the Redis password is in the LLMConfig"
        assert "redis://" not in shown
    # The pods hold the URL only as a reference to the Secret: the kubelet expands the password.
    for _, tpl in pod_templates(service["spec"]["rayClusterConfig"]):
        [container] = tpl["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert "secretKeyRef" in env["LLMSERVE_REDIS_PASSWORD"]["valueFrom"]
        assert env["LLMSERVE__CACHE__REDIS_URL"]["value"].startswith("redis://:$(LLMSERVE_REDIS_PASSWORD)@")
    assert "redis://" not in service["spec"]["serveConfigV2"]


def test_llmserve_run_sends_the_redis_url_through_the_environment_only() -> None:
    """`llmserve run`'s serve config (the same shape as serveConfigV2) names no Redis URL; its
    engines read it from the environment Ray started with."""
    from serve.config import REDIS_URL_ENV, load_config
    from serve.engine.cluster import serve_deploy_config

    config = load_config(None, environ={"LLMSERVE__CACHE__REDIS_URL": URL})
    assert config.cache.redis_url == URL
    assert PASSWORD not in json.dumps(serve_deploy_config(config))
    assert REDIS_URL_ENV == "LLMSERVE__CACHE__REDIS_URL"  # what the chart sets (templates/_helpers.tpl)


def test_no_rendered_object_holds_a_redis_url_with_a_password() -> None:
    objs = helm_template(*CASES["cpu-dev-everything"])
    for obj in objs:
        if obj["kind"] == "Secret":
            continue
        text = yaml.safe_dump(obj)
        assert "redis://:$(LLMSERVE_REDIS_PASSWORD)@" in text or "redis://" not in text, obj["metadata"]["name"]
    assert by_kind(objs, "RayService")
