"""A fake engine for unit tests of the gateway's pure logic: knobs for latency, failures, text."""

from __future__ import annotations

import asyncio
import json
import time as real_time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from serve.gateway.upstream import EngineUnavailable, UpstreamResponse


@dataclass
class FakeUpstream:
    text: str = "hello from the fake engine"
    latency_s: float = 0.0
    fail_first_n: int = 0  # refuse this many connections (EngineUnavailable) before answering
    status: int = 200
    error_body: bytes = b""
    logprob: float = -0.5  # every token's logprob, for the cascade's confidence signal
    finish_reason: str = "stop"
    down_models: set[str] = field(default_factory=set)  # connection refused for these
    status_by_model: dict[str, int] = field(default_factory=dict)  # answer this HTTP status
    text_by_model: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[str, str, dict]] = field(default_factory=list)
    # Per replica URL: LoRA name -> path, as vLLM's runtime-LoRA endpoints keep it (a loaded name
    # refuses a second load with 400 "already been loaded"; unloading an unknown one is 404).
    loras: dict[str, dict[str, str]] = field(default_factory=dict)
    lora_load_status: int = 200  # answer loads with this status instead (a broken adapter)

    async def post(self, base_url: str, path: str, body: bytes, *, stream: bool, timeout_s: float) -> UpstreamResponse:
        payload = json.loads(body)
        self.calls.append((base_url, path, payload))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.fail_first_n > 0:
            self.fail_first_n -= 1
            raise EngineUnavailable(f"{base_url} refused")
        if path == "/v1/load_lora_adapter":
            return self._load_lora(base_url, payload)
        if path == "/v1/unload_lora_adapter":
            if self.loras.get(base_url, {}).pop(payload["lora_name"], None) is None:
                return UpstreamResponse(404, {}, b'{"error": {"message": "cannot be found", "code": 404}}')
            return UpstreamResponse(200, {}, b"Success: LoRA adapter removed")
        model = payload["model"]
        if model in self.down_models:
            raise EngineUnavailable(f"{base_url} refused")
        status = self.status_by_model.get(model, self.status)
        if status != 200:
            body = self.error_body or json.dumps({"error": {"message": f"fake {status}", "type": "X",
                                                            "param": None, "code": status}}).encode()
            return UpstreamResponse(status, {}, body)
        text = self.text_by_model.get(model, self.text)
        if path == "/v1/responses":
            return self._responses(model, text, payload, stream)
        if stream:
            usage = bool((payload.get("stream_options") or {}).get("include_usage"))
            return UpstreamResponse(200, {}, chunks=self._chunks(model, text, usage))
        words = text.split()
        logprobs = None
        if payload.get("logprobs"):
            logprobs = {"content": [{"token": w, "logprob": self.logprob, "top_logprobs": []} for w in words]}
        body_out = {
            "id": "cmpl-fake", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs, "finish_reason": self.finish_reason}],
            "usage": {"prompt_tokens": 3, "completion_tokens": len(words), "total_tokens": 3 + len(words)},
        }
        return UpstreamResponse(200, {}, json.dumps(body_out).encode())

    def _load_lora(self, base_url: str, payload: dict) -> UpstreamResponse:
        table = self.loras.setdefault(base_url, {})
        if self.lora_load_status != 200:
            return UpstreamResponse(self.lora_load_status, {}, b'{"error": {"message": "bad adapter"}}')
        if payload["lora_name"] in table:
            return UpstreamResponse(400, {}, b'{"error": {"message": "The lora adapter has already been loaded."}}')
        table[payload["lora_name"]] = payload["lora_path"]
        return UpstreamResponse(200, {}, b"Success: LoRA adapter loaded")

    async def _chunks(self, model: str, text: str, usage: bool) -> AsyncIterator[bytes]:
        words = text.split()
        for word in words:
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model,
                     "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        end = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model,
               "choices": [{"index": 0, "delta": {}, "finish_reason": self.finish_reason}]}
        yield f"data: {json.dumps(end)}\n\n".encode()
        if usage:
            u = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [],
                 "usage": {"prompt_tokens": 3, "completion_tokens": len(words), "total_tokens": 3 + len(words)}}
            yield f"data: {json.dumps(u)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    def _responses(self, model: str, text: str, payload: dict, stream: bool) -> UpstreamResponse:
        """The Responses API as vLLM answers it: the whole conversation arrives in `input`."""
        words = text.split()
        logprobs = [{"token": w, "logprob": self.logprob, "top_logprobs": []} for w in words] \
            if "message.output_text.logprobs" in (payload.get("include") or []) else []
        n_in = len(json.dumps(payload.get("input")))
        body = {"id": f"resp_fake{len(self.calls)}", "object": "response", "created_at": 1, "model": model,
                "status": "incomplete" if self.finish_reason == "length" else "completed",
                "incomplete_details": {"reason": "max_output_tokens"} if self.finish_reason == "length" else None,
                "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": text, "annotations": [],
                                         "logprobs": logprobs}]}],
                "usage": {"input_tokens": n_in, "output_tokens": len(words), "total_tokens": n_in + len(words)},
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
        if not stream:
            return UpstreamResponse(200, {}, json.dumps(body).encode())

        async def events() -> AsyncIterator[bytes]:
            from serve.gateway.dialects.responses_events import replay

            for ev in replay(body):
                yield ev

        return UpstreamResponse(200, {}, chunks=events())

    async def close(self) -> None:
        pass


class FakeTime:
    """A `time` module whose clock the test sets (monkeypatched into the module under test)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(real_time, name)
