"""The processes `make bench-routing` starts (bench/routing.py drives them): two bare `vllm serve`
replicas with vllm-router in front, and llmserve with the same model at two replicas; every one in
a session of its own and stopped by the caller (bench.run.stop). Also what is read from them: each
replica's vLLM counters, and the LoRA adapters the (v) workload uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench import routing_stats as stats
from bench.run import ROOT, free_port

PEERS_BIN = ROOT / ".venv-peers" / "bin"


def engine_flags(engine: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in engine.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out += [flag] if v else []
        else:
            out += [flag, str(v)]
    return out


def start_bare(model_path: str, engine: dict[str, Any], env: dict[str, str], logs: Path, n: int,
               adapters: dict[str, str], kv_events: bool) -> tuple[list[subprocess.Popen], list[str], list[str]]:
    """`n` bare vLLM OpenAI servers of the same model and arguments: (processes, base URLs
    without /v1, ZMQ KV-event endpoints (empty unless `kv_events`))."""
    procs, urls, zmq = [], [], []
    for i in range(n):
        port = free_port()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
               "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
               "--disable-uvicorn-access-log", *engine_flags(engine)]
        if adapters:
            cmd += ["--max-loras", str(max(4, len(adapters))), "--lora-modules",
                    *(f"{k}={v}" for k, v in adapters.items())]
        if kv_events:
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            cmd += ["--kv-events-config", json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                                                      "endpoint": endpoint, "topic": "kv-events"})]
            zmq.append(endpoint)
        with open(logs / f"routing-bare-{i}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")
    return procs, urls, zmq


def start_vllm_router(policy: str, urls: list[str], zmq: list[str], logs: Path, block_size: int
                      ) -> tuple[subprocess.Popen, str]:
    """vllm-router in front of the bare replicas; its base URL (with /v1)."""
    exe = PEERS_BIN / "vllm-router"
    if not exe.exists():
        raise RuntimeError(f"{exe} is missing: `make peers` installs it")
    port = free_port()
    cmd = [str(exe), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
           "--prometheus-port", str(free_port()), "--worker-urls", *urls]
    if policy == "kv_aware":
        cmd += [f"--kv-event-source={u}={z}" for u, z in zip(urls, zmq, strict=True)]
        cmd += ["--kv-event-block-size", str(block_size), "--kv-event-model", "tiny"]
    with open(logs / f"routing-vllm-router-{policy}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}/v1"


def llmserve_config(model_source: str, engine: dict[str, Any], env: dict[str, str], policy: str,
                    adapters: dict[str, str], port: int, address: str | None = None) -> dict[str, Any]:
    """llmserve's configuration: the same model, engine arguments and KV size at two replicas,
    routing `policy`; `address` joins a running cluster (a second gateway)."""
    model: dict[str, Any] = {"name": "tiny", "source": model_source, "accelerator": "cpu", "engine": engine,
                             "env": env, "deployment": {"replicas": 2, "max_ongoing_requests": 256}}
    if adapters:
        model["adapters"] = [{"name": k, "path": v} for k, v in adapters.items()]
    ray: dict[str, Any] = {"num_cpus": 8, "observability": True}  # the engines' counters (ray_vllm_*)
    if address:
        ray = {"address": address}
    return {"models": [model], "auth": {"enabled": False}, "ray": ray,
            "gateway": {"host": "127.0.0.1", "port": port, "metrics_port": 0, "routing": {"policy": policy}}}


def start_llmserve(cfg: dict[str, Any], logs: Path, name: str, env: dict[str, str], command: str = "run"
                   ) -> tuple[subprocess.Popen, str]:
    # Not beside the logs: the results directory keeps only what is committed or ignored.
    path = Path(tempfile.mkdtemp(prefix="bench-routing-")) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with open(logs / f"routing-{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "serve.cli", command, "--config", str(path)], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{cfg['gateway']['port']}/v1"


def wait_replicas(base: str, proc: subprocess.Popen, n: int, timeout_s: float) -> float:
    """Until the gateway's /health counts `n` ready replicas of `tiny`."""
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llmserve exited with {proc.returncode}; see its log")
        try:
            with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=5) as r:
                if json.loads(r.read()).get("replicas", {}).get("tiny", 0) >= n:
                    return time.monotonic() - started
        except (OSError, ValueError):
            pass
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"llmserve: {n} replicas not ready after {timeout_s:.0f}s")
        time.sleep(2)


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def bare_counters(urls: list[str]) -> dict[str, dict[str, float]]:
    """Each bare replica's counters, keyed by its URL."""
    return {u: stats.engine_counters(get(u + "/metrics")).get("", {}) for u in urls}


def ray_port(since: float, kind: str) -> str | None:
    """A port of the newest local Ray session started after `since`, from the file Ray names after
    it in the session directory (`metrics_export_port_<node>`, `gcs_server_port_<node>`)."""
    root = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray"))
    sessions = sorted((p for p in root.glob("session_2*") if p.stat().st_mtime >= since - 5),
                      key=lambda p: p.stat().st_mtime)
    for s in reversed(sessions):
        ports = list(s.glob(f"{kind}_port_*"))
        if ports:
            return ports[0].read_text().strip()
    return None


def ray_metrics_url(since: float) -> str | None:
    """Ray's metrics export endpoint (vLLM's counters of engines in Ray) of the local Ray started
    after `since`. A local Ray only: a joined cluster has Prometheus of its own."""
    port = ray_port(since, "metrics_export")
    return f"http://127.0.0.1:{port}/metrics" if port else None


def ray_counters(url: str | None) -> dict[str, dict[str, float]]:
    """Each llmserve replica's counters from Ray's export of vLLM's metrics, keyed by ReplicaId."""
    if url is None:
        return {}
    return {k: v for k, v in stats.engine_counters(get(url), by_label="ReplicaId").items() if k}


def make_adapters(base_dir: str, out_dir: Path, names: list[str]) -> dict[str, str]:
    """Random rank-8 LoRA adapters for the model, written by peft as a real one is (the same
    recipe as the integration tests' adapter, for this model's shape); kept between runs."""
    out = {}
    for i, name in enumerate(names):
        path = out_dir / f"{Path(base_dir).name}-{name}"
        if not (path / "adapter_config.json").exists():
            import torch
            from peft import LoraConfig, get_peft_model
            from transformers import LlamaForCausalLM

            torch.manual_seed(100 + i)
            model = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
            peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
            peft_model.save_pretrained(str(path))
        out[name] = str(path)
    return out
