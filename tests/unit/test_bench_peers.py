"""`make bench-peers`' pure parts (bench/peers_report.py, bench/peers.py's config builders): the
medians, the added TTFT, issue 27's goals and the table, on hand-made runs; nothing is timed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from bench import peers, peers_report

FOUR = ("llmserve", "litellm", "vllm-router round_robin", "vllm-router cache_aware")


def run(system: str, replicas: int, conc: int, rnd: int, rps: float, p50: float, p99: float,
        cpu: float | None, rss: float = 50.0, errors: int = 0) -> dict:
    return {"system": system, "replicas": replicas, "concurrency": conc, "round": rnd, "req_per_s": rps,
            "ttft_ms": {"p50": p50, "p99": p99}, "routing_cpu_ms": cpu, "routing_rss_mb": rss, "errors": errors}


def fleet(replicas: int = 1, ours: tuple[float, float, float] = (100.0, 20.0, 2.0),
          with_bare: bool = True) -> list[dict]:
    """Two rounds at 16 streams; llmserve's (req/s, TTFT p99, gateway CPU) from `ours`."""
    rps, p99, cpu = ours
    rows: dict[str, tuple[float, float, float, float | None]] = {
        "llmserve": (rps, 12.0, p99, cpu), "litellm": (20.0, 400.0, 900.0, 45.0),
            "vllm-router round_robin": (95.0, 11.0, 18.0, 1.5), "vllm-router cache_aware": (90.0, 11.0, 16.0, 1.8)}
    if with_bare:
        rows["bare"] = (99.0, 10.0, 15.0, None)
    out = []
    for rnd in (0, 1):
        for system, (r, a, b, c) in rows.items():
            out.append(run(system, replicas, 16, rnd, r + rnd, a + rnd, b + rnd, c))
    return out


def by_name(goals: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in goals}


def test_summary_takes_medians_and_adds_ttft_against_bare() -> None:
    s = peers_report.summarize(fleet())
    row = s[1]["llmserve"][16]
    assert row["req_per_s"] == 100.5  # median of 100 and 101
    assert row["req_per_s_per_round"] == [100.0, 101.0]
    assert row["ttft_p99_ms"] == 20.5
    assert row["added_ttft_p50_ms"] == pytest.approx(2.0)  # 12.5 - 10.5
    assert row["added_ttft_p99_ms"] == pytest.approx(5.0)  # 20.5 - 15.5
    assert row["routing_cpu_ms_per_request"] == 2.0
    assert math.isnan(s[1]["bare"][16]["routing_cpu_ms_per_request"])  # bare routes nothing


def test_summary_without_bare_leaves_added_ttft_unknown() -> None:
    s = peers_report.summarize(fleet(replicas=2, with_bare=False))
    assert set(s[2]) == set(FOUR)
    assert math.isnan(s[2]["llmserve"][16]["added_ttft_p99_ms"])


def test_goals_met_when_llmserve_beats_the_stricter_router() -> None:
    gs = by_name(peers_report.goals(peers_report.summarize(fleet(ours=(100.0, 20.0, 2.0)))))
    assert [g["met"] for g in gs.values()] == [True, True, True, True]
    # against the faster router (round robin 95.5), the cheaper one (1.5 ms) and the lower p99 (16.5)
    assert gs["throughput vs vllm-router (1 replica)"]["measured"] == round(100.5 / 95.5, 3)
    assert gs["gateway CPU/request vs vllm-router (1 replica)"]["measured"] == round(2.0 / 1.5, 3)
    assert gs["gateway CPU/request vs LiteLLM (1 replica)"]["measured"] == round(2.0 / 45.0, 3)
    assert gs["TTFT p99 over vllm-router (1 replica)"]["measured"] == 4.0
    assert gs["TTFT p99 over vllm-router (1 replica)"]["per_concurrency"] == {"16": 4.0}


@pytest.mark.parametrize(("ours", "failed"), [
    ((94.0, 20.0, 2.0), "throughput vs vllm-router (1 replica)"),
    ((100.0, 20.0, 2.3), "gateway CPU/request vs vllm-router (1 replica)"),
    ((100.0, 21.6, 2.0), "TTFT p99 over vllm-router (1 replica)"),
])
def test_each_goal_fails_on_its_own_figure(ours: tuple[float, float, float], failed: str) -> None:
    gs = by_name(peers_report.goals(peers_report.summarize(fleet(ours=ours))))
    assert [name for name, g in gs.items() if not g["met"]] == [failed]


