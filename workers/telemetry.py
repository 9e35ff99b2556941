"""Traces: OpenTelemetry spans from an API request through Temporal (the signal, the
workflow, its activities) to Redis, exported over OTLP when the environment asks for it.

Tracing is off unless the standard variables turn it on: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, or `OTEL_TRACES_EXPORTER=otlp`; `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and the exporter's own variables apply as
OpenTelemetry documents them. Off, nothing is installed: no interceptor on the Temporal
client, no middleware on the API, and a Redis call costs one comparison more.

Each entry point calls `configure_tracing` once; tests pass a provider of their own, since
OpenTelemetry's global provider can be set only once in a process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Tracer
from temporalio.client import Interceptor
from temporalio.contrib.opentelemetry import TracingInterceptor

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_NO_SPAN: AbstractContextManager[object] = contextlib.nullcontext()
_redis_tracer: Tracer | None = None


def tracing_wanted(environ: Mapping[str, str]) -> bool:
    """Whether the standard OpenTelemetry variables ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {
        name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")
    }
    if "none" in exporters:
        return False
    return "otlp" in exporters or any(environ.get(name) for name in _ENDPOINTS)


def configure_tracing(
    service_name: str,
    *,
    environ: Mapping[str, str] | None = None,
    provider: TracerProvider | None = None,
) -> TracerProvider | None:
    """The process's tracer provider, or None when tracing is off. Without `provider`, one
    exporting OTLP over HTTP is made when the environment asks for it (named
    `service_name` unless OTEL_SERVICE_NAME names it) and made OpenTelemetry's global one.
    Either way, Redis calls are traced with it from now on."""
    global _redis_tracer
    if provider is None:
        env = os.environ if environ is None else environ
        if not tracing_wanted(env):
            _redis_tracer = None
            return None
        provider = _exporting_provider(service_name, env)
        trace.set_tracer_provider(provider)
    _redis_tracer = provider.get_tracer("tenure.redis")
    return provider


def _exporting_provider(service_name: str, environ: Mapping[str, str]) -> TracerProvider:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    named = {} if environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(named))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def temporal_interceptors(provider: TracerProvider | None) -> list[Interceptor]:
    """What a Temporal client needs to carry traces into workflows and activities (and a
    worker built on that client to continue them): nothing when tracing is off."""
    if provider is None:
        return []
    return [TracingInterceptor(provider.get_tracer("temporalio"))]


def redis_span(command: str) -> AbstractContextManager[object]:
    """A client span around one Redis call, when tracing is on and the call is part of a
    traced operation (a request, an activity); otherwise nothing."""
    tracer = _redis_tracer
    if tracer is None or not trace.get_current_span().is_recording():
        return _NO_SPAN
    return tracer.start_as_current_span(
        command,
        kind=SpanKind.CLIENT,
        attributes={"db.system": "redis", "db.operation.name": command},
    )
