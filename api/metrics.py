"""The API's Prometheus metrics, in a registry of each app's own, served at `/metrics` on
the API's port, or on a port of their own (`TENURE_API_METRICS_PORT`, as on Kubernetes),
where an Ingress in front of the API cannot pass them on.

Every `/graphql` request is counted once, by operation and outcome code, and timed
(`ObservedRequests`, in `api/request_context.py`); a request refused before GraphQL ran is
counted by its code as well. The gateway counts its cache reads, the reads that fell back to
the cache because the workflow did not answer, and the size of each signal it sends (commands
to one entity that met in flight share one signal, `workers/coalescing.py`).

`/metrics` needs no token, like `/livez`: it says how busy the API is and which operations
clients send, so it is for the cluster's Prometheus, never for the public.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from starlette.requests import Request
from starlette.responses import Response

OPERATION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_OPERATIONS = 100
ANONYMOUS = "anonymous"
OTHER = "other"
OK = "OK"
UNKNOWN = "unknown"
"""The operation of a request refused before its body was read."""

CACHE_RESULTS = ("hit", "miss", "stale")
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100)


class OperationNames:
    """Operation names as label values, few enough for Prometheus whatever clients send: a
    short identifier as it is, `anonymous` for no name or another kind of string, and
    `other` for every new name once `limit` names have been seen."""

    def __init__(self, limit: int = MAX_OPERATIONS) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, name: object) -> str:
        if not isinstance(name, str):  # none, or whatever JSON a client sent instead
            return ANONYMOUS
        if name in self._seen:
            return name
        if not OPERATION_NAME.fullmatch(name):
            return ANONYMOUS
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(name)
        return name


class ApiMetrics:
    """The API's instruments, in a registry of their own (two apps in one process, as in the
    tests, never count into each other)."""

    def __init__(self, max_operations: int = MAX_OPERATIONS) -> None:
        # The `_created` series prometheus-client adds to each counter and histogram would
        # double what is stored, for a timestamp nobody queries.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self.operations = OperationNames(max_operations)
        self.requests = Counter(
            "tenure_api_requests",
            "GraphQL requests by operation and outcome: OK, or the code of the first error.",
            ["operation", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "tenure_api_request_duration_seconds",
            "Time from a GraphQL request's arrival to its answer, refusals included.",
            ["operation"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.refusals = Counter(
            "tenure_api_refusals",
            "Requests refused before GraphQL ran anything (401, 413, 429, 405, 406, request "
            "limits, malformed requests), by code.",
            ["code"],
            registry=self.registry,
        )
        self.cache_reads = Counter(
            "tenure_api_cache_reads",
            "CACHED reads by result: hit, miss (read from the workflow) or stale (the entity "
            "is stuck).",
            ["result"],
            registry=self.registry,
        )
        self.live_read_fallbacks = Counter(
            "tenure_api_live_read_fallbacks",
            "Reads of a workflow that did not answer, answered from the cache as stale.",
            registry=self.registry,
        )
        self.signal_batch_size = Histogram(
            "tenure_api_signal_batch_size",
            "Commands carried by each signal sent to an entity (coalesced in flight).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.update_refusals = Counter(
            "tenure_api_update_refusals",
            "Waited commands whose update Temporal refused or did not answer, by reason "
            "(resource_exhausted: 10 in flight on one entity); they went by signal instead.",
            ["reason"],
            registry=self.registry,
        )
        self._counted: dict[tuple[str, str], Counter] = {}
        self._timed: dict[str, Histogram] = {}
        self._cache_reads = {result: self.cache_reads.labels(result) for result in CACHE_RESULTS}

    def observe_request(
        self, operation: str, code: str, seconds: float | None, *, refused: bool
    ) -> None:
        """Count and time one request (not timed when `seconds` is None: an event stream);
        `operation` is a label from `operations` (or UNKNOWN)."""
        # Each request pays for this: the labelled children are looked up once, not per call.
        counted = self._counted.get((operation, code))
        if counted is None:
            counted = self._counted[operation, code] = self.requests.labels(operation, code)
        counted.inc()
        if seconds is not None:
            timed = self._timed.get(operation)
            if timed is None:
                timed = self._timed[operation] = self.duration.labels(operation)
            timed.observe(seconds)
        if refused:
            self.refusals.labels(code).inc()

    def cache_read(self, result: str, count: int = 1) -> None:
        self._cache_reads[result].inc(count)

    async def endpoint(self, request: Request) -> Response:
        """`/metrics`, in Prometheus's text format."""
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.contextmanager
    def served(self, host: str, port: int) -> Iterator[None]:
        """`/metrics` on `host:port`, by prometheus-client's server (a thread), while inside."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        try:
            yield
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
