"""The `tenure` console script: `tenure dev`, `tenure worker`, `tenure api`,
`tenure repair <type> <id>` for an entity that is stuck, `tenure reindex` to rebuild the
cache and the listing index from Temporal, and `tenure token` to mint a development
token.

Exit status: 0 done, 1 refused or failed (one line on stderr says why), 2 a usage error."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import traceback
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any, NoReturn

from entities.errors import ErrorCode, TenureError
from entities.runtime.policy import WEBHOOK_SUBJECTS, Role
from workers.settings import MIN_SECRET_BYTES, Settings, settings_or_exit

if TYPE_CHECKING:
    from temporalio.client import Client

SERVERS = {"dev": "deploy.dev", "worker": "workers.__main__", "api": "api.__main__"}


def _unknown_types(entity_types: Iterable[str]) -> str | None:
    """Why `entity_types` are refused, or None when the catalog knows them all."""
    from entities import catalog

    known = sorted(catalog.entity_types())
    unknown = sorted(set(entity_types) - set(known))
    return f"no entity type {unknown}; one of {known}" if unknown else None


async def _connect(settings: Settings) -> Client:
    """A Temporal client for an operator's command: a setting not set, or a Temporal that
    does not answer, is a TenureError saying which."""
    from workers.temporal import connect_temporal

    try:
        return await connect_temporal(settings)
    except ValueError as exc:  # a setting missing: the message names it
        raise TenureError(ErrorCode.INVALID_INPUT, str(exc)) from exc
    except RuntimeError as exc:  # the SDK's "Failed client connect: ..."
        raise TenureError(
            ErrorCode.UNAVAILABLE, f"no Temporal at {settings.temporal_address}: {exc}"
        ) from exc


async def _repair(entity_type: str, entity_id: str, force: bool) -> int:
    from workers.repair import repair

    client = await _connect(settings_or_exit("tenure repair", 1))
    done = await repair(client, entity_type, entity_id, force=force)
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
        self.open = False  # a line drawn and not ended

    def __call__(self, done: int, total: int) -> None:
        filled = self.WIDTH * done // total if total else self.WIDTH
        bar = "#" * filled + "." * (self.WIDTH - filled)
        end = "\n" if done >= total else ""
        print(f"\r{self.label} [{bar}] {done}/{total}", end=end, file=sys.stderr, flush=True)
        self.open = not end

    def close(self) -> None:
        """End the line, when entities that could not be read left it short of its total:
        what is printed next went on the bar's line."""
        if self.open:
            print(file=sys.stderr, flush=True)
            self.open = False


async def _reindex(entity_types: list[str], where: str | None, concurrency: int) -> int:
    from entities import catalog
    from workers.cache import SnapshotCache, connect_redis
    from workers.forgetting import ended_retention
    from workers.reindex import reindex

    settings = settings_or_exit("tenure reindex", 1)
    client = await _connect(settings)
    try:
        redis_client = connect_redis(settings)
    except ValueError as exc:  # a setting missing: the message names it
        raise TenureError(ErrorCode.INVALID_INPUT, str(exc)) from exc
    bar = ProgressBar("reindex")
    try:
        done = await reindex(
            client,
            SnapshotCache(redis_client, settings.redis_prefix),
            entity_types or sorted(catalog.entity_types()),
            where=where,
            concurrency=concurrency,
            progress=bar,
            ended_retention=await ended_retention(client, settings),
        )
    finally:
        bar.close()
        await redis_client.aclose()
    print(f"{done.found} entities found, {done.written} written, {len(done.failed)} unreadable")
    for workflow_id in done.failed[:20]:
        print(f"  could not read {workflow_id}", file=sys.stderr)
    return 1 if done.failed else 0


