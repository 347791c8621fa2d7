"""Locust users that call llmserve the way OpenAI SDK clients do.

    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 2m --host http://127.0.0.1:8000 \\
        --csv out/llmserve --json > out/llmserve.json

Scenarios (pick with class names on the command line, or with --tags):
  ChatUser        streaming chat (the default), records TTFT and TPOT as their own metrics   tag: chat
  HeadHeavyUser   deterministic questions drawn from a Zipf distribution (head-cache traffic) tag: head
  LongPromptUser  long prompts (prefill-heavy), sized from the model's max_model_len          tag: long
  BatchUser       uploads a small batch file and submits it to /v1/batches                   tag: batch
Environment: LLMSERVE_API_KEY (default "none"), LLMSERVE_MODEL (default "tiny"), LLMSERVE_HEAD_MODEL
(route with a head cache; default LLMSERVE_MODEL), LLMSERVE_MAX_TOKENS (default 32), LLMSERVE_ZIPF_S
(default 1.1), LLMSERVE_DISTINCT_QUERIES (default 1000).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time

from locust import FastHttpUser, between, tag, task

# Locust puts this file's directory on sys.path; prompts.py has no locust import, for unit tests.
from prompts import SUMMARISE, TOPICS, context_length, long_context, long_context_chars

from serve.sse_events import iter_events

logger = logging.getLogger(__name__)

API_KEY = os.environ.get("LLMSERVE_API_KEY", "none")
MODEL = os.environ.get("LLMSERVE_MODEL", "tiny")
HEAD_MODEL = os.environ.get("LLMSERVE_HEAD_MODEL", MODEL)
MAX_TOKENS = int(os.environ.get("LLMSERVE_MAX_TOKENS", "32"))
ZIPF_S = float(os.environ.get("LLMSERVE_ZIPF_S", "1.1"))
DISTINCT = int(os.environ.get("LLMSERVE_DISTINCT_QUERIES", "1000"))


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (rank ** s) for rank in range(1, n + 1)]


def head_query(rng: random.Random, weights: list[float]) -> str:
    rank = rng.choices(range(len(weights)), weights=weights)[0]
    return f"How do I handle my {TOPICS[rank % len(TOPICS)]} (question {rank})?"


class _OpenAIUser(FastHttpUser):
    abstract = True
    wait_time = between(0.0, 0.2)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

    def stream_chat(self, name: str, model: str, messages: list[dict], temperature: float = 0.7) -> None:
        body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": temperature,
                "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first = None
        tokens = 0
        with self.client.post("/v1/chat/completions", data=json.dumps(body), headers=self.headers(),
                              name=name, stream=True, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            for event in iter_events(resp.iter_content(chunk_size=512, decode_content=False)):
                obj = event.json()
                if obj is None:  # [DONE]
                    continue
                if obj.get("error"):  # the engine broke mid-stream: a 200 that failed
                    err = obj["error"]
                    resp.failure(f"stream error: {str(err.get('message') if isinstance(err, dict) else err)[:200]}")
                    return
                if obj.get("choices") and first is None:
                    first = time.perf_counter()
                if obj.get("usage"):
                    tokens = obj["usage"].get("completion_tokens", 0)
            resp.success()
        end = time.perf_counter()
        fire = self.environment.events.request.fire
        if first is not None:
            fire(request_type="METRIC", name=f"{name} TTFT", response_time=(first - start) * 1000,
                 response_length=0, exception=None, context={})
            if tokens > 1:
                fire(request_type="METRIC", name=f"{name} TPOT", response_time=(end - first) * 1000 / (tokens - 1),
                     response_length=tokens, exception=None, context={})


class ChatUser(_OpenAIUser):
    weight = 3

    @tag("chat")
    @task
    def chat(self) -> None:
        q = random.choice(TOPICS)
        self.stream_chat("chat", MODEL, [{"role": "user", "content": f"Tell me about my {q}."}])


class HeadHeavyUser(_OpenAIUser):
    weight = 2

    def on_start(self) -> None:
        self.rng = random.Random(hash(self) & 0xFFFF)
        self.weights = zipf_weights(DISTINCT, ZIPF_S)

    @tag("head")
    @task
    def head(self) -> None:
        self.stream_chat("head", HEAD_MODEL, [{"role": "user", "content": head_query(self.rng, self.weights)}],
                         temperature=0.0)


class LongPromptUser(_OpenAIUser):
    weight = 1

    def on_start(self) -> None:
        # The context must fit the model's (vLLM answers 400 to every prompt that does not), so
        # size it from what the gateway reports for the model, as vLLM's /v1/models does.
        with self.client.get(f"/v1/models/{MODEL}", headers=self.headers(), name="models.get",
                             catch_response=True) as resp:
            entry = resp.json() if resp.status_code == 200 else None
            if entry is None:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
        max_model_len, source = context_length(entry)
        self.context_chars = long_context_chars(max_model_len, MAX_TOKENS)
        self.rng = random.Random()
        log = logger.info if source == "model" else logger.warning
        log("LongPromptUser: %s max_model_len %d (%s): context of %d chars, max_tokens %d", MODEL, max_model_len,
            "from /v1/models" if source == "model" else "not reported; a safe default", self.context_chars,
            MAX_TOKENS)

    @tag("long")
    @task
    def long(self) -> None:
        context = long_context(self.rng, self.context_chars, TOPICS)
        self.stream_chat("long", MODEL, [{"role": "system", "content": context},
                                         {"role": "user", "content": SUMMARISE}])


class BatchUser(FastHttpUser):
    weight = 0  # opt in: `locust ... BatchUser` or --tags batch
    wait_time = between(5, 10)

    @tag("batch")
    @task
    def submit(self) -> None:
        lines = [json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": MODEL, "max_tokens": 8,
                                      "messages": [{"role": "user", "content": f"question {i}"}]}})
                 for i in range(10)]
        headers = {"Authorization": f"Bearer {API_KEY}"}
        up = self.client.post("/v1/files", headers=headers, name="files.create",
                              files={"file": ("batch.jsonl", "\n".join(lines).encode())}, data={"purpose": "batch"})
        if up.status_code != 200:
            return
        self.client.post("/v1/batches", headers={**headers, "Content-Type": "application/json"},
                         name="batches.create", data=json.dumps({"input_file_id": up.json()["id"],
                                                                 "endpoint": "/v1/chat/completions",
                                                                 "completion_window": "24h"}))
