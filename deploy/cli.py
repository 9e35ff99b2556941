"""The `tenure` console script: `tenure dev`, `tenure worker`, `tenure api`,
`tenure repair <type> <id>` for an entity that is stuck, `tenure reindex` to rebuild the
cache and the listing index from Temporal, and `tenure token` to mint a development
token."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys

from entities.errors import TenureError
from entities.runtime.policy import Role
from workers.settings import Settings

SERVERS = {"dev": "deploy.dev", "worker": "workers.__main__", "api": "api.__main__"}


async def _repair(entity_type: str, entity_id: str, force: bool) -> int:
    from workers.repair import repair
    from workers.temporal import connect_temporal

    client = await connect_temporal(Settings.from_env())
    try:
        done = await repair(client, entity_type, entity_id, force=force)
    except TenureError as exc:
        print(f"tenure repair: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 1
    print(
        f"{done.workflow_id}: reset to the task completed at event {done.reset_to_event} "
        f"of run {done.old_run_id}; new run {done.new_run_id}, "
        f"{done.commands_reapplied} commands re-applied"
    )
    return 0


class ProgressBar:
    """A progress bar on stderr, redrawn in place."""

    WIDTH = 40

    def __init__(self, label: str) -> None:
        self.label = label

    def __call__(self, done: int, total: int) -> None:
        filled = self.WIDTH * done // total if total else self.WIDTH
        bar = "#" * filled + "." * (self.WIDTH - filled)
        end = "\n" if done >= total else ""
        print(f"\r{self.label} [{bar}] {done}/{total}", end=end, file=sys.stderr, flush=True)


async def _reindex(entity_types: list[str], where: str | None, concurrency: int) -> int:
    from entities import catalog
    from workers.cache import SnapshotCache, connect_redis
    from workers.reindex import reindex
    from workers.temporal import connect_temporal

    settings = Settings.from_env()
    known = sorted(catalog.entity_types())
    unknown = set(entity_types) - set(known)
    if unknown:
        print(f"tenure reindex: no entity type {sorted(unknown)}; one of {known}", file=sys.stderr)
        return 2
    client = await connect_temporal(settings)
    redis_client = connect_redis(settings)
    try:
        done = await reindex(
            client,
            SnapshotCache(redis_client, settings.redis_prefix),
            entity_types or known,
            where=where,
            concurrency=concurrency,
            timeout=settings.live_read_timeout,
            progress=ProgressBar("reindex"),
        )
    finally:
        await redis_client.aclose()
    print(f"{done.found} entities found, {done.written} written, {len(done.failed)} unreadable")
    for workflow_id in done.failed[:20]:
        print(f"  could not read {workflow_id}", file=sys.stderr)
    return 1 if done.failed else 0


def _token(parsed: argparse.Namespace) -> int:
    from deploy.tokens import dev_secret, mint

    settings = Settings.from_env()
    if not settings.auth_secret and (settings.auth_public_key_file or settings.auth_jwks_url):
        print(
            "tenure token: tokens are signed by your identity provider here "
            "(TENURE_AUTH_PUBLIC_KEY_FILE or TENURE_AUTH_JWKS_URL is set)",
            file=sys.stderr,
        )
        return 1
    secret = settings.auth_secret or dev_secret(settings.data_dir)
    print(
        mint(
            secret,
            role=parsed.role,
            sub=parsed.sub,
            accounts=[a.strip() for a in parsed.accounts.split(",") if a.strip()],
            scopes=[scope for scope in re.split(r"[\s,]+", parsed.scopes) if scope],
            ttl_seconds=parsed.ttl,
            settings=settings,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in SERVERS and len(args) == 1:
        module = __import__(SERVERS[args[0]], fromlist=["main"])
        module.main()
        return
    parser = argparse.ArgumentParser(prog="tenure")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in SERVERS:
        commands.add_parser(name, help=f"run the {name}")
    fix = commands.add_parser(
        "repair",
        help="reset a stuck entity to its last good task, re-applying the signals after it",
        description="Uses TEMPORAL_ADDRESS and TEMPORAL_NAMESPACE.",
    )
    fix.add_argument("entity_type", help="account, cart, inventory, ...")
    fix.add_argument("entity_id")
    fix.add_argument("--force", action="store_true", help="reset even if it is not stuck")
    rebuild = commands.add_parser(
        "reindex",
        help="rebuild the cache and the listing index from Temporal (after Redis was lost)",
        description="Lists the entities through Temporal's visibility and writes each one's "
        "snapshot to Redis; never moves an entry back. Uses TEMPORAL_ADDRESS, REDIS_URL "
        "and the other settings of the worker.",
    )
    rebuild.add_argument("entity_types", nargs="*", help="account, cart, ... (all when none)")
    rebuild.add_argument(
        "--where", help="narrow Temporal's visibility query: \"TaskQueue = 'tenure'\""
    )
    rebuild.add_argument("--concurrency", type=int, default=16, help="entities read at once")
    token = commands.add_parser(
        "token",
        help="mint a token signed with TENURE_AUTH_SECRET, or else the development secret",
        description="Prints the token alone. Without TENURE_AUTH_SECRET, signs with the "
        "secret `make dev` keeps in TENURE_DATA_DIR (.data).",
    )
    token.add_argument("--role", required=True, choices=[r.value for r in Role])
    token.add_argument("--sub", required=True, help="who the token names")
    token.add_argument("--accounts", default="", help="accounts a customer owns: a,b")
    token.add_argument("--scopes", default="", help="a service's scopes: 'account:deposit read:*'")
    token.add_argument("--ttl", type=int, default=3600, help="seconds it is valid (3600)")
    parsed = parser.parse_args(args)
    if parsed.command == "token":
        sys.exit(_token(parsed))
    if parsed.command == "reindex":
        sys.exit(
            asyncio.run(_reindex(parsed.entity_types, parsed.where, max(1, parsed.concurrency)))
        )
    if parsed.command == "repair":
        sys.exit(asyncio.run(_repair(parsed.entity_type, parsed.entity_id, parsed.force)))
    parser.error(f"{parsed.command} takes no arguments")
