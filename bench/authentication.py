"""What authentication costs a read: CACHED reads from the scale's clients to the API that
lets every caller in, against the same reads to the same API verifying a bearer token (HS256)
on each request, in alternating slices. Both callers are admins, whom no rate limit applies
to, so verifying the token is all that differs (bench/stack.py)."""

from __future__ import annotations

from bench.cached import CachedReads, read_only_accounts
from bench.graphql import GraphQL
from bench.scenarios import Bench, Load, Result


async def authenticated_reads(bench: Bench) -> list[Result]:
    """CACHED reads without a token, then with one, of the same accounts."""
    accounts = await read_only_accounts(bench, "t")
    open_reads = CachedReads(bench.gql, accounts)
    token_reads = CachedReads(GraphQL(bench.stack.secured_http), accounts)
    # Each API keeps rendered responses of its own: warm both.
    await open_reads.warm_up(bench)
    await token_reads.warm_up(bench)
    count = bench.scale.reads
    without = Load(open_reads, count, bench.stack.window(bench.stack.worker))
    verified = Load(token_reads, count, bench.stack.window(bench.stack.worker))
    await bench.alternate([without, verified])
    return [
        Result(
            "cached_reads_open",
            "GraphQL reads, CACHED, no token",
            "reads",
            without.measured,
            window=without.window,
            problems=open_reads.problems(),
        ),
        Result(
            "cached_reads_token",
            "GraphQL reads, CACHED, token verified",
            "reads",
            verified.measured,
            baseline="cached_reads_open",
            window=verified.window,
            problems=token_reads.problems(),
        ),
    ]
