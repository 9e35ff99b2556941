"""What a request leaves behind once it is answered: nothing the garbage collector must find.

Objects held only by a reference cycle wait for a collector pass; under load that garbage
outlives the young generations and is freed in full passes that stop every request in
flight (10-25 ms each, every few seconds, measured in `make bench`'s CACHED reads). A request
through Strawberry must be freed by reference counting as soon as it is answered."""

from __future__ import annotations

import gc

from api.context import TenureContext
from tests.api.test_accounts_api import OPEN, open_active, read_account
from tests.conftest import GraphQLClient, new_id


def _alive(kind: type) -> int:
    # By exact type: isinstance asks each object its class, which a workflow sandbox's
    # proxies left by other tests refuse.
    return sum(type(o) is kind for o in gc.get_objects())


async def test_mutations_and_reads_leave_no_request_for_the_collector(gql: GraphQLClient) -> None:
    account_id = new_id()
    await open_active(gql, account_id)  # the documents parsed and kept, as a running API has
    gc.collect()
    gc.disable()  # what the requests leave is what reference counting left
    try:
        before = _alive(TenureContext)
        await gql.data(OPEN, id=new_id())
        for consistency in ("LIVE", "CACHED"):
            assert (await read_account(gql, account_id, consistency))["balance"] == 0
        assert _alive(TenureContext) == before
    finally:
        gc.enable()
