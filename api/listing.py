"""Lists and counts of entities from the listing index (workers/index.py): Relay-style
connections with keyset cursors, and counts per status. Each type's fields here are a thin
binding of its listing declaration (`EntityType.listing`) to its filter input."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Generic, TypeVar

import strawberry

from api.accounts import Account
from api.authorization import Forbidden
from api.carts import Cart
from api.context import Info
from api.gateway import EntityRead, Source
from api.inventory import InventoryItem
from api.read_plans import listing_field
from api.response_size import bounded
from entities.account import AccountStatus
from entities.cart import CartStatus
from entities.errors import ErrorCode, TenureError
from entities.runtime.listing import MAX_TEXT_LENGTH, searchable
from entities.runtime.policy import READ, Role
from workers.cache import CachedSnapshot, CacheUnavailable, SnapshotCache
from workers.failures import redis_unavailable
from workers.index import STATUS
from workers.listing import EntityIndex, ListFilter, Order

N = TypeVar("N")

DEFAULT_PAGE = 20
MAX_PAGE = 100
MAX_STATUSES = 64

strawberry.enum(
    Order,
    name="ListOrder",
    description="UPDATED_DESC: last updated first. ID: by id.",
)


@strawberry.type(description="Where a page is in its list.")
class PageInfo:
    has_next_page: bool
    has_previous_page: bool = strawberry.field(
        description="Always false: lists are read forwards, from a cursor."
    )
    start_cursor: str | None
    end_cursor: str | None = strawberry.field(
        description="Where the next page starts. When a sparse filter ends a page early, "
        "it is past the last edge: after everything that was looked at."
    )


@strawberry.type
class Edge(Generic[N]):
    cursor: str
    node: N


@strawberry.type
class Connection(Generic[N]):
    edges: list[Edge[N]] = bounded(MAX_PAGE, paged=True)
    page_info: PageInfo
    total_count: int | None = strawberry.field(
        description="How many the whole filtered list holds; null when it cannot be counted "
        "cheaply, which each list's description says: for entities, a filter the index does "
        "not count over more than 500 of them; for bulk commands, a status only each one knows."
    )

    @classmethod
    def forward(
        cls, edges: list[Edge[N]], has_next: bool, end_cursor: str | None, total: int | None
    ) -> Connection[N]:
        """A page of a list read forwards from a cursor, as every list here is."""
        return cls(
            edges=edges,
            page_info=PageInfo(
                has_next_page=has_next,
                has_previous_page=False,
                start_cursor=edges[0].cursor if edges else None,
                end_cursor=end_cursor,
            ),
            total_count=total,
        )


@strawberry.type
class StatusCount:
    status: str
    count: int


@strawberry.type(description="How many entities of a type there are, in each status.")
class EntityStats:
    by_status: list[StatusCount] = bounded(
        MAX_STATUSES, description="Each status with at least one entity in it."
    )
    total: int


@strawberry.input
class AccountFilter:
    status: list[AccountStatus] | None = None
    updated_after: datetime | None = None
    updated_before: datetime | None = None
    text: str | None = strawberry.field(
        default=None, description="A prefix of the owner's name, the email or the id."
    )
    closed: bool | None = strawberry.field(
        default=None, description="false leaves closed accounts out; true shows only them."
    )


@strawberry.input
class CartFilter:
    status: list[CartStatus] | None = None
    account_id: strawberry.ID | None = None
    updated_after: datetime | None = None
    updated_before: datetime | None = None
    closed: bool | None = strawberry.field(
        default=None, description="false leaves checked-out carts out; true shows only them."
    )


@strawberry.input
class InventoryItemFilter:
    low_stock: int | None = strawberry.field(
        default=None, description="Only items with fewer than this many available."
    )
    text: str | None = strawberry.field(default=None, description="A prefix of the name or SKU.")
    updated_after: datetime | None = None
    updated_before: datetime | None = None


@dataclass(frozen=True)
class _Cursor:
    order: Order
    key: str

    def encode(self) -> str:
        document = json.dumps([self.order.value, self.key], separators=(",", ":"))
        return base64.urlsafe_b64encode(document.encode()).decode()

    @classmethod
    def decode(cls, cursor: str, order: Order) -> _Cursor:
        try:
            if len(cursor) > 512:
                raise ValueError
            order_name, key = json.loads(base64.urlsafe_b64decode(cursor.encode()))
            if order_name != order.value or not isinstance(key, str):
                raise ValueError
            key.encode()  # a lone surrogate (`\ud800` in its JSON) is no key Redis holds
        except (ValueError, TypeError, binascii.Error):
            raise TenureError(
                ErrorCode.INVALID_INPUT, "after: not a cursor of this list in this order"
            ) from None
        return cls(order, key)


def _page_size(first: int) -> int:
    if not 0 <= first <= MAX_PAGE:
        raise TenureError(ErrorCode.INVALID_INPUT, f"first: from 0 to {MAX_PAGE}")
    return first


def _text(text: str | None) -> str | None:
    if text is None or not text.strip():
        return None
    if len(text) > MAX_TEXT_LENGTH:
        raise TenureError(ErrorCode.INVALID_INPUT, f"text: at most {MAX_TEXT_LENGTH} characters")
    return searchable(text.strip())


def _values(chosen: list[AccountStatus] | list[CartStatus] | None) -> list[str] | None:
    """The statuses a filter allows; an empty list allows none."""
    return None if chosen is None else [status.value for status in chosen]


def _tags(**given: Iterable[str] | None) -> dict[str, frozenset[str]]:
    return {name: frozenset(values) for name, values in given.items() if values is not None}


def _scoped(info: Info, entity_type: str, where: ListFilter) -> ListFilter:
    """`where` narrowed to what the caller may read: admins and services by the policy (a
    read of the type), customers to the entities they own, FORBIDDEN when a customer names
    an account not theirs or the type's list cannot tell whose an entity is."""
    principal = info.context.principal
    entity = info.context.gateway.entity(entity_type)
    policy = entity.policy
    if not policy.allows(principal, entity_type, READ, owned=True):
        raise Forbidden()
    if principal.role is not Role.CUSTOMER or policy.owner is None:
        return where
    owned_by, own = entity.listed.owned_by, principal.accounts
    if owned_by == "id":
        if where.ids is not None and not where.ids <= own:
            raise Forbidden()
        return ListFilter(**{**where.__dict__, "ids": where.ids or own})
    if owned_by is not None:
        asked = where.tags.get(owned_by)
        if asked is not None and not asked <= own:
            raise Forbidden()
        return ListFilter(**{**where.__dict__, "tags": {**where.tags, owned_by: asked or own}})
    raise Forbidden()


