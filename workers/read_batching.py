"""Cache reads batched per event-loop turn: concurrent requests share one Redis round trip."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import redis.asyncio as redis
from redis.exceptions import RedisError

Fields = list[bytes | str | None]


class ReadBatcher:
    """HMGETs asked for in the same event-loop turn go to Redis as one pipeline.

    Under load many requests reach their cache read together; one pipeline costs one pool
    checkout and one round trip for all of them instead of one each. A lone read waits one
    loop turn at most. A Redis error fails every read of its batch with that error.
    """

    def __init__(self, client: redis.Redis, fields: Sequence[str]) -> None:
        self._client = client
        self._fields = list(fields)
        self._pending: list[tuple[str, asyncio.Future[Fields]]] = []
        self._flushing: set[asyncio.Task[None]] = set()

    async def hmget(self, key: str) -> Fields:
        future: asyncio.Future[Fields] = asyncio.get_running_loop().create_future()
        self._pending.append((key, future))
        if len(self._pending) == 1:
            task = asyncio.create_task(self._flush())
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other requests of this turn join
        batch, self._pending = self._pending, []
        try:
            if len(batch) == 1:
                results = [await self._client.hmget(batch[0][0], self._fields)]
            else:
                pipeline = self._client.pipeline(transaction=False)
                for key, _ in batch:
                    pipeline.hmget(key, self._fields)
                results = await pipeline.execute()
        except (RedisError, OSError) as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
