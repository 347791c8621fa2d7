"""Tests marked `destructive` (they take parts of the shared stack away) run after every other test
of their session: tests/conftest.py orders them, whatever their file names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def collected(*args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_destructive_tests_are_ordered_after_every_other_test_of_the_session():
    everything = collected("tests/integration")
    destructive = collected("tests/integration", "-m", "destructive")
    assert destructive and len(destructive) < len(everything)
    # Their own files sort before others (test_faults < test_policies): only the marker puts them last.
    assert everything[-len(destructive):] == destructive