def test_litellm_goal_is_strictly_under_a_tenth() -> None:
    runs = [r for r in fleet() if r["system"] != "litellm"]
    runs += [run("litellm", 1, 16, rnd, 20.0, 400.0, 900.0, 20.0) for rnd in (0, 1)]  # 2.0 / 20.0 = 0.1
    gs = by_name(peers_report.goals(peers_report.summarize(runs)))
    assert gs["gateway CPU/request vs LiteLLM (1 replica)"]["met"] is False


def test_a_missing_figure_fails_its_goal() -> None:
    runs = [r for r in fleet() if r["system"] != "litellm"]
    gs = by_name(peers_report.goals(peers_report.summarize(runs)))
    g = gs["gateway CPU/request vs LiteLLM (1 replica)"]
    assert (g["met"], g["measured"], g["per_concurrency"]) == (False, None, {"16": None})
    assert gs["throughput vs vllm-router (1 replica)"]["met"] is True


def test_goals_per_replica_count_and_worst_concurrency() -> None:
    runs = fleet(1) + fleet(2, ours=(94.0, 20.0, 2.0), with_bare=False)
    runs += [run(s, 1, 64, rnd, 200.0 if s != "llmserve" else 150.0, 30.0, 60.0, 1.0) for s in FOUR for rnd in (0, 1)]
    gs = by_name(peers_report.goals(peers_report.summarize(runs)))
    one = gs["throughput vs vllm-router (1 replica)"]
    assert one["per_concurrency"] == {"16": round(100.5 / 95.5, 3), "64": 0.75}
    assert (one["measured"], one["met"]) == (0.75, False)
    assert gs["throughput vs vllm-router (2 replicas)"]["met"] is False
    assert gs["gateway CPU/request vs vllm-router (2 replicas)"]["met"] is True


def test_table_rows_in_system_order_with_rounds_and_dashes() -> None:
    lines = peers_report.table(peers_report.summarize(fleet())).splitlines()
    assert len(lines) == 2 + 5
    assert [line.split("|")[2].strip() for line in lines[2:]] == list(peers_report.SYSTEMS)
    bare, ours = lines[2], lines[3]
    assert "| 99.5 | 99.0 / 100.0 |" in bare and bare.split("|")[10].strip() == "-"  # no routing CPU
    assert "| +2.0 | +5.0 | 2.00 | 50 | 0 |" in ours
    goals = peers_report.goals_table(peers_report.goals(peers_report.summarize(fleet(ours=(94.0, 20.0, 2.0)))))
    assert "| throughput vs vllm-router (1 replica) |" in goals and goals.count("| NO |") == 1


def test_llmserve_config_turns_on_keys_limits_and_cost() -> None:
    base = yaml.safe_load((Path(peers.ROOT) / "bench" / "config.yaml").read_text())
    cfg = peers.llmserve_config(base, 2, "a" * 64)
    assert base["auth"] == {"enabled": False}  # the base is not changed
    key = cfg["auth"]["keys"][0]
    assert cfg["auth"]["enabled"] is True and key["sha256"] == "a" * 64
    assert (key["requests_per_minute"], key["tokens_per_minute"]) == (peers.KEY_RPM, peers.KEY_TPM)
    tiny = cfg["models"][0]
    assert tiny["deployment"]["replicas"] == 2 and tiny["price"]["output_per_million"] > 0
    from serve.config import Config

    Config.model_validate(cfg)  # what `llmserve run --config` will load


def test_litellm_config_has_one_deployment_per_engine_and_the_limits() -> None:
    cfg = peers.litellm_config(["http://127.0.0.1:1", "http://127.0.0.1:2"], None)
    params = [m["litellm_params"] for m in cfg["model_list"]]
    assert [p["api_base"] for p in params] == ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"]
    assert {(p["rpm"], p["tpm"]) for p in params} == {(peers.KEY_RPM, peers.KEY_TPM)}
    assert cfg["general_settings"] == {"master_key": peers.KEY}
    assert peers.litellm_config(["http://x"], "postgresql://u@h/d")["general_settings"]["database_url"] == \
        "postgresql://u@h/d"


def test_bare_vllm_cmd_passes_engine_args_as_flags() -> None:
    cmd = peers.bare_vllm_cmd("/m", 8001, {"dtype": "float32", "enforce_eager": True, "enable_lora": False,
                                           "max_model_len": 1024}, python="py")
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    tail = cmd[cmd.index("--disable-uvicorn-access-log") + 1:]
    assert tail == ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024"]


