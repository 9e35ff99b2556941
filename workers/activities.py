"""Activities: the only code that does I/O on behalf of workflows. Each is idempotent."""

from __future__ import annotations

from temporalio import activity

from entities.runtime.envelope import Snapshot
from workers.cache import SnapshotCache


class CacheActivities:
    """Publishing entity snapshots to the last-seen cache."""

    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache

    @activity.defn(name="publish_snapshot")
    async def publish_snapshot(self, snapshot: Snapshot) -> bool:
        """Write the snapshot if it is newer than what the cache holds; safe to repeat."""
        return await self._cache.put(snapshot)
