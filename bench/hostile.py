"""CACHED reads beside one hostile client: the p99 of 32 clients' CACHED reads measured
alone and while one more client sends, as often as the API lets it, the most expensive
document the API's request limits let through.

Every limit is taken from the settings the API runs with (api/limits.py), so the document
stays the worst allowed one when a limit changes. Each copy carries a fresh comment, so no
cache of parsed or validated documents (nor of rendered responses) spares the API any work,
as an attacker would make sure of.

Everything goes to `secured_api`, which verifies tokens. The readers are admins, whom no
rate limit applies to. The hostile client is a customer reading its own cart: the caller a
public API cannot trust. Its rate limit charges an answer by its size (api/rate_limits.py),
so the worst document costs its whole burst, and it sends the next one when `Retry-After`
says it may: the most of that document the limits allow. (One that ignores `Retry-After`
gets fewer through: each early try spends the token that has just come back.) Beside the
same readers, in slices of their own, an operator (an admin) sends the same document back to
back, as no limit stops it from doing: reported, with no target, since an operator is
trusted with the API's whole capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from graphql import GraphQLError, GraphQLSchema, specified_rules, validate

from api.carts import MAX_CART_LINES
from api.limits import DocumentLimits
from api.response_size import ResponseSize
from api.schema import build_schema
from bench.cached import CachedReads, read_only_accounts
from bench.graphql import GraphQL
from bench.http import HTTPClient, HTTPError
from bench.scenarios import Bench, Load, Result
from deploy.tokens import mint
from workers.settings import Settings

NONCE_DIGITS = 12  # room for any number of requests in one run
READS_PER_SCALE_READ = 3
"""Each side reads three times the scale's reads: slices of about 2 s at default scale, where
one of the scale's would be over in well under a second, before the hostile customer's
rate limit has had a say, and with too few reads for a steady p99."""
CREATE_CART = """mutation($account: ID!, $id: ID) {
  createCart(accountId: $account, id: $id, wait: true) { cartId } }"""
ADD_LINE = """mutation($id: ID!, $sku: String!, $wait: Boolean!) {
  addCartItem(cartId: $id, sku: $sku, quantity: 1, unitPrice: 100, wait: $wait) { status } }"""


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
        self.size = ResponseSize(settings.max_response_values)

    def accepts(self, query: str, variables: dict[str, Any] | None = None) -> bool:
        try:
            document = self.limits.parse(f"#{0:0{NONCE_DIGITS}d}\n{query}")
        except GraphQLError:
            return False
        if validate(self.schema, document, specified_rules):
            return False
        if self.limits.check_live_reads(document, None, variables or {}) is not None:
            return False
        return self.size.check(self.schema, document, None, variables or {}) is None


def padded(query: str, chars: int) -> str:
    """`query` with its id variable given a default value, never used (the id is always
    sent), of as many characters as make the document, with its nonce, `chars` long."""
    bare = query.replace("$id: ID!", '$id: ID = ""', 1)
    room = chars - len(f"#{0:0{NONCE_DIGITS}d}\n") - len(bare)
    return bare.replace('$id: ID = ""', f'$id: ID = "{"A" * room}"', 1)


def overlapping_lists(settings: Settings, cart_id: str, chars: int) -> HostileDocument:
    """One cart's CACHED read, `reads` times over under one name, each asking for the
    cart's lines `lists` times over: validation compares every two of the reads and, for
    each such pair, every list of one with every list of the other, fields with fields of
    their own that graphql-core cannot wave through as it does two identical leaves. So
    the comparisons grow with the square of all the fields, within the limits on fields
    and on one name's repeats in a selection set. Padded to `chars` characters."""
    # Reads and lists are both fields with selections of their own: since the limit on
    # those repeats (`max_object_repeats`, 3), this shape is 3 reads of 3 lists at most.
    repeats = min(settings.max_field_repeats, settings.max_object_repeats)

    def comparisons(shape: tuple[int, int]) -> tuple[int, int]:
        reads, lists = shape
        pairs = reads * (reads - 1) // 2 * lists**2 + reads * lists * (lists - 1) // 2
        return pairs, reads

    reads, lists = max(
        (
            (reads, lists)
            for reads in range(1, min(settings.max_root_fields, repeats) + 1)
            for lists in range(1, repeats + 1)
            if reads + 2 * reads * lists <= settings.max_fields
        ),
        key=comparisons,
    )
    read = f"cart(id: $id) {{ {'lines { sku } ' * lists}}}"
    query = f"query Hostile($id: ID!) {{ {' '.join([read] * reads)} }}"
    document = HostileDocument(
        f"{reads} reads of a cart's lines {lists} times, {chars // 1024} KiB",
        padded(query, chars),
        {"id": cart_id},
        _full_cart,
    )
    judge = _Judge(settings)
    if not judge.accepts(document.query, document.variables):
        raise RuntimeError(f"the API would refuse the hostile document {document.name!r}")
    return document


