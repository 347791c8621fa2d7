"""One Ray cluster, one set of real vLLM-CPU engines and one gateway for the whole test session.

Starting engines costs minutes on 2 cores, so everything integration-level shares them: two tiny
generate models with different seeds (a student and a teacher) and a tiny embedding model.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from serve.config import Config
from tests.support import RedisServer, free_port, serving

pytestmark = pytest.mark.integration

ENGINE = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "max_num_seqs": 16,
          "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}


PRICE_A = {"input_per_million": 0.1, "output_per_million": 0.2}
PRICE_B = {"input_per_million": 1.0, "output_per_million": 2.0}


TIER_PROMPTS = {
    "teacher": {"system": "You are the support desk of Example Co. Answer in one short sentence, politely, and "
                          "name the policy that applies: returns within 30 days, refunds in 5 days, delivery "
                          "in 2 to 4 working days.",
                "examples": [{"role": "user", "content": "Can I return shoes?"},
                             {"role": "assistant", "content": "Yes, within 30 days of delivery (returns policy)."}]},
    "student": {"system": "Support."},
}


def stack_config(port: int, redis_url: str, lora_dir: str, batch_dir: str) -> Config:
    """Student tiny-a (two replicas, with a LoRA adapter) and teacher tiny-b, an embedding model,
    and routes that force each policy outcome."""
    return Config.model_validate({
        "models": [
            {"name": "tiny-a", "source": "builtin://tiny?seed=1", "accelerator": "cpu",
             "engine": {**ENGINE, "max_lora_rank": 8}, "deployment": {"replicas": 2}, "price": PRICE_A,
             "adapters": [{"name": "tiny-a-lora", "path": lora_dir}]},
            {"name": "tiny-b", "source": "builtin://tiny?seed=2", "accelerator": "cpu", "engine": ENGINE,
             "price": PRICE_B},
            {"name": "tiny-embed", "source": "builtin://tiny?seed=1", "accelerator": "cpu", "task": "embed",
             "engine": {"dtype": "float32", "max_model_len": 512, "enforce_eager": True}},
        ],
        "routes": [
            # min_mean_logprob -1000: the student is always confident enough.
            {"name": "cascade-accept", "cascade": {"student": "tiny-a-lora", "teacher": "tiny-b",
                                                   "min_mean_logprob": -1000, "escalate_on_length": False}},
            # 1.0: no mean logprob can reach it, so every answer escalates.
            {"name": "cascade-escalate", "cascade": {"student": "tiny-a", "teacher": "tiny-b",
                                                     "min_mean_logprob": 1.0, "escalate_on_length": False}},
            {"name": "head", "target": "tiny-b", "fallback": ["tiny-a"], "cache": {"ttl_s": 600}},
            # The student lifecycle moves this route's student; the gate decides who may take it.
            {"name": "student-route", "cascade": {"student": "tiny-a-lora", "teacher": "tiny-b",
                                                  "min_mean_logprob": -1000, "escalate_on_length": False},
             # Six labels and hand-made adapters (no training manifest): the gate's sample and split checks
             # are unit-tested (tests/unit/test_quality.py); here the gate decides on the score.
             "gate": {"metric": "token_overlap", "min_score": 0.5, "min_samples": 6, "require_training_split": False}},
            {"name": "shadowed", "target": "tiny-a", "shadow": {"model": "tiny-a-lora", "fraction": 1.0}},
            # The Responses API on a cascade with the head cache on (always confident: accepted).
            {"name": "cascade-cached", "cascade": {"student": "tiny-a", "teacher": "tiny-b", "min_mean_logprob": -1000,
                                                   "escalate_on_length": False}, "cache": {"ttl_s": 600}},
            # Per-tier prompts (test_tier_prompts.py): the teacher gets long instructions and an example,
            # the student a short one; accepted on `tiered` (cached), escalated on `tiered-escalate`.
            {"name": "tiered", "prompts": TIER_PROMPTS, "cache": {"ttl_s": 600},
             "cascade": {"student": "tiny-a", "teacher": "tiny-b", "min_mean_logprob": -1000,
                         "escalate_on_length": False}},
            {"name": "tiered-escalate", "prompts": TIER_PROMPTS,
             "cascade": {"student": "tiny-a", "teacher": "tiny-b", "min_mean_logprob": 1.0,
                         "escalate_on_length": False}},
        ],
        "cache": {"redis_url": redis_url},
        "batch": {"db_path": f"{batch_dir}/batch.db", "storage_dir": f"{batch_dir}/files", "concurrency": 4},
        "auth": {"keys": [
            {"name": "test", "sha256": hashlib.sha256(b"test").hexdigest(), "admin": True},
            {"name": "limited", "sha256": hashlib.sha256(b"limited").hexdigest(), "requests_per_minute": 2,
             "storage_bytes": 64 * 1024,
             "models": ["tiny-a"]},
            {"name": "other", "sha256": hashlib.sha256(b"other").hexdigest()},
        ]},
        # Adapters loaded at run time (student promotion) must lie next to the configured one.
        # default_model: a request without `model` is served as vLLM serves its one model (vLLM's own tests).
        "gateway": {"host": "127.0.0.1", "port": port, "metrics_port": free_port(), "request_timeout_s": 60,
                    "default_model": "tiny-a",
                    "adapter_roots": [os.path.dirname(lora_dir)]},
        "ray": {"num_cpus": 8, "namespace": "llmserve-test"},
    })


class Stack:
    def __init__(self, config: Config, registry, server, thread, redis: RedisServer):
        self.config = config
        self.redis = redis
        self.registry = registry
        self.server = server
        self.thread = thread
        self.base_url = f"http://127.0.0.1:{config.gateway.port}/v1"

    def client(self, api_key: str = "test", **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=api_key, **{"max_retries": 0, "timeout": 120, **kw})

    def config_file(self, directory) -> str:
        """The stack's configuration as a YAML file, for CLI commands that read `--config` (a
        route's prompts, normalisation and prices are the operator's, never guessed)."""
        import yaml

        path = os.path.join(str(directory), "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(self.config.model_dump(mode="json", exclude_none=True), f)
        return path

    def replicas(self, model: str) -> list[tuple[str, str]]:
        import ray

        return (ray.get(self.registry.snapshot.remote()) or {}).get(model, [])

    def engine_unfinished(self, model: str) -> int:
        """Requests still held by the model's engines (vLLM's own count)."""
        import json
        import urllib.request

        total = 0
        for _, url in self.replicas(model):
            with urllib.request.urlopen(f"{url}/llmserve/stats", timeout=10) as r:
                total += json.loads(r.read())["unfinished_requests"]
        return total

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.config.gateway.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def make_lora_adapter(base_dir: str, out_dir: str, seed: int = 7, std: float = 0.3) -> str:
    """A random rank-8 LoRA adapter for the tiny model, written by peft as a real adapter is."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():  # big enough to change greedy output visibly
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def stack(tmp_path_factory, redis_server):
    from concurrent.futures import ThreadPoolExecutor

    from serve.config import ModelSpec
    from serve.engine.cluster import start_ray, wait_for_engines
    from serve.engine.models import resolve_source
    from serve.gateway.server import build_gateway, ray_snapshot_source
    from serve.launch.local import start_stack, stop_stack

    os.environ.setdefault("LLMSERVE_CACHE_DIR", str(tmp_path_factory.getbasetemp().parent / "llmserve-cache"))
    base = resolve_source(ModelSpec(name="x", source="builtin://tiny?seed=1"))
    lora = str(tmp_path_factory.mktemp("lora") / "tiny-a-lora")
    config = stack_config(free_port(), redis_server.url, lora, str(tmp_path_factory.mktemp("batch")))
    try:
        # The adapter is written (torch and peft in this process, 5-13 s on 2 cores) while Ray's
        # head starts; the engines that load it are deployed by start_stack, after both.
        with ThreadPoolExecutor(1) as pool:
            adapter = pool.submit(make_lora_adapter, base, lora)
            start_ray(config)
            adapter.result()
        registry = start_stack(config)
        wait_for_engines(registry, [m.name for m in config.models], timeout_s=900)
        app = build_gateway(config, ray_snapshot_source(registry))
        with serving(app, config) as server:
            yield Stack(config, registry, server, None, redis_server)
    finally:
        stop_stack(config)


# The SDK client, raw HTTP client and tokenizer most integration modules ask for, once for all of them.
@pytest.fixture(scope="module")
def client(stack):
    return stack.client()


@pytest.fixture(scope="module")
def http(stack):
    from tests.integration.vllm_port import http_client

    yield from http_client(stack)


@pytest.fixture(scope="module")
def tokenizer():
    from tests.integration.vllm_port import tiny_tokenizer

    return tiny_tokenizer()
