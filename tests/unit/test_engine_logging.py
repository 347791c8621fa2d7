"""An engine replica keeps Serve's replica log handler through vLLM's logging config (issue 28).

vLLM applies its logging config while the engine is built in the replica (AsyncLLM's
configure_logging_if_needed), with a dictConfig that closes every handler of the process. Serve's
replica handler (a MemoryHandler over a rotating file, on the "ray.serve" logger) lost its target
so, and after a lost head Serve's recovering controller, reading the target's file name from each
live replica (is_allocated -> get_component_logger_file_path), replaced every engine replica.
"""

from __future__ import annotations

import logging
import logging.handlers
from collections.abc import Iterator

import pytest

from tests.unit.engine_replica_support import construct_until_engine_build


@pytest.fixture()
def serve_handler(tmp_path) -> Iterator[logging.handlers.MemoryHandler]:
    """A handler as Serve's configure_component_logger makes it for a replica."""
    target = logging.handlers.RotatingFileHandler(tmp_path / "replica.log", maxBytes=1 << 20, backupCount=1)
    handler = logging.handlers.MemoryHandler(10, target=target, flushLevel=logging.ERROR)
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    target.close()


@pytest.fixture(autouse=True)
def vllm_logger_restored() -> Iterator[None]:
    """vLLM's config gives its logger a handler on this test's stdout: taken off again after."""
    vllm = logging.getLogger("vllm")
    saved = (vllm.handlers[:], vllm.propagate, vllm.level)
    yield
    vllm.handlers[:], vllm.propagate = saved[0], saved[1]
    vllm.setLevel(saved[2])


def _configure_vllm_logging_as_the_engine_build_does() -> None:
    from vllm.config.logging import LoggingConfig
    from vllm.logger import configure_logging

    configure_logging(LoggingConfig())  # what AsyncLLM.__init__ runs, unconditionally the first time


def test_vllms_logging_config_closes_serves_replica_handler(serve_handler) -> None:
    """Why the replica needs log_handlers_kept: the installed vLLM still closes it."""
    _configure_vllm_logging_as_the_engine_build_does()
    assert serve_handler.target is None


def test_the_replica_keeps_serves_log_handler_through_its_engine_build(monkeypatch, serve_handler, tmp_path) -> None:
    async def build(self, llm_config, engine_cls=None, **kwargs):
        _configure_vllm_logging_as_the_engine_build_does()

    construct_until_engine_build(monkeypatch, build)
    # What Serve's get_component_logger_file_path reads, and the replica's records still written.
    assert serve_handler.target is not None
    assert serve_handler.target.baseFilename == str(tmp_path / "replica.log")  # type: ignore[attr-defined]
    logging.getLogger("ray.serve").error("after the engine build")
    assert "after the engine build" in (tmp_path / "replica.log").read_text()
    # vLLM's own logging is as vLLM configured it.
    assert [h.name for h in logging.getLogger("vllm").handlers] == ["vllm"]
    assert not logging.getLogger("vllm").propagate