def _run(command: str, work: Coroutine[Any, Any, int]) -> int:
    """`work`'s exit status; a failure an operator can act on (a refusal, a setting not
    set, Temporal or Redis refusing or out of reach) is one line on stderr and 1."""
    from temporalio.service import RPCError

    from workers.cache import CacheUnavailable

    try:
        return asyncio.run(work)
    except TenureError as exc:
        message = f"{exc.code.value}: {exc.message}"
    except RPCError as exc:
        message = f"Temporal answered {exc.status.name}: {exc.message}"
    except CacheUnavailable as exc:
        message = f"{ErrorCode.UNAVAILABLE.value}: Redis: {exc}"
    except KeyboardInterrupt:
        return 130
    print(f"tenure {command}: {message}", file=sys.stderr)
    return 1


def _exit_after_temporal(command: str, work: Coroutine[Any, Any, int]) -> NoReturn:
    """Run a command that uses Temporal, then end the process with its status at once.

    The client and the replayer run on the SDK's Rust core, whose threads outlive them:
    the SDK has no call that stops those threads and waits for them. Left to a normal
    exit, the interpreter finalizes while they may still take the GIL, and the process
    died with 134 (PyGILState_Release ... finalizing) or 139 in about one run of eight,
    whatever the command's own status. Nothing of ours is left to finalize once the
    command has returned, so its output is flushed and the process leaves with
    os._exit, before finalization starts."""
    try:
        status = _run(command, work)
    except Exception:
        traceback.print_exc()  # a defect, not an operator's mistake: the trace is the report
        status = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _ttl(text: str) -> int:
    """A --ttl: whole seconds above 0 (a token of 0 or fewer would be expired when minted)."""
    try:
        seconds = int(text)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds above 0")
    return seconds


def _token(parsed: argparse.Namespace) -> int:
    from deploy.tokens import mint, stored_dev_secret

    if parsed.role == Role.SERVICE.value and parsed.sub.startswith(WEBHOOK_SUBJECTS):
        # The API refuses it: a service so named would send as a provider's webhook.
        print(
            f"tenure token: a service's --sub may not begin {WEBHOOK_SUBJECTS} (inbound "
            "webhooks send as it)",
            file=sys.stderr,
        )
        return 1
    settings = settings_or_exit("tenure token", 1)
    if not settings.auth_secret and (settings.auth_public_key_file or settings.auth_jwks_url):
        print(
            "tenure token: tokens are signed by your identity provider here "
            "(TENURE_AUTH_PUBLIC_KEY_FILE or TENURE_AUTH_JWKS_URL is set)",
            file=sys.stderr,
        )
        return 1
    if settings.auth_secret and len(settings.auth_secret.encode()) < MIN_SECRET_BYTES:
        # The API refuses to start with it: a token signed so would never be accepted.
        print(
            f"tenure token: TENURE_AUTH_SECRET must be at least {MIN_SECRET_BYTES} bytes",
            file=sys.stderr,
        )
        return 1
    try:
        secret = settings.auth_secret or stored_dev_secret(settings.data_dir)
    except TenureError as exc:
        print(f"tenure token: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 1
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
    token.add_argument("--ttl", type=_ttl, default=3600, help="seconds it is valid (3600)")
    parsed = parser.parse_args(args)
    if parsed.command == "token":
        sys.exit(_token(parsed))
    if parsed.command in ("reindex", "repair"):
        # Checked before connecting, so the answer does not wait on Temporal.
        types = parsed.entity_types if parsed.command == "reindex" else [parsed.entity_type]
        refusal = _unknown_types(types)
        if refusal:
            print(f"tenure {parsed.command}: {refusal}", file=sys.stderr)
            sys.exit(2)
    if parsed.command == "reindex":
        concurrency = max(1, parsed.concurrency)
        _exit_after_temporal("reindex", _reindex(parsed.entity_types, parsed.where, concurrency))
    if parsed.command == "repair":
        _exit_after_temporal("repair", _repair(parsed.entity_type, parsed.entity_id, parsed.force))
    parser.error(f"{parsed.command} takes no arguments")


if __name__ == "__main__":
    main()
