"""Fallback: which target to try next when one fails, and whether a retry is allowed at all."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Failure(str, Enum):
    UNAVAILABLE = "unavailable"  # no ready replica / connection refused
    OVERLOADED = "overloaded"  # backpressure: 429/503 from the engine or every replica saturated
    TIMEOUT = "timeout"
    ENGINE_ERROR = "engine_error"  # 5xx from the engine
    CLIENT_ERROR = "client_error"  # 4xx: the request itself is wrong; another model will not help


RETRYABLE = {Failure.UNAVAILABLE, Failure.OVERLOADED, Failure.TIMEOUT, Failure.ENGINE_ERROR}


def classify_status(status: int) -> Failure | None:
    if status < 400:
        return None
    if status in (429, 503):
        return Failure.OVERLOADED
    if status == 504:
        return Failure.TIMEOUT
    if status >= 500:
        return Failure.ENGINE_ERROR
    return Failure.CLIENT_ERROR


@dataclass(frozen=True)
class FallbackPolicy:
    chain: tuple[str, ...]  # primary first
    max_attempts: int = 3

    def next_target(self, attempted: int, failure: Failure, bytes_sent: bool) -> str | None:
        """The target for attempt number ``attempted`` (0-based count of failed attempts so far),
        or None when the failure must go to the client."""
        if bytes_sent or failure not in RETRYABLE:
            return None
        if attempted >= self.max_attempts or attempted >= len(self.chain):
            return None
        return self.chain[attempted]