# `make bench-start`'s comparison with bare `vllm serve` (issue 27 section 4).

def start_run(label: str, ready: float | None) -> dict:
    return {"label": label, "events": {} if ready is None else {"ready": ready}, "phases": {}, "models": ["tiny"],
            "stop": {"exit_s": 5.0, "all_gone_s": 5.5, "exit_code": 0, "leftovers": []}, "errors": []}


def test_start_goal_is_the_warm_gap_to_bare_vllm() -> None:
    from bench import start

    bare = [{"label": "first", "ready_s": 20.0}, {"label": "warm", "ready_s": 30.0}]
    goal = start.over_bare([start_run("first", 80.0), start_run("warm", 45.0)], bare)
    assert goal == {"name": "warm start over bare vllm serve", "target": "<= 15 s", "measured": 15.0, "met": True}
    goal = start.over_bare([start_run("first", 80.0), start_run("warm", 45.2)], bare)
    assert goal is not None and (goal["measured"], goal["met"]) == (15.2, False)
    assert start.over_bare([start_run("warm", None)], bare) is None  # llmserve never got ready: no figure
    assert start.over_bare([start_run("warm", 45.0)], [{"label": "warm", "ready_s": None}]) is None


def test_start_table_shows_bare_and_the_gap_per_run() -> None:
    from bench import start

    text = start.table([start_run("first", 80.0), start_run("warm", 45.0)],
                       [{"label": "first", "ready_s": 20.0}, {"label": "warm", "ready_s": 30.0}])
    rows = {line.split("  ", 1)[0].strip() if not line.startswith("  ") else line.split("  ")[1]: line
            for line in text.splitlines()}
    assert rows["bare vllm serve ready"].split()[-4:] == ["20.0", "s", "30.0", "s"]
    assert rows["llmserve minus bare"].split()[3:] == ["60.0", "s", "15.0", "s", "warm", "<=", "15", "s"]
    assert "bare vllm serve ready" not in start.table([start_run("warm", 45.0)])


class StandIn:
    """A local HTTP server that answers every POST with `reply` and records (path, Authorization,
    Content-Type, JSON body) of each: what a bench sends, seen from the other end."""

    def __init__(self, reply: dict) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen: list[tuple[str, str | None, str | None, dict]] = []
        self.seen = seen

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seen.append((self.path, self.headers["Authorization"], self.headers["Content-Type"], body))
                out = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Running:
    """A process that has not exited (wait_ready polls it before each probe)."""

    returncode = None

    def poll(self) -> None:
        return None


def test_litellm_virtual_key_asks_key_generate_with_the_limits() -> None:
    """The database path cannot run here (no Prisma engine offline): its one HTTP call, against a stand-in."""
    server = StandIn({"key": "sk-virtual"})
    try:
        key = peers.litellm_virtual_key(server.base)
    finally:
        server.close()
    assert key == "sk-virtual"
    assert [(path, auth, body) for path, auth, _, body in server.seen] == [
        ("/key/generate", f"Bearer {peers.KEY}", {"models": ["tiny"], "rpm_limit": peers.KEY_RPM,
                                                  "tpm_limit": peers.KEY_TPM})]


def test_each_readiness_probe_is_the_request_its_caller_sent(tmp_path: Path) -> None:
    """One wait_ready (bench/run.py), two probes: `make bench`'s (and bench-routing's, -soak's,
    -profile's, batch-throughput's) a one-token completion with no key; bench-peers' for every
    system it starts (LiteLLM's proxy, which refuses a request without its master key, among them)
    and bench-start's bare vLLM a one-token chat completion with the bench's key."""
    import subprocess
    import time
    from typing import cast

    from bench import run as bench_run

    server = StandIn({"choices": []})
    alive = cast(subprocess.Popen, Running())
    try:
        assert bench_run.wait_ready(server.base, "tiny", alive, 5, "llmserve") >= 0
        assert peers.wait_ready(server.base, alive, 5, "bare vLLM (warm)", interval_s=0.25) >= 0
        fleet = peers.Fleet(tmp_path, {})
        fleet.procs["litellm"], fleet.bases["litellm"], fleet.launched["litellm"] = alive, server.base, time.monotonic()
        assert fleet.ready("litellm", 5) >= 0
    finally:
        server.close()
    completion = ("/v1/completions", None, "application/json", {"model": "tiny", "prompt": "hi", "max_tokens": 1})
    chat = ("/v1/chat/completions", f"Bearer {peers.KEY}", "application/json",
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert server.seen == [completion, chat, chat]
