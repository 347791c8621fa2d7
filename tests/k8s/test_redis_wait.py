"""The head waits for the chart's Redis when GCS fault tolerance keeps its state there (issue 28).

At install the Redis pod and the head start together; a GCS that cannot reach Redis when it starts
exits, so the head container restarted once after the kubelet's back-off (seen in tests/cluster).
The head's init container asks Redis itself, through its Service (which answers only once Redis is
Ready), until it answers PONG: its script is run here against a stand-in redis-cli.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.support import CASES, by_kind, helm_template, values_of

# redis-cli as the script calls it: logs its arguments and the password it was given, answers an
# error until the ANSWER_AFTER-th call, then PONG.
FAKE_REDIS_CLI = r"""#!/bin/sh
echo "$*|$REDISCLI_AUTH" >> "$CLI_LOG"
n=$(wc -l < "$CLI_LOG")
if [ "$n" -ge "$ANSWER_AFTER" ]; then echo PONG; else echo "Could not connect to Redis" >&2; exit 1; fi
"""


def _head(objs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return by_kind(objs, "RayService")[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]


def _run(container: dict[str, Any], tmp_path: Path, answer_after: int) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-cli").write_text(FAKE_REDIS_CLI)
    (bin_dir / "redis-cli").chmod(0o755)
    log = tmp_path / "cli.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CLI_LOG": str(log), "ANSWER_AFTER": str(answer_after),
           "REDISCLI_AUTH": "pw-from-secret"}
    proc = subprocess.run(container["command"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return log.read_text().splitlines()


@pytest.mark.parametrize("case", [c for c in CASES if values_of(c)["gcsFaultTolerance"]["enabled"]
                                  and values_of(c)["redis"]["enabled"]])
def test_the_head_waits_for_the_charts_redis(case: str, tmp_path: Path) -> None:
    objs = helm_template(*CASES[case])
    head = _head(objs)
    ft = by_kind(objs, "RayService")[0]["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    [wait] = head["initContainers"]
    # The Redis the GCS uses, with the password from the Secret the GCS reads it from.
    auth = {e["name"]: e for e in wait["env"]}["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]
    assert auth == ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    host, port = ft["redisAddress"].split(":")
    if case == "default":  # the script is the same in every case; run once (it sleeps 2 s)
        calls = _run(wait, tmp_path, answer_after=2)
        assert calls == [f"-h {host} -p {port} ping|pw-from-secret"] * 2, "asks again until Redis answers"
    else:
        assert f"redis-cli -h {host} -p {port} ping" in wait["command"][-1]
    # Pod Security "restricted", as every other container of the pod.
    assert wait["securityContext"] == head["containers"][0]["securityContext"]
    assert wait["resources"]["limits"]["memory"]


def test_no_wait_without_the_charts_redis() -> None:
    """An external Redis (or none): nothing of the chart's to wait for."""
    objs = helm_template("--set", "redis.enabled=false,gcsFaultTolerance.external.address=redis.example:6379")
    assert "initContainers" not in _head(objs)
    assert "initContainers" not in _head(helm_template("--set", "gcsFaultTolerance.enabled=false"))


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


@pytest.mark.parametrize("case", list(CASES))
def test_serves_recovery_outlasts_a_lost_heads_replicas(case: str) -> None:
    """With GCS fault tolerance, Serve's controller restarts on the new head and waits for each live
    replica before replacing it; Ray's 30 s default was 0.5 s short after a lost head here
    (tests/cluster), and a replaced replica reloads its model. The head (where the controller runs)
    carries the longer wait; no worker does, and without fault tolerance nothing recovers."""
    objs = helm_template(*CASES[case])
    spec = by_kind(objs, "RayService")[0]["spec"]["rayClusterConfig"]
    head = _env(spec["headGroupSpec"]["template"]["spec"]["containers"][0])
    ft = values_of(case)["gcsFaultTolerance"]
    want = str(ft["serveRecoveryTimeoutS"]) if spec.get("gcsFaultToleranceOptions") else None
    assert head.get("RAY_SERVE_SLOW_STARTUP_WARNING_S") == want
    assert want is None or int(want) > 30
    for group in spec.get("workerGroupSpecs") or []:
        for c in group["template"]["spec"]["containers"]:
            assert "RAY_SERVE_SLOW_STARTUP_WARNING_S" not in _env(c), group["groupName"]


def test_no_longer_recovery_wait_without_fault_tolerance() -> None:
    head = _head(helm_template("--set", "gcsFaultTolerance.enabled=false"))["containers"][0]
    assert "RAY_SERVE_SLOW_STARTUP_WARNING_S" not in _env(head)
    head = _head(helm_template("--set", "gcsFaultTolerance.serveRecoveryTimeoutS=90"))["containers"][0]
    assert _env(head)["RAY_SERVE_SLOW_STARTUP_WARNING_S"] == "90"
