"""Input a person could not have meant is refused with INVALID_INPUT and stores nothing."""

from __future__ import annotations

import pytest

from tests.conftest import GraphQLClient, new_id

OPEN = """mutation($id: ID, $name: String!) { openAccount(id: $id, ownerName: $name,
  email: "a@b.cc", wait: true) { accountId } }"""
READ = "query($id: ID!) { account(id: $id, consistency: LIVE) { ownerName } }"


@pytest.mark.parametrize("name", ["Ada\x00", "Ada\nLovelace", "\x1b[31mAda", "", "x" * 201])
async def test_names_with_control_characters_or_out_of_bounds_are_refused(
    gql: GraphQLClient, name: str
) -> None:
    account_id = new_id()
    assert await gql.error_code(OPEN, id=account_id, name=name) == "INVALID_INPUT"
    assert (await gql.data(READ, id=account_id))["account"] is None


async def test_an_empty_id_is_refused_not_replaced_by_a_random_one(gql: GraphQLClient) -> None:
    assert await gql.error_code(OPEN, id="", name="Ada") == "INVALID_INPUT"


async def test_a_missing_id_is_made_up(gql: GraphQLClient) -> None:
    made = await gql.data(OPEN, id=None, name="Ada")
    assert made["openAccount"]["accountId"]
