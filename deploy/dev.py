"""`make dev`: the whole stack in one process tree — Temporal, Redis, worker and API.

Embedded servers persist to the data directory, so entities survive a restart. When
TEMPORAL_ADDRESS or REDIS_URL is set, that server is used and none is started for it.
Without a configured key source, tokens are signed with a secret kept in the data
directory, and an admin and a customer token are printed at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from urllib.parse import quote

from deploy.embedded import EmbeddedRedis, EmbeddedTemporal, free_port, port_is_free
from deploy.tokens import dev_secret, mint
from workers.logs import configure_logging
from workers.settings import Settings, settings_or_exit

log = logging.getLogger("tenure.dev")

TEMPORAL_PORT = 7233
REDIS_PORT = 6380  # a Redis on 6379 is common; never collide with it
TOKEN_TTL = 12 * 3600  # a working day, so a restart is rarely needed for a new one


def _tokens(settings: Settings) -> str:
    """The lines that hand a developer an admin and a customer token, when we can sign."""
    if not settings.auth_secret or settings.environment != "development":
        return ""  # an admin token in a production log would be anyone's who reads it
    admin = mint(
        settings.auth_secret,
        role="admin",
        sub="dev-admin",
        ttl_seconds=TOKEN_TTL,
        settings=settings,
    )
    customer = mint(
        settings.auth_secret,
        role="customer",
        sub="ada",
        accounts=["ada"],
        ttl_seconds=TOKEN_TTL,
        settings=settings,
    )
    hours = TOKEN_TTL // 3600
    headers = json.dumps({"Authorization": f"Bearer {admin}"})
    ide = f"http://{settings.api_host}:{settings.api_port}/graphql?headers={quote(headers)}"
    return (
        f"\n  Admin token (sub dev-admin, {hours} hours):\n    {admin}"
        f"\n  Customer token (sub ada, owns account ada, {hours} hours):\n    {customer}"
        '\n  In GraphiQL\'s headers pane: {"Authorization": "Bearer <token>"};'
        " `tenure token --help` mints others."
        f"\n  GraphiQL with the admin token in its headers:\n    {ide}"
    )


def _spawn(module: str, settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env()}
    return subprocess.Popen([sys.executable, "-m", module], env=env)


async def run(settings: Settings) -> int:
    if not port_is_free(settings.api_port, settings.api_host):
        print(
            f"error: port {settings.api_port} is already in use (set API_PORT to use another)",
            file=sys.stderr,
        )
        return 1
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    if settings.shop_currency is None:  # prices in euros, as accounts open by default
        settings = settings.model_copy(update={"shop_currency": "EUR"})
    if not (settings.auth_secret or settings.auth_public_key_file or settings.auth_jwks_url):
        settings = settings.model_copy(
            update={"auth_secret": dev_secret(data), "environment": "development"}
        )
    servers: list[EmbeddedTemporal | EmbeddedRedis] = []
    children: list[subprocess.Popen[bytes]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if not settings.temporal_address:
            temporal = EmbeddedTemporal(
                port=free_port(TEMPORAL_PORT),
                db_file=data / "temporal.db",
                log_file=data / "temporal.log",
                ui=True,
            )
            log.info("starting Temporal dev server on %s", temporal.address)
            await temporal.start()
            servers.append(temporal)
            settings = settings.model_copy(update={"temporal_address": temporal.address})
        if not settings.redis_url:
            redis_server = EmbeddedRedis(
                port=free_port(REDIS_PORT), data_dir=data / "redis", log_file=data / "redis.log"
            )
            log.info("starting Valkey on port %d", redis_server.port)
            await redis_server.start()
            servers.append(redis_server)
            settings = settings.model_copy(update={"redis_url": redis_server.url})
        children.append(_spawn("workers", settings))
        children.append(_spawn("api", settings))
        ui = next((s.ui_port for s in servers if isinstance(s, EmbeddedTemporal)), None)
        print(
            f"\nTenure is up: GraphiQL at http://{settings.api_host}:{settings.api_port}/graphql"
            f"\n  Temporal {settings.temporal_address}   Redis {settings.redis_url}"
            + (f"\n  Temporal UI at http://127.0.0.1:{ui}" if ui else "")
            + "\n  For `tenure` and `temporal` commands against this stack:"
            f"\n    export TEMPORAL_ADDRESS={settings.temporal_address}"
            f" REDIS_URL={settings.redis_url}"
            f"{_tokens(settings)}"
            "\n  Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stop.is_set():
            exited = [c for c in children if c.poll() is not None]
            if exited:
                log.error("a child process exited (code %s); stopping", exited[0].returncode)
                return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
        for server in reversed(servers):
            server.stop()
        log.info("stopped")


def main() -> None:
    settings = settings_or_exit("error")
    if settings.log_format is None:
        # Readable lines from every process of the stack (its children inherit it), even
        # with a key source configured, which makes the API a production one.
        settings = settings.model_copy(update={"log_format": "text"})
    configure_logging(settings, "dev")
    sys.exit(asyncio.run(run(settings)))


if __name__ == "__main__":
    main()
