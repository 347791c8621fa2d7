"""Token-bucket rate limiting: the pure arithmetic, shared by the in-process limiter and the
Redis Lua script (which runs the same steps atomically so every gateway replica sees one bucket)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    tokens: float
    updated_at: float


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    remaining: float
    retry_after_s: float  # 0 when allowed; else seconds until `cost` fits
    reset_s: float  # seconds until the bucket is full again


def take(bucket: Bucket | None, capacity: float, per_minute: float, cost: float, now: float
         ) -> tuple[Verdict, Bucket]:
    """Refill at `per_minute`/60 per second up to `capacity`, then take `cost` if it fits.

    A cost larger than the capacity can never fit; it is refused with the time to a full bucket
    rather than forever, so clients see a finite Retry-After."""
    rate = per_minute / 60.0
    if bucket is None:
        bucket = Bucket(capacity, now)
    tokens = min(capacity, bucket.tokens + max(0.0, now - bucket.updated_at) * rate)
    if cost <= tokens:
        tokens -= cost
        verdict = Verdict(True, tokens, 0.0, (capacity - tokens) / rate if rate else 0.0)
    else:
        need = min(cost, capacity) - tokens
        verdict = Verdict(False, tokens, need / rate if rate else float("inf"),
                          (capacity - tokens) / rate if rate else 0.0)
    return verdict, Bucket(tokens, now)


# The same arithmetic for Redis: KEYS[1] bucket hash; ARGV capacity, per_minute, cost, now.
LUA_TAKE = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2]) / 60.0
local cost = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then tokens = capacity; ts = now end
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
tokens = math.min(capacity, tokens + elapsed * rate)
local allowed = 0
if cost <= tokens then tokens = tokens - cost; allowed = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 60)
return {allowed, tostring(tokens)}
"""


def reserve_tokens(prompt_tokens: int, choices: int, max_output: int | None, context: int,
                   student_output: int | None = None) -> int:
    """The most tokens a request may spend, reserved against the key's budget at admission and
    settled on the usage the engine reports: the prompt, plus every choice's output up to its
    maximum, or the rest of the context when none is given (the most vLLM generates). A cascade's
    student reads the prompt too and makes up to `student_output` tokens a choice before the
    teacher may answer in full."""
    out = max_output if max_output is not None else max(1, context - prompt_tokens)
    total = prompt_tokens + choices * out
    if student_output is not None:
        total += prompt_tokens + choices * student_output
    return total


# Add ARGV[3] tokens (a refund; negative: a further charge) to the bucket KEYS[1], up to its
# capacity ARGV[1]; ARGV[2] per_minute, ARGV[4] now. A missing bucket is full: nothing to refund.
LUA_SETTLE = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2]) / 60.0
local delta = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then return '' end
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
tokens = math.min(capacity, tokens + elapsed * rate + delta)
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
return tostring(tokens)
"""


def settle(bucket: Bucket | None, capacity: float, per_minute: float, delta: float, now: float) -> Bucket | None:
    """The in-process LUA_SETTLE: refill, then add `delta` (may go below zero: the key waits)."""
    if bucket is None:
        return None
    tokens = min(capacity, bucket.tokens + max(0.0, now - bucket.updated_at) * per_minute / 60.0 + delta)
    return Bucket(tokens, now)


# Concurrency slots, KEYS[1] a sorted set of slot ids scored by when each expires (a gateway that
# dies without releasing its slots loses them at that time): ARGV limit, slot id, expiry, now.
LUA_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) - tonumber(ARGV[4])) + 60)
return 1
"""


def estimate_tokens(body_len: int, max_tokens: object, default_max_tokens: int = 256) -> int:
    """Tokens a request may use, charged at admission as OpenAI does: the prompt (about 4 bytes a
    token) plus the most it may generate."""
    out = max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0 \
        else default_max_tokens
    return body_len // 4 + out
