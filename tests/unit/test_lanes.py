"""`make test`'s lane runner (tests/lanes.py): every lane's tests in the closing line, one exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def lanes(*args: str) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-m", "tests.lanes", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    return done.returncode, done.stdout.splitlines()


def pytest(path: Path, *extra: str) -> str:
    return f"{sys.executable} -m pytest -q -p no:cacheprovider --rootdir {path.parent} {path} {' '.join(extra)}"


def test_the_last_line_sums_every_pytest_run_of_every_lane_and_a_failure_fails(tmp_path):
    (tmp_path / "test_ok.py").write_text("def test_a():\n    pass\n\n\ndef test_b():\n    pass\n")
    (tmp_path / "test_bad.py").write_text(
        "import warnings\n\n\ndef test_c():\n    warnings.warn(UserWarning('w'))\n\n\n"
        "def test_d():\n    assert False\n")
    code, out = lanes("--lane", "one", "true", pytest(tmp_path / "test_ok.py"),
                      "--lane", "two", pytest(tmp_path / "test_bad.py"), pytest(tmp_path / "test_ok.py"))
    assert code == 1
    assert out[-1].startswith("1 failed, 5 passed, 1 warning in "), out[-5:]
    # Each lane's output is printed whole, the lanes' own lines before the closing one.
    assert out[-3].startswith("one: exit 0, 2 passed in ") and out[-2].startswith("two: exit 1, 1 failed, 3 passed")


def summary(line: str) -> str:
    """A command that ends as a pytest run does, with `line` as its closing summary (no pytest start-up)."""
    return f"echo ..; echo '{line}'"


def test_a_command_failing_outside_pytest_fails_the_run_and_shows_in_the_last_line():
    code, out = lanes("--lane", "lint", "exit 3", summary("2 passed in 0.01s"),
                      "--lane", "other", summary("== 2 passed, 1 warning in 0.01s =="))
    assert code == 3
    assert out[-1].startswith("4 passed, 1 warning, 1 error in "), out[-5:]


def test_all_passing_lanes_exit_zero_and_deselecting_every_test_of_a_run_is_no_failure():
    code, out = lanes("--lane", "a", summary("2 passed in 0.01s"),
                      "--lane", "b", f"{summary('1 passed, 1 deselected in 0.01s')}",
                      f"{summary('2 deselected in 0.01s')}; exit 5")
    assert code == 0, out
    assert out[-1].startswith("3 passed, 3 deselected in "), out[-5:]