async def list_entities(
    info: Info,
    entity_type: str,
    where: ListFilter,
    first: int,
    after: str | None,
    order: Order,
    render: Callable[[EntityRead], N],
) -> Connection[N]:
    """One page of the type's entities that the caller may read, rendered from their
    cached snapshots, read in one batch."""
    first = _page_size(first)
    resume = _Cursor.decode(after, order).key if after is not None else None
    where = _scoped(info, entity_type, where)
    cache = info.context.gateway.cache
    try:
        page = await EntityIndex.of(cache).page(entity_type, where, order, first, resume)
        # Reads of one loop turn go to Redis as one pipeline (workers/read_batching.py).
        hits = await asyncio.gather(*(cache.get(entity_type, i) for i in page.ids))
    except CacheUnavailable as exc:
        raise redis_unavailable("the entity index", exc) from exc
    edges = [
        Edge(
            cursor=_Cursor(order, key).encode(),
            node=render(
                EntityRead(
                    hit.snapshot, Source.CACHE, stale=hit.stuck is not None, cached_at=hit.cached_at
                )
            ),
        )
        for key, entity_id, hit in zip(page.keys, page.ids, hits, strict=True)
        if hit is not None and _still(cache, where, entity_id, hit)
    ]
    end_cursor = _Cursor(order, page.end_key).encode() if page.end_key else None
    total = page.total
    if total is not None and after is None and not page.has_next:
        total = len(edges)  # the whole list is this page: as it shows it
    return Connection.forward(edges, page.has_next, end_cursor, total)


def _still(cache: SnapshotCache, where: ListFilter, entity_id: str, hit: CachedSnapshot) -> bool:
    """Whether the entity, as its snapshot read after the index, exists and is still one
    the filter lists: written in between, it may have left it (a SUSPENDED page showed rows
    ACTIVE by then, hundreds in a probe's 25 s of suspensions and reactivations). One with
    no state has no entry."""
    entry = cache.stored_entry(hit.snapshot)
    return entry is not None and where.admits(entity_id, entry)


