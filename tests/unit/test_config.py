import pytest

from serve.config import ConfigError, apply_env_overrides, default_config, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


GOOD = """
models:
  - name: a
    source: /models/a
    engine: {dtype: float32, max_model_len: 512, enable_prefix_caching: true, tensor_parallel_size: 2,
             swap_space: 4}
    deployment: {autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}}
gateway: {port: 9000}
"""


def test_loads_file_and_keeps_extra_engine_args(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), environ={})
    m = cfg.models[0]
    assert cfg.gateway.port == 9000
    kwargs = m.engine.to_kwargs()
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["swap_space"] == 4
    assert "quantization" not in kwargs  # unset fields are not passed to vLLM
    assert m.deployment.autoscaling.max_replicas == 4


def test_env_overrides_nested_fields_with_types(tmp_path):
    env = {"LLMSERVE__GATEWAY__PORT": "9100", "LLMSERVE__MODELS__0__DEPLOYMENT__REPLICAS": "3",
           "LLMSERVE__MODELS__0__ENGINE__ENFORCE_EAGER": "true", "OTHER": "x"}
    cfg = load_config(write(tmp_path, GOOD), environ=env)
    assert cfg.gateway.port == 9100
    assert cfg.models[0].deployment.replicas == 3
    assert cfg.models[0].engine.enforce_eager is True


def test_invalid_field_is_named_with_file(tmp_path):
    p = write(tmp_path, "models:\n  - name: a\n    source: x\n    deployment: {replicas: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, environ={})
    assert str(p) in str(e.value) and "models.0.deployment.replicas" in str(e.value)


def test_unknown_key_is_rejected(tmp_path):
    p = write(tmp_path, "models:\n  - name: a\n    source: x\n    replica: 2\n")
    with pytest.raises(ConfigError, match=r"models\.0\.replica"):
        load_config(p, environ={})


@pytest.mark.parametrize("text,needle", [
    ("models: []\n", "at least one model"),
    ("- a\n", "mapping"),
    ("models: [\n", "not valid YAML"),
    ("models:\n  - {name: a, source: x}\n  - {name: a, source: y}\n", "used twice"),
    ("models:\n  - {name: a, source: x, deployment: {autoscaling: {min_replicas: 3, max_replicas: 2}}}\n",
     "min_replicas"),
    ("models:\n  - {name: 'a b', source: x}\n", "whitespace"),
])
def test_bad_files(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, text), environ={})


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/llmserve.yaml", environ={})


def test_default_is_tiny_on_cpu():
    cfg = default_config()
    (m,) = cfg.models
    assert m.is_builtin_tiny and m.tiny_seed == 1 and m.accelerator == "cpu"
    assert cfg.gateway.host == "127.0.0.1" and cfg.gateway.port == 8000
    assert load_config(None, environ={"LLMSERVE__GATEWAY__PORT": "8123"}).gateway.port == 8123


def test_env_override_creates_list_entries():
    data = apply_env_overrides({"models": []}, {"LLMSERVE__MODELS__0__NAME": "x"})
    assert data == {"models": [{"name": "x"}]}


def test_example_configs_validate():
    import pathlib

    examples = sorted(pathlib.Path(__file__).parents[2].joinpath("examples").glob("*.yaml"))
    assert examples
    for p in examples:
        load_config(p, environ={})


@pytest.mark.parametrize("policy", ["ray_default", "slo"])
def test_autoscaling_reaches_serve_as_a_valid_autoscaling_config(policy):
    """What the engine deployment hands Ray Serve must pass Serve's own schema: our policy's
    inputs go to its policy_kwargs, never into Serve's fields."""
    from ray.serve.config import AutoscalingConfig

    from serve.config import ModelSpec
    from serve.engine.deployments import llm_config_for

    spec = ModelSpec.model_validate({"name": "m", "source": "/models/m", "deployment": {"autoscaling": {
        "min_replicas": 1, "max_replicas": 8, "policy": policy}}})
    cfg = llm_config_for(spec, "ns").deployment_config["autoscaling_config"]
    parsed = AutoscalingConfig(**cfg)
    assert parsed.max_replicas == 8
    if policy == "slo":
        assert cfg["policy"]["policy_function"] == "serve.policies.autoscaling:SLOPolicy"
