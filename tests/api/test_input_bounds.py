"""Input a person could not have meant is refused with INVALID_INPUT and stores nothing."""

from __future__ import annotations

import pytest

from tests.conftest import GraphQLClient, new_id

OPEN = """mutation($id: ID, $name: String!) { openAccount(id: $id, ownerName: $name,
  email: "a@b.cc", wait: true) { accountId } }"""
READ = "query($id: ID!) { account(id: $id, consistency: LIVE) { ownerName } }"


@pytest.mark.parametrize(
    "name", ["Ada\x00", "Ada\nLovelace", "\x1b[31mAda", "", "x" * 201, "Ada\u202egnp.exe"]
)
async def test_names_with_control_characters_or_out_of_bounds_are_refused(
    gql: GraphQLClient, name: str
) -> None:
    account_id = new_id()
    assert await gql.error_code(OPEN, id=account_id, name=name) == "INVALID_INPUT"
    assert (await gql.data(READ, id=account_id))["account"] is None


async def test_a_refused_field_is_named_as_the_mutation_names_it(gql: GraphQLClient) -> None:
    body = await gql(OPEN, id=new_id(), name="Ada\x00")
    message = body["errors"][0]["message"]
    assert message.startswith("ownerName: ") and "owner_name" not in message


async def test_an_empty_id_is_refused_not_replaced_by_a_random_one(gql: GraphQLClient) -> None:
    assert await gql.error_code(OPEN, id="", name="Ada") == "INVALID_INPUT"


async def test_a_missing_id_is_made_up(gql: GraphQLClient) -> None:
    made = await gql.data(OPEN, id=None, name="Ada")
    assert made["openAccount"]["accountId"]


async def test_a_price_is_at_least_one_and_the_cart_keeps_nothing_refused(
    gql: GraphQLClient,
) -> None:
    account_id = new_id()
    await gql.data(OPEN, id=account_id, name="Ada")
    await gql.data(
        "mutation($id: ID!) { verifyAccount(id: $id, wait: true) { status } }", id=account_id
    )
    cart = await gql.data(
        "mutation($a: ID!) { createCart(accountId: $a, wait: true) { cartId } }", a=account_id
    )
    cart_id = cart["createCart"]["cartId"]
    add = """mutation($c: ID!, $p: Long!) { addCartItem(cartId: $c, sku: "pot", quantity: 1,
        unitPrice: $p, wait: true) { status } }"""
    body = await gql(add, c=cart_id, p=0)
    assert body["errors"][0]["extensions"]["code"] == "INVALID_INPUT"
    assert "unitPrice" in body["errors"][0]["message"]
    lines = await gql.data(
        "query($c: ID!) { cart(id: $c, consistency: LIVE) { lines { sku } revision } }", c=cart_id
    )
    assert lines["cart"] == {"lines": [], "revision": 1}


async def test_a_refused_literal_is_not_repeated_back_at_length(gql: GraphQLClient) -> None:
    """graphql-core's message repeats a literal it refuses, indented more at each level:
    two lists 195 deep, some 850 bytes asked, came back as 42 KB."""
    deep = "[" * 195 + '"x"' + "]" * 195
    document = f"{{ a: account(id: {deep}) {{ id }} b: cart(id: {deep}) {{ id }} }}"
    response = await gql.http.post("/graphql", json={"query": document})
    body = response.json()
    assert [error["extensions"]["code"] for error in body["errors"]] == ["INVALID_INPUT"] * 2
    assert all(error["message"].startswith("ID cannot represent") for error in body["errors"])
    assert len(response.content) < 4 * len(document)
