"""builtin://tiny with shape parameters: parsing, the cache directory each shape gets, errors at
config validation (`llmserve check-config`), and one shaped model built for real."""

import json
from pathlib import Path

import pytest
import yaml

from serve.cli import main as llmserve
from serve.config import ConfigError, ModelSpec, load_config
from serve.model.tiny import DEFAULT_SHAPE, parse_tiny_source

ROOT = Path(__file__).parents[2]


def test_shape_parameters_parse():
    tiny = parse_tiny_source("builtin://tiny?seed=2&num_hidden_layers=4&hidden_size=256")
    assert tiny.seed == 2 and tiny.overrides == {"num_hidden_layers": 4, "hidden_size": 256}
    assert tiny.shape == {**DEFAULT_SHAPE, "num_hidden_layers": 4, "hidden_size": 256}
    spec = ModelSpec(name="t", source="builtin://tiny?seed=3&intermediate_size=512")
    assert spec.is_builtin_tiny and spec.tiny_seed == 3 and spec.tiny.shape["intermediate_size"] == 512


@pytest.mark.parametrize(("source", "name"), [
    ("builtin://tiny", "tiny-seed0"),
    ("builtin://tiny?seed=2", "tiny-seed2"),
    # A default given explicitly is the same model: the same directory as before shapes existed.
    ("builtin://tiny?seed=2&num_hidden_layers=2&hidden_size=128", "tiny-seed2"),
])
def test_the_default_shape_keeps_the_old_directory(source, name):
    assert parse_tiny_source(source).dir_name == name
    assert parse_tiny_source(source).shape == DEFAULT_SHAPE


def test_each_shape_gets_its_own_directory():
    sources = ["builtin://tiny?seed=2", "builtin://tiny?seed=2&num_hidden_layers=4",
               "builtin://tiny?seed=2&hidden_size=256", "builtin://tiny?seed=2&num_hidden_layers=4&hidden_size=256",
               "builtin://tiny?seed=2&num_hidden_layers=3", "builtin://tiny?seed=1&num_hidden_layers=4",
               "builtin://tiny?seed=2&intermediate_size=512", "builtin://tiny?seed=2&num_key_value_heads=1"]
    names = [parse_tiny_source(s).dir_name for s in sources]
    assert len(set(names)) == len(sources), names
    assert names[3] == "tiny-seed2-hidden_size256-num_hidden_layers4"
    # The order in the URL does not make another model.
    assert parse_tiny_source("builtin://tiny?hidden_size=256&num_hidden_layers=4&seed=2").dir_name == names[3]


@pytest.mark.parametrize(("source", "needle"), [
    ("builtin://tiny?seed=2&layers=4", "unknown parameter 'layers'"),
    ("builtin://tiny?seed=two", "seed must be a non-negative integer"),
    ("builtin://tiny?seed=-1", "seed must be a non-negative integer"),
    ("builtin://tiny?num_hidden_layers=+3", "num_hidden_layers must be a non-negative integer"),
    ("builtin://tiny?num_hidden_layers=", "num_hidden_layers must be a non-negative integer"),
    ("builtin://tiny?num_hidden_layers=0", "must be positive integers"),
    ("builtin://tiny?seed=1&seed=2", "seed is given twice"),
    ("builtin://tiny?seed", "name=value pairs"),
    ("builtin://tiny?num_attention_heads=3", "multiple of num_attention_heads"),
    ("builtin://tiny?num_key_value_heads=3&num_attention_heads=4", "multiple of num_attention_heads"),
    ("builtin://tiny?hidden_size=32", "head size hidden_size/num_attention_heads = 16"),
    ("builtin://tinyx?seed=1", "unknown builtin model"),
    ("builtin://huge", "unknown builtin model"),
])
def test_a_bad_builtin_url_fails_config_validation(tmp_path, capsys, source, needle):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "m", "source": source, "accelerator": "cpu"}]}))
    with pytest.raises(ConfigError, match=r"models\.0\.source") as err:
        load_config(path, environ={})
    assert needle in str(err.value)
    assert llmserve(["check-config", str(path)]) == 2
    assert needle in capsys.readouterr().err


def test_a_bad_base_fails_students_train_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:  # argparse's error: exit 2, the reason on stderr
        llmserve(["students", "train", "--labels", str(tmp_path / "missing.jsonl"), "--base",
                  "builtin://tiny?seed=1&layers=4", "-o", str(tmp_path / "out")])
    assert err.value.code == 2 and "unknown parameter 'layers'" in capsys.readouterr().err


def test_demo_teacher_is_larger_than_its_student():
    config = load_config(ROOT / "examples" / "demo.yaml", environ={})
    teacher, student = config.model("teacher-base"), config.model("student")
    assert teacher is not None and student is not None
    assert teacher.tiny.dir_name != student.tiny.dir_name
    assert teacher.tiny.shape["num_hidden_layers"] > student.tiny.shape["num_hidden_layers"]


def test_a_shaped_model_is_built_with_its_shape_in_its_own_directory(tmp_path, monkeypatch):
    """The engines' resolution and the students' (`students train --base`) give the same directory."""
    from serve.engine.models import resolve_source
    from serve.students.generate import resolve_base

    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path))
    source = "builtin://tiny?seed=2&num_hidden_layers=3"
    path = resolve_source(ModelSpec(name="t", source=source))
    assert path == str(tmp_path / "tiny-seed2-num_hidden_layers3")
    config = json.loads((Path(path) / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert {k: config[k] for k in DEFAULT_SHAPE if k != "num_hidden_layers"} == {
        k: v for k, v in DEFAULT_SHAPE.items() if k != "num_hidden_layers"}
    assert json.loads((Path(path) / "llmserve-tiny.json").read_text())["seed"] == 2
    assert resolve_base(source) == path  # already built: found, not built again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-seed2-num_hidden_layers3"]
