"""`python -m api`: serve the GraphQL API with uvicorn against TEMPORAL_ADDRESS and REDIS_URL."""

from __future__ import annotations

import sys

import uvicorn

from api.app import create_app
from deploy.embedded import port_is_free
from workers.settings import Settings


def main() -> None:
    settings = Settings.from_env()
    if not port_is_free(settings.api_port, settings.api_host):
        sys.exit(f"error: port {settings.api_port} is already in use (set API_PORT to use another)")
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
