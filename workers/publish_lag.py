"""How stale the cache was: from an entity's change to its snapshot written to the cache,
whichever way it came (`by`): a publish by activity (a saga's request too), an offer its
worker wrote, or a write back once Redis answered again after it refused one
(`SnapshotCache.written_back`).

Only a write that stored a newer snapshot counts. An entity that offers its changes still
publishes by activity once per interval, carrying what its offers already wrote: counting
that publish would read the interval (about 2 s under a stream of commands) where the cache
had the change within milliseconds. A publish by activity that finds its snapshot already
written (an offer was first, or its own earlier attempt) says nothing about the cache's lag.

Counted in the worker only: a snapshot the API process stored first (a LIVE read's, a waited
command's answer, whose publish its API process makes) is not counted, nor is the rare write
whose answer never came back (an index write that failed after the snapshot's in a Redis
Cluster, a saga request's publish given up on after it stored).
"""

from __future__ import annotations

from datetime import UTC, datetime

from temporalio.common import MetricHistogramFloat, MetricMeter

from entities.runtime.envelope import Snapshot

PUBLISH_LAG = "tenure_publish_lag_seconds"
PUBLISH_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
"""Seconds; the worker's runtime gives the histogram these buckets (`worker_runtime`)."""
DESCRIPTION = (
    "From an entity's change (its workflow's time) to its snapshot in the cache, by the "
    "write that stored it (`by`: activity, offer or write_back)."
)
BY_ACTIVITY = "activity"
BY_OFFER = "offer"
BY_WRITE_BACK = "write_back"


def lag_histogram(meter: MetricMeter) -> MetricHistogramFloat:
    return meter.create_histogram_float(PUBLISH_LAG, DESCRIPTION, "s")


def record_lag(histogram: MetricHistogramFloat, snapshot: Snapshot, by: str) -> None:
    """Count how long `snapshot`'s change took to reach the cache, now that a write `by`
    one path stored it (call only for a write that stored it)."""
    changed = snapshot.updated_at
    if changed is None:
        return
    if changed.tzinfo is None:  # workflow time is UTC
        changed = changed.replace(tzinfo=UTC)
    lag = (datetime.now(UTC) - changed).total_seconds()
    histogram.record(max(lag, 0.0), {"entity_type": snapshot.entity_type, "by": by})
