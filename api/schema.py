"""The GraphQL schema: every entity binding's queries and mutations merged into one, with
the request limits and introspection the settings choose."""

from __future__ import annotations

from collections.abc import Callable

import strawberry
from graphql import GraphQLError
from strawberry.extensions import DisableIntrospection, SchemaExtension
from strawberry.schema.config import StrawberryConfig
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


class TenureSchema(strawberry.Schema):
    """Logs only unexpected errors; rejections and bad input are the client's to see."""

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        unexpected = [error for error in errors if not is_expected(error)]
        if unexpected:
            super().process_errors(unexpected, execution_context)


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
    )


# Under the default settings (production: no introspection); `create_app` builds its own.
schema = build_schema(Settings())
