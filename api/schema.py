"""The GraphQL schema: every entity binding's queries and mutations merged into one."""

from __future__ import annotations

import strawberry
from graphql import GraphQLError
from strawberry.extensions import ParserCache, ValidationCache
from strawberry.schema.config import StrawberryConfig
from strawberry.tools import merge_types
from strawberry.types import ExecutionContext

from api.accounts import AccountMutation, AccountQuery
from api.carts import CartMutation, CartQuery
from api.checkouts import CheckoutQuery
from api.common import SCALARS
from api.errors import is_expected
from api.inventory import InventoryMutation, InventoryQuery

Query = merge_types("Query", (AccountQuery, CartQuery, CheckoutQuery, InventoryQuery))
Mutation = merge_types("Mutation", (AccountMutation, CartMutation, InventoryMutation))


class TenureSchema(strawberry.Schema):
    """Logs only unexpected errors; rejections and bad input are the client's to see."""

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        unexpected = [error for error in errors if not is_expected(error)]
        if unexpected:
            super().process_errors(unexpected, execution_context)


# Clients send the same few documents over and over: parse and validate each once.
DOCUMENT_CACHE_SIZE = 256

schema = TenureSchema(
    query=Query,
    mutation=Mutation,
    config=StrawberryConfig(scalar_map=SCALARS),
    extensions=[
        lambda: ParserCache(maxsize=DOCUMENT_CACHE_SIZE),
        lambda: ValidationCache(maxsize=DOCUMENT_CACHE_SIZE),
    ],
)
