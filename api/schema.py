"""The GraphQL schema: every entity binding's queries and mutations merged into one, with
the request limits and introspection the settings choose."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import strawberry
from graphql import GraphQLError, GraphQLResolveInfoHelpers, GraphQLWrappingType
from graphql.pyutils import gather_with_cancel
from strawberry.extensions import DisableIntrospection, SchemaExtension
from strawberry.schema.config import StrawberryConfig
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext
from strawberry.tools import merge_types
from strawberry.types import ExecutionContext

from api.accounts import AccountMutation, AccountQuery
from api.bulk import BulkMutation, BulkQuery
from api.bulk_listing import BulkListQuery
from api.carts import CartMutation, CartQuery
from api.checkout_operations import CheckoutOperatorMutation, CheckoutOperatorQuery
from api.checkouts import CheckoutQuery
from api.common import SCALARS
from api.documents import CheckedDocuments, Documents
from api.errors import is_expected
from api.inventory import InventoryMutation, InventoryQuery
from api.limits import DocumentLimits, LiveReadLimit
from api.listing import ListingQuery
from api.request_context import OperationName
from api.response_size import ResponseSize, ResponseSizeLimit
from api.subscriptions import subscription_type
from api.webhook_subscribers import WebhookMutation, WebhookQuery
from workers.settings import Settings

logger = logging.getLogger("strawberry.execution")

Query = merge_types(
    "Query",
    (
        AccountQuery,
        CartQuery,
        CheckoutQuery,
        InventoryQuery,
        ListingQuery,
        BulkQuery,
        BulkListQuery,
        CheckoutOperatorQuery,
        WebhookQuery,
    ),
)
Mutation = merge_types(
    "Mutation",
    (
        AccountMutation,
        CartMutation,
        InventoryMutation,
        BulkMutation,
        CheckoutOperatorMutation,
        WebhookMutation,
    ),
)
Subscription = subscription_type(Query)


class FreedExecutionContext(StrawberryGraphQLCoreExecutionContext):
    """Strawberry's execution context, freed as soon as its request is answered.

    graphql-core hands resolvers the context's `gather` and `track` as bound methods, kept on
    the context itself: a reference cycle, through which everything a request touched (its
    Starlette request and response, Tenure's context, the resolved values) waited for the
    collector. Under load that garbage outlived the young generations and was freed in full
    passes, about 20,000 objects at once every few seconds, holding every request in
    flight for 10-25 ms. Here the helpers reach the context through a weak reference, so
    the request is freed when its last reference goes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        context = weakref.ref(self)

        def track(values: Sequence[Any]) -> None:
            # Called by resolvers this context is running, so it is alive; nothing is
            # left to track once it is gone.
            alive = context()
            if alive is not None:
                alive.track_async_work(values)

        self.async_helpers = GraphQLResolveInfoHelpers(gather=_gather, track=track)


def _gather(values: Sequence[Awaitable[Any]]) -> Awaitable[list[Any]]:
    """graphql-core's `gather_async_work`, which uses nothing of its context."""
    return gather_with_cancel(*values)


MAX_LOGGED_ERRORS = 5
"""Unexpected errors logged with their traceback per request; the rest are counted in one
line, so that one document whose every item fails cannot flood the logs."""


class TenureSchema(strawberry.Schema):
    """Logs only unexpected errors, a few per request; rejections and bad input are the
    client's to see. Answers introspection's `isOneOf` on every type."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Strawberry's resolver reads `extensions`, which a list or non-null wrapper lacks:
        # asked on `ofType` chains, it failed once per field of the schema (268 errors
        # logged for one request). Such a type is no input object: null, as graphql-core's
        # own resolver answers.
        field = self._schema.type_map["__Type"].fields["isOneOf"]  # type: ignore[attr-defined]
        strawberry_is_one_of = field.resolve

        def is_one_of(obj: Any, info: Any) -> bool | None:
            if isinstance(obj, GraphQLWrappingType):
                return None
            answer: bool = strawberry_is_one_of(obj, info)
            return answer

        field.resolve = is_one_of

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        unexpected = [error for error in errors if not is_expected(error)]
        if unexpected:
            super().process_errors(unexpected[:MAX_LOGGED_ERRORS], execution_context)
        if len(unexpected) > MAX_LOGGED_ERRORS:
            logger.error(
                "and %d more unexpected errors in the same request, not logged",
                len(unexpected) - MAX_LOGGED_ERRORS,
            )


DOCUMENT_CACHE_SIZE = 256


def introspection_enabled(settings: Settings) -> bool:
    """Whether the schema answers introspection: as configured, else in development only."""
    if settings.introspection is not None:
        return settings.introspection
    return settings.environment == "development"


def build_schema(settings: Settings) -> TenureSchema:
    """The schema with the limits and the introspection `settings` choose."""
    limits = DocumentLimits.from_settings(settings)
    documents = Documents(limits, DOCUMENT_CACHE_SIZE)
    extensions: list[Callable[[], SchemaExtension]] = [
        OperationName,
        lambda: CheckedDocuments(documents),
        lambda: LiveReadLimit(limits),
        lambda: ResponseSizeLimit(ResponseSize(settings.max_response_values)),
    ]
    if not introspection_enabled(settings):
        extensions.append(DisableIntrospection)
    return TenureSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        config=StrawberryConfig(scalar_map=SCALARS),
        extensions=extensions,
        execution_context_class=FreedExecutionContext,
    )


# Under the default settings (production: no introspection); `create_app` builds its own.
schema = build_schema(Settings())
