"""Rate limits per caller: a token bucket for each principal in Redis, sized by its role.

One atomic script refills and takes from the bucket, on Redis's own clock, so every API
process shares the same limit. A request takes one token at the door, before it costs
anything else. An operation whose answer could be large takes more once its document is
counted, before it runs: one point for every `values_per_point` values (100, as GitHub
counts), the count `api/response_size.py` makes with every list full, so a request for a
thousand values weighs ten requests for a few, however it is answered (executed, or a kept
response replayed). A request never costs more than its role's whole burst, so that it can
always be paid. A caller over its limit is answered 429 with `Retry-After` and the code
RATE_LIMITED; an operation over a WebSocket pays the same (`api/transports.py`), refused at
the door with RATE_LIMITED in an `error` message, for its size in a `next` one. When Redis
cannot be reached the request goes through: the limits protect the service, and Redis being
down must not take the API down with it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from graphql import GraphQLError
from starlette.types import ASGIApp, Receive, Scope, Send

from api.authentication import principal_of
from api.errors import LimitCode, over_limit
from api.responses import send_error
from entities.runtime.policy import Principal, Role
from workers.cache import RedisClient
from workers.failures import REDIS_FAILURES

log = logging.getLogger(__name__)

LIMITER_KEY = "tenure.rate_limiter"
RETRY_AFTER_KEY = "tenure.retry_after"
"""Set on a request GraphQL refused for its rate limit: the view answers it 429 with this
`Retry-After`."""

# KEYS[1] the bucket; ARGV: tokens per second, burst, tokens to take, tokens to wait for
# when they cannot be taken (both at most the burst). Returns 0 when they were taken, else
# the milliseconds until the bucket holds the tokens to wait for (and takes none).
_TAKE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local rate = tonumber(ARGV[1]) / 1000
local burst = tonumber(ARGV[2])
local cost = math.min(tonumber(ARGV[3]), burst)
local wanted = math.min(tonumber(ARGV[4]), burst)
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1] or ARGV[2])
local at = tonumber(bucket[2] or now_ms)
tokens = math.min(burst, tokens + (now_ms - at) * rate)
if tokens < cost then
  return math.ceil((math.max(wanted, cost) - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tokens - cost, 'at', now_ms)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate) + 1000)
return 0
"""


@dataclass(frozen=True)
class Limit:
    """Requests per second, and how many may come at once after a quiet spell."""

    per_second: float
    burst: int


class RateLimiter:
    """Takes tokens for a principal from its role's bucket."""

    def __init__(
        self,
        client: RedisClient,
        prefix: str,
        limits: dict[Role, Limit],
        values_per_point: int = 100,
    ) -> None:
        self._prefix = prefix
        self._limits = limits
        self.values_per_point = values_per_point
        self._take = client.register_script(_TAKE)

    def limits(self, principal: Principal) -> bool:
        """Whether the principal's role has a limit at all."""
        return principal.role in self._limits

    def points(self, principal: Principal, values: int) -> int:
        """What an answer of up to `values` values costs the principal, the token its
        request took at the door included: one point per `values_per_point`, at least one,
        and never more than its role's burst, so that it can always be paid."""
        limit = self._limits.get(principal.role)
        if limit is None:
            return 0
        if self.values_per_point <= 0:
            return 1
        return max(1, min(limit.burst, math.ceil(values / self.values_per_point)))

    async def wait_ms(self, principal: Principal, tokens: int = 1, retried: int = 0) -> int:
        """0 when the principal may go on, having taken `tokens` (at most its burst), else
        how long until its bucket holds `retried` tokens (milliseconds; at least `tokens`),
        what the request will cost when it is sent again."""
        limit = self._limits.get(principal.role)
        if limit is None or tokens <= 0:
            return 0
        key = f"{self._prefix}rate:{{{principal.sender}}}"
        try:
            waited = await self._take(
                keys=[key], args=[limit.per_second, limit.burst, tokens, retried]
            )
        except REDIS_FAILURES as exc:
            log.warning("rate limits unavailable, letting requests through: %s", exc)
            return 0
        return int(waited)


class RateLimits:
    """ASGI middleware, inside `Authentication`: refuses a caller over its limit, and leaves
    the limiter in the scope for `charge_answer`."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self._app = app
        self._limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = principal_of(scope) if scope["type"] == "http" else None
        if principal is not None:
            wait_ms = await self._limiter.wait_ms(principal)
            if wait_ms:
                retry_after = retry_after_seconds(wait_ms)
                await send_rate_limited(send, retry_after, too_many_requests(retry_after))
                return
            scope[LIMITER_KEY] = self._limiter
        await self._app(scope, receive, send)


def too_many_requests(retry_after: int) -> str:
    """The message of a refusal at the door."""
    return f"too many requests; try again in {retry_after} s"


def retry_after_seconds(wait_ms: int) -> int:
    """`Retry-After` for a wait: whole seconds, at least one."""
    return max(1, math.ceil(wait_ms / 1000))


async def send_rate_limited(send: Send, retry_after: int, message: str) -> None:
    """Answer 429 RATE_LIMITED with `Retry-After`, before GraphQL runs anything."""
    await send_error(
        send,
        429,
        LimitCode.RATE_LIMITED,
        message,
        [(b"retry-after", str(retry_after).encode())],
    )


@dataclass(frozen=True)
class Overdrawn:
    """An answer that costs more points than the caller's bucket holds now."""

    points: int
    values_per_point: int
    retry_after: int

    @property
    def message(self) -> str:
        return (
            f"this request costs {self.points} points of your rate limit (one for each "
            f"{self.values_per_point} values its answer could hold), more than you have now; "
            f"try again in {self.retry_after} s, or select fewer fields or ask for smaller pages"
        )


async def charge_answer(
    limiter: RateLimiter | None, principal: Principal | None, values: Callable[[], int | None]
) -> Overdrawn | None:
    """Charge the caller for an answer of up to `values()` values, beyond the token its
    request took at the door: None when it may go on. `values` is counted only for a caller
    with a limit; None from it (no operation to count) costs nothing more."""
    if limiter is None or principal is None or not limiter.limits(principal):
        return None
    counted = values()
    if counted is None:
        return None
    points = limiter.points(principal, counted)
    # Sent again, the request pays its token at the door once more: wait for all of them.
    wait_ms = await limiter.wait_ms(principal, points - 1, retried=points)
    if not wait_ms:
        return None
    return Overdrawn(points, limiter.values_per_point, retry_after_seconds(wait_ms))


def limiter_of(scope: Scope) -> RateLimiter | None:
    """The limiter whose door a request (or a WebSocket operation) has passed, if any."""
    limiter: RateLimiter | None = scope.get(LIMITER_KEY)
    return limiter


def rate_limited(scope: Scope, overdrawn: Overdrawn) -> GraphQLError:
    """RATE_LIMITED for an answer that costs more points than the caller has now; the view
    answers it 429 with `Retry-After` (`RETRY_AFTER_KEY`)."""
    scope[RETRY_AFTER_KEY] = overdrawn.retry_after
    return over_limit(LimitCode.RATE_LIMITED, overdrawn.message)
