"""CACHED reads beside one hostile client: the p99 of 32 clients' CACHED reads measured
alone and while one more client sends, back to back, the most expensive document the API's
request limits let through.

Every limit is taken from the settings the API runs with (api/limits.py), so the document
stays the worst allowed one when a limit changes. Each copy carries a fresh comment, so no
cache of parsed or validated documents (nor of rendered responses) spares the API any work,
as an attacker would make sure of.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from graphql import GraphQLError, GraphQLSchema, specified_rules, validate

from api.cached_reads import MAX_BODY as PLANNED_BODY
from api.limits import DocumentLimits
from api.schema import build_schema
from bench.cached import CachedReads, read_only_accounts
from bench.http import HTTPClient, HTTPError
from bench.scenarios import Bench, Load, Result
from workers.settings import Settings

NONCE_DIGITS = 12  # room for any number of requests in one run
ESCAPED = "\\u0041"  # one character of padding, lexed as an escape sequence


@dataclass(frozen=True)
class HostileDocument:
    """A GraphQL request to send over and over, each copy made new by a comment, and what
    the API must answer to it."""

    name: str
    query: str
    variables: dict[str, Any]
    expect: Callable[[int, Any], bool]

    def body(self, n: int) -> dict[str, Any]:
        return {"query": f"#{n:0{NONCE_DIGITS}d}\n{self.query}", "variables": self.variables}

    def size(self) -> int:
        """Its body's bytes as sent."""
        return len(json.dumps(self.body(0)).encode())


class _Judge:
    """Whether a document is accepted under the API's limits, judged as the API judges it:
    parsed within the token limit and checked against the other limits, then validated."""

    def __init__(self, settings: Settings) -> None:
        self.limits = DocumentLimits.from_settings(settings)
        self.schema: GraphQLSchema = build_schema(settings)._schema

    def accepts(self, query: str, variables: dict[str, Any] | None = None) -> bool:
        try:
            document = self.limits.parse(f"#{0:0{NONCE_DIGITS}d}\n{query}")
        except GraphQLError:
            return False
        if validate(self.schema, document, specified_rules):
            return False
        return self.limits.check_live_reads(document, None, variables or {}) is None


def _largest(fits: Callable[[int], bool], high: int) -> int:
    """The largest n in [0, high] for which `fits(n)`, which holds up to some n and no further."""
    low = 0
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _answered(status: int, body: Any) -> bool:
    """200 with the read-only account's balance, and no error."""
    account = (body.get("data") or {}).get("account") if status == 200 else None
    return not body.get("errors") and account is not None and account.get("balance") == 0


