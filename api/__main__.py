"""`python -m api`: serve the GraphQL API with uvicorn against TEMPORAL_ADDRESS and REDIS_URL."""

from __future__ import annotations

import contextlib
import gc
import sys

import uvicorn

from api.app import create_app
from api.server import ApiServer
from deploy.embedded import port_is_free
from workers.logs import configure_logging
from workers.settings import settings_or_exit
from workers.telemetry import configure_tracing


def main() -> None:
    settings = settings_or_exit("tenure api")
    if not port_is_free(settings.api_port, settings.api_host):
        sys.exit(f"error: port {settings.api_port} is already in use (set API_PORT to use another)")
    metrics_port = settings.api_metrics_port
    if metrics_port and not port_is_free(metrics_port, settings.api_host):
        sys.exit(
            f"error: port {metrics_port} is already in use "
            "(set TENURE_API_METRICS_PORT to use another)"
        )
    try:
        configure_logging(settings, "api")
        tracer_provider = configure_tracing("tenure-api")
        app = create_app(settings, tracer_provider=tracer_provider)
    except ValueError as exc:  # a setting that cannot work, said in one line
        sys.exit(f"error: {exc}")
    # What is loaded by now (modules, the schema) lives as long as the process: keep it out
    # of the collector's full passes, which stalled every request in flight for 50-60 ms
    # about twice a second under load.
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        log_config=None,  # uvicorn's records go through the process's logging, JSON or text
        access_log=False,
        server_header=False,  # what serves the API is no client's business
        # On SIGTERM uvicorn stops accepting at once and lets requests in flight finish;
        # the subscriptions end first (api/server.py).
        timeout_graceful_shutdown=int(settings.api_shutdown_grace),
        # uvicorn's own 5 s closed idle connections under a proxy that keeps them 60 s (a
        # request sent on one as it closed failed), and under clients that pause longer
        # than 5 s between bursts (each burst began by connecting again).
        timeout_keep_alive=int(settings.api_keep_alive),
    )
    server = ApiServer(app, config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:  # as uvicorn.run: it could not start (a port taken meanwhile)
        sys.exit(3)
    if tracer_provider is not None:
        tracer_provider.shutdown()  # the spans still buffered


if __name__ == "__main__":
    main()