def full_carts(settings: Settings, cart_id: str) -> HostileDocument:
    """The hostile client's cart, full, read under as many aliases as the response-size
    limit lets through with every field of every line: values to execute, each a resolver
    call on the event loop the readers share, where the document itself costs nothing to
    parse or validate."""
    line = "lines { sku quantity unitPrice lineTotal }"
    values = 1 + 1 + MAX_CART_LINES * 4
    reads = min(settings.max_response_values // values, settings.max_aliases + 1)
    query = (
        "query Hostile($id: ID!) { "
        + " ".join(f"c{i}: cart(id: $id) {{ {line} }}" for i in range(reads))
        + " }"
    )
    document = HostileDocument(
        f"{reads} reads of a cart of {MAX_CART_LINES} lines, every field",
        query,
        {"id": cart_id},
        _full_carts(reads),
    )
    if not _Judge(settings).accepts(document.query, document.variables):
        raise RuntimeError(f"the API would refuse the hostile document {document.name!r}")
    return document


def _full_carts(reads: int) -> Callable[[int, Any], bool]:
    def expect(status: int, body: Any) -> bool:
        data = (body.get("data") or {}) if status == 200 else {}
        return not body.get("errors") and all(
            len((data.get(f"c{i}") or {}).get("lines", ())) == MAX_CART_LINES for i in range(reads)
        )

    return expect


def _full_cart(status: int, body: Any) -> bool:
    """200 with the hostile client's cart, full, and no error."""
    data = (body.get("data") or {}) if status == 200 else {}
    return (
        not body.get("errors") and len((data.get("cart") or {}).get("lines", ())) == MAX_CART_LINES
    )


def worst(settings: Settings, cart_id: str) -> HostileDocument:
    """The most expensive document the limits allow, of those tried on a 2-core machine
    that other engineers' tests were sharing (limits: 16 Ki characters, 200 fields, one
    name 20 times in a selection set, 15 aliases, 20 root fields, 5 Temporal queries,
    depth 8). Each candidate ran beside 32 CACHED readers, in slices alternating with the
    readers alone, 2 to 4 passes in each of several runs that tried a few candidates in
    turn. Figures: the mean time to answer one (range over passes), then the readers' p99
    and reads/s beside it (medians over passes). The same readers alone: a p99 of 20-60 ms
    on a quiet machine, up to 600 ms when others' tests ran, and 800-2,300 reads/s.

    - one name 20 times in one selection set, aliases for the rest: at most 190 pairs to
      compare (the last limits' 707 repeats are refused now); not measured;
    - 20 `account` roots of 9 `balance` each, leaves that graphql-core compares two by two
      but settles at once when alike: 85-255 ms; 390 ms; 590/s;
    - 8 `cart` roots of 12 `lines { sku }` each (below): 1.5 KiB, so that the rendered-
      read planner parses and validates it too (twice in all) and both keep it:
      120-480 ms; 355 ms; 470/s; padded to 8 KiB, the longest they keep: 110-565 ms;
      370 ms; 420/s (both grow cheaper as a run goes on, from about 500 ms to 110-170);
      padded to 16 KiB, so that Strawberry alone validates it, once, and keeps nothing:
      210-360 ms; 375 ms; 390/s: in every run that had it, the readers' lowest reads/s,
      and their highest p99 in all runs but one (where the 8 KiB one's was higher);
    - 5 history pages of 100 commands with every field, the 11 aliases left asking the
      first for its senders again: about 8,000 fields executed on the event loop, and 5
      Temporal queries: 215-385 ms; 275 ms; 460/s (the aliases spread over the pages:
      330 ms, 410/s; padded to 16 KiB: 245 ms, 515/s); with 6 `cart` roots of 7
      `lines { sku }` in the fields left: 255-500 ms; 390 ms; 400/s;
    - 5 LIVE reads beside 10 CACHED ones: 130-280 ms, mostly waiting on Temporal; 255 ms;
      810/s;
    - the depth limit binds nothing: this schema's deepest path is 5 fields long.

    So: the overlapping lists, padded to the document limit. Since then an object field may
    repeat 3 times in a selection set (`max_object_repeats`), which cuts this shape to 3
    reads of 3 lists, and an answer may hold 5,000 values (`max_response_values`), which
    refuses the 5 history pages (5,515 values). Measured again on 2026-12-03 with the
    hostile cart full (100 lines), side by side on the same machine:

    - the overlapping lists, 3 reads of 3 lists of 100 `sku`s, 16 KiB: 33 ms each; the
      readers' p99 1.41 x alone (rounds 1.29-1.82);
    - 12 aliased reads of the full cart with every field of every line (`full_carts`,
      4,824 values, 881 bytes): 84 ms each, the readers' p99 7.20 x alone, while graphql-
      core completed each list in one go; once long lists are answered in turns
      (`api/pacing.py`), 200-230 ms each and the readers' p99 1.86 x and 1.95 x alone.

    So: the full carts, the worst by far."""
    return full_carts(settings, cart_id)


async def hostile_cart(bench: Bench, account_id: str) -> str:
    """A cart of the hostile client's own, in the cache, with as many lines as a cart holds."""
    cart_id = f"{bench.tag}-hostile-cart"
    await bench.gql.open_account(account_id, wait=True)
    await bench.gql.command(CREATE_CART, account=account_id, id=cart_id)
    for n in range(MAX_CART_LINES):
        await bench.gql.command(
            ADD_LINE, id=cart_id, sku=f"hostile-{n}", wait=n == MAX_CART_LINES - 1
        )
    return cart_id


@dataclass
class HostileClient:
    """One client sending `document` while `running`, the next as soon as the last is
    answered or, refused for its rate limit, as soon as `Retry-After` says; and what came
    back."""

    http: HTTPClient
    document: HostileDocument
    role: str
    sent: int = 0
    rate_limited: int = 0
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
            headers: dict[str, str] = {}
            try:
                status, headers, body = await self.http.exchange(
                    "POST", "/graphql", self.document.body(self.sent + self.rate_limited)
                )
            except HTTPError as exc:
                status, body = 0, str(exc)
            if status == 429 and "retry-after" in headers:
                self.rate_limited += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), float(headers["retry-after"]))
                continue
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
            "role": self.role,
            "requests": self.sent,
            "rate_limited": self.rate_limited,
            "mean_ms": round(1000 * mean, 1),
        }

    def problems(self) -> list[str]:
        if not self.unexpected:
            return []
        return [
            f"{self.unexpected} of {self.sent} hostile requests were not answered as "
            f"expected, first: {self.first_unexpected}"
        ]


