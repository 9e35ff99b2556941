"""What a client developer reads in GraphiQL or a generated client: every root field says
what it does, and the arguments every entity's fields share say what they mean."""

from __future__ import annotations

from api.schema import build_schema
from workers.settings import Settings

SHARED_ARGUMENTS = {"wait", "idempotencyKey", "consistency", "first", "after"}


def test_every_root_field_and_shared_argument_is_described() -> None:
    schema = build_schema(Settings())._schema
    undescribed = []
    for root in (schema.query_type, schema.mutation_type, schema.subscription_type):
        assert root is not None
        for name, field in root.fields.items():
            if not field.description:
                undescribed.append(f"{root.name}.{name}")
            undescribed += [
                f"{root.name}.{name}({argument})"
                for argument, arg in field.args.items()
                if argument in SHARED_ARGUMENTS and not arg.description
            ]
    assert undescribed == []


def test_every_mutation_answers_null_alone_when_refused() -> None:
    """A refused mutation nulls its own field, not the whole answer (`README`)."""
    schema = build_schema(Settings())._schema
    assert schema.mutation_type is not None and schema.query_type is not None
    fields = {**schema.mutation_type.fields, **schema.query_type.fields}
    non_null = [
        name for name, field in fields.items() if field.type.__class__.__name__ == "GraphQLNonNull"
    ]
    assert non_null == []
