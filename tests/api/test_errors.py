"""Error presentation: stable codes, and internal failures masked."""

from __future__ import annotations

from graphql import GraphQLError

from api.errors import INTERNAL_MESSAGE, present_error
from entities.errors import ErrorCode, TenureError


def test_a_domain_error_keeps_its_code_and_message() -> None:
    error = GraphQLError("x", path=["a"], original_error=TenureError(ErrorCode.NOT_FOUND, "gone"))
    assert present_error(error)["extensions"] == {"code": "NOT_FOUND"}
    assert present_error(error)["message"] == "gone"


def test_an_unexpected_exception_is_masked_as_internal() -> None:
    boom = RuntimeError("password=hunter2 at /srv/secret.py line 3")
    presented = present_error(GraphQLError(str(boom), path=["account"], original_error=boom))
    assert presented["extensions"] == {"code": "INTERNAL"}
    assert presented["message"] == INTERNAL_MESSAGE
    assert "hunter2" not in str(presented)


def test_a_validation_error_is_invalid_input() -> None:
    presented = present_error(GraphQLError("Cannot query field 'x' on type 'Query'."))
    assert presented["extensions"] == {"code": "INVALID_INPUT"}
