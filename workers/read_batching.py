"""Cache reads batched per event-loop turn: concurrent requests share one Redis round trip."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException

Fields = list[bytes | str | None]


class ReadBatcher:
    """HMGETs asked for in the same event-loop turn go to Redis as one pipeline.

    Under load many requests reach their cache read together; one pipeline costs one pool
    checkout and one round trip for all of them instead of one each. A lone read waits one
    loop turn at most. An error fails every read of its batch with that error; in a Redis
    Cluster, every read of its node's part of the batch.
    """

    def __init__(self, client: redis.Redis | RedisCluster, fields: Sequence[str]) -> None:
        self._client = client
        self._fields = list(fields)
        self._pending: list[tuple[str, asyncio.Future[Fields]]] = []
        self._flush: asyncio.Task[None] | None = None

    async def hmget(self, key: str) -> Fields:
        future: asyncio.Future[Fields] = asyncio.get_running_loop().create_future()
        self._pending.append((key, future))
        if self._flush is None:
            self._flush = asyncio.create_task(self._flush_next_turn())
        return await future

    def _take_batch(self) -> list[tuple[str, asyncio.Future[Fields]]]:
        batch, self._pending, self._flush = self._pending, [], None
        return batch

    async def _flush_next_turn(self) -> None:
        batch = []
        try:
            await asyncio.sleep(0)  # let the other requests of this turn join
            batch = self._take_batch()
            results = await self._round_trip([key for key, _ in batch])
        except BaseException as exc:
            # Whatever went wrong, no reader is left waiting, and the next read starts a
            # new batch.
            if self._flush is asyncio.current_task():
                batch = self._take_batch()
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _round_trip(self, keys: list[str]) -> list[Fields | Exception]:
        if len(keys) == 1:
            return [await self._client.hmget(keys[0], self._fields)]
        if isinstance(self._client, RedisCluster):
            return await self._per_node(self._client, keys)
        return list(await self._pipelined(keys))

    async def _pipelined(self, keys: list[str]) -> list[Fields]:
        pipeline = self._client.pipeline(transaction=False)
        for key in keys:
            pipeline.hmget(key, self._fields)
        results: list[Fields] = await pipeline.execute()
        return results

    async def _per_node(self, cluster: RedisCluster, keys: list[str]) -> list[Fields | Exception]:
        """The batch as one pipeline per node, side by side: a cluster pipeline fails whole
        when one node's part fails, and one master down (until its failover, 15 s by
        default) failed nearly every batch, the reads of keys on the others too."""
        by_node: dict[str, list[int]] = {}
        try:
            for n, key in enumerate(keys):
                node = cluster.get_node_from_key(key)
                by_node.setdefault(node.name if node is not None else "", []).append(n)
        except RedisClusterException:  # no slots known yet: before the client's first command
            return list(await self._pipelined(keys))
        parts = list(by_node.values())
        answers = await asyncio.gather(
            *(self._pipelined([keys[n] for n in part]) for part in parts), return_exceptions=True
        )
        results: list[Fields | Exception] = [[] for _ in keys]
        for part, answer in zip(parts, answers, strict=True):
            if isinstance(answer, BaseException) and not isinstance(answer, Exception):
                raise answer
            for i, n in enumerate(part):
                results[n] = answer if isinstance(answer, Exception) else answer[i]
        return results