async def hostile_reads(bench: Bench) -> list[Result]:
    """CACHED reads from the scale's clients alone, beside one hostile customer, and beside
    one operator sending the same document, in alternating slices."""
    stack = bench.stack
    secured = stack.secured_settings
    assert secured.auth_secret
    readers = GraphQL(stack.secured_http)
    accounts = await read_only_accounts(bench, "h")
    loads = {name: CachedReads(readers, accounts) for name in ("alone", "customer", "operator")}
    for load in loads.values():
        await load.warm_up(bench)
    account_id = f"{bench.tag}-hostile"
    document = worst(stack.settings, await hostile_cart(bench, account_id))

    def client(role: str) -> HTTPClient:
        token = mint(
            secured.auth_secret or "",
            role=role,
            sub=account_id,
            accounts=[account_id] if role == "customer" else [],
            settings=secured,
        )
        return HTTPClient(
            secured.api_host, secured.api_port, 1, headers={"Authorization": f"Bearer {token}"}
        )

    customer_http, operator_http = client("customer"), client("admin")
    try:
        customer = HostileClient(customer_http, document, "customer")
        operator = HostileClient(operator_http, document, "admin")
        reads = READS_PER_SCALE_READ * bench.scale.reads
        alone = Load(loads["alone"], reads, stack.window(stack.worker))
        beside = Load(
            loads["customer"],
            reads,
            stack.window(stack.worker),
            beside=customer.running,
        )
        beside_operator = Load(
            loads["operator"],
            reads,
            stack.window(stack.worker),
            beside=operator.running,
        )
        await bench.alternate([alone, beside, beside_operator])
    finally:
        await customer_http.aclose()
        await operator_http.aclose()
    return [
        Result(
            "cached_reads_alone",
            "GraphQL reads, CACHED, alone",
            "reads",
            alone.measured,
            window=alone.window,
            problems=loads["alone"].problems(),
        ),
        _beside(
            "cached_reads_hostile", "a hostile customer", beside, alone, loads["customer"], customer
        ),
        _beside(
            "cached_reads_hostile_operator",
            "an operator sending the same document",
            beside_operator,
            alone,
            loads["operator"],
            operator,
        ),
    ]


def _beside(
    key: str, who: str, beside: Load, alone: Load, reads: CachedReads, hostile: HostileClient
) -> Result:
    """The readers' result beside one hostile client, against their result alone."""
    return Result(
        key,
        f"GraphQL reads, CACHED, {who} beside",
        "reads",
        beside.measured,
        baseline="cached_reads_alone",
        window=beside.window,
        problems=reads.problems() + hostile.problems(),
        details={
            "hostile": hostile.details(),
            "p99_ms_by_round": {
                "alone": [round(ms, 1) for ms in alone.measured.slice_p99_ms],
                "beside": [round(ms, 1) for ms in beside.measured.slice_p99_ms],
            },
        },
    )
