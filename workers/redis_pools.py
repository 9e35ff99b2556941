"""Redis clients whose commands wait a moment for a free connection when every one of
their pool's is busy, as a plain Redis client's blocking pool makes them wait, instead of
failing at once. redis-py's cluster client and its Sentinel pool refuse a command past
`max_connections` at once (MaxConnectionsError, "Too many connections"): a burst of reads
larger than the pool then failed UNAVAILABLE against a Redis that was fine.

A wait longer than `timeout` fails as a ConnectionError, which callers see as Redis being
unavailable, as they see any other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError

_HOLDING: ContextVar[bool] = ContextVar("tenure_redis_connection_held", default=False)
"""Whether this task already holds a turn: redis-py's cluster client runs commands from
within commands (a pipeline's redirects, a command split across slots), which must not
wait for a second turn while holding the first."""


class WaitingCluster(RedisCluster):
    """A Redis Cluster client that lets at most `max_connections` commands and pipelines
    run at once, each using at most one connection of each node, and makes the rest wait
    up to `timeout` seconds for their turn."""

    def __init__(self, *args: Any, timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns = asyncio.Semaphore(kwargs.get("max_connections", 100))
        self._timeout = timeout

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """A turn to use connections, once one is free; ConnectionError after `timeout`."""
        if _HOLDING.get():
            yield
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._turns.acquire()
        except TimeoutError:
            raise ConnectionError(
                f"no Redis connection came free within {self._timeout} s"
            ) from None
        held = _HOLDING.set(True)
        try:
            yield
        finally:
            _HOLDING.reset(held)
            self._turns.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turn():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused, as the client does
        return _WaitingPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py makes its own


class _WaitingPipeline(ClusterPipeline):
    """A cluster pipeline that runs in one turn of its client."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        client = self.cluster_client
        assert isinstance(client, WaitingCluster)
        async with client.turn():
            return await super().execute(raise_on_error, allow_redirections)


class WaitingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """The pool of the master the Sentinels name, blocking as the plain client's pool is:
    a command past `max_connections` waits up to `timeout` for one to come back."""