async def entity_stats(info: Info, entity_type: str) -> EntityStats:
    """Counts per status; for whoever may read every entity of the type."""
    principal = info.context.principal
    policy = info.context.gateway.entity(entity_type).policy
    scoped = principal.role is Role.CUSTOMER and policy.owner is not None
    if scoped or not policy.allows(principal, entity_type, READ, owned=True):
        raise Forbidden()
    try:
        by_status, total = await EntityIndex.of(info.context.gateway.cache).counts(entity_type)
    except CacheUnavailable as exc:
        raise redis_unavailable("the entity index", exc) from exc
    return EntityStats(
        by_status=[StatusCount(status=s, count=n) for s, n in by_status.items()], total=total
    )


FIRST = strawberry.argument(description=f"At most {MAX_PAGE}; {DEFAULT_PAGE} when not given.")
After = Annotated[
    str | None,
    strawberry.argument(
        description="A page's endCursor: the page after it. The first page when not given."
    ),
]


@strawberry.type
class ListingQuery:
    @strawberry.field(description="Accounts, newest update first unless ordered by id.")
    async def accounts(
        self,
        info: Info,
        where: Annotated[AccountFilter | None, strawberry.argument(name="filter")] = None,
        first: Annotated[int, FIRST] = DEFAULT_PAGE,
        after: After = None,
        order_by: Order = Order.UPDATED_DESC,
    ) -> Connection[Account] | None:
        f = where or AccountFilter()
        found = ListFilter(
            tags=_tags(**{STATUS: _values(f.status)}),
            updated_after=f.updated_after,
            updated_before=f.updated_before,
            text=_text(f.text),
            closed=f.closed,
        )
        return await list_entities(
            info, "account", found, first, after, order_by, Account.from_read
        )

    @strawberry.field(description="Carts, newest update first unless ordered by id.")
    async def carts(
        self,
        info: Info,
        where: Annotated[CartFilter | None, strawberry.argument(name="filter")] = None,
        first: Annotated[int, FIRST] = DEFAULT_PAGE,
        after: After = None,
        order_by: Order = Order.UPDATED_DESC,
    ) -> Connection[Cart] | None:
        f = where or CartFilter()
        found = ListFilter(
            tags=_tags(
                **{STATUS: _values(f.status)},
                account_id=[f.account_id] if f.account_id is not None else None,
            ),
            updated_after=f.updated_after,
            updated_before=f.updated_before,
            closed=f.closed,
        )
        return await list_entities(info, "cart", found, first, after, order_by, Cart.from_read)

    @strawberry.field(description="Inventory items, newest update first unless ordered by id.")
    async def inventory_items(
        self,
        info: Info,
        where: Annotated[InventoryItemFilter | None, strawberry.argument(name="filter")] = None,
        first: Annotated[int, FIRST] = DEFAULT_PAGE,
        after: After = None,
        order_by: Order = Order.UPDATED_DESC,
    ) -> Connection[InventoryItem] | None:
        f = where or InventoryItemFilter()
        found = ListFilter(
            updated_after=f.updated_after,
            updated_before=f.updated_before,
            text=_text(f.text),
            below={"available": f.low_stock} if f.low_stock is not None else {},
        )
        return await list_entities(
            info, "inventory", found, first, after, order_by, InventoryItem.from_read
        )

    @strawberry.field(description="How many accounts are in each status.")
    async def account_stats(self, info: Info) -> EntityStats | None:
        return await entity_stats(info, "account")

    @strawberry.field(description="How many carts are in each status.")
    async def cart_stats(self, info: Info) -> EntityStats | None:
        return await entity_stats(info, "cart")

    @strawberry.field(description="How many inventory items there are (they have no status).")
    async def inventory_stats(self, info: Info) -> EntityStats | None:
        return await entity_stats(info, "inventory")


# Replayed while the index stands (api/cached_reads.py), to callers who see every entity: a
# list filtered by status (or a cart's account) while those values' generations stand.
listing_field("accounts", "account", tags={"status": STATUS})
listing_field("carts", "cart", tags={"accountId": "account_id", "status": STATUS})
listing_field("inventoryItems", "inventory")
listing_field("accountStats", "account")
listing_field("cartStats", "cart")
listing_field("inventoryStats", "inventory")
