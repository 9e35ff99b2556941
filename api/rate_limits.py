"""Rate limits per caller: a token bucket for each principal in Redis, sized by its role.

One atomic script refills and takes from the bucket, on Redis's own clock, so every API
process shares the same limit. A caller over its limit is answered 429 with `Retry-After`
and the code RATE_LIMITED, before its request costs anything else. When Redis cannot be
reached the request goes through: the limits protect the service, and Redis being down
must not take the API down with it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from api.authentication import principal_of
from api.responses import send_error
from entities.runtime.policy import Principal, Role
from workers.cache import RedisClient

log = logging.getLogger(__name__)

# KEYS[1] the bucket; ARGV: tokens per second, burst. Returns 0 when a token was taken, else
# the milliseconds until one will be there.
_TAKE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local rate = tonumber(ARGV[1]) / 1000
local burst = tonumber(ARGV[2])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1] or ARGV[2])
local at = tonumber(bucket[2] or now_ms)
tokens = math.min(burst, tokens + (now_ms - at) * rate)
if tokens < 1 then
  return math.ceil((1 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tokens - 1, 'at', now_ms)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate) + 1000)
return 0
"""


@dataclass(frozen=True)
class Limit:
    """Requests per second, and how many may come at once after a quiet spell."""

    per_second: float
    burst: int


class RateLimiter:
    """Takes a token for a principal from its role's bucket."""

    def __init__(self, client: RedisClient, prefix: str, limits: dict[Role, Limit]) -> None:
        self._prefix = prefix
        self._limits = limits
        self._take = client.register_script(_TAKE)

    async def wait_ms(self, principal: Principal) -> int:
        """0 when the principal may go on, else how long until it may (milliseconds)."""
        limit = self._limits.get(principal.role)
        if limit is None:
            return 0
        key = f"{self._prefix}rate:{{{principal.role.value}:{principal.subject}}}"
        try:
            waited = await self._take(keys=[key], args=[limit.per_second, limit.burst])
        except RedisError as exc:
            log.warning("rate limits unavailable, letting requests through: %s", exc)
            return 0
        return int(waited)


class RateLimits:
    """ASGI middleware, inside `Authentication`: refuses a caller over its limit."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self._app = app
        self._limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = principal_of(scope) if scope["type"] == "http" else None
        if principal is not None:
            wait_ms = await self._limiter.wait_ms(principal)
            if wait_ms:
                await _limited(send, wait_ms)
                return
        await self._app(scope, receive, send)


async def _limited(send: Send, wait_ms: int) -> None:
    retry_after = max(1, math.ceil(wait_ms / 1000))
    await send_error(
        send,
        429,
        "RATE_LIMITED",
        f"too many requests; try again in {retry_after} s",
        [(b"retry-after", str(retry_after).encode())],
    )
