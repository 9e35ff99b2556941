"""Accounts opened only to be read, and CACHED reads of them that check what they return:
the common ground of the scenarios that compare the API's read path with itself."""

from __future__ import annotations

from bench.graphql import READ, GraphQL
from bench.scenarios import OPENED_REVISION, Bench, until_cached


async def read_only_accounts(bench: Bench, prefix: str) -> list[str]:
    """`scale.entities` accounts of their own, opened, verified and in the cache; nothing is
    ever deposited to them."""
    accounts = [f"{bench.tag}-{prefix}{i}" for i in range(bench.scale.entities)]
    await bench.setup(len(accounts), lambda i: bench.gql.open_account(accounts[i], wait=True))
    missing = await until_cached(bench, dict.fromkeys(accounts, OPENED_REVISION))
    if missing:
        raise RuntimeError(f"setup failed: {missing} accounts never reached the cache")
    return accounts


class CachedReads:
    """CACHED reads of read-only accounts in turn, through `gql`; `wrong` counts the reads
    not answered from the cache with the state the account was opened with, so that a
    comparison is known to have measured the cached path on both sides."""

    def __init__(self, gql: GraphQL, accounts: list[str]) -> None:
        self.gql = gql
        self.accounts = accounts
        self.wrong = 0

    async def __call__(self, i: int) -> None:
        account_id = self.accounts[i % len(self.accounts)]
        data = await self.gql(READ, id=account_id, consistency="CACHED")
        account = data["account"]
        self.wrong += (
            account is None
            or account["source"] != "CACHE"
            or account["stale"]
            or account["balance"] != 0
            or account["revision"] != OPENED_REVISION
        )

    async def warm_up(self, bench: Bench) -> None:
        """One read of each account, untimed, as a running system has made already."""
        await bench.setup(len(self.accounts), self)
        self.wrong = 0

    def problems(self) -> list[str]:
        if not self.wrong:
            return []
        return [f"{self.wrong} reads were not answered from the cache as opened"]
