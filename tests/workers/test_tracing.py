"""Traces from a GraphQL request through Temporal to the workflow, its activities and Redis,
recorded in memory from the real API, a real worker and the real servers; and nothing at
all installed when tracing is off."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from temporalio.client import Client

from api.app import create_app
from tests.conftest import new_id
from tests.entities.shop import eventually
from workers.cache import SnapshotCache
from workers.settings import Settings
from workers.telemetry import configure_tracing, redis_span, temporal_interceptors, tracing_wanted
from workers.temporal import connect_temporal
from workers.worker import build_worker

OPEN = """mutation($id: ID!) { openAccount(id: $id, ownerName: "Ada", email: "ada@example.com",
  wait: true) { status } }"""
VERIFY = """mutation($id: ID!) { verifyAccount(id: $id, wait: true) { account { status } } }"""


class Recorded:
    """The spans finished so far, in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()

    def named(self, name: str, trace_id: int | None = None) -> list[ReadableSpan]:
        return [
            span
            for span in self.spans()
            if span.name == name and (trace_id is None or _trace(span) == trace_id)
        ]

    def one(self, name: str, trace_id: int | None = None) -> ReadableSpan:
        found = self.named(name, trace_id)
        assert len(found) == 1, (name, [span.name for span in self.spans()])
        return found[0]


def _trace(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    """Tracing on, into memory, with a provider of the test's own (OpenTelemetry's global
    one can be set once in a process); off again afterwards."""
    recorded = Recorded()
    configure_tracing("tenure-test", provider=recorded.provider)
    yield recorded
    configure_tracing("tenure-test", environ={})
    recorded.provider.shutdown()


@contextlib.asynccontextmanager
async def traced_stack(
    settings: Settings, cache: SnapshotCache, recorded: Recorded
) -> AsyncIterator[httpx.AsyncClient]:
    """A worker and the API, both on a Temporal client tracing with the recorded provider,
    the API behind OpenTelemetry's ASGI middleware."""
    client = await connect_temporal(settings, tracer_provider=recorded.provider)
    app = create_app(settings, temporal_client=client, tracer_provider=recorded.provider)
    async with build_worker(client, settings, cache), app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tenure") as http:
            yield http


async def test_a_waited_mutation_is_one_trace_from_the_request_to_the_workflow_activity_and_redis(
    settings: Settings, cache: SnapshotCache, recorded: Recorded
) -> None:
    account_id = new_id()
    async with traced_stack(settings, cache, recorded) as http:
        response = await http.post(
            "/graphql", json={"query": OPEN, "variables": {"id": account_id}}
        )
        assert response.json() == {"data": {"openAccount": {"status": "APPLIED"}}}
        for probe in ("/livez", "/readyz", "/metrics"):  # no trace for probes and scrapes
            assert (await http.get(probe)).status_code == 200

        async def published() -> list[ReadableSpan]:
            return recorded.named("RunActivity:publish_snapshot")

        # The snapshot is published beside the command's outcome, maybe after the answer.
        await eventually(published, bool)

    request = recorded.one("POST /graphql")
    assert request.kind is SpanKind.SERVER
    assert not [span.name for span in recorded.spans() if span.name.startswith("GET")]
    trace_id = _trace(request)
    assert request.attributes is not None
    assert request.attributes["tenure.request_id"] == response.headers["x-request-id"]
    in_trace = {span.name for span in recorded.spans() if _trace(span) == trace_id}
    assert {
        "POST /graphql",
        # the API's client starts the entity with the command as an update, and waits on it
        "StartUpdateWithStartWorkflow:Account",
        "RunWorkflow:Account",  # the worker's workflow task
        "HandleUpdate:apply",
        "StartActivity:publish_snapshot",
        "RunActivity:publish_snapshot",
        "EVALSHA",  # Redis: the activity's write, and the API's of the state it answers with
    } <= in_trace
    start = recorded.one("StartUpdateWithStartWorkflow:Account", trace_id)
    assert _parent(start) == _id(request)
    assert _parent(recorded.one("RunWorkflow:Account", trace_id)) == _id(start)
    publish = recorded.one("RunActivity:publish_snapshot", trace_id)
    assert _parent(publish) == _id(recorded.one("StartActivity:publish_snapshot", trace_id))
    redis_calls = recorded.named("EVALSHA", trace_id)
    assert _id(publish) in {_parent(span) for span in redis_calls}
    assert _id(request) in {_parent(span) for span in redis_calls}
    assert all(span.attributes and span.attributes["db.system"] == "redis" for span in redis_calls)


async def test_a_command_to_an_existing_entity_links_its_workflow_span_to_the_request(
    settings: Settings, cache: SnapshotCache, recorded: Recorded
) -> None:
    account_id = new_id()
    async with traced_stack(settings, cache, recorded) as http:
        await http.post("/graphql", json={"query": OPEN, "variables": {"id": account_id}})
        recorded.exporter.clear()
        response = await http.post(
            "/graphql", json={"query": VERIFY, "variables": {"id": account_id}}
        )
        assert "errors" not in response.json(), response.json()

    request = recorded.one("POST /graphql")
    trace_id = _trace(request)
    update = recorded.one("StartWorkflowUpdate:apply", trace_id)
    assert _parent(update) == _id(request)
    # A waited command goes as an update, answered with its outcome: no query.
    assert not recorded.named("QueryWorkflow:outcome", trace_id)
    # The workflow handles the update in the trace of the request that started the entity,
    # as Temporal's interceptor does for every workflow: linked to this request's update.
    handled = recorded.one("HandleUpdate:apply")
    assert _trace(handled) != trace_id
    assert [link.context.span_id for link in handled.links] == [_id(update)]


async def test_with_tracing_off_nothing_is_installed(
    settings: Settings, temporal_client: Client
) -> None:
    assert configure_tracing("tenure-test", environ={}) is None
    assert temporal_interceptors(None) == []
    client = await connect_temporal(settings)
    assert list(client.config()["interceptors"]) == []
    app = create_app(settings, temporal_client=temporal_client)
    assert OpenTelemetryMiddleware not in [m.cls for m in app.user_middleware]
    assert redis_span("EVALSHA") is redis_span("HMGET")  # the one shared no-op


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SERVICE_NAME": "tenure-api"}, False),
    ],
)
def test_tracing_is_off_unless_the_environment_asks_for_an_exporter(
    environ: dict[str, str], wanted: bool
) -> None:
    assert tracing_wanted(environ) is wanted
