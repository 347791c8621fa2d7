"""An engine replica (serve/engine/direct.py DirectLLMServer) constructed up to its engine build,
for the unit tests that check what the replica does around Ray Serve LLM's LLMServer.__init__."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from ray.llm._internal.serve.core.server.llm_server import LLMServer

from serve.engine import direct


class Replica(direct.DirectLLMServer):
    def __del__(self) -> None:  # the real one unregisters and stops the port: neither exists here
        pass


class Built(Exception):
    """Raised by the stand-in engine build: the replica's construction ends there."""


def construct_until_engine_build(monkeypatch: pytest.MonkeyPatch,
                                 build: Callable[..., Awaitable[None]]) -> None:
    """Run the replica's __init__ with `build(self, llm_config, engine_cls=None, **kwargs)` standing
    in for LLMServer.__init__ (the engine build), which then ends the construction (Built)."""
    async def init(self: Any, llm_config: Any, engine_cls: Any = None, **kwargs: Any) -> None:
        await build(self, llm_config, engine_cls=engine_cls, **kwargs)
        raise Built

    monkeypatch.setattr(LLMServer, "__init__", init)
    monkeypatch.setattr(direct, "tie_engine_cores_to_replica", lambda: None)
    monkeypatch.setenv(direct.SECRET_ENV, "unit-test-engine-secret-0123456789")
    with pytest.raises(Built):
        asyncio.run(Replica.__init__(Replica.__new__(Replica), SimpleNamespace()))