def overlapping_fields(settings: Settings, account_id: str, body_bytes: int) -> HostileDocument:
    """One CACHED read of an account, asking for its balance as many times over as the
    validator lets pass: every pair of fields of one response name is compared, so the cost
    grows with their square, up to graphql-core's complexity budget. The id variable (always
    sent) has a default value that is never used, of escaped characters, each lexed one by
    one, which fills the body to `body_bytes`."""
    judge = _Judge(settings)
    variables = {"id": account_id}

    def query(fields: int, pad: int = 0) -> str:
        default = f' = "{ESCAPED * pad}"' if pad else "!"
        return f"query Hostile($id: ID{default}) {{ account(id: $id) {{ {'balance ' * fields}}} }}"

    fields = _largest(lambda n: judge.accepts(query(n), variables), settings.max_tokens)
    unpadded = HostileDocument("", query(fields), variables, _answered).size()
    escaped = len(json.dumps(ESCAPED)) - 2  # one character of padding, as sent
    pad = max(0, (body_bytes - unpadded) // escaped - 1)
    document = HostileDocument(
        f"{fields} overlapping fields, {body_bytes // 1024} KiB",
        query(fields, pad),
        variables,
        _answered,
    )
    if not judge.accepts(document.query, variables) or document.size() > body_bytes:
        raise RuntimeError(f"the API would refuse the hostile document {document.name!r}")
    return document


def worst(settings: Settings, account_id: str) -> HostileDocument:
    """The most expensive document the limits allow, of those tried on a 2-core machine
    (mean time to answer one, alone beside 32 readers; the readers' throughput beside it):

    - the overlapping fields alone, 6 KiB: 280-295 ms; 106-115 reads/s;
    - padded to the 64 KiB below which the rendered-read planner (api/cached_reads.py)
      parses and validates a document before Strawberry does it again: 310-350 ms; 89-100/s;
    - padded to the body limit, which the planner skips, so it is validated once:
      165-175 ms; 177-194/s;
    - 19 reads of entities that do not exist (5 LIVE, the rest CACHED reads that miss the
      cache, and checkout reads: all the Temporal queries one request can make): 100-105 ms,
      spent waiting on Temporal rather than holding the API's event loop; 900-1,080/s, and
      a read p99 of 30-80 ms against 300-700 ms beside the overlapping fields.

    So: the overlapping fields, padded to what the planner still reads. Each copy is validated
    twice, and each validation holds the API's event loop for its whole length."""
    return overlapping_fields(settings, account_id, min(PLANNED_BODY, settings.max_body_bytes))


@dataclass
class HostileClient:
    """One client sending `document` back to back while `running`, and what came back."""

    http: HTTPClient
    document: HostileDocument
    sent: int = 0
    unexpected: int = 0
    first_unexpected: str | None = None
    latencies: list[float] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(self._send_until(stop))
        await asyncio.sleep(0)  # its first request is on its way before the clock starts
        try:
            yield
        finally:
            # Never cancelled mid-request: its connection would be left half-read.
            stop.set()
            await task

    async def _send_until(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            started = loop.time()
            try:
                status, body = await self.http.request(
                    "POST", "/graphql", self.document.body(self.sent)
                )
            except HTTPError as exc:
                status, body = 0, str(exc)
            self.latencies.append(loop.time() - started)
            self.sent += 1
            if not isinstance(body, dict) or not self.document.expect(status, body):
                self.unexpected += 1
                self.first_unexpected = self.first_unexpected or f"{status}: {body}"[:300]

    def details(self) -> dict[str, Any]:
        mean = sum(self.latencies) / len(self.latencies) if self.latencies else 0.0
        return {
            "document": self.document.name,
            "document_bytes": self.document.size(),
            "requests": self.sent,
            "mean_ms": round(1000 * mean, 1),
        }


async def hostile_reads(bench: Bench) -> list[Result]:
    """CACHED reads from the scale's clients alone, then beside one hostile client, in
    alternating slices."""
    accounts = await read_only_accounts(bench, "h")
    alone_reads, beside_reads = CachedReads(bench.gql, accounts), CachedReads(bench.gql, accounts)
    await alone_reads.warm_up(bench)
    settings = bench.stack.settings
    http = HTTPClient(settings.api_host, settings.api_port, 1)
    try:
        hostile = HostileClient(http, worst(settings, accounts[0]))
        alone = Load(alone_reads, bench.scale.reads, bench.stack.window(bench.stack.worker))
        beside = Load(
            beside_reads,
            bench.scale.reads,
            bench.stack.window(bench.stack.worker),
            beside=hostile.running,
        )
        await bench.alternate([alone, beside])
    finally:
        await http.aclose()
    problems = beside_reads.problems()
    if hostile.unexpected:
        problems.append(
            f"{hostile.unexpected} of {hostile.sent} hostile requests were not answered as "
            f"expected, first: {hostile.first_unexpected}"
        )
    return [
        Result(
            "cached_reads_alone",
            "GraphQL reads, CACHED, alone",
            "reads",
            alone.measured,
            window=alone.window,
            problems=alone_reads.problems(),
        ),
        Result(
            "cached_reads_hostile",
            "GraphQL reads, CACHED, hostile beside",
            "reads",
            beside.measured,
            baseline="cached_reads_alone",
            window=beside.window,
            problems=problems,
            details={
                "hostile": hostile.details(),
                "p99_ms_by_round": {
                    "alone": [round(ms, 1) for ms in alone.measured.slice_p99_ms],
                    "beside": [round(ms, 1) for ms in beside.measured.slice_p99_ms],
                },
            },
        ),
    ]
