"""Connecting to Temporal with the payload converter every part of Tenure shares."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any, TypeVar

from opentelemetry.sdk.trace import TracerProvider
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest, GetSystemInfoRequest
from temporalio.client import Client, WorkflowHandle, WorkflowQueryFailedError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode

from workers.answer_budget import ANSWERS_FULL
from workers.query_guard import AHEAD_OF_TASK
from workers.settings import Settings
from workers.telemetry import temporal_interceptors

T = TypeVar("T")


async def connect_temporal(
    settings: Settings,
    *,
    tracer_provider: TracerProvider | None = None,
    runtime: Runtime | None = None,
) -> Client:
    """A Temporal client for `settings`, speaking pydantic payloads; tracing its calls, and
    the workflows and activities of a worker built on it, with `tracer_provider`; on
    `runtime` (its metrics, its logs) rather than the process's default one."""
    if not settings.temporal_address:
        raise ValueError("TEMPORAL_ADDRESS is not set")
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
        interceptors=temporal_interceptors(tracer_provider),
        runtime=runtime,
    )


async def within(seconds: float, call: Awaitable[T]) -> T:
    """`call`, given up after `seconds` with the RPCError a deadline raises.

    A call's own `rpc_timeout` is no hard bound: a query given 2 s was seen answering after
    4.1 s (the client retries inside it), and with no worker polling a query waits about
    30 s. Every Temporal call that a client waits on goes through here instead."""
    task = asyncio.ensure_future(call)
    # An SDK call cancelled raises its own error instead (an update's "timed out or
    # cancelled"). When the caller itself is cancelled meanwhile, wait_for leaves that
    # error on the task for nobody to take, and asyncio logs it as an ERROR.
    task.add_done_callback(_take_error)
    try:
        await asyncio.wait([task], timeout=seconds)
    finally:
        # Given up, or the caller cancelled: the call is cancelled and not waited for.
        # (wait_for waited for it to end, and a call that does not end at once when
        # cancelled, a signal stuck on a frozen Temporal, held the caller its own 5 s more.)
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise RPCError(f"no answer within {seconds:.3g} s", RPCStatusCode.DEADLINE_EXCEEDED, b"")


def _take_error(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


QUERY_ATTEMPTS = 3
OVERLOADED = "[TMPRL1101]"
"""How a query fails whose activation the worker did not finish within 2 s ("Potential
deadlock detected"): a worker short of CPU (a burst of entities replayed at once), not a
workflow that is broken. The SDK drops the entity from its cache; asked again, it replays."""
OVERLOADED_PAUSE = 0.2
NONDETERMINISTIC = "[TMPRL1100]"
"""How a query fails that made a worker replay an entity whose history today's code cannot
follow: the entity is stuck until repaired (`workers.repair`), as when the server answers
for it that its workflow task is failing. Not asked again."""
UNKNOWN_QUERY = "expected but not found"
"""How a query fails that the worker holding the entity does not know: a worker of an older
release, in a rolling deploy, asked a query added since. The entity is fine and a newer
worker will answer: UNAVAILABLE, where it went to the client as INTERNAL."""


async def ask(
    handle: WorkflowHandle[Any, Any],
    query: Any,
    *args: Any,
    result_type: type[T] | None = None,
    seconds: float,
) -> T:
    """The workflow's answer to `query` (a name or a query method), within `seconds` in all.
    Asked again when a worker refused it so as to replay the entity in order
    (`workers.query_guard`), or could not answer it in time for want of CPU (OVERLOADED,
    after a pause); either refusal, repeated, is UNAVAILABLE like any other. An entity
    that cannot be replayed (NONDETERMINISTIC), or is held by a worker that does not know
    the query (UNKNOWN_QUERY), is UNAVAILABLE at once."""

    async def asking() -> T:
        for attempt in range(QUERY_ATTEMPTS):
            try:
                answer: T = await handle.query(
                    query, *args, result_type=result_type, rpc_timeout=timedelta(seconds=seconds)
                )
                return answer
            except WorkflowQueryFailedError as exc:
                if NONDETERMINISTIC in str(exc) or UNKNOWN_QUERY in str(exc):
                    raise RPCError(str(exc), RPCStatusCode.UNAVAILABLE, b"") from exc
                # Refused by a worker short of CPU, or by a task full of answers: after a
                # pause, the next task answers.
                overloaded = OVERLOADED in str(exc) or ANSWERS_FULL in str(exc)
                if not overloaded and AHEAD_OF_TASK not in str(exc):
                    raise
                if attempt == QUERY_ATTEMPTS - 1:
                    raise RPCError(str(exc), RPCStatusCode.UNAVAILABLE, b"") from exc
                if overloaded:
                    await asyncio.sleep(OVERLOADED_PAUSE * (attempt + 1))
        raise AssertionError("unreachable")

    return await within(seconds, asking())


PROBE_INTERVAL = 0.5


async def answers(client: Client) -> bool:
    """Whether Temporal answers a cheap call within a second."""
    try:
        await within(1.0, client.workflow_service.get_system_info(GetSystemInfoRequest()))
    except RPCError:
        return False
    return True


async def until_unreachable(client: Client, misses: int = 2) -> None:
    """Return once Temporal has failed to answer `misses` probes in a row."""
    missed = 0
    while missed < misses:
        await asyncio.sleep(PROBE_INTERVAL)
        missed = 0 if await answers(client) else missed + 1


async def until_reachable(client: Client) -> None:
    """Return once Temporal answers again."""
    while not await answers(client):
        await asyncio.sleep(PROBE_INTERVAL)


async def namespace_retention(client: Client, namespace: str) -> float | None:
    """Seconds Temporal keeps a closed workflow of `namespace` (its retention), or None when
    it does not answer within a few seconds."""
    request = DescribeNamespaceRequest(namespace=namespace)
    try:
        described = await within(5.0, client.workflow_service.describe_namespace(request))
    except RPCError:
        return None
    return described.config.workflow_execution_retention_ttl.ToTimedelta().total_seconds()
