"""Activities: the only code that does I/O on behalf of workflows. Each is idempotent."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from entities.runtime.backlog import NEXT_TASK_ACTIVITY
from entities.runtime.envelope import Publication
from entities.runtime.publisher import PUBLISH_ACTIVITY
from workers.cache import CacheUnavailable, SnapshotCache
from workers.logs import RepeatedLogFilter

log = logging.getLogger(__name__)
# Redis down: every entity's publish fails at once, and is retried. Said once in a while,
# with how often it happened meanwhile.
log.addFilter(RepeatedLogFilter(window=10.0))

PUBLISH_FAILURES = "tenure_publish_failures"
PUBLISH_LAG = "tenure_publish_lag_seconds"
PUBLISH_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
"""Seconds; the worker's runtime gives the histogram these buckets (`worker_runtime`)."""


@NEXT_TASK_ACTIVITY.defn
async def next_task() -> None:
    """Nothing: an entity catching up on held commands waits for it to get its next
    workflow task (entities/runtime/backlog.py)."""


class CacheActivities:
    """Publishing entity snapshots to the last-seen cache, and their changes to the change
    stream."""

    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache

    @PUBLISH_ACTIVITY.defn
    async def publish_snapshot(self, publication: Publication) -> bool:
        """Write the snapshot if it is newer than what the cache holds, and stream the
        changes not streamed yet; safe to repeat. Counts each attempt that fails, and how
        long the change took to reach the cache."""
        try:
            return await self.publish(publication)
        except CacheUnavailable as exc:
            # Redis down: expected, retried, counted. Benign, the SDK logs it at debug, where
            # each attempt of every entity logged a warning with its traceback (675 in a 25 s
            # outage); this process says it once in a while instead (the filter above).
            log.warning(
                "publishing to the cache failed (Redis unavailable: %s); the entities retry, "
                "and tenure_publish_failures_total counts every attempt",
                exc,
            )
            raise ApplicationError(
                f"the cache is unavailable: {exc}",
                type="CacheUnavailable",
                category=ApplicationErrorCategory.BENIGN,
            ) from None

    async def publish(self, publication: Publication) -> bool:
        """`publish_snapshot`'s work, from any activity: whether the cache took the snapshot.
        Raises CacheUnavailable, or what else failed, having counted it."""
        snapshot = publication.snapshot
        meter = activity.metric_meter()
        attributes = {"entity_type": snapshot.entity_type}
        try:
            written = await self._cache.put_publication(publication)
        except Exception:
            meter.create_counter(
                PUBLISH_FAILURES, "Attempts to publish a snapshot to the cache that failed."
            ).add(1, attributes)
            raise
        changed = snapshot.updated_at
        if changed is not None:
            if changed.tzinfo is None:  # workflow time is UTC
                changed = changed.replace(tzinfo=UTC)
            lag = (datetime.now(UTC) - changed).total_seconds()
            meter.create_histogram_float(
                PUBLISH_LAG,
                "From an entity's change (its workflow's time) to its snapshot in the cache.",
                "s",
            ).record(max(lag, 0.0), attributes)
        return written
