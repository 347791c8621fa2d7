"""`helm test`: the rendered test pod's script, run with sh against a stand-in for curl that answers
like the gateway Service would (status codes with curl's own -f rule: an HTTP error is exit 22)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.support import CPU_DEV, helm_template, one

# curl as the script uses it: flags, -H header, the URL last. Logs "URL|auth header" per call.
FAKE_CURL = r"""#!/bin/sh
fail=0; auth=""; url=""
while [ $# -gt 0 ]; do
  case "$1" in
    -H) auth="$2"; shift ;;
    --retry|--retry-delay|--max-time) shift ;;
    -*f*) case "$1" in --*) ;; *) fail=1 ;; esac ;;
    *) url="$1" ;;
  esac
  shift
done
echo "$url|$auth" >> "$CURL_LOG"
case "$url" in
  */health) status="$HEALTH_STATUS"; body="$HEALTH_BODY" ;;
  */v1/models) status=200; body="$MODELS_BODY" ;;
  *) status=404; body="not found" ;;
esac
if [ "$status" -ge 400 ] && [ "$fail" = 1 ]; then echo "curl: (22) HTTP $status" >&2; exit 22; fi
printf '%s' "$body"
"""

MODELS = json.dumps({"object": "list", "data": [{"id": "tiny-a", "object": "model"},
                                                 {"id": "tiny-b", "object": "model"}]})


def _run(tmp_path: Path, health: tuple[int, str], models: str = MODELS) -> tuple[int, list[str], str]:
    pod: dict[str, Any] = one(helm_template("-f", CPU_DEV), "Pod")
    [container] = pod["spec"]["containers"]
    assert container["command"] == ["/bin/sh", "-ec"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text(FAKE_CURL)
    (bin_dir / "curl").chmod(0o755)
    log = tmp_path / "curl.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CURL_LOG": str(log), "API_KEY": "sk-test",
           "HEALTH_STATUS": str(health[0]), "HEALTH_BODY": health[1], "MODELS_BODY": models}
    proc = subprocess.run(["/bin/sh", "-ec", container["args"][0]], env=env, capture_output=True, text=True,
                          timeout=30)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc.returncode, calls, proc.stdout + proc.stderr


def test_passes_when_health_is_200_and_every_model_is_listed(tmp_path: Path) -> None:
    rc, calls, out = _run(tmp_path, (200, '{"status":"ok","replicas":{"tiny-a":1,"tiny-b":1}}'))
    assert rc == 0, out
    assert calls == ["http://llm-llmserve:8000/health|",
                     "http://llm-llmserve:8000/v1/models|Authorization: Bearer sk-test"]


@pytest.mark.parametrize("health", [
    (503, '{"status":"starting","replicas":{"tiny-a":0,"tiny-b":0}}'),  # no model ready yet
    (200, "OK"),  # not the gateway's /health (no status)
])
def test_fails_unless_health_is_the_gateways_200(tmp_path: Path, health: tuple[int, str]) -> None:
    rc, calls, out = _run(tmp_path, health)
    assert rc != 0, out
    assert calls == ["http://llm-llmserve:8000/health|"], "stops before /v1/models"


def test_fails_when_a_model_is_missing(tmp_path: Path) -> None:
    models = json.dumps({"object": "list", "data": [{"id": "tiny-a", "object": "model"}]})
    rc, _, out = _run(tmp_path, (200, '{"status":"degraded"}'), models)
    assert rc != 0 and "model tiny-b missing" in out, out
