"""What the economics tests share (tests/unit/test_economics.py, tests/unit/test_attribution.py): the
student's and the teacher's prices, a cached cascade route over them, and a real gateway app on it
whose fake engine's student is sure of some prompts only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from serve.cache.store import HeadCache
from serve.config import Config
from serve.gateway.app import create_app
from serve.gateway.backends import Backends
from serve.policies.cost import Price
from tests.fakes import FakeUpstream

TEACHER, STUDENT = Price(10.0, 20.0), Price(1.0, 2.0)
PRICES = {"teacher": TEACHER, "student": STUDENT}
# CONFIG's prices are TEACHER's and STUDENT's: the report reads them from the configuration.
CONFIG = Config.model_validate({
    "auth": {"enabled": False},
    "models": [{"name": "student", "source": "x", "price": {"input_per_million": 1, "output_per_million": 2}},
               {"name": "teacher", "source": "y", "price": {"input_per_million": 10, "output_per_million": 20}}],
    "routes": [{"name": "assistant", "cache": {"ttl_s": 60},
                "cascade": {"student": "student", "teacher": "teacher", "min_mean_logprob": -1.0}}],
})


@dataclass
class SureOfSome(FakeUpstream):
    """The student is confident (logprob -0.1) about prompts that say 'easy', unsure (-3) otherwise.
    `teacher_on_hard`: what the teacher says about prompts that say 'hard' instead of its
    `text_by_model` answer (a teacher whose cost on the cache's misses is not its mean)."""

    teacher_on_hard: str | None = None

    def __post_init__(self) -> None:
        self._teacher_text = self.text_by_model.get("teacher", self.text)

    async def post(self, base_url, path, body, *, stream, timeout_s):
        prompt = json.loads(body)["messages"][0]["content"]
        self.logprob = -0.1 if "easy" in prompt else -3.0
        if self.teacher_on_hard is not None:
            self.text_by_model["teacher"] = self.teacher_on_hard if "hard" in prompt else self._teacher_text
        return await super().post(base_url, path, body, stream=stream, timeout_s=timeout_s)


def cascade_app(upstream: FakeUpstream) -> Any:
    """CONFIG's gateway app (head cache in process) with one replica each of student and teacher on
    `upstream`."""
    backends = Backends()
    backends.update({m: [(f"{m}#1", f"http://{m}")] for m in ("student", "teacher")})
    return create_app(CONFIG, backends, upstream, cache=HeadCache(None))
